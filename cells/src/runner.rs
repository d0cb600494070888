//! The cell runner: a cell's life, the same in the Jupyter kernel and the terminal REPL.
//!
//! - **Start** ([`Runner::start`]): evcxr's context is created in the background while the
//!   front-end connects to the session server; the prelude waits for that connection and is
//!   skipped without one (cells then fail with `NoServer`, saying why).
//! - **A cell** ([`Runner::run`]): waits for the prelude, evaluates, and streams the child's lines
//!   to the front-end's [`Output`] as they come: plain lines, and [`Marker`]s (a display, a clear,
//!   an error that makes the cell fail). At its end it waits for the lines still on their way, so
//!   a front-end shows all of a cell's output before its result.
//! - **Interrupt in two steps** ([`Runner::interrupt`]): first the server's operation is cancelled
//!   (the cell ends `Interrupted`, variables kept); a second interrupt, or the cell still running
//!   [`interrupt_grace`] later, kills the evcxr child (variables lost, the model untouched).
//! - **Restart**: evcxr starts a new child after a kill, a panic that aborts or an `exit`; the
//!   evaluator re-runs the prelude in it, so the next cell has `session` again.
//! - **Magics** ([`Runner::magic`]): answered from the table at once, without compiling.

use crate::evaluator::{CellError, CellOutput, Evaluator, LineSink};
use crate::magics;
use crate::marker::{Display, Marker};
use hearth::display::MARKER;
use hearth::{Bundle, Session};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long an interrupted cell may go on after the cancel before its process is killed, unless
/// `HEARTH_INTERRUPT_GRACE_MS` says otherwise ([`interrupt_grace`]).
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// After evcxr returns a cell's result, its last lines can still be in the child's pipes (a
/// stderr line arrives about 100 µs after): this long is given them to reach the runner.
const LATE_LINES: Duration = Duration::from_millis(15);

/// Then the lines being handed to the front-end are waited for, at most this long, checked every
/// `POLL`. The wait ends as soon as none is left; the limit only matters for a slow one (the
/// terminal rasterising a plot), whose output would otherwise come after the cell's result.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// How often the end of a cell looks at the lines in flight.
const POLL: Duration = Duration::from_millis(5);

/// How often a cell (or a completion) looks whether the background start got as far as it needs.
const START_POLL: Duration = Duration::from_millis(10);

/// The front-end's side of the runner: where a cell's output goes, and what it is told along the
/// way. The line methods are called from the threads that drain the cell process's pipes, one
/// line at a time per stream, and the runner waits for them at the end of a cell.
pub trait Output: Send + Sync + 'static {
    /// A line the cell printed on stdout.
    fn stdout(&self, line: &str);
    /// A line of the cell's stderr, or a marker line that does not parse.
    fn stderr(&self, line: &str);
    /// A display to show, or to update in place.
    fn display(&self, display: &Display);
    /// `hearth::clear_output(wait)`.
    fn clear(&self, wait: bool);
    /// evcxr returned the cell's result; its last lines may still be on their way.
    fn evaluated(&self) {}
    /// A step of an interrupt is about to be taken (not called for the kill after the grace period).
    fn interrupting(&self, _step: Interrupt) {}
    /// The connection attempt ended (before the prelude runs).
    fn connected(&self, _session: &Result<Session, String>) {}
    /// The prelude ran or failed (not called without a connection: there is no prelude then).
    fn prepared(&self, _status: &Result<(), String>) {}
    /// A cell waits for the prelude, which is still compiling.
    fn waiting_for_prelude(&self) {}
}

/// The steps of an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Step one: the server cancels what it runs for this session; the cell ends `Interrupted`.
    Cancel,
    /// Step two: the evcxr child is killed, and restarted with the prelude.
    Kill,
}

