//! The REPL's front-end: connects to (or starts) the session server and creates the evaluator in
//! the background (hearth-cells' [`Runner`]), runs cells and magics, turns Ctrl-C into the
//! runner's two-step interrupt, and asks the server to autosave on the way out. The interactive
//! loop (rustyline) and the script runner both drive a [`Front`]; [`Screen`] is the runner's
//! output on this terminal.

use crate::render::Terminal;
use hearth::Session;
use hearth_cells::evaluator::{route_stderr, write_fd, StderrLine};
use hearth_cells::magics;
use hearth_cells::marker::Display;
use hearth_cells::runner::{Interrupt, Output, Runner};
use hearth_cells::scanner::{input_status, split_typed, Completeness};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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

impl Connect {
    fn session(self) -> Result<Session, String> {
        match self {
            Connect::Home { model, resume } => {
                Session::connect_or_start(&hearth::home_dir(), "main", model.as_deref(), resume)
            }
            Connect::Attach { url, token } => Session::attach(&url, &token, "main"),
        }
        .map_err(|e| e.to_string())
    }
}

type Printer = Box<dyn rustyline::ExternalPrinter + Send>;

/// The runner's output on this terminal, and the notes hearth adds: above the prompt while
/// rustyline reads, on stderr otherwise.
pub struct Screen {
    term: Arc<Terminal>,
    /// Prints above the prompt while rustyline reads (interactive mode).
    printer: Mutex<Option<Printer>>,
    /// The runner this draws for, to know whether a cell runs.
    runner: OnceLock<Weak<Runner>>,
    launched: Instant,
    /// Crates cargo compiled since the last cell ended (or during the prelude), from its
    /// `Compiling x` lines, which evcxr writes to this process's stderr.
    compiled: Mutex<Vec<String>>,
    /// The real stderr while fd 2 is the router's pipe (-1: not routed), and whether a status
    /// line is drawn on it now.
    status_fd: AtomicI32,
    status_shown: AtomicBool,
}

impl Screen {
    fn running(&self) -> bool {
        self.runner.get().and_then(Weak::upgrade).is_some_and(|r| r.is_running())
    }

    /// A note from hearth, printed above the prompt when one is shown.
    fn notify(&self, msg: &str) {
        let mut printer = self.printer.lock().unwrap_or_else(|p| p.into_inner());
        match printer.as_mut() {
            Some(p) if !self.running() => {
                let _ = p.print(format!("{msg}\n"));
            }
            _ => self.term.note(msg),
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
        if fd >= 0 && self.running() && self.term.stderr_tty {
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

    /// Takes file descriptor 2 for the life of the REPL: evcxr writes cargo's `Compiling x` lines
    /// straight to this process's stderr; they become [`Screen::compiling`] (one quiet status
    /// line), everything else is forwarded.
    fn route_stderr(self: &Arc<Self>) {
        let s = self.clone();
        let saved = route_stderr(move |line, saved| match line {
            StderrLine::Compiling(krate) => s.compiling(krate),
            StderrLine::Other(line) => {
                s.clear_status();
                s.forward_stderr(line, saved);
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
}

impl Output for Screen {
    fn stdout(&self, line: &str) {
        self.clear_status();
        self.term.child_stdout(line);
    }

    fn stderr(&self, line: &str) {
        self.clear_status();
        self.term.child_stderr(line);
    }

    fn display(&self, d: &Display) {
        self.clear_status();
        self.term.show(&d.data, d.display_id.as_deref(), d.update);
    }

    fn clear(&self, _wait: bool) {
        // a terminal keeps its scrollback
        self.clear_status();
    }

    /// The status line goes; on a pipe (scripts, CI) one line says which crates a cell had to
    /// compile besides itself.
    fn evaluated(&self) {
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

    fn interrupting(&self, step: Interrupt) {
        match step {
            Interrupt::Cancel => self.term.note("hearth: interrupting (Ctrl-C again restarts the cell process)"),
            Interrupt::Kill => self.term.note("hearth: restarting the cell process"),
        }
    }

    fn connected(&self, session: &Result<Session, String>) {
        match session {
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
            // no prelude then: the cell process's own connect would not honour --model or --attach
            Err(e) => self.notify(&format!("hearth: no session server: {e}")),
        }
    }

    fn prepared(&self, ready: &Result<(), String>) {
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

    fn waiting_for_prelude(&self) {
        self.term.note("hearth: waiting for `session` (the prelude is compiling)…");
    }
}

/// The REPL's state: the terminal, its [`Screen`] and the cell runner, shared by the input loop
/// and the Ctrl-C thread.
pub struct Front {
    term: Arc<Terminal>,
    screen: Arc<Screen>,
    runner: Arc<Runner>,
}

impl Front {
    /// Starts connecting and creating the evaluator in the background; returns at once.
    pub fn start(term: Arc<Terminal>, connect: Connect, launched: Instant) -> Arc<Front> {
        let screen = Arc::new(Screen {
            term: term.clone(),
            printer: Mutex::new(None),
            runner: OnceLock::new(),
            launched,
            compiled: Mutex::new(Vec::new()),
            status_fd: AtomicI32::new(-1),
            status_shown: AtomicBool::new(false),
        });
        screen.route_stderr();
        let runner = Runner::start(screen.clone(), move || connect.session());
        let _ = screen.runner.set(Arc::downgrade(&runner));
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT]) {
            let r = runner.clone();
            std::thread::Builder::new()
                .name("hearth-ctrl-c".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        r.interrupt();
                    }
                })
                .ok();
        }
        Arc::new(Front { term, screen, runner })
    }

    /// Lets background messages print above rustyline's prompt.
    pub fn set_printer(&self, p: Printer) {
        *self.screen.printer.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    }

    /// Waits up to `max` for the background connection.
    pub fn wait_connected(&self, max: Duration) {
        self.runner.wait_connected(max);
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
        match self.runner.evaluator_now() {
            Some(ev) if ev.is_ready() && !self.runner.is_running() => {
                let (names, start, _) = ev.complete(line, pos);
                (start, names)
            }
            _ => (pos, Vec::new()),
        }
    }

    /// Runs one cell (a magic, an evcxr command or Rust) and shows its output; `false` if it
    /// failed.
    pub fn run_cell(&self, code: &str) -> bool {
        if let Some(out) = self.runner.magic(code) {
            return match out {
                Ok(bundle) => {
                    self.term.show(&bundle.data, None, false);
                    true
                }
                Err(e) => {
                    self.term.error(&e);
                    false
                }
            };
        }
        let result = self.runner.run(code);
        self.term.end_cell();
        match result {
            Ok(out) => {
                if out.has_value() {
                    let data: BTreeMap<String, String> = out.data.into_iter().collect();
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
        self.runner.shutdown(Duration::from_secs(5));
    }

    /// On the way out: the server saves every run (it stays up, warm, until its idle timeout).
    pub fn goodbye(&self) {
        self.screen.restore_stderr();
        let Some(s) = self.runner.session_now() else {
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

/// rustyline's helper: multi-line input by hearth-cells' completeness scanner, completion.
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
