//! The evaluator: one thread that owns evcxr's `CommandContext` (and through it the child
//! process that runs compiled cells). It is created in the background so the front-end answers
//! at once; requests queue until it is ready. The model never lives here: the child holds only a
//! `hearth::Session` (URL, token, run name), re-created by the prelude after any child restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// What a cell produced (besides the streams, which arrive on their own channels).
#[derive(Debug, Clone, Default)]
pub struct CellOutput {
    /// The final value's MIME bundle (`evcxr_display` or `Debug` text), empty when none.
    pub data: HashMap<String, String>,
}

/// Why a cell failed.
#[derive(Debug, Clone)]
pub struct CellError {
    /// Short name (`CompilationError`, `Panic`, `Interrupted`, …).
    pub ename: String,
    /// The message.
    pub evalue: String,
    /// Rendered lines.
    pub traceback: Vec<String>,
}

enum Req {
    Eval(String, mpsc::Sender<Result<CellOutput, CellError>>),
    Complete(String, usize, mpsc::Sender<(Vec<String>, usize, usize)>),
    Variables(mpsc::Sender<Vec<(String, String)>>),
    /// Drop the context (which removes evcxr's build directory) and end the thread.
    Quit(mpsc::Sender<()>),
}

/// Where the child's output goes: one callback per stdout / stderr line.
pub type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Set once the context and the prelude are ready (or failed).
type Readiness = Arc<(Mutex<Option<Result<(), String>>>, std::sync::Condvar)>;

/// A handle on the evaluator thread.
#[derive(Clone)]
pub struct Evaluator {
    tx: mpsc::Sender<Req>,
    child: Arc<Mutex<Option<Arc<Mutex<std::process::Child>>>>>,
    ready: Readiness,
    /// Set by [`Evaluator::shutdown`]: a child that dies now is not restarted.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// The prelude every (re)started child runs first, as one cell (one compile): the `hearth`
/// crate and a `session`.
pub fn prelude_code(prelude_dir: &std::path::Path) -> String {
    [
        format!(":dep hearth = {{ package = \"hearth-prelude\", path = {:?} }}", prelude_dir.display().to_string()),
        "use hearth::*;".to_string(),
        // evcxr's generated code names `Result<(), E>`; hearth's one-parameter alias must not shadow std's
        "use std::result::Result;".to_string(),
        "hearth::install_panic_hook();".to_string(),
        "hearth::install_error_watch();".to_string(),
        "let session = hearth::Session::connect().expect(\"hearth: could not connect to the session server\");".to_string(),
    ]
    .join("\n")
}

/// Points `TMPDIR` at this process's own folder, `<temp>/hearth-evcxr/<pid>`, where evcxr then
/// builds cells, and removes the folders of processes that no longer run (a kill -9 or a crash
/// leaves evcxr's ~250 MB build directory behind; a clean exit removes it through
/// [`Evaluator::shutdown`]). Call it at start-up, before other threads exist.
pub fn use_private_tmpdir() -> std::io::Result<PathBuf> {
    let root = std::env::temp_dir().join("hearth-evcxr");
    std::fs::create_dir_all(&root)?;
    sweep_tmpdirs(&root);
    let mine = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&mine)?;
    std::env::set_var("TMPDIR", &mine);
    Ok(mine)
}

