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
mod session;

pub use display::{clear_output, Bundle, Plot, Progress, SampleTable};
pub use error::{HearthError, Result};
pub use hearth_api::{
    AdamParams, ChatMessage, CheckpointKind, Datum, ForwardBackwardInput, ForwardBackwardOutput, LoadStateResponse, LoraConfig, LossFn,
    LossFnInputs, MetricRow, Metrics, OptimStepOutput, PpoConfig, RenderChatResponse, RunInfo, SampleInput, SampleOutput, SampledSequence,
    SamplingParams, SaveStateResponse, ServerInfo, Stop, StopReason, TargetModule, TrainingConfig,
};
pub use session::{home_dir, Pending, Session};

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
            let err = serde_json::json!({"error": {"ename": "Panic", "evalue": format!("panicked{at}: {msg}")}});
            let _ = writeln!(std::io::stderr(), "{}{err}", display::MARKER);
        } else {
            let _ = writeln!(std::io::stderr(), "panicked{at}: {msg}");
        }
    }));
}
