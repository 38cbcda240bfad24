//! Worker mode (`jobhost worker`): the process side of process isolation.
//!
//! The daemon starts workers with piped stdin, stdout and stderr (see
//! [`crate::isolation`]). A worker reads one [`Request`] per line on stdin,
//! runs it on its main thread, and replies with [`Reply`] lines: any number
//! of log lines and progress reports, then exactly one outcome. Each line is
//! one JSON object.
//!
//! The replies go to a copy of the original stdout. File descriptor 1 then
//! points at stderr, so a plugin that prints cannot corrupt the channel. Whatever reaches stderr (a panic message, an allocation failure)
//! is logged by the daemon and quoted when the worker dies. Before and after
//! each job the worker writes a marker line to stderr ([`JOB_MARKER`]), so
//! that the daemon can tell which job printed each line.
//!
//! A worker ends when stdin closes. It is also killed by the kernel when the
//! daemon dies (`PR_SET_PDEATHSIG`), so that a job that loops forever cannot
//! outlive a daemon that was killed with SIGKILL.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::RStr;
use jobhost_plugin_api::{HostCallbacks, HostCallbacksRef, HostContext, LogLevel, Outcome, PluginModuleRef};
use serde::{Deserialize, Serialize};

use crate::store::JobId;

/// Start of the lines that mark on stderr where a job's output begins
/// (followed by the job id) and ends (followed by nothing).
pub const JOB_MARKER: &str = "\u{1e}jobhost-job:";

/// Arguments of the hidden `jobhost worker` command, set by the daemon.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Process id of the daemon; the worker exits when that process ends.
    #[arg(long)]
    pub parent: u32,
    /// Cap on the worker's data memory (heap and other private mappings), in bytes.
    #[arg(long)]
    pub memory_limit: Option<u64>,
}

/// One job for a worker to run. The fields borrow from the daemon's run,
/// so that sending a job copies its params only into the encoded line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request<'a> {
    pub job_id: JobId,
    pub attempt: u32,
    /// The library to run it from: the content-addressed copy the daemon loaded.
    pub library: Cow<'a, Path>,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// Params as JSON text.
    #[serde(borrow)]
    pub params: Cow<'a, str>,
}

/// A message a worker sends back while and after it runs a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Log { level: Level, message: String },
    Progress { fraction: f64 },
    Succeeded { output: String },
    Retry { message: String, delay_ms: Option<u64> },
    Failed { message: String },
}

/// [`LogLevel`], as it crosses the channel.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevel> for Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Debug => Self::Debug,
            LogLevel::Info => Self::Info,
            LogLevel::Warn => Self::Warn,
            LogLevel::Error => Self::Error,
        }
    }
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Debug => Self::Debug,
            Level::Info => Self::Info,
            Level::Warn => Self::Warn,
            Level::Error => Self::Error,
        }
    }
}

impl Reply {
    fn from_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded { output } => Self::Succeeded { output: output.into_string() },
            Outcome::Retry { message, delay_ms } => Self::Retry { message: message.into_string(), delay_ms: delay_ms.into_option() },
            Outcome::Failed { message } => Self::Failed { message: message.into_string() },
        }
    }

    /// Returns the outcome this reply ends a run with, or `None` for a log line or progress.
    pub fn into_outcome(self) -> Option<Outcome> {
        match self {
            Self::Succeeded { output } => Some(Outcome::Succeeded { output: output.into() }),
            Self::Retry { message, delay_ms } => Some(Outcome::Retry { message: message.into(), delay_ms: delay_ms.into() }),
            Self::Failed { message } => Some(Outcome::Failed { message: message.into() }),
            Self::Log { .. } | Self::Progress { .. } => None,
        }
    }
}

/// The reply channel: the saved stdout, shared with plugin threads that call back.
type Channel = Mutex<BufWriter<File>>;

/// Runs jobs from stdin until it closes. Never returns while the daemon lives,
/// except on a broken channel.
pub fn serve(args: &WorkerArgs) -> ExitCode {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process, and
    // PR_SET_NAME copies the NUL-terminated name, which `ps` and `pgrep` show.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_NAME, c"jobhost-worker".as_ptr());
    }
    // The daemon may have died before the flag was set.
    if std::os::unix::process::parent_id() != args.parent {
        return ExitCode::FAILURE;
    }
    if let Some(limit) = args.memory_limit
        && let Err(error) = limit_memory(limit)
    {
        eprintln!("jobhost worker: cannot set memory_limit: {error}");
        return ExitCode::FAILURE;
    }
    let channel = match take_stdout() {
        Ok(file) => Mutex::new(BufWriter::new(file)),
        Err(error) => {
            eprintln!("jobhost worker: cannot set up the reply channel: {error}");
            return ExitCode::FAILURE;
        }
    };

    let mut libraries: HashMap<PathBuf, PluginModuleRef> = HashMap::new();
    let mut input = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return ExitCode::SUCCESS,
            Ok(_) => {}
            Err(error) => {
                eprintln!("jobhost worker: cannot read the next job: {error}");
                return ExitCode::FAILURE;
            }
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                // Unlike eprintln!, a failed write here does not panic: the
                // markers only label output, and the job must run regardless.
                let _ = writeln!(std::io::stderr(), "{JOB_MARKER}{}", request.job_id);
                let reply = run(&request, &mut libraries, &channel);
                let _ = writeln!(std::io::stderr(), "{JOB_MARKER}");
                reply
            }
            Err(error) => Reply::Failed { message: format!("the worker received a job it cannot read: {error}") },
        };
        if send(&channel, &reply).is_err() {
            // The daemon closed the channel: no run is waiting for results.
            return ExitCode::FAILURE;
        }
    }
}

