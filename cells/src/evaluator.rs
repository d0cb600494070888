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

impl CellOutput {
    /// Whether there is a value to show: a cell ending in a loop or a block has the value `()`,
    /// which is nothing to show.
    pub fn has_value(&self) -> bool {
        let unit = self.data.len() == 1 && self.data.get("text/plain").is_some_and(|t| t.trim() == "()");
        !self.data.is_empty() && !unit
    }
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

/// How long the evaluator's queue stays empty before it warms rust-analyzer up.
const WARM_WHEN_IDLE: std::time::Duration = std::time::Duration::from_millis(200);

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

/// The `hearth` dependency of every cell: the prelude crate by path, with the `tls` feature
/// only for an `https://` server (plain http needs no TLS stack, and without it rust-analyzer
/// loads ~60 fewer crates). The same text serves evcxr's first crate graph and the prelude's
/// `:dep` line, so that line changes nothing.
pub fn prelude_dep(prelude_dir: &std::path::Path) -> String {
    format!(
        "{{ package = \"hearth-prelude\", path = {:?}, default-features = {} }}",
        prelude_dir.display().to_string(),
        needs_tls()
    )
}

/// The prelude every (re)started child runs first, as one cell (one compile): the `hearth`
/// crate and a `session`.
pub fn prelude_code(prelude_dir: &std::path::Path) -> String {
    [
        format!(":dep hearth = {}", prelude_dep(prelude_dir)),
        "use hearth::*;".to_string(),
        // evcxr's generated code names `Result<(), E>`; hearth's one-parameter alias must not shadow std's
        "use std::result::Result;".to_string(),
        "hearth::install_panic_hook();".to_string(),
        "hearth::install_error_watch();".to_string(),
        // typed, so evcxr takes the type as written instead of having rust-analyzer infer it
        // (which resolves the hearth crate and its dependencies: about 3 s on 2 cores)
        "let session: hearth::Session = hearth::Session::connect_for_cells();".to_string(),
    ]
    .join("\n")
}

/// Whether cells talk to an `https://` server: `HEARTH_URL`, else the home's session file.
fn needs_tls() -> bool {
    let url = std::env::var("HEARTH_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| hearth_api::SessionFile::read(&hearth::home_dir().join("session.json")).map(|f| f.url));
    url.is_some_and(|u| u.starts_with("https://"))
}

/// Points `TMPDIR` at this process's own folder, `<temp>/hearth-evcxr/<pid>` (rust-analyzer's
/// scratch files), and removes the folders of processes that no longer run. Then takes a build
/// slot (see [`take_build_slot`]) and points evcxr at it (`EVCXR_TMPDIR`). Call it at start-up,
/// before other threads exist. Returns the private temp folder, for removal at exit.
pub fn use_private_tmpdir() -> std::io::Result<PathBuf> {
    let root = std::env::temp_dir().join("hearth-evcxr");
    std::fs::create_dir_all(&root)?;
    sweep_tmpdirs(&root);
    let mine = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&mine)?;
    // a slot, or (no usable cache folder) evcxr's own throwaway folder under TMPDIR
    if let Ok(slot) = take_build_slot(&cell_cache_dir()) {
        std::env::set_var("EVCXR_TMPDIR", slot);
    }
    std::env::set_var("TMPDIR", &mine);
    Ok(mine)
}

/// The per-user folder of build slots: `$HEARTH_CELL_CACHE`, else `$XDG_CACHE_HOME/hearth/cells`,
/// else `~/.cache/hearth/cells`.
pub fn cell_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HEARTH_CELL_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("hearth").join("cells")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("hearth").join("cells")))
        .unwrap_or_else(|| std::env::temp_dir().join("hearth-cells"))
}

