//! What hearth's two front-ends, the Jupyter kernel (`hearth-kernel`) and the terminal REPL
//! (`hearth`), share: everything about a cell except how its output is shown. Neither sockets nor
//! a terminal live here.
//!
//! - [`runner`]: one cell's life: start (evcxr in the background while the front-end connects),
//!   submit, stream the child's lines and displays to the front-end's [`runner::Output`], the
//!   two-step interrupt, the end of a cell, the restart of a killed child.
//! - [`marker`]: the marker lines the prelude writes (displays, clears, errors), typed.
//! - [`evaluator`]: the thread that owns evcxr, with the prelude preloaded so every cell has
//!   `session`; re-run after a child restart. Build slots, the private temp folder, stderr routing.
//! - [`scanner`]: is a cell complete (brackets, strings, comments)?
//! - [`magics`]: the magics table (`:status`, `:runs`, `:sample`, `:plot`, `:save`, `:resume`,
//!   `:help`), answered without compiling.
//!
//! A front-end implements [`runner::Output`] and drives a [`runner::Runner`]; the marker lines it
//! receives are already parsed:
//!
//! ```
//! use hearth_cells::marker::Marker;
//! use hearth_cells::scanner::{is_complete, Completeness};
//!
//! let line = hearth::Bundle::text("step 3/3").marker_line(false);
//! let Some(Marker::Display(d)) = Marker::parse(&line) else { unreachable!() };
//! assert_eq!(d.data["text/plain"], "step 3/3");
//! assert_eq!(Marker::parse("a line the cell printed"), None);
//! assert!(matches!(is_complete("for i in 0..3 {"), Completeness::Incomplete(_)));
//! ```

pub mod evaluator;
pub mod magics;
pub mod marker;
pub mod runner;
pub mod scanner;