/// Caps the data segment and private mappings (`RLIMIT_DATA`), which is where
/// every heap allocation lands; an allocation beyond it fails.
fn limit_memory(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Returns the original stdout as a file, and points descriptor 1 at stderr.
fn take_stdout() -> std::io::Result<File> {
    // SAFETY: dup and dup2 act on descriptors this process owns; the new
    // descriptor is owned by the returned File alone.
    unsafe {
        let saved = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
        if saved < 0 || libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(saved))
    }
}

fn send(channel: &Channel, reply: &Reply) -> std::io::Result<()> {
    let mut out = channel.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    serde_json::to_writer(&mut *out, reply)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The context of one run, which callbacks reach through `host_data`.
struct RunChannel<'a> {
    channel: &'a Channel,
}

fn run(request: &Request<'_>, libraries: &mut HashMap<PathBuf, PluginModuleRef>, channel: &Channel) -> Reply {
    let module = match libraries.get(&*request.library) {
        Some(module) => *module,
        None => match crate::registry::open_library(&request.library) {
            Ok(module) => *libraries.entry(request.library.to_path_buf()).or_insert(module),
            Err(problem) => {
                return Reply::Failed { message: format!("the worker process cannot load {}: {problem}", request.library.display()) };
            }
        },
    };
    let run_channel = RunChannel { channel };
    let context = HostContext {
        job_id: request.job_id,
        attempt: request.attempt,
        host_data: (&raw const run_channel).cast::<c_void>(),
        callbacks: callbacks(),
    };
    let outcome = (module.invoke())(&context, RStr::from_str(&request.method), RStr::from_str(&request.params));
    Reply::from_outcome(outcome)
}

fn callbacks() -> HostCallbacksRef {
    static CALLBACKS: OnceLock<HostCallbacksRef> = OnceLock::new();
    *CALLBACKS.get_or_init(|| HostCallbacks { log: log_line, progress: report_progress, is_cancelled }.leak_into_prefix())
}

/// # Safety
///
/// `host_data` must be the pointer [`run`] put in the context, which stays
/// valid for the whole call.
unsafe fn run_channel<'a>(host_data: *const c_void) -> &'a RunChannel<'a> {
    // SAFETY: guaranteed by the caller, see above.
    unsafe { &*host_data.cast::<RunChannel<'a>>() }
}

extern "C" fn log_line(host_data: *const c_void, level: LogLevel, message: RStr<'_>) {
    // SAFETY: plugins only call back with the host_data of their own context, during the call.
    let run = unsafe { run_channel(host_data) };
    let _ = send(run.channel, &Reply::Log { level: level.into(), message: message.as_str().to_owned() });
}

extern "C" fn report_progress(host_data: *const c_void, fraction: f64) {
    // SAFETY: as in `log_line`.
    let run = unsafe { run_channel(host_data) };
    if fraction.is_finite() {
        let _ = send(run.channel, &Reply::Progress { fraction: fraction.clamp(0.0, 1.0) });
    }
}

/// A worker's job is never asked to stop: it is killed instead.
extern "C" fn is_cancelled(_host_data: *const c_void) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip_as_single_lines() {
        let replies = [
            Reply::Log { level: Level::Warn, message: "two\nlines".into() },
            Reply::Progress { fraction: 0.5 },
            Reply::Retry { message: "later".into(), delay_ms: Some(250) },
        ];
        for reply in replies {
            let line = serde_json::to_string(&reply).unwrap();
            assert!(!line.contains('\n'), "{line}");
            let back: Reply = serde_json::from_str(&line).unwrap();
            assert_eq!(format!("{back:?}"), format!("{reply:?}"));
        }
    }

    #[test]
    fn only_final_replies_end_a_run() {
        assert!(Reply::Progress { fraction: 1.0 }.into_outcome().is_none());
        let outcome = Reply::Failed { message: "bad".into() }.into_outcome();
        assert_eq!(outcome, Some(Outcome::Failed { message: "bad".into() }));
    }
}