/// One evaluator and its session, and the cell running in it now. Shared (`Arc`) by the
/// front-end's threads: the one that runs cells, the one that interrupts, the output threads.
pub struct Runner {
    output: Arc<dyn Output>,
    session: OnceLock<Result<Session, String>>,
    evaluator: OnceLock<Evaluator>,
    /// The prelude ran, failed, or will not run (no connection).
    prepared: AtomicBool,
    executing: AtomicBool,
    /// Counts cells, so a late kill spares the cell after the one it was meant for.
    cell: AtomicU64,
    /// Interrupts of the running cell.
    presses: AtomicU32,
    /// Set by an interrupt or an error marker: the running cell ends with this error.
    cell_error: Mutex<Option<CellError>>,
    /// Lines of the child being handed to the output right now.
    publishing: AtomicUsize,
}

impl Runner {
    /// Starts the evaluator and, on a background thread, `connect` (which finds or starts the
    /// session server for the front-end's own use: magics, cancel, autosave); returns at once.
    /// The prelude runs once `connect` succeeded; an error skips it.
    pub fn start(
        output: Arc<dyn Output>,
        connect: impl FnOnce() -> Result<Session, String> + Send + 'static,
    ) -> Arc<Runner> {
        let runner = Arc::new(Runner {
            output,
            session: OnceLock::new(),
            evaluator: OnceLock::new(),
            prepared: AtomicBool::new(false),
            executing: AtomicBool::new(false),
            cell: AtomicU64::new(0),
            presses: AtomicU32::new(0),
            cell_error: Mutex::new(None),
            publishing: AtomicUsize::new(0),
        });
        let r = runner.clone();
        std::thread::Builder::new().name("hearth-start".into()).spawn(move || r.connect_and_prepare(connect)).ok();
        runner
    }

    fn connect_and_prepare(self: Arc<Self>, connect: impl FnOnce() -> Result<Session, String>) {
        // evcxr's context (rust-analyzer's load, about 4 s on 2 cores) is created while `connect`
        // runs; the prelude, whose `session` finds the server through the session file, waits
        let (gate, wait) = std::sync::mpsc::channel::<Result<(), String>>();
        let sink = |stderr: bool| -> LineSink {
            let runner = Arc::downgrade(&self);
            Arc::new(move |line: &str| {
                if let Some(r) = Weak::upgrade(&runner) {
                    r.child_line(line, stderr);
                }
            })
        };
        let ev = Evaluator::start_after(sink(false), sink(true), move || {
            wait.recv().unwrap_or_else(|_| Err("no session server".into()))
        });
        let _ = self.evaluator.set(ev.clone());
        let session = connect();
        self.output.connected(&session);
        let _ = gate.send(session.as_ref().map(|_| ()).map_err(Clone::clone));
        let failed = session.is_err();
        let _ = self.session.set(session);
        if failed {
            self.prepared.store(true, Ordering::SeqCst);
            return;
        }
        let ready = ev.wait_ready();
        self.prepared.store(true, Ordering::SeqCst);
        self.output.prepared(&ready);
    }

    /// One line of the child's stdout or stderr, counted while the output has it. Display markers
    /// come on stdout (in order with the cell's prints), error markers on stderr.
    fn child_line(&self, line: &str, stderr: bool) {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let routed = stderr || line.starts_with(MARKER);
        match routed.then(|| Marker::parse(line)).flatten() {
            Some(Marker::Display(d)) => self.output.display(&d),
            Some(Marker::Clear { wait }) => self.output.clear(wait),
            Some(Marker::Error { ename, evalue }) => {
                let mut flagged = self.cell_error.lock().unwrap_or_else(|p| p.into_inner());
                flag(&mut flagged, CellError { ename, evalue, traceback: vec![] });
            }
            None if routed => self.output.stderr(line),
            None => self.output.stdout(line),
        }
        self.publishing.fetch_sub(1, Ordering::SeqCst);
    }

    /// The front-end's session, once the connection attempt ended (waits for it).
    pub fn session(&self) -> Result<&Session, String> {
        loop {
            if let Some(s) = self.session.get() {
                return s.as_ref().map_err(Clone::clone);
            }
            std::thread::sleep(START_POLL);
        }
    }

