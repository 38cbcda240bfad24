//! Process isolation, the daemon side: long-lived worker processes that run
//! jobs sent to them one at a time (see [`crate::worker`] for the other side).
//!
//! # Life of a worker
//!
//! A worker is started when a run needs one and none is idle, up to
//! `concurrency` workers; workers differ only in their memory limit. After a
//! run it goes back to the idle list, unless the daemon is stopping, it has
//! run `max_jobs_per_worker` jobs, or jobs.toml was reloaded since it
//! started: then it is retired (its stdin is closed and it exits), so that
//! old plugin versions do not stay loaded.
//!
//! A worker that dies while it runs a job fails that run with the reason:
//! the signal or exit code, and its last line on stderr. Killing a worker is
//! how timeouts and cancels stop a process-isolated job. The kill goes
//! through [`RunState::cancel`], which kills the worker that
//! [`RunState::attach`] recorded for the run.
//!
//! Workers are started from one dedicated thread, because the kernel sends
//! the `PR_SET_PDEATHSIG` signal when the *thread* that started the worker
//! ends, and that thread lives as long as the pool.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use jobhost_plugin_api::Outcome;

use crate::executor::{Run, RunState, log_plugin_line};
use crate::metrics::Metrics;
use crate::worker::{JOB_MARKER, Reply, Request};

/// The end of a process-isolated run.
#[derive(Debug)]
pub enum Ended {
    /// The method returned (or panicked, which the plugin turns into a failure).
    Returned(Outcome),
    /// The worker died or could not be used; the text gives the reason.
    Lost(String),
}

/// The worker processes of one daemon.
pub struct WorkerProcesses {
    idle: Mutex<Vec<WorkerProcess>>,
    /// Workers started and not yet reaped.
    alive: Mutex<usize>,
    reap_notice: Condvar,
    capacity: usize,
    max_jobs: Option<u64>,
    stopping: AtomicBool,
    /// The newest jobs.toml generation a run has asked for.
    newest_generation: AtomicU64,
    spawner: Sender<SpawnRequest>,
    metrics: Arc<Metrics>,
}

struct SpawnRequest {
    memory_limit: Option<u64>,
    reply: Sender<std::io::Result<Child>>,
}

struct WorkerProcess {
    child: Child,
    pid: u32,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    stderr: Arc<StderrTail>,
    memory_limit: Option<u64>,
    generation: u64,
    jobs_run: u64,
}

/// The part of a worker's stderr that explains its death.
#[derive(Default)]
struct StderrTail {
    state: Mutex<TailState>,
    closed: Condvar,
    /// The job whose output the stderr lines are now, from the worker's markers; 0 between jobs.
    job_id: AtomicI64,
}

#[derive(Default)]
struct TailState {
    last_line: String,
    /// The allocation failure Rust prints before it aborts, if any.
    allocation_failure: Option<String>,
    closed: bool,
}

/// Maximum length, in characters, of a stderr line quoted in a failure reason.
const MAX_QUOTED: usize = 400;

