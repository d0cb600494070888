//! hearth's Jupyter kernel, and the front-end logic it shares with the REPL.
//!
//! - [`scanner`]: is a cell complete (brackets, strings, comments)?
//! - [`magics`]: the magics table (`:status`, `:runs`, `:sample`, `:plot`, `:save`, `:resume`,
//!   `:help`), answered without compiling.
//! - [`evaluator`]: the thread that owns evcxr, with the prelude preloaded so every cell has
//!   `session`; re-run after a child restart.
//! - [`jupyter`]: sockets, HMAC-verified messages, handlers, interrupts in two steps.
//! - [`install`]: the kernelspec.

pub mod evaluator;
pub mod install;
pub mod jupyter;
pub mod magics;
pub mod scanner;
