//! hearth's Jupyter kernel: the Jupyter protocol side. Everything about a cell (the evaluator,
//! the runner and its two-step interrupt, the display markers, the magics, the completeness
//! scanner) is `hearth-cells`, shared with the terminal REPL.
//!
//! - [`jupyter`]: sockets, HMAC-verified messages, handlers; the runner's output as iopub messages.
//! - [`install`]: the kernelspec.

pub mod install;
pub mod jupyter;