/// Removes `root/<pid>` folders whose process is gone.
pub fn sweep_tmpdirs(root: &std::path::Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && pid != std::process::id() as libc::pid_t {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Where the prelude crate's source is: `HEARTH_PRELUDE_DIR`, else next to this crate's source.
pub fn prelude_dir() -> PathBuf {
    std::env::var_os("HEARTH_PRELUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("prelude"))
}

fn error_of(e: evcxr::Error) -> CellError {
    match e {
        evcxr::Error::CompilationErrors(errors) => {
            let traceback: Vec<String> = errors.iter().map(|e| e.rendered()).collect();
            let evalue = errors.iter().map(|e| e.message()).collect::<Vec<_>>().join("\n");
            CellError { ename: "CompilationError".into(), evalue, traceback }
        }
        evcxr::Error::SubprocessTerminated(msg) => CellError {
            ename: "ChildRestarted".into(),
            evalue: format!("{msg}. The cell process restarted: variables are lost, the model is untouched; `session` is back."),
            traceback: vec![],
        },
        other => {
            let msg = other.to_string();
            let ename = if msg.contains("panicked") { "Panic" } else { "Error" };
            CellError { ename: ename.into(), evalue: msg.clone(), traceback: vec![msg] }
        }
    }
}

impl Evaluator {
    /// Starts the thread; evcxr's context and the prelude are set up there, in the background.
    /// `stdout` / `stderr` receive the child's output lines as they come.
    pub fn start(stdout: LineSink, stderr: LineSink) -> Evaluator {
        let (tx, rx) = mpsc::channel::<Req>();
        let child = Arc::new(Mutex::new(None));
        let ready: Readiness = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
        let (child2, ready2) = (child.clone(), ready.clone());
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping2 = stopping.clone();
        std::thread::Builder::new()
            .name("hearth-evaluator".into())
            .spawn(move || {
                let (mut ctx, outputs) = match evcxr::CommandContext::new() {
                    Ok(x) => x,
                    Err(e) => {
                        let (lock, cv) = &*ready2;
                        *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e.to_string()));
                        cv.notify_all();
                        return;
                    }
                };
                // Keep draining the child's output, or eval blocks on a full pipe.
                let (out_rx, err_rx) = (outputs.stdout, outputs.stderr);
                std::thread::spawn(move || {
                    for line in out_rx {
                        stdout(&line);
                    }
                });
                std::thread::spawn(move || {
                    for line in err_rx {
                        stderr(&line);
                    }
                });
                let prelude = prelude_code(&prelude_dir());
                let run_prelude = |ctx: &mut evcxr::CommandContext| -> Result<(), String> {
                    ctx.execute(&prelude).map(|_| ()).map_err(|e| format!("prelude: {}", error_of(e).evalue))
                };
                let _ = ctx.execute(":cache 500");
                let _ = ctx.execute(":opt 0");
                let status = run_prelude(&mut ctx);
                *child2.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.process_handle());
                {
                    let (lock, cv) = &*ready2;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                    cv.notify_all();
                }
                for req in rx {
                    match req {
                        Req::Eval(code, reply) => {
                            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.execute(&code)));
                            let out = match res {
                                Ok(Ok(o)) => Ok(CellOutput { data: o.content_by_mime_type }),
                                Ok(Err(e)) => {
                                    let restarted = matches!(e, evcxr::Error::SubprocessTerminated(_));
                                    let err = error_of(e);
                                    if restarted && !stopping2.load(std::sync::atomic::Ordering::SeqCst) {
                                        // the child is new: give it `session` again
                                        let _ = run_prelude(&mut ctx);
                                        *child2.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.process_handle());
                                    }
                                    Err(err)
                                }
                                Err(_) => Err(CellError { ename: "InternalError".into(), evalue: "evcxr panicked".into(), traceback: vec![] }),
                            };
                            let _ = reply.send(out);
                        }
                        Req::Complete(code, pos, reply) => {
                            let (list, start, end) = match ctx.completions(&code, pos) {
                                // rust-analyzer's snippets carry arguments (`with_capacity(capacity)`): offer the name
                                Ok(c) => {
                                    let mut names: Vec<String> = c.completions.into_iter().map(|c| c.code.split('(').next().unwrap_or_default().to_string()).collect();
                                    names.dedup();
                                    (names, c.start_offset, c.end_offset)
                                }
                                Err(_) => (Vec::new(), pos, pos),
                            };
                            let _ = reply.send((list, start, end));
                        }
                        Req::Variables(reply) => {
                            let _ = reply.send(ctx.variables_and_types().map(|(a, b)| (a.to_string(), b.to_string())).collect());
                        }
                        Req::Quit(done) => {
                            drop(ctx);
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .ok();
        Evaluator { tx, child, ready, stopping }
    }

    /// Ends the evaluator: kills a running cell's process, then drops evcxr's context, which
    /// removes its build directory (about 250 MB under the temp dir, left behind by a process
    /// that simply exits). Waits at most `max`.
    pub fn shutdown(&self, max: std::time::Duration) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Req::Quit(tx)).is_err() {
            return;
        }
        // a cell still running would hold the queue: stop its process
        if rx.recv_timeout(std::time::Duration::from_millis(200)).is_ok() {
            return;
        }
        self.kill_child();
        let _ = rx.recv_timeout(max);
    }

    /// Blocks until the context and prelude are ready; the prelude's error if it failed.
    pub fn wait_ready(&self) -> Result<(), String> {
        let (lock, cv) = &*self.ready;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.clone().unwrap_or(Ok(()))
    }

    /// Whether the context and prelude are set up (successfully or not), without waiting.
    pub fn is_ready(&self) -> bool {
        self.ready.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Evaluates a cell (blocking).
    pub fn eval(&self, code: &str) -> Result<CellOutput, CellError> {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Req::Eval(code.to_string(), tx)).is_err() {
            return Err(CellError { ename: "EvaluatorGone".into(), evalue: "the evaluator thread stopped".into(), traceback: vec![] });
        }
        rx.recv().unwrap_or_else(|_| Err(CellError { ename: "EvaluatorGone".into(), evalue: "the evaluator thread stopped".into(), traceback: vec![] }))
    }

    /// Completions at `pos` (byte offset): (matches, start, end).
    pub fn complete(&self, code: &str, pos: usize) -> (Vec<String>, usize, usize) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Req::Complete(code.to_string(), pos, tx)).is_err() {
            return (Vec::new(), pos, pos);
        }
        rx.recv().unwrap_or((Vec::new(), pos, pos))
    }

    /// Variables defined so far with their types.
    pub fn variables(&self) -> Vec<(String, String)> {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Req::Variables(tx)).is_err() {
            return Vec::new();
        }
        rx.recv().unwrap_or_default()
    }

    /// Kills the child process running the current cell (the second step of an interrupt).
    pub fn kill_child(&self) -> bool {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match child {
            Some(c) => c.lock().map(|mut c| c.kill().is_ok()).unwrap_or(false),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeping_removes_the_folders_of_processes_that_are_gone() {
        let root = std::env::temp_dir().join(format!("hearth-sweep-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut done = std::process::Command::new("true").spawn().unwrap();
        done.wait().unwrap();
        let (dead, alive) = (root.join(done.id().to_string()), root.join(std::process::id().to_string()));
        for d in [&dead, &alive, &root.join("not-a-pid")] {
            std::fs::create_dir_all(d.join(".tmpXYZ")).unwrap();
        }
        sweep_tmpdirs(&root);
        assert!(!dead.exists(), "a finished process's folder stays");
        assert!(alive.exists() && root.join("not-a-pid").exists(), "a live process's (or a foreign) folder was removed");
        let _ = std::fs::remove_dir_all(&root);
    }
}
