//! The REPL's front-end: connects to (or starts) the session server and creates the evaluator in
//! the background, runs cells and magics, turns Ctrl-C into the kernel's two-step interrupt, and
//! asks the server to autosave on the way out. The interactive loop (rustyline) and the script
//! runner both drive a [`Front`].

use crate::render::Terminal;
use hearth::display::MARKER;
use hearth::Session;
use hearth_kernel::evaluator::{write_fd, CellError, Evaluator, LineSink, StderrLine};
use hearth_kernel::magics;
use hearth_kernel::scanner::{input_status, split_typed, Completeness};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How to reach the session server.
#[derive(Debug, Clone)]
pub enum Connect {
    /// The server of `$HEARTH_HOME`, started on `model` if none runs.
    Home {
        /// Preset, local folder or hub id (`None`: the running server's, else the last one's, else tiny).
        model: Option<String>,
        /// `--resume` / `--no-resume` for a server this starts.
        resume: Option<bool>,
    },
    /// A server elsewhere (`HEARTH_URL` and `HEARTH_TOKEN` are set for the cell process too).
    Attach {
        /// Its URL.
        url: String,
        /// Its bearer token.
        token: String,
    },
}

type Printer = Box<dyn rustyline::ExternalPrinter + Send>;

/// State shared by the input loop, the background start, the cell's output threads and the
/// Ctrl-C thread.
pub struct Front {
    term: Arc<Terminal>,
    session: OnceLock<Result<Session, String>>,
    evaluator: OnceLock<Evaluator>,
    /// Prints above the prompt while rustyline reads (interactive mode).
    printer: Mutex<Option<Printer>>,
    executing: AtomicBool,
    cell: AtomicU64,
    presses: AtomicU32,
    /// Set by Ctrl-C or an error marker: the running cell ends with this error.
    cell_error: Mutex<Option<CellError>>,
    /// Output lines being rendered right now, so a cell's output precedes its result.
    publishing: AtomicUsize,
    /// The evaluator is ready (or failed).
    prepared: AtomicBool,
    launched: Instant,
    /// Crates cargo compiled since the last cell ended (or during the prelude), from its
    /// `Compiling x` lines, which evcxr writes to this process's stderr.
    compiled: Mutex<Vec<String>>,
    /// The real stderr while fd 2 is the router's pipe (-1: not routed), and whether a status
    /// line is drawn on it now.
    status_fd: std::sync::atomic::AtomicI32,
    status_shown: AtomicBool,
}