/// The lock of the slot this process builds in, held until the process ends.
static SLOT_LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Takes the first free build slot `root/slot-N` (free: nobody holds `slot-N.lock`, an exclusive
/// `flock` that the kernel drops when its process ends, kill -9 included) and keeps it for the
/// life of this process.
///
/// Why slots: evcxr builds cells as a cargo crate. In a throwaway folder every new kernel or REPL
/// rebuilt the prelude, and evcxr's cross-folder compile cache (`:cache`) made it worse: it keys
/// entries with the target folder taken out but copies rustc's dep-info verbatim, so a hit names
/// `OUT_DIR` files (serde_core's and thiserror's `out/private.rs`) in the folder of the process that
/// filled the cache. Once that folder is gone, cargo finds a missing input on every build, and
/// every cell "recompiled" serde_core, thiserror, serde, serde_json, ureq, hearth-api and
/// hearth-prelude (about 1 s a cell). A slot outlives its process, so cargo's own fingerprints
/// stay true: after the first build ever in a slot, a cell compiles only itself. evcxr's cache
/// stays off.
pub fn take_build_slot(root: &std::path::Path) -> std::io::Result<PathBuf> {
    if SLOT_LOCK.get().is_some() {
        return Err(std::io::Error::other("this process already holds a build slot"));
    }
    let (dir, lock) = lock_free_slot(root)?;
    let _ = SLOT_LOCK.set(lock);
    Ok(dir)
}

/// evcxr copies each cell's library to `target/<triple>/debug/libcode_<n>.so` and numbers them
/// from 1 in every process: the copies of an earlier process are dead weight (about 0.5 MB each).
fn remove_cell_copies(slot: &std::path::Path) {
    for triple in std::fs::read_dir(slot.join("target")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(triple.path().join("debug")).into_iter().flatten().flatten() {
            if f.file_name().to_str().is_some_and(|n| n.starts_with("libcode_") && n.ends_with(".so")) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// The first slot of `root` whose lock is free, with that lock held (released when the file is
/// dropped or the process ends).
fn lock_free_slot(root: &std::path::Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(root)?;
    for n in 0..64 {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(format!("slot-{n}.lock")))?;
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let dir = root.join(format!("slot-{n}"));
        std::fs::create_dir_all(&dir)?;
        remove_cell_copies(&dir);
        return Ok((dir, lock));
    }
    Err(std::io::Error::other(format!("all 64 build slots in {} are in use", root.display())))
}

/// A line that reached this process's stderr while [`route_stderr`] holds it.
pub enum StderrLine<'a> {
    /// cargo's `   Compiling serde v1.0.229`: the crate (evcxr writes these for every crate a
    /// cell's build compiles besides the cell itself).
    Compiling(&'a str),
    /// Anything else but cargo's other status lines (`Finished`, `Blocking`, …), which are dropped.
    Other(&'a str),
}

/// Makes file descriptor 2 a pipe for the rest of the process and hands each line written to it
/// to `on_line`, with the real stderr's descriptor (to forward to). evcxr writes cargo's status
/// lines straight to this process's stderr: the front-ends turn them into one transient status
/// line instead. Returns the real stderr's descriptor, `None` if stderr was left as it was.
pub fn route_stderr(on_line: impl Fn(StderrLine<'_>, libc::c_int) + Send + 'static) -> Option<libc::c_int> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: plain descriptor calls on descriptors this function owns; on any failure stderr is
    // left as it was.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        if saved < 0 || libc::dup2(fds[1], 2) < 0 {
            libc::close(fds[0]);
            libc::close(fds[1]);
            return None;
        }
        libc::close(fds[1]);
        let read = <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]);
        std::thread::Builder::new()
            .name("hearth-stderr".into())
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(read).lines().map_while(Result::ok) {
                    if let Some(krate) = compiling_crate(&line) {
                        on_line(StderrLine::Compiling(krate), saved);
                    } else if !is_cargo_status(&line) {
                        on_line(StderrLine::Other(&line), saved);
                    }
                }
            })
            .ok()?;
        Some(saved)
    }
}

