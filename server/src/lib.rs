//! hearth's session server: one warm base model served to kernels, REPLs and scripts over HTTP.
//!
//! - [`options`]: the command line; [`run`] starts everything.
//! - [`worker`]: the engine thread that owns every run and executes operations one at a time,
//!   each run's in submission order; HTTP handlers submit jobs and wait on (or poll) them.
//! - [`quota`]: what each user may take (quotas the admin sets) and what they took (usage).
//! - [`queue`]: the worker's queue, a line per user served in turn by device time.
//! - [`resident`]: the runs and samplers the worker holds in memory, within their caps
//!   (least recently used ones evicted, brought back when used) and memory admission.
//! - [`job`]: what a job is and what it answers, typed: an [`job::Op`] in, a [`job::JobState`]
//!   ending in the operation's own response ([`job::Outcome`]) out.
//! - [`limits`]: what one request may cost, checked before any work or allocation.
//! - [`routes`]: composes the three protocols behind [`http`]'s one auth layer, body limit and
//!   JSON errors: [`native`] (the `/v1` API), [`openai`] (OpenAI-compatible sampling,
//!   `/v1/completions`, `/v1/chat/completions`) and [`tinker`] (Tinker's wire protocol under
//!   `/api/v1`, for the official `tinker` SDK).
//! - [`users`]: who calls (the admin, or a user the admin added) and which runs are theirs.
//! - [`registry`]: runs, checkpoints and metrics in SQLite under the hearth home.
//! - [`lifecycle`]: the session file, token, idle timeout, signals, autosave on the way out,
//!   resume on the way in, cost accounting.
//!
//! ```no_run
//! use clap::Parser;
//! let opts = hearth_server::options::Options::parse_from(["hearth-server", "--model", "tiny"]);
//! hearth_server::run(opts, |ready| eprintln!("listening on {}", ready.url)).unwrap();
//! ```

pub mod checkpoints;
pub mod decoding;
pub mod error;
pub mod http;
pub mod job;
pub mod lifecycle;
pub mod limits;
pub mod native;
pub mod openai;
pub mod options;
pub mod queue;
pub mod quota;
pub mod registry;
pub mod resident;
pub mod routes;
pub mod tinker;
pub mod users;
pub mod worker;

pub use error::{ApiError, ServerError};
pub use hearth_api::SessionFile;
pub use lifecycle::{run, App, Ready};

use clap::Parser;
use std::io::Write;

/// A mutex's guard; a lock poisoned by a panic elsewhere is taken as it is, as everywhere in the
/// server (a panicking job is caught and answered as an error, and the server goes on).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Log lines on stderr (`HEARTH_LOG=debug` for more); the token is never logged.
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(std::io::stderr(), "hearth-server {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

/// The server's command line: parse `args` (the first is the program name), serve until
/// shutdown, return the exit code. The `hearth-server` binary and `hearth serve` both run this.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    hearth_engine::alloc::keep_freed_memory();
    let level = std::env::var("HEARTH_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Info);
    let _ = log::set_boxed_logger(Box::new(StderrLog(level))).map(|()| log::set_max_level(level));
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    if args.get(1).is_some_and(|a| a == "users") {
        return users::cli(&args[1..]);
    }
    let opts = match options::Options::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let result = run(opts, |ready| {
        let mut out = std::io::stdout();
        let _ =
            writeln!(out, "hearth-server listening on {} (session file {})", ready.url, ready.session_file.display());
        let _ = out.flush();
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "hearth-server: {e}");
            1
        }
    }
}
