//! `hearth-kernel`: `install [--user|--prefix P]` writes the kernelspec; `run CONNECTION_FILE`
//! serves Jupyter. evcxr re-executes this binary as its cell runner, so its hook runs first.

use std::io::Write;

fn usage() -> ! {
    let _ = writeln!(
        std::io::stderr(),
        "usage: hearth-kernel install [--user | --prefix PATH]\n       hearth-kernel run CONNECTION_FILE"
    );
    std::process::exit(2)
}

fn main() {
    evcxr::runtime_hook();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result: Result<(), String> = match args.first().map(String::as_str) {
        Some("install") => {
            let prefix = match (args.get(1).map(String::as_str), args.get(2)) {
                (None | Some("--user"), _) => None,
                (Some("--prefix"), Some(p)) => Some(std::path::PathBuf::from(p)),
                _ => usage(),
            };
            hearth_kernel::install::install(prefix.as_deref()).map(|dir| {
                let _ = writeln!(std::io::stdout(), "installed the hearth kernelspec in {}", dir.display());
            })
        }
        Some("run") => {
            let Some(file) = args.get(1) else { usage() };
            // cells' displays come to us as marker lines on the child's stderr
            std::env::set_var("HEARTH_DISPLAY", "1");
            let tmp = hearth_cells::evaluator::use_private_tmpdir().ok();
            // Jupyter sends interrupt_request (interrupt_mode: message); a stray SIGINT is ignored.
            // SAFETY: setting SIGINT to SIG_IGN installs no handler code.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(hearth_kernel::jupyter::run(std::path::Path::new(file))).map_err(|e| e.to_string())
                })
                .inspect(|()| {
                    if let Some(dir) = &tmp {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                })
        }
        _ => usage(),
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "hearth-kernel: {e}");
        std::process::exit(1);
    }
}