impl Front {
    /// Starts connecting and creating the evaluator in the background; returns at once.
    pub fn start(term: Arc<Terminal>, connect: Connect, launched: Instant) -> Arc<Front> {
        let front = Arc::new(Front {
            term,
            session: OnceLock::new(),
            evaluator: OnceLock::new(),
            printer: Mutex::new(None),
            executing: AtomicBool::new(false),
            cell: AtomicU64::new(0),
            presses: AtomicU32::new(0),
            cell_error: Mutex::new(None),
            publishing: AtomicUsize::new(0),
            prepared: AtomicBool::new(false),
            launched,
            compiled: Mutex::new(Vec::new()),
            status_fd: std::sync::atomic::AtomicI32::new(-1),
            status_shown: AtomicBool::new(false),
        });
        let f = front.clone();
        std::thread::Builder::new().name("hearth-start".into()).spawn(move || f.connect_and_prepare(connect)).ok();
        let f = front.clone();
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT]) {
            std::thread::Builder::new()
                .name("hearth-ctrl-c".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        f.interrupt();
                    }
                })
                .ok();
        }
        front
    }

    /// Lets background messages print above rustyline's prompt.
    pub fn set_printer(&self, p: Printer) {
        *self.printer.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }

    /// A note from hearth, printed above the prompt when one is shown.
    fn notify(&self, msg: &str) {
        let mut printer = self.printer.lock().unwrap_or_else(|p| p.into_inner());
        match printer.as_mut() {
            Some(p) if !self.executing.load(Ordering::SeqCst) => {
                let _ = p.print(format!("{msg}\n"));
            }
            _ => self.term.note(msg),
        }
    }

    fn connect_and_prepare(self: Arc<Self>, connect: Connect) {
        self.route_stderr();
        // evcxr's context is created while the server starts; the prelude (whose `session`
        // finds the server through the session file) waits for the connection below
        let (gate, wait) = std::sync::mpsc::channel::<Result<(), String>>();
        let (a, b) = (self.clone(), self.clone());
        let out: LineSink = Arc::new(move |l: &str| a.child_line(l, false));
        let err: LineSink = Arc::new(move |l: &str| b.child_line(l, true));
        let ev =
            Evaluator::start_after(out, err, move || wait.recv().unwrap_or_else(|_| Err("no session server".into())));
        let session = match connect {
            Connect::Home { model, resume } => {
                Session::connect_or_start(&hearth::home_dir(), "main", model.as_deref(), resume)
            }
            Connect::Attach { url, token } => Session::attach(&url, &token, "main"),
        }
        .map_err(|e| e.to_string());
        match &session {
            Ok(s) => {
                let step = s
                    .runs()
                    .ok()
                    .and_then(|r| r.into_iter().find(|r| r.id == s.run_name()).map(|r| r.step))
                    .unwrap_or(0);
                let model = s.info().map(|i| format!("{} on {}", i.model, i.device)).unwrap_or_default();
                self.notify(&format!(
                    "hearth: connected to {} ({model}), run {} at step {step}; compiling the prelude…",
                    s.url(),
                    s.run_name()
                ));
            }
            Err(e) => self.notify(&format!("hearth: no session server: {e}")),
        }
        let failed = session.is_err();
        let _ = gate.send(session.as_ref().map(|_| ()).map_err(Clone::clone));
        let _ = self.session.set(session);
        let _ = self.evaluator.set(ev.clone());
        if failed {
            // no prelude: the cell process's own connect would not honour --model or --attach
            self.prepared.store(true, Ordering::SeqCst);
            return;
        }
        let ready = ev.wait_ready();
        self.prepared.store(true, Ordering::SeqCst);
        let compiled = std::mem::take(&mut *self.compiled.lock().unwrap_or_else(|p| p.into_inner()));
        let first = if compiled.is_empty() {
            String::new()
        } else {
            format!("; compiled {} crates once for this build slot", compiled.len())
        };
        match ready {
            Ok(()) => self
                .notify(&format!("hearth: `session` is ready ({:.1} s{first})", self.launched.elapsed().as_secs_f64())),
            Err(e) => self.notify(&format!("hearth: the prelude failed, cells cannot run: {e}")),
        }
    }

    /// A line that was on its way to stderr while it was borrowed: above the prompt, or to the
    /// real stderr.
    fn forward_stderr(&self, line: &str, saved: libc::c_int) {
        let mut printer = self.printer.lock().unwrap_or_else(|p| p.into_inner());
        match printer.as_mut() {
            Some(p) => {
                let _ = p.print(format!("{line}\n"));
            }
            None => write_fd(saved, format!("{line}\n").as_bytes()),
        }
    }

    /// cargo compiles `krate` for the current cell (or the prelude): a status line that the
    /// cell's first output or its end removes, while a cell runs on a terminal.
    fn compiling(&self, krate: &str) {
        let n = {
            let mut c = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
            c.push(krate.to_string());
            c.len()
        };
        let fd = self.status_fd.load(Ordering::SeqCst);
        if fd >= 0 && self.executing.load(Ordering::SeqCst) && self.term.stderr_tty {
            write_fd(fd, format!("\r\x1b[2K\x1b[2mcompiling {krate} ({n})…\x1b[0m").as_bytes());
            self.status_shown.store(true, Ordering::SeqCst);
        }
    }

    /// Removes the status line, if one is drawn.
    fn clear_status(&self) {
        let fd = self.status_fd.load(Ordering::SeqCst);
        if fd >= 0 && self.status_shown.swap(false, Ordering::SeqCst) {
            write_fd(fd, b"\r\x1b[2K");
        }
    }

    /// At the end of a cell: the status line goes; on a pipe (scripts, CI) one line says which
    /// crates a cell had to compile besides itself.
    fn end_compile_status(&self) {
        self.clear_status();
        let compiled = std::mem::take(&mut *self.compiled.lock().unwrap_or_else(|p| p.into_inner()));
        if !compiled.is_empty() && !self.term.interactive {
            self.term.note(&format!(
                "hearth: compiled {} crates for this cell: {}",
                compiled.len(),
                compiled.join(", ")
            ));
        }
    }

    fn child_line(&self, line: &str, stderr: bool) {
        self.clear_status();
        self.publishing.fetch_add(1, Ordering::SeqCst);
        // display markers come on stdout, in order with the cell's prints; errors on stderr
        if stderr || line.starts_with(MARKER) {
            if let Some(e) = self.term.child_stderr(line) {
                // an interrupt's own error wins over the `?` error it caused
                let mut flagged = self.cell_error.lock().unwrap_or_else(|p| p.into_inner());
                if flagged.as_ref().is_none_or(|f| f.ename != "Interrupted") {
                    *flagged = Some(e);
                }
            }
        } else {
            self.term.child_stdout(line);
        }
        self.publishing.fetch_sub(1, Ordering::SeqCst);
    }

    /// Waits up to `max` for the background connection.
    pub fn wait_connected(&self, max: Duration) {
        let t0 = Instant::now();
        while self.session.get().is_none() && t0.elapsed() < max {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the background connection.
    fn session(&self) -> Result<&Session, String> {
        loop {
            if let Some(s) = self.session.get() {
                return s.as_ref().map_err(Clone::clone);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn evaluator(&self) -> Evaluator {
        loop {
            if let Some(e) = self.evaluator.get() {
                return e.clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Completions for rustyline: magic names, else evcxr's (once it is ready).
    fn complete(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let head = &line[..pos];
        let word = head.trim_start();
        if word.starts_with(':') && !word.contains(char::is_whitespace) {
            let word = word.trim_start_matches(':');
            let names =
                magics::MAGICS.iter().filter(|m| m.name.starts_with(word)).map(|m| format!(":{}", m.name)).collect();
            return (line.len() - line.trim_start().len(), names);
        }
        match self.evaluator.get() {
            Some(ev) if ev.is_ready() && !self.executing.load(Ordering::SeqCst) => {
                let (names, start, _) = ev.complete(line, pos);
                (start, names)
            }
            _ => (pos, Vec::new()),
        }
    }

    /// Ctrl-C: while a cell runs, first cancel the server's operation (the cell ends with
    /// `Interrupted`, variables kept); if the cell still runs after the grace period, or on a
    /// second Ctrl-C, restart the cell process (variables lost, the model untouched).
    pub fn interrupt(self: &Arc<Self>) {
        if !self.executing.load(Ordering::SeqCst) {
            return;
        }
        let cell = self.cell.load(Ordering::SeqCst);
        if self.presses.fetch_add(1, Ordering::SeqCst) > 0 {
            self.term.note("hearth: restarting the cell process");
            if let Some(ev) = self.evaluator.get() {
                ev.kill_child();
            }
            return;
        }
        *self.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(CellError {
            ename: "Interrupted".into(),
            evalue: "the cell was interrupted; the server's operation was cancelled and changed nothing (variables are kept)".into(),
            traceback: vec![],
        });
        self.term.note("hearth: interrupting (Ctrl-C again restarts the cell process)");
        let f = self.clone();
        std::thread::spawn(move || {
            if let Some(Ok(s)) = f.session.get() {
                let _ = s.cancel_all();
            }
            let grace = std::env::var("HEARTH_INTERRUPT_GRACE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
            std::thread::sleep(Duration::from_millis(grace));
            if f.executing.load(Ordering::SeqCst) && f.cell.load(Ordering::SeqCst) == cell {
                if let Some(ev) = f.evaluator.get() {
                    ev.kill_child();
                }
            }
        });
    }

    /// Runs one cell (a magic, an evcxr command or Rust) and shows its output; `false` if it
    /// failed.
    pub fn run_cell(&self, code: &str) -> bool {
        if let Some((m, _)) = magics::find(code) {
            let out = self.session().and_then(|s| magics::run(code, s).unwrap_or_else(|| Err("not a magic".into())));
            return match out {
                Ok(bundle) => {
                    self.term.show(&bundle.data, None, false);
                    true
                }
                Err(e) => {
                    self.term.error(&CellError { ename: format!("Magic:{}", m.name), evalue: e, traceback: vec![] });
                    false
                }
            };
        }
        if let Err(e) = self.session() {
            self.term.error(&CellError { ename: "NoServer".into(), evalue: e, traceback: vec![] });
            return false;
        }
        let ev = self.evaluator();
        if !self.prepared.load(Ordering::SeqCst) {
            self.term.note("hearth: waiting for `session` (the prelude is compiling)…");
            while !self.prepared.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Err(e) = ev.wait_ready() {
            self.term.error(&CellError { ename: "PreludeError".into(), evalue: e, traceback: vec![] });
            return false;
        }
        *self.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.presses.store(0, Ordering::SeqCst);
        self.cell.fetch_add(1, Ordering::SeqCst);
        self.executing.store(true, Ordering::SeqCst);
        let result = ev.eval(code);
        self.executing.store(false, Ordering::SeqCst);
        self.end_compile_status();
        // the cell's last output lines are still on their way from the child's pipes
        std::thread::sleep(Duration::from_millis(15));
        for _ in 0..200 {
            if self.publishing.load(Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.term.end_cell();
        let flagged = self.cell_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let result = match (result, flagged) {
            (Ok(_), Some(e)) => Err(e),
            (Err(e), Some(f)) if f.ename == "Interrupted" && e.ename == "ChildRestarted" => {
                Err(CellError { ename: "Interrupted".into(), evalue: e.evalue, traceback: vec![] })
            }
            (r, _) => r,
        };
        match result {
            Ok(out) => {
                let data: BTreeMap<String, String> = out.data.into_iter().collect();
                // a cell ending in a statement-like expression (a `for` loop) has the value `()`
                let unit = data.len() == 1 && data.get("text/plain").is_some_and(|t| t.trim() == "()");
                if !data.is_empty() && !unit {
                    self.term.show(&data, None, false);
                }
                true
            }
            Err(e) => {
                self.term.error(&e);
                false
            }
        }
    }

    /// Ends the evaluator (evcxr's build directory goes with it).
    pub fn shutdown(&self) {
        if let Some(ev) = self.evaluator.get() {
            ev.shutdown(Duration::from_secs(5));
        }
    }

    /// Takes file descriptor 2 for the life of the REPL: evcxr writes cargo's `Compiling x` lines
    /// straight to this process's stderr; they become [`Front::compiling`] (one quiet status
    /// line), everything else is forwarded.
    fn route_stderr(self: &Arc<Self>) {
        let f = self.clone();
        let saved = hearth_kernel::evaluator::route_stderr(move |line, saved| match line {
            StderrLine::Compiling(krate) => f.compiling(krate),
            StderrLine::Other(line) => {
                f.clear_status();
                f.forward_stderr(line, saved);
            }
        });
        if let Some(fd) = saved {
            self.status_fd.store(fd, Ordering::SeqCst);
        }
    }

    /// Gives fd 2 back to the real stderr, so the last lines are written before the process ends.
    fn restore_stderr(&self) {
        self.clear_status();
        let fd = self.status_fd.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: `fd` is the original stderr, duplicated by the router.
            unsafe { libc::dup2(fd, 2) };
        }
    }

    /// On the way out: the server saves every run (it stays up, warm, until its idle timeout).
    pub fn goodbye(&self) {
        self.restore_stderr();
        let Some(Ok(s)) = self.session.get() else {
            return;
        };
        match s.autosave() {
            Ok(saved) if saved.is_empty() => self.term.note("hearth: nothing changed since the last save"),
            Ok(saved) => {
                for r in saved {
                    self.term.note(&format!("hearth: saved step {} to {}", r.step, r.path));
                }
            }
            Err(e) => self.term.note(&format!("hearth: could not ask the server to save: {e}")),
        }
    }
}

/// Is this line the end of the session (`:quit`, `:exit`)?
pub fn is_quit(line: &str) -> bool {
    matches!(line.trim(), ":quit" | ":exit" | ":q")
}

/// rustyline's helper: multi-line input by the kernel's completeness scanner, completion.
pub struct Helper {
    front: Arc<Front>,
}

impl Completer for Helper {
    type Candidate = Pair;
    fn complete(&self, line: &str, pos: usize, _: &rustyline::Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, names) = self.front.complete(line, pos);
        Ok((start, names.into_iter().map(|n| Pair { display: n.clone(), replacement: n }).collect()))
    }
}

impl Hinter for Helper {
    type Hint = String;
}

impl Highlighter for Helper {}

impl Validator for Helper {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        // the same rule that splits the accepted text into cells: Enter runs when no cell is left open
        Ok(match input_status(ctx.input()) {
            Completeness::Incomplete(_) => ValidationResult::Incomplete,
            _ => ValidationResult::Valid(None),
        })
    }
}

impl rustyline::Helper for Helper {}

/// The interactive loop; returns the exit code.
pub fn interactive(front: &Arc<Front>, history: PathBuf, banner: &str) -> i32 {
    let config = rustyline::Config::builder()
        .max_history_size(10_000)
        .and_then(|b| b.history_ignore_dups(true))
        .map(|b| b.auto_add_history(false).completion_type(rustyline::CompletionType::List).build())
        .unwrap_or_default();
    let mut ed: rustyline::Editor<Helper, rustyline::history::FileHistory> =
        match rustyline::Editor::with_config(config) {
            Ok(e) => e,
            Err(e) => {
                front.term.note(&format!("hearth: cannot use this terminal: {e}"));
                return 1;
            }
        };
    ed.set_helper(Some(Helper { front: front.clone() }));
    if history.exists() {
        if let Err(e) = ed.load_history(&history) {
            front.term.note(&format!("hearth: could not read the history {}: {e}", history.display()));
        }
    }
    if let Ok(p) = ed.create_external_printer() {
        front.set_printer(Box::new(p));
    }
    front.term.out(banner);
    loop {
        match ed.readline("hearth> ") {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                let _ = ed.add_history_entry(line.as_str());
                if let Some(dir) = history.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                // appended at once, so a crash or kill -9 keeps what was typed
                if let Err(e) = ed.append_history(&history) {
                    front.term.note(&format!("hearth: could not write the history {}: {e}", history.display()));
                }
                // a pasted block (or lines typed ahead while a cell ran) is several cells, split
                // exactly as if typed line by line
                if run_until_quit(front, &split_typed(&line).0) {
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => continue, // Ctrl-C at the prompt clears the line
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                front.term.note(&format!("hearth: {e}"));
                break;
            }
        }
    }
    front.goodbye();
    front.shutdown();
    0
}

/// Runs `cells` in order, up to a `:quit` among them; true when there was one.
fn run_until_quit(front: &Arc<Front>, cells: &[String]) -> bool {
    for cell in cells {
        if is_quit(cell) {
            return true;
        }
        front.run_cell(cell);
    }
    false
}

/// Runs a script's cells in order, stopping at the first failure (exit code 1).
pub fn script(front: &Arc<Front>, source: &str) -> i32 {
    let mut code = 0;
    for cell in crate::cells::split(source) {
        if is_quit(&cell) {
            break;
        }
        if !front.run_cell(&cell) {
            code = 1;
            break;
        }
    }
    front.goodbye();
    front.shutdown();
    code
}