    /// The front-end's session if connected by now, without waiting.
    pub fn session_now(&self) -> Option<&Session> {
        self.session.get().and_then(|s| s.as_ref().ok())
    }

    /// Waits up to `max` for the connection attempt to end.
    pub fn wait_connected(&self, max: Duration) {
        let t0 = Instant::now();
        while self.session.get().is_none() && t0.elapsed() < max {
            std::thread::sleep(POLL);
        }
    }

    /// The evaluator (waits the moment it takes to be created).
    pub fn evaluator(&self) -> Evaluator {
        loop {
            if let Some(e) = self.evaluator.get() {
                return e.clone();
            }
            std::thread::sleep(START_POLL);
        }
    }

    /// The evaluator if created by now, without waiting.
    pub fn evaluator_now(&self) -> Option<&Evaluator> {
        self.evaluator.get()
    }

    /// Whether a cell is being evaluated now.
    pub fn is_running(&self) -> bool {
        self.executing.load(Ordering::SeqCst)
    }

    /// The magic `code` is (`None`: it is none), answered with the session; a failure is the
    /// cell's error `Magic:<name>`.
    pub fn magic(&self, code: &str) -> Option<Result<Bundle, CellError>> {
        let (m, _) = magics::find(code)?;
        let out = self.session().and_then(|s| magics::run(code, s).unwrap_or_else(|| Err("not a magic".into())));
        Some(out.map_err(|e| CellError { ename: format!("Magic:{}", m.name), evalue: e, traceback: vec![] }))
    }

    /// Runs one cell (Rust or an evcxr command; see [`Runner::magic`] for magics) to its end: its
    /// lines went to the [`Output`] before this returns. Blocks.
    pub fn run(&self, code: &str) -> Result<CellOutput, CellError> {
        if let Err(e) = self.session() {
            return Err(CellError { ename: "NoServer".into(), evalue: e, traceback: vec![] });
        }
        let ev = self.evaluator();
        if !self.prepared.load(Ordering::SeqCst) {
            self.output.waiting_for_prelude();
            while !self.prepared.load(Ordering::SeqCst) {
                std::thread::sleep(START_POLL);
            }
        }
        ev.wait_ready().map_err(|e| CellError { ename: "PreludeError".into(), evalue: e, traceback: vec![] })?;
        *self.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.presses.store(0, Ordering::SeqCst);
        self.cell.fetch_add(1, Ordering::SeqCst);
        self.executing.store(true, Ordering::SeqCst);
        let result = ev.eval(code);
        self.executing.store(false, Ordering::SeqCst);
        self.output.evaluated();
        std::thread::sleep(LATE_LINES);
        let t0 = Instant::now();
        while self.publishing.load(Ordering::SeqCst) > 0 && t0.elapsed() < DRAIN_LIMIT {
            std::thread::sleep(POLL);
        }
        let flagged = self.cell_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        settle(result, flagged)
    }

    /// Interrupts the running cell (nothing when none runs). The first call cancels the server's
    /// operation and makes the cell end `Interrupted`; if the same cell still runs
    /// [`interrupt_grace`] later, or on a second call, the evcxr child is killed.
    pub fn interrupt(self: &Arc<Self>) {
        if !self.executing.load(Ordering::SeqCst) {
            return;
        }
        let cell = self.cell.load(Ordering::SeqCst);
        if self.presses.fetch_add(1, Ordering::SeqCst) > 0 {
            self.output.interrupting(Interrupt::Kill);
            if let Some(ev) = self.evaluator.get() {
                ev.kill_child();
            }
            return;
        }
        *self.cell_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(interrupted());
        self.output.interrupting(Interrupt::Cancel);
        let r = self.clone();
        std::thread::spawn(move || {
            if let Some(s) = r.session_now() {
                let _ = s.cancel_all();
            }
            std::thread::sleep(interrupt_grace(std::env::var("HEARTH_INTERRUPT_GRACE_MS").ok().as_deref()));
            if r.executing.load(Ordering::SeqCst) && r.cell.load(Ordering::SeqCst) == cell {
                if let Some(ev) = r.evaluator.get() {
                    ev.kill_child();
                }
            }
        });
    }