impl WorkerProcesses {
    /// Creates an empty pool of at most `capacity` workers; none starts yet.
    pub fn new(capacity: usize, max_jobs: Option<u64>, metrics: Arc<Metrics>) -> Arc<Self> {
        let (spawner, requests) = crossbeam_channel::unbounded::<SpawnRequest>();
        let started = std::thread::Builder::new().name("jobhost-spawner".into()).spawn(move || {
            for request in requests {
                let _ = request.reply.send(start_process(request.memory_limit));
            }
        });
        if let Err(error) = started {
            tracing::error!(target: "jobhost::daemon", %error, "cannot start the thread that starts worker processes; process-isolated jobs will fail");
        }
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            alive: Mutex::new(0),
            reap_notice: Condvar::new(),
            capacity: capacity.max(1),
            max_jobs,
            stopping: AtomicBool::new(false),
            newest_generation: AtomicU64::new(0),
            spawner,
            metrics,
        })
    }

    /// Returns the number of worker processes started and not yet reaped.
    pub fn alive(&self) -> usize {
        *self.alive.lock().unwrap()
    }

    /// Runs `run` in a worker and returns how it ended. Blocks until then.
    pub fn run(&self, run: &Run) -> Ended {
        let request = Request {
            job_id: run.job.id,
            attempt: run.job.attempt,
            library: run.plugin.loaded_from.as_path().into(),
            method: run.job.method.as_str().into(),
            params: run.job.params.as_str().into(),
        };
        let mut line = match serde_json::to_vec(&request) {
            Ok(line) => line,
            Err(error) => {
                return Ended::Lost(format!("cannot encode the job for its worker process: {error}"));
            }
        };
        line.push(b'\n');
        self.newest_generation.fetch_max(run.generation, Ordering::Relaxed);

        // A worker can die while idle, for instance when an operator kills
        // it. The job never reached it then, so one fresh worker gets a try.
        for first_try in [true, false] {
            let mut worker = match self.check_out(run.settings.memory_limit, run.generation) {
                Ok(worker) => worker,
                Err(error) => {
                    return Ended::Lost(format!("cannot start a worker process: {error}"));
                }
            };
            run.state.attach(worker.pid);
            let sent = worker.input.write_all(&line).and_then(|()| worker.input.flush());
            if sent.is_err() {
                run.state.detach();
                let reason = self.bury(worker, &run.state, false);
                if first_try && !run.state.is_cancelled() {
                    tracing::warn!(target: "jobhost::daemon", job_id = run.job.id, "{reason}; starting another worker for the job");
                    continue;
                }
                return Ended::Lost(reason);
            }
            return self.wait_for_reply(worker, run);
        }
        unreachable!("the second try always returns")
    }

    fn wait_for_reply(&self, mut worker: WorkerProcess, run: &Run) -> Ended {
        let mut line = String::new();
        loop {
            line.clear();
            match worker.output.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    run.state.detach();
                    return Ended::Lost(self.bury(worker, &run.state, true));
                }
                Ok(_) => {}
            }
            let reply = match serde_json::from_str::<Reply>(&line) {
                Ok(reply) => reply,
                Err(error) => {
                    run.state.detach();
                    let _ = worker.child.kill();
                    let reason = self.bury(worker, &run.state, true);
                    return Ended::Lost(format!("the worker process sent a reply the daemon cannot read ({error}); {reason}"));
                }
            };
            match reply {
                Reply::Log { level, message } => log_plugin_line(&run.state, level.into(), &message),
                Reply::Progress { fraction } => run.state.set_progress(fraction),
                last => {
                    run.state.detach();
                    worker.jobs_run += 1;
                    self.check_in(worker);
                    let outcome = last.into_outcome().expect("log lines and progress are handled above");
                    return Ended::Returned(outcome);
                }
            }
        }
    }

    /// Takes an idle worker with `memory_limit`, or starts one.
    fn check_out(&self, memory_limit: Option<u64>, generation: u64) -> std::io::Result<WorkerProcess> {
        let mut retired = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap();
            // Workers started before a reload are not used for newer runs.
            if idle.iter().any(|worker| worker.generation < generation) {
                let (current, old): (Vec<_>, Vec<_>) = idle.drain(..).partition(|worker| worker.generation >= generation);
                *idle = current;
                retired.extend(old);
            }
            let found = idle.iter().rposition(|worker| worker.memory_limit == memory_limit).map(|index| idle.swap_remove(index));
            // Make room for a worker with another limit.
            if found.is_none() && self.alive().saturating_sub(retired.len()) >= self.capacity && !idle.is_empty() {
                retired.push(idle.remove(0));
            }
            found
        };
        for worker in retired {
            self.retire(worker);
        }
        match found {
            Some(worker) => Ok(worker),
            None => self.start(memory_limit, generation),
        }
    }

    fn check_in(&self, worker: WorkerProcess) {
        let worn_out = self.max_jobs.is_some_and(|max| worker.jobs_run >= max);
        let outdated = worker.generation < self.newest_generation.load(Ordering::Relaxed);
        if self.stopping.load(Ordering::Acquire) || worn_out || outdated || self.alive() > self.capacity {
            self.retire(worker);
            return;
        }
        self.idle.lock().unwrap().push(worker);
        // `stop` may have emptied the list between the check and the push.
        if self.stopping.load(Ordering::Acquire) {
            self.retire_idle();
        }
    }

    fn start(&self, memory_limit: Option<u64>, generation: u64) -> std::io::Result<WorkerProcess> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.spawner
            .send(SpawnRequest { memory_limit, reply })
            .map_err(|_| std::io::Error::other("the thread that starts worker processes has stopped"))?;
        let mut child = answer.recv().map_err(|_| std::io::Error::other("the thread that starts worker processes has stopped"))??;
        let pid = child.id();
        let (Some(input), Some(output), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the worker process has no pipes"));
        };
        *self.alive.lock().unwrap() += 1;
        self.metrics.count_workers(1);
        let tail = Arc::new(StderrTail::default());
        let reader_tail = tail.clone();
        let reader = std::thread::Builder::new().name("jobhost-worker-stderr".into()).spawn(move || read_stderr(stderr, pid, &reader_tail));
        if let Err(error) = reader {
            // The worker still runs; its stderr is not read, so mark it closed.
            tracing::warn!(target: "jobhost::daemon", %error, worker = pid, "cannot start the thread that reads a worker's stderr");
            tail.state.lock().unwrap().closed = true;
        }
        tracing::debug!(target: "jobhost::daemon", worker = pid, memory_limit, "worker process started");
        Ok(WorkerProcess { child, pid, input, output: BufReader::new(output), stderr: tail, memory_limit, generation, jobs_run: 0 })
    }

    /// Ends an idle worker: closing its stdin makes it exit.
    fn retire(&self, worker: WorkerProcess) {
        let WorkerProcess { mut child, input, pid, .. } = worker;
        drop(input);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                _ => {
                    tracing::warn!(target: "jobhost::daemon", worker = pid, "an idle worker process did not exit when asked; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        tracing::debug!(target: "jobhost::daemon", worker = pid, "worker process retired");
        self.reaped();
    }

    /// Reaps a worker that died or was killed, and returns the reason it
    /// ended. `had_job` is false for a worker found dead when it was sent a
    /// job, which it never received.
    fn bury(&self, mut worker: WorkerProcess, state: &RunState, had_job: bool) -> String {
        drop(worker.input);
        let status = worker.child.wait();
        self.reaped();
        let pid = worker.pid;
        if !had_job {
            let ending = status.map_or_else(|error| format!("was lost ({error})"), describe_status);
            return format!("idle worker process {pid} {ending} before it received the job");
        }
        let last_line = worker.stderr.last_words(Duration::from_millis(200));
        let reason = match status {
            Ok(status) => describe_death(pid, status, &last_line, worker.memory_limit, state.is_cancelled()),
            Err(error) => format!("worker process {pid} was lost: {error}"),
        };
        self.metrics.record_worker_death(state.is_cancelled());
        if !state.is_cancelled() {
            tracing::warn!(target: "jobhost::daemon", job_id = state.job_id, worker = worker.pid, "{reason}; a new worker will take the next job");
        }
        reason
    }

    fn reaped(&self) {
        let mut alive = self.alive.lock().unwrap();
        *alive = alive.saturating_sub(1);
        self.metrics.count_workers(-1);
        self.reap_notice.notify_all();
    }

    fn retire_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap());
        for worker in idle {
            self.retire(worker);
        }
    }

    /// Starts no more work: idle workers exit now, busy ones after their job.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.retire_idle();
    }

    /// Waits until every worker has been reaped, or `timeout` passes.
    /// Returns how many are left.
    pub fn wait_until_reaped(&self, timeout: Duration) -> usize {
        let alive = self.alive.lock().unwrap();
        let (alive, _) = self.reap_notice.wait_timeout_while(alive, timeout, |alive| *alive > 0).unwrap();
        *alive
    }
}

