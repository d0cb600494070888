//! `hearth-server`: parse the options, serve until shutdown, map errors to an exit code.

use clap::Parser;
use std::io::Write;

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

fn main() {
    hearth_engine::alloc::keep_freed_memory();
    let level = std::env::var("HEARTH_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Info);
    let _ = log::set_boxed_logger(Box::new(StderrLog(level))).map(|()| log::set_max_level(level));
    let opts = hearth_server::options::Options::parse();
    let result = hearth_server::run(opts, |ready| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "hearth-server listening on {} (session file {})", ready.url, ready.session_file.display());
        let _ = out.flush();
    });
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "hearth-server: {e}");
        std::process::exit(1);
    }
}