    /// Ends the evaluator (evcxr's build directory goes with its context), waiting at most `max`.
    pub fn shutdown(&self, max: Duration) {
        if let Some(ev) = self.evaluator.get() {
            ev.shutdown(max);
        }
    }
}

/// The error of an interrupted cell.
fn interrupted() -> CellError {
    CellError {
        ename: "Interrupted".into(),
        evalue:
            "the cell was interrupted; the server's operation was cancelled and changed nothing (variables are kept)"
                .into(),
        traceback: vec![],
    }
}

/// The grace period: `HEARTH_INTERRUPT_GRACE_MS` (`ms`) when it is a number, else
/// [`INTERRUPT_GRACE`].
pub fn interrupt_grace(ms: Option<&str>) -> Duration {
    ms.and_then(|v| v.parse().ok()).map_or(INTERRUPT_GRACE, Duration::from_millis)
}

/// Records an error marker's error as the cell's: an interrupt's own error wins over the `?`
/// error it caused.
fn flag(flagged: &mut Option<CellError>, e: CellError) {
    if flagged.as_ref().is_none_or(|f| f.ename != "Interrupted") {
        *flagged = Some(e);
    }
}

/// The cell's outcome: evcxr's result, unless an interrupt or an error marker flagged the cell.
/// An interrupt whose second step killed the child reads `Interrupted`, with the restart's words.
fn settle(result: Result<CellOutput, CellError>, flagged: Option<CellError>) -> Result<CellOutput, CellError> {
    match (result, flagged) {
        (Ok(_), Some(e)) => Err(e),
        (Err(e), Some(f)) if f.ename == "Interrupted" && e.ename == "ChildRestarted" => {
            Err(CellError { ename: "Interrupted".into(), evalue: e.evalue, traceback: vec![] })
        }
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(ename: &str) -> CellError {
        CellError { ename: ename.into(), evalue: format!("{ename} happened"), traceback: vec![] }
    }

    #[test]
    fn an_interrupt_wins_over_the_error_it_caused() {
        let mut flagged = None;
        flag(&mut flagged, err("Error"));
        assert_eq!(flagged.as_ref().map(|e| e.ename.as_str()), Some("Error"));
        flag(&mut flagged, err("Panic"));
        assert_eq!(flagged.as_ref().map(|e| e.ename.as_str()), Some("Panic"), "a later error replaces an earlier");
        let mut flagged = Some(interrupted());
        flag(&mut flagged, err("Error"));
        assert_eq!(flagged.map(|e| e.ename), Some("Interrupted".into()));
    }

    #[test]
    fn a_flagged_cell_fails_and_a_killed_interrupted_cell_reads_interrupted() {
        let ok = || Ok(CellOutput::default());
        assert!(settle(ok(), None).is_ok());
        assert_eq!(settle(ok(), Some(err("Panic"))).unwrap_err().ename, "Panic");
        let restarted = settle(Err(err("ChildRestarted")), Some(interrupted())).unwrap_err();
        assert_eq!((restarted.ename.as_str(), restarted.evalue.as_str()), ("Interrupted", "ChildRestarted happened"));
        // evcxr's own error stands when nothing interrupted the cell
        assert_eq!(settle(Err(err("CompilationError")), Some(err("Error"))).unwrap_err().ename, "CompilationError");
        assert_eq!(settle(Err(err("ChildRestarted")), None).unwrap_err().ename, "ChildRestarted");
    }

    #[test]
    fn the_grace_period_is_three_seconds_unless_set() {
        assert_eq!(interrupt_grace(None), Duration::from_secs(3));
        assert_eq!(interrupt_grace(Some("120000")), Duration::from_secs(120));
        assert_eq!(interrupt_grace(Some("soon")), INTERRUPT_GRACE);
    }
}
