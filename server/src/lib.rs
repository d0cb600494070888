//! hearth's session server: one warm base model served to kernels, REPLs and scripts over HTTP.
//!
//! - [`options`]: the command line; [`run`] starts everything.
//! - [`worker`]: the engine thread that owns every run and executes operations in submission
//!   order; HTTP handlers submit jobs and wait on (or poll) them.
//! - [`routes`]: the `/v1` API, bearer-token auth, body limits, JSON errors.
//! - [`registry`]: runs, checkpoints and metrics in SQLite under the hearth home.
//! - [`lifecycle`]: the session file, token, idle timeout, signals, autosave on the way out,
//!   resume on the way in, cost accounting.
//!
//! ```no_run
//! use clap::Parser;
//! let opts = hearth_server::options::Options::parse_from(["hearth-server", "--model", "tiny"]);
//! hearth_server::run(opts, |ready| eprintln!("listening on {}", ready.url)).unwrap();
//! ```

pub mod error;
pub mod lifecycle;
pub mod options;
pub mod registry;
pub mod routes;
pub mod worker;

pub use error::{ApiError, ServerError};
pub use hearth_api::SessionFile;
pub use lifecycle::{run, App, Ready};