fn start_process(memory_limit: Option<u64>) -> std::io::Result<Child> {
    // /proc/self/exe is this very binary, even if the file on disk was
    // replaced since the daemon started, so the worker speaks its protocol.
    // NOTE: a program that embeds the daemon through this library must run
    // `worker::serve` for a `worker` command line, as main.rs does. Otherwise
    // every process-isolated job fails with that program's usage error.
    let mut command = Command::new("/proc/self/exe");
    // `ps` then shows the binary's path rather than /proc/self/exe.
    if let Ok(path) = std::env::current_exe() {
        command.arg0(path);
    }
    command.arg("worker").arg("--parent").arg(std::process::id().to_string());
    if let Some(limit) = memory_limit {
        command.arg("--memory-limit").arg(limit.to_string());
    }
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
}

fn read_stderr(stderr: std::process::ChildStderr, pid: u32, tail: &StderrTail) {
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        let line = line.trim_end();
        if let Some(job) = line.strip_prefix(JOB_MARKER) {
            let job_id = job.parse().unwrap_or(0);
            if job_id != 0 {
                // A new job: what the previous one printed explains nothing about it.
                let mut state = tail.state.lock().unwrap();
                state.last_line.clear();
                state.allocation_failure = None;
            }
            tail.job_id.store(job_id, Ordering::Relaxed);
            continue;
        }
        if line.is_empty() {
            continue;
        }
        match tail.job_id.load(Ordering::Relaxed) {
            0 => tracing::warn!(target: "jobhost::plugin", worker = pid, "worker output: {line}"),
            job_id => {
                tracing::warn!(target: "jobhost::plugin", job_id, worker = pid, "worker output: {line}")
            }
        }
        let mut state = tail.state.lock().unwrap();
        if state.allocation_failure.is_none() && line.starts_with("memory allocation of") {
            state.allocation_failure = Some(line.to_owned());
        }
        state.last_line = line.to_owned();
    }
    tail.state.lock().unwrap().closed = true;
    tail.closed.notify_all();
}