/// Writes `bytes` to descriptor `fd` (the real stderr kept by [`route_stderr`]).
pub fn write_fd(fd: libc::c_int, bytes: &[u8]) {
    // SAFETY: `fd` is a descriptor this process keeps open for its whole life.
    let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// The crate of cargo's `   Compiling serde v1.0.229` line.
fn compiling_crate(line: &str) -> Option<&str> {
    let rest = line.strip_prefix(char::is_whitespace)?.trim_start().strip_prefix("Compiling ")?;
    rest.split_whitespace().next()
}

/// `   Compiling serde v1.0.229`, `    Finished ...`: cargo's status lines.
fn is_cargo_status(line: &str) -> bool {
    let t = line.trim_start();
    line.len() > t.len()
        && ["Compiling ", "Finished ", "Blocking ", "Updating ", "Locking ", "Downloaded ", "Downloading ", "Adding "]
            .iter()
            .any(|w| t.starts_with(w))
}

/// Removes `root/<pid>` folders whose process is gone.
pub fn sweep_tmpdirs(root: &std::path::Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
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

/// evcxr's context, with a cell process that finds Rust's `libstd-*.so`: cells link it
/// dynamically and evcxr relies on the rpath that cargo writes relative to `deps/`, which is one
/// folder off for the copy evcxr loads; it only resolved by luck in a throwaway temp folder (the
/// surplus `..` stopped at `/`), and never in a build slot under the home folder.
fn new_context() -> Result<(evcxr::CommandContext, evcxr::EvalContextOutputs), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe);
    let libdir = std::process::Command::new("rustc")
        .args(["--print", "target-libdir"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(out) = libdir {
        let mut path = std::ffi::OsString::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
            path.push(":");
            path.push(old);
        }
        child.env("LD_LIBRARY_PATH", path);
    }
    // the prelude's crate and `:opt 0` are in the first Cargo.toml: rust-analyzer loads the
    // crate graph once, not three times
    let dep = prelude_dep(&prelude_dir());
    let (ctx, outputs) = evcxr::EvalContext::with_subprocess_command_and_state(child, |state| {
        state.set_opt_level("0")?;
        state.add_dep("hearth", &dep)
    })
    .map_err(|e| e.to_string())?;
    Ok((evcxr::CommandContext::with_eval_context(ctx), outputs))
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
            evalue: format!(
                "{msg}. The cell process restarted: variables are lost, the model is untouched; `session` is back."
            ),
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
        Self::start_after(stdout, stderr, || Ok(()))
    }

    /// [`Evaluator::start`], with the prelude (whose `session` connects to the server) held
    /// until `connected` returns: evcxr's context (rust-analyzer's load, about 4 s on 2 cores) is
    /// created meanwhile, while the front-end starts or finds the server. `connected` returning
    /// an error skips the prelude; the evaluator is then ready with that error.
    pub fn start_after(
        stdout: LineSink,
        stderr: LineSink,
        connected: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Evaluator {
        let (tx, rx) = mpsc::channel::<Req>();
        let child = Arc::new(Mutex::new(None));
        let ready: Readiness = Arc::new((Mutex::new(None), std::sync::Condvar::new()));
        let (child2, ready2) = (child.clone(), ready.clone());
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping2 = stopping.clone();
        std::thread::Builder::new()
            .name("hearth-evaluator".into())
            .spawn(move || {
                let (mut ctx, outputs) = match new_context() {
                    Ok(x) => x,
                    Err(e) => {
                        let (lock, cv) = &*ready2;
                        *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e));
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
                // the server is there (one started by the front-end), or there is none to use;
                // only then does the home's session file say whether cells need TLS
                let connection = connected();
                let prelude = prelude_code(&prelude_dir());
                let run_prelude = |ctx: &mut evcxr::CommandContext| -> Result<(), String> {
                    ctx.execute(&prelude).map(|_| ()).map_err(|e| format!("prelude: {}", error_of(e).evalue))
                };
                // (`:opt 0` is set in `new_context`, before rust-analyzer's first load)
                let status = connection.and_then(|()| run_prelude(&mut ctx));
                *child2.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.process_handle());
                {
                    let (lock, cv) = &*ready2;
                    *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                    cv.notify_all();
                }
                // rust-analyzer resolves the crates a cell uses the first time it must infer a
                // variable's type (about 4 s on 2 cores); the first time the queue is idle, a
                // completion request does it, so the first `let` a user types is not the slow one
                let mut warmed = false;
                loop {
                    let req = if warmed {
                        match rx.recv() {
                            Ok(r) => r,
                            Err(_) => break,
                        }
                    } else {
                        match rx.recv_timeout(WARM_WHEN_IDLE) {
                            Ok(r) => r,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                let probe = "let hearth_warm_up = session.run_name(); hearth_warm_up.";
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    ctx.completions(probe, probe.len())
                                }));
                                warmed = true;
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    };
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
                                Err(_) => Err(CellError {
                                    ename: "InternalError".into(),
                                    evalue: "evcxr panicked".into(),
                                    traceback: vec![],
                                }),
                            };
                            let _ = reply.send(out);
                        }
                        Req::Complete(code, pos, reply) => {
                            let (list, start, end) = match ctx.completions(&code, pos) {
                                // rust-analyzer's snippets carry arguments (`with_capacity(capacity)`): offer the name
                                Ok(c) => {
                                    let mut names: Vec<String> = c
                                        .completions
                                        .into_iter()
                                        .map(|c| c.code.split('(').next().unwrap_or_default().to_string())
                                        .collect();
                                    names.dedup();
                                    (names, c.start_offset, c.end_offset)
                                }
                                Err(_) => (Vec::new(), pos, pos),
                            };
                            let _ = reply.send((list, start, end));
                        }
                        Req::Variables(reply) => {
                            let _ = reply
                                .send(ctx.variables_and_types().map(|(a, b)| (a.to_string(), b.to_string())).collect());
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
            return Err(CellError {
                ename: "EvaluatorGone".into(),
                evalue: "the evaluator thread stopped".into(),
                traceback: vec![],
            });
        }
        rx.recv().unwrap_or_else(|_| {
            Err(CellError {
                ename: "EvaluatorGone".into(),
                evalue: "the evaluator thread stopped".into(),
                traceback: vec![],
            })
        })
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
    fn a_unit_value_or_none_is_nothing_to_show() {
        let out = |pairs: &[(&str, &str)]| CellOutput {
            data: pairs.iter().map(|(m, c)| (m.to_string(), c.to_string())).collect(),
        };
        assert!(!out(&[]).has_value());
        assert!(!out(&[("text/plain", "()")]).has_value());
        assert!(!out(&[("text/plain", " ()\n")]).has_value());
        assert!(out(&[("text/plain", "42")]).has_value());
        assert!(out(&[("text/plain", "()"), ("text/html", "<b>()</b>")]).has_value());
    }

    /// A flock belongs to the open file, which a child shares from fork until its exec closes the
    /// close-on-exec descriptors: a process spawned by one test while the other drops a slot's lock
    /// holds that lock a moment longer (the slot test then took slot-2 in CI). The two take turns.
    static FORKS_AND_LOCKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn sweeping_removes_the_folders_of_processes_that_are_gone() {
        let _turn = FORKS_AND_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
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
        assert!(
            alive.exists() && root.join("not-a-pid").exists(),
            "a live process's (or a foreign) folder was removed"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_build_slot_is_held_by_one_owner_and_free_again_when_dropped() {
        let _turn = FORKS_AND_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
        let root = std::env::temp_dir().join(format!("hearth-slot-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, lock_a) = lock_free_slot(&root).unwrap();
        let (b, lock_b) = lock_free_slot(&root).unwrap();
        assert_eq!((a.file_name().unwrap(), b.file_name().unwrap()), ("slot-0".as_ref(), "slot-1".as_ref()));
        let debug = a.join("target/x86_64-unknown-linux-gnu/debug");
        std::fs::create_dir_all(&debug).unwrap();
        for f in ["libcode_1.so", "libcode_12.so", "libctx.so"] {
            std::fs::write(debug.join(f), b"").unwrap();
        }
        drop(lock_a);
        let (again, _lock) = lock_free_slot(&root).unwrap();
        assert_eq!(again, a, "a released slot is not reused");
        assert!(
            !debug.join("libcode_1.so").exists() && !debug.join("libcode_12.so").exists(),
            "an earlier process's cell copies stay"
        );
        assert!(debug.join("libctx.so").exists(), "cargo's own output was removed");
        drop(lock_b);
        let _ = std::fs::remove_dir_all(&root);
    }
}
