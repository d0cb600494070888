//! `hearth`: the terminal REPL. Every cell is Rust (evcxr) with `session` connected to run `main`
//! of the warm model; magics answer at once; plots, sample tables and progress bars are drawn for
//! the terminal. `hearth run script.rs` (or piped input) runs cells without a prompt, and
//! `hearth serve` is the session server itself (what `hearth-server` runs).
//!
//! The same binary is also evcxr's cell process and rustc wrapper (evcxr re-executes it), so
//! `main` hands over to evcxr before anything else.

mod cells;
mod front;
mod image;
mod render;

use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

const AFTER_HELP: &str = "\
Every cell is Rust, evaluated by evcxr with `session` (a hearth::Session on run `main`) in scope.
Magics (instant, no compile): :status :runs :sample <prompt> :plot [all] :save [name] :resume [name] :help;
:quit (or Ctrl-D) ends the REPL after the server has saved every run. Ctrl-C while a cell runs
cancels the server's operation (variables kept); a second Ctrl-C restarts the cell process.
History: $HEARTH_HOME/history. Plots on a terminal without an image protocol: $HEARTH_HOME/plots/.

Environment: HEARTH_HOME (default: $XDG_DATA_HOME/hearth or ~/.local/share/hearth), HEARTH_URL + HEARTH_TOKEN
(attach to a remote server), HEARTH_SERVER_BIN (the server program), NO_COLOR.";

#[derive(Parser, Debug)]
#[command(name = "hearth", version, about = "Train a warm language model one Rust cell at a time.", after_help = AFTER_HELP)]
struct Options {
    #[command(subcommand)]
    command: Option<Command>,
    /// The model a new server loads: a preset (tiny, smollm2-135m-shape), a local Hugging Face
    /// folder or .gguf file, owner/name from the hub, or owner/name:file.gguf; a server already
    /// running for this home must have it.
    /// Default: the running server's, else the last server's of this home, else tiny.
    #[arg(long, global = true)]
    model: Option<String>,
    /// Attach to a running server at this URL instead of the one of $HEARTH_HOME (token from
    /// --token-file or HEARTH_TOKEN).
    #[arg(long, value_name = "URL", global = true)]
    attach: Option<String>,
    /// The bearer token's file, for --attach.
    #[arg(long, value_name = "FILE", requires = "attach", global = true)]
    token_file: Option<PathBuf>,
    /// A server this starts resumes every run from its newest checkpoint (the default when the
    /// last server stopped by itself).
    #[arg(long, conflicts_with = "no_resume", global = true)]
    resume: bool,
    /// A server this starts begins with no runs.
    #[arg(long, global = true)]
    no_resume: bool,
    /// The hearth home: session file, runs, checkpoints, history, plots [env: HEARTH_HOME].
    #[arg(long, value_name = "DIR", global = true)]
    home: Option<PathBuf>,
    /// Inline images: auto-detect (kitty, iTerm2, sixel; none on a pipe), or force one.
    #[arg(long, value_enum, value_name = "PROTOCOL", global = true)]
    images: Option<image::Protocol>,
    /// Colours: auto (a terminal, and NO_COLOR unset), always or never.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    color: ColorChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a script's cells without a prompt (`-` reads stdin); stops at the first failing cell
    /// with exit code 1. Cells end at blank lines once complete; `:magic` lines are cells.
    Run {
        /// The script (Rust cells and magics).
        script: PathBuf,
    },
    /// Be the session server (`hearth-server`'s flags; `hearth serve --help` lists them).
    Serve {
        /// Passed to the server.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() {
    let launched = std::time::Instant::now();
    // The cell process is this binary re-executed and inherits an ignored SIGINT: Ctrl-C is the
    // REPL's to interpret (cancel the server's operation first), not a kill of the cell's state.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    evcxr::runtime_hook();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "serve") {
        // SAFETY: back to the default disposition; the server installs its own handler.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
        let server_args = std::iter::once(std::ffi::OsString::from("hearth serve")).chain(args.into_iter().skip(2));
        std::process::exit(hearth_server::main(server_args));
    }
    let opts = Options::parse();
    std::process::exit(repl(opts, launched));
}

fn repl(opts: Options, launched: std::time::Instant) -> i32 {
    let fail = |msg: String| {
        let _ = writeln!(std::io::stderr(), "hearth: {msg}");
        2
    };
    // The cell process inherits these, so its `Session::connect()` finds the same server.
    if let Some(home) = &opts.home {
        std::env::set_var("HEARTH_HOME", home);
    }
    std::env::set_var("HEARTH_DISPLAY", "1");
    // evcxr builds cells in <temp>/hearth-evcxr/<pid>; folders of processes gone are swept
    let tmp = hearth_cells::evaluator::use_private_tmpdir().ok();
    let connect = match &opts.attach {
        Some(url) => {
            let token = match &opts.token_file {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => t.trim().to_string(),
                    Err(e) => return fail(format!("{}: {e}", f.display())),
                },
                None => match std::env::var("HEARTH_TOKEN") {
                    Ok(t) if !t.is_empty() => t,
                    _ => return fail("--attach needs --token-file or HEARTH_TOKEN".into()),
                },
            };
            std::env::set_var("HEARTH_URL", url);
            std::env::set_var("HEARTH_TOKEN", &token);
            front::Connect::Attach { url: url.clone(), token }
        }
        None => {
            std::env::remove_var("HEARTH_URL");
            let resume = if opts.resume {
                Some(true)
            } else if opts.no_resume {
                Some(false)
            } else {
                None
            };
            front::Connect::Home { model: opts.model.clone(), resume }
        }
    };
    let home = hearth::home_dir();
    // read the script before anything starts, so a missing file changes nothing
    let script = match &opts.command {
        Some(Command::Run { script }) if script.as_os_str() == "-" => Some(read_stdin()),
        Some(Command::Run { script }) => match std::fs::read_to_string(script) {
            Ok(s) => Some(Ok(s)),
            Err(e) => return fail(format!("{}: {e}", script.display())),
        },
        _ if !std::io::stdin().is_terminal() => Some(read_stdin()),
        _ => None,
    };
    let script = match script.transpose() {
        Ok(s) => s,
        Err(e) => return fail(format!("reading stdin: {e}")),
    };
    let color = match opts.color {
        ColorChoice::Auto => None,
        ColorChoice::Always => Some(true),
        ColorChoice::Never => Some(false),
    };
    let term = Arc::new(render::Terminal::new(color, opts.images, home.join("plots")));
    let front = front::Front::start(term, connect, launched);
    // a server that starts at once (the tiny preset: ~0.1 s) says so before the first prompt
    front.wait_connected(std::time::Duration::from_millis(400));
    let code = match script {
        Some(source) => front::script(&front, &source),
        None => {
            let banner = format!(
                "hearth {} · Rust cells with `session` on the warm model · :help for magics · Ctrl-C cancels · Ctrl-D saves and exits",
                env!("CARGO_PKG_VERSION")
            );
            front::interactive(&front, home.join("history"), &banner)
        }
    };
    if let Some(dir) = tmp {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

fn read_stdin() -> std::io::Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    Ok(s)
}