impl StderrTail {
    /// Returns the stderr line that explains a death best: an allocation
    /// failure, else the last line. Waits up to `patience` for the pipe to
    /// close, so that a dying worker's last words are in.
    fn last_words(&self, patience: Duration) -> String {
        let state = self.state.lock().unwrap();
        let (state, _) = self.closed.wait_timeout_while(state, patience, |state| !state.closed).unwrap();
        let line = state.allocation_failure.as_ref().unwrap_or(&state.last_line);
        match line.char_indices().nth(MAX_QUOTED) {
            Some((end, _)) => format!("{}…", &line[..end]),
            None => line.clone(),
        }
    }
}

/// Describes how a process ended: "exited with code 3", "was killed by signal 11 (…)".
fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        (None, None) => format!("ended with {status}"),
    }
}

/// Explains how a worker ended while it ran a job.
fn describe_death(pid: u32, status: ExitStatus, last_line: &str, memory_limit: Option<u64>, killed_by_daemon: bool) -> String {
    let ending = describe_status(status);
    let out_of_memory = last_line.starts_with("memory allocation of");
    let mut reason = match memory_limit {
        Some(limit) if out_of_memory => format!(
            "worker process {pid} ran out of memory: the job needed more than memory_limit = \"{}\", and the worker {ending}",
            crate::config::format_size(limit)
        ),
        None if out_of_memory => format!("worker process {pid} ran out of memory and {ending}"),
        _ => format!("worker process {pid} {ending} while it ran the job"),
    };
    if killed_by_daemon {
        reason.push_str(", because the job was cancelled or timed out");
    } else if status.signal() == Some(libc::SIGKILL) {
        reason.push_str("; jobhost did not send that signal, so the system's out-of-memory killer or an operator may have");
    }
    if !last_line.is_empty() {
        reason.push_str(&format!("; its last output: {last_line}"));
    }
    reason
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV, invalid memory access",
        libc::SIGABRT => "SIGABRT, aborted",
        libc::SIGKILL => "SIGKILL",
        libc::SIGBUS => "SIGBUS, bus error",
        libc::SIGILL => "SIGILL, illegal instruction",
        libc::SIGFPE => "SIGFPE, arithmetic error",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGXCPU => "SIGXCPU, CPU time limit",
        _ => "unnamed signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn death_reasons_name_the_cause() {
        let segfault = ExitStatus::from_raw(libc::SIGSEGV);
        let reason = describe_death(7, segfault, "", None, false);
        assert_eq!(reason, "worker process 7 was killed by signal 11 (SIGSEGV, invalid memory access) while it ran the job");

        let exit = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_death(7, exit, "", None, false), "worker process 7 exited with code 3 while it ran the job");

        let abort = ExitStatus::from_raw(libc::SIGABRT);
        let reason = describe_death(7, abort, "memory allocation of 16777216 bytes failed", Some(64 << 20), false);
        assert!(reason.starts_with("worker process 7 ran out of memory: the job needed more than memory_limit = \"64MiB\""), "{reason}");
        assert!(reason.ends_with("its last output: memory allocation of 16777216 bytes failed"), "{reason}");

        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(describe_death(7, killed, "", None, false).contains("out-of-memory killer"));
        assert!(describe_death(7, killed, "", None, true).ends_with("because the job was cancelled or timed out"));
    }
}
