//! Log output: `tracing` to stderr, plus two files in `log_dir`.
//!
//! - `jobs.log`: every dispatch, start, success, retry and failure
//!   (targets `jobhost::job`, `jobhost::plugin` and `jobhost::daemon`), with
//!   job id, plugin, method and attempt as fields.
//! - `jobs-errors.log`: errors only, from every target.
//!
//! `RUST_LOG` sets the stderr filter (default: `info`); the files ignore it.

use std::path::Path;

use tracing::Level;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Keeps the file writers flushing; drop it only when the process ends.
#[must_use = "logs stop being written when the guard is dropped"]
pub struct LogGuard {
    _guards: Vec<WorkerGuard>,
}

/// Destination and level of stderr logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// `RUST_LOG`, or `info` by default: for the daemon.
    Info,
    /// `RUST_LOG`, or `warn` by default: for commands whose stdout is their output.
    Quiet,
    /// Nothing, as under a progress bar.
    Off,
}

/// Installs the global subscriber. With `log_dir` set, also writes
/// `jobs.log` and `jobs-errors.log` there. If the folder cannot be created,
/// it prints a warning and logs to stderr only.
pub fn init(stderr: Stderr, log_dir: Option<&Path>) -> LogGuard {
    // PostgreSQL notices such as "relation already exists, skipping" are
    // routine during migrations, so they show only from `warn` up.
    let default = match stderr {
        Stderr::Info => "info,sqlx::postgres::notice=warn",
        Stderr::Quiet | Stderr::Off => "warn",
    };
    let stderr_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colors only on a terminal, so that captured logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr_layer = (stderr != Stderr::Off)
        .then(|| fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(false).with_filter(stderr_filter));

    let mut guards = Vec::new();
    let mut file_layers = Vec::new();
    if let Some(log_dir) = log_dir {
        match std::fs::create_dir_all(log_dir) {
            Ok(()) => {
                let (jobs, guard) = tracing_appender::non_blocking(buffered(tracing_appender::rolling::never(log_dir, "jobs.log")));
                guards.push(guard);
                let jobs_targets = Targets::new()
                    .with_target("jobhost::job", Level::INFO)
                    .with_target("jobhost::plugin", Level::INFO)
                    .with_target("jobhost::daemon", Level::INFO);
                file_layers.push(fmt::layer().with_writer(jobs).with_ansi(false).with_filter(jobs_targets).boxed());

                let (errors, guard) =
                    tracing_appender::non_blocking(buffered(tracing_appender::rolling::never(log_dir, "jobs-errors.log")));
                guards.push(guard);
                file_layers.push(fmt::layer().with_writer(errors).with_ansi(false).with_filter(LevelFilter::ERROR).boxed());
            }
            Err(error) => eprintln!("warning: cannot create log folder {}: {error}; logging to stderr only", log_dir.display()),
        }
    }

    let _ = tracing_subscriber::registry().with(stderr_layer).with(file_layers).try_init();
    LogGuard { _guards: guards }
}

/// Wraps a log file in a buffer. The writer thread flushes it whenever its
/// queue of lines is empty, so lines still reach the file at once. Unbuffered,
/// each line cost a `write` system call, which took about a quarter of the
/// daemon's CPU samples (`perf record`) in a drain of no-op jobs.
fn buffered(file: tracing_appender::rolling::RollingFileAppender) -> std::io::BufWriter<tracing_appender::rolling::RollingFileAppender> {
    std::io::BufWriter::with_capacity(64 * 1024, file)
}
