//! Running claimed jobs: a pool of worker threads, the call across the
//! plugin ABI, the host callbacks the plugin calls, timeouts, and the retry
//! policy applied to each result.
//!
//! # Worker pool
//!
//! `concurrency` threads take runs from one queue, so a burst of short jobs
//! costs no thread hand-off per job. A thread runs an in-process method
//! itself, and hands a process-isolated one to a worker process
//! ([`crate::isolation`]), waiting for its reply.
//!
//! A run with a `timeout` gets a watchdog task. Whichever of the two
//! finishes the run first reports it (see [`RunState::finish`]). When the
//! watchdog wins, the job is reported as timed out and the run is cancelled.
//! A worker process is killed. An in-process method gets a stop request
//! through its context, and a new thread replaces the one still inside it,
//! which exits once the method returns.
//!
//! The plugin reaches back into the host only through [`HostCallbacks`],
//! with a pointer to the [`RunState`] of its job, which outlives the call.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::RStr;
use jobhost_plugin_api::{HostCallbacks, HostCallbacksRef, HostContext, LogLevel, Outcome};

use crate::config::{Isolation, MethodSettings};
use crate::isolation::{Ended, WorkerProcesses};
use crate::metrics::Metrics;
use crate::registry::LoadedPlugin;
use crate::store::{ClaimedJob, FinishedOutcome, JobId};

/// State of one run, shared by the host and the running method.
#[derive(Debug)]
pub struct RunState {
    pub job_id: JobId,
    pub plugin: String,
    pub method: String,
    pub attempt: u32,
    /// Set when the job is cancelled, times out, or its lease is lost.
    pub cancelled: AtomicBool,
    /// Progress as `f64` bits; `u64::MAX` until the method reports any.
    progress: AtomicU64,
    /// Set by the first to report the run's end: its worker or its watchdog.
    finished: AtomicBool,
    /// The worker process running the job, while it does.
    worker: Mutex<Option<u32>>,
}

const NO_PROGRESS: u64 = u64::MAX;

impl RunState {
    pub fn new(job: &ClaimedJob) -> Arc<Self> {
        Arc::new(Self {
            job_id: job.id,
            plugin: job.plugin.clone(),
            method: job.method.clone(),
            attempt: job.attempt,
            cancelled: AtomicBool::new(false),
            progress: AtomicU64::new(NO_PROGRESS),
            finished: AtomicBool::new(false),
            worker: Mutex::new(None),
        })
    }

    /// Marks the run as reported. Returns false if it already was, in which
    /// case the caller must not report it again.
    pub fn finish(&self) -> bool {
        !self.finished.swap(true, Ordering::AcqRel)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The last progress the method reported, from 0.0 to 1.0.
    pub fn progress(&self) -> Option<f64> {
        match self.progress.load(Ordering::Relaxed) {
            NO_PROGRESS => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// Records a progress report, from 0.0 to 1.0.
    pub fn set_progress(&self, fraction: f64) {
        if fraction.is_finite() {
            self.progress.store(fraction.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        }
    }

    /// Stops the run: kills its worker process, or sets the flag an
    /// in-process method reads. Returns false if it was cancelled already.
    pub fn cancel(&self) -> bool {
        let first = !self.cancelled.swap(true, Ordering::AcqRel);
        // The lock keeps the pid from being reaped, and reused, during the kill.
        if let Some(pid) = *self.worker.lock().unwrap() {
            kill(pid);
        }
        first
    }

    /// Records that worker process `pid` now runs the job; kills it at once
    /// if the run was cancelled before.
    pub fn attach(&self, pid: u32) {
        let mut worker = self.worker.lock().unwrap();
        *worker = Some(pid);
        if self.cancelled.load(Ordering::Acquire) {
            kill(pid);
        }
    }

    /// Records that no worker process runs the job any more; call before
    /// reaping the process.
    pub fn detach(&self) {
        self.worker.lock().unwrap().take();
    }
}

fn kill(pid: u32) {
    // SAFETY: kill only sends a signal; the pid is a child of this process
    // that has not been reaped, so it names no other process.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Calls the plugin's method on this thread and returns its outcome and run time.
pub fn run_in_process(plugin: &LoadedPlugin, job: &ClaimedJob, state: &Arc<RunState>) -> (Outcome, Duration) {
    let context = HostContext {
        job_id: job.id,
        attempt: job.attempt,
        host_data: Arc::as_ptr(state).cast::<c_void>(),
        callbacks: callbacks(),
    };
    let started = Instant::now();
    let outcome = (plugin.module.invoke())(&context, RStr::from_str(&job.method), RStr::from_str(&job.params));
    (outcome, started.elapsed())
}

/// Applies the retry policy to what a run returned.
///
/// A retryable error becomes a retry while attempts remain; after the last
/// attempt it fails the job. The delay is the one the plugin asked for, else
/// the method's backoff.
pub fn apply_policy(outcome: Outcome, job: &ClaimedJob, settings: &MethodSettings) -> FinishedOutcome {
    match outcome {
        Outcome::Succeeded { output } => FinishedOutcome::Succeeded { output: output.into_string() },
        Outcome::Failed { message } => FinishedOutcome::Failed { error: message.into_string() },
        Outcome::Retry { message, delay_ms } => retry_or_fail(message.into_string(), delay_ms.into_option().map(Duration::from_millis), job, settings),
    }
}

/// Retries `job` after `delay` (else the method's backoff) while attempts remain, else fails it.
pub fn retry_or_fail(error: String, delay: Option<Duration>, job: &ClaimedJob, settings: &MethodSettings) -> FinishedOutcome {
    if job.attempt < job.max_attempts {
        let delay = delay.unwrap_or_else(|| settings.retry_delay_after(job.attempt));
        FinishedOutcome::Retry { error, delay }
    } else {
        FinishedOutcome::Failed { error: format!("{error} (gave up after {} of {} attempts)", job.attempt, job.max_attempts) }
    }
}

// ---------------------------------------------------------------------------
// Worker pool
// ---------------------------------------------------------------------------

/// A claimed job, ready to run.
pub struct Run {
    pub job: ClaimedJob,
    pub plugin: Arc<LoadedPlugin>,
    pub settings: MethodSettings,
    pub state: Arc<RunState>,
    /// How many reloads of jobs.toml came before the one `plugin` is from.
    pub generation: u64,
}

/// Receiver of what became of each run.
pub trait RunSink: Send + Sync + 'static {
    /// Reports that the run ended, or timed out, with `outcome` after the retry policy.
    fn finished(&self, job: &ClaimedJob, outcome: FinishedOutcome, duration: Duration);
    /// Reports that the run was dropped before it started, because it was cancelled.
    fn skipped(&self, job: &ClaimedJob);
    /// Reports that the run was not started because the pool is stopping.
    fn not_started(&self, job: &ClaimedJob);
}

/// Threads that run queued jobs, in-process or through worker processes.
pub struct WorkerPool {
    queue: Sender<Run>,
    inner: Arc<PoolInner>,
}

struct PoolInner {
    queue: Receiver<Run>,
    sink: Arc<dyn RunSink>,
    runtime: tokio::runtime::Handle,
    stopping: AtomicBool,
    workers: Arc<WorkerProcesses>,
}

impl WorkerPool {
    /// Starts `threads` worker threads that report to `sink`; watchdogs run on
    /// `runtime`. Up to `threads` worker processes start as jobs need them,
    /// each replaced after `max_jobs_per_worker` jobs if that is set.
    pub fn start(
        threads: usize,
        max_jobs_per_worker: Option<u64>,
        metrics: Arc<Metrics>,
        sink: Arc<dyn RunSink>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let (queue, receiver) = crossbeam_channel::unbounded();
        let workers = WorkerProcesses::new(threads, max_jobs_per_worker, metrics);
        let inner = Arc::new(PoolInner { queue: receiver, sink, runtime, stopping: AtomicBool::new(false), workers });
        for _ in 0..threads {
            inner.spawn_worker();
        }
        Self { queue, inner }
    }

    /// Queues `run`; it starts when a worker is free.
    pub fn submit(&self, run: Run) {
        if let Err(error) = self.queue.send(run) {
            // Only after `stop`, when nothing is submitted any more.
            self.inner.sink.not_started(&error.0.job);
        }
    }

    /// Stops starting runs: queued ones are reported as not started; running
    /// ones go on, and their threads exit when they return. Idle worker
    /// processes exit now, busy ones after their job.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        while let Ok(run) = self.inner.queue.try_recv() {
            self.inner.sink.not_started(&run.job);
        }
        self.inner.workers.stop();
    }

    /// Returns the pool's worker processes.
    pub fn worker_processes(&self) -> Arc<WorkerProcesses> {
        self.inner.workers.clone()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PoolInner {
    fn spawn_worker(self: &Arc<Self>) {
        let inner = self.clone();
        let spawned = std::thread::Builder::new().name("jobhost-worker".into()).spawn(move || inner.work());
        if let Err(error) = spawned {
            tracing::error!(target: "jobhost::daemon", %error, "cannot start a worker thread; fewer jobs run at once");
        }
    }

    fn work(self: Arc<Self>) {
        while let Ok(run) = self.queue.recv() {
            if self.stopping.load(Ordering::Acquire) {
                self.sink.not_started(&run.job);
                continue;
            }
            if run.state.is_cancelled() {
                self.sink.skipped(&run.job);
                continue;
            }
            if !self.execute(run) {
                // A watchdog reported this run and started a replacement thread.
                return;
            }
        }
    }

    /// Runs one job and reports it. Returns false if this thread must end,
    /// because the method's watchdog reported it and started a replacement.
    fn execute(self: &Arc<Self>, run: Run) -> bool {
        let Run { ref job, ref settings, ref state, .. } = run;
        tracing::info!(target: "jobhost::job", job_id = job.id, plugin = %job.plugin, method = %job.method, attempt = job.attempt, "job started");

        let watchdog = settings.timeout.map(|timeout| {
            let (done, done_receiver) = tokio::sync::oneshot::channel::<()>();
            let (inner, job, settings, state) = (self.clone(), job.clone(), settings.clone(), state.clone());
            self.runtime.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(timeout) => inner.time_out(&job, &settings, &state, timeout),
                    _ = done_receiver => {}
                }
            });
            done
        });

        let started = Instant::now();
        let ended = match settings.isolation {
            Isolation::InProcess => Ended::Returned(run_in_process(&run.plugin, job, state).0),
            Isolation::Process => self.workers.run(&run),
        };
        let duration = started.elapsed();
        if let Some(done) = watchdog {
            let _ = done.send(());
        }
        if !state.finish() {
            // Reported already, by the watchdog or by shutdown. A thread that
            // waited on a worker process was not stuck, so it carries on.
            if settings.isolation == Isolation::InProcess {
                tracing::info!(
                    target: "jobhost::job",
                    job_id = job.id,
                    plugin = %job.plugin,
                    method = %job.method,
                    attempt = job.attempt,
                    duration_ms = duration.as_secs_f64() * 1000.0,
                    "the in-process method returned after its run was reported; its result is discarded and its thread exits"
                );
            }
            return settings.isolation == Isolation::Process;
        }
        let outcome = match ended {
            Ended::Returned(outcome) => apply_policy(outcome, job, settings),
            Ended::Lost(reason) => retry_or_fail(reason, None, job, settings),
        };
        self.sink.finished(job, outcome, duration);
        true
    }

    fn time_out(self: &Arc<Self>, job: &ClaimedJob, settings: &MethodSettings, state: &RunState, timeout: Duration) {
        if !state.finish() {
            return;
        }
        // A worker process is killed. NOTE: an in-process run cannot be
        // killed; it is asked to stop, and its thread is replaced so that the
        // pool keeps its size meanwhile.
        state.cancel();
        let error = format!("timed out after {}", humantime::format_duration(timeout));
        self.sink.finished(job, retry_or_fail(error, None, job, settings), timeout);
        if settings.isolation == Isolation::InProcess && !self.stopping.load(Ordering::Acquire) {
            self.spawn_worker();
        }
    }
}

// ---------------------------------------------------------------------------
// Host callbacks
// ---------------------------------------------------------------------------

fn callbacks() -> HostCallbacksRef {
    static CALLBACKS: OnceLock<HostCallbacksRef> = OnceLock::new();
    *CALLBACKS.get_or_init(|| HostCallbacks { log: log_line, progress: report_progress, is_cancelled }.leak_into_prefix())
}

/// # Safety
///
/// `host_data` must be the pointer [`run_in_process`] put in the context,
/// which stays valid for the whole call.
unsafe fn state<'a>(host_data: *const c_void) -> &'a RunState {
    // SAFETY: guaranteed by the caller, see above.
    unsafe { &*host_data.cast::<RunState>() }
}

extern "C" fn log_line(host_data: *const c_void, level: LogLevel, message: RStr<'_>) {
    // SAFETY: plugins only call back with the host_data of their own context, during the call.
    let state = unsafe { state(host_data) };
    log_plugin_line(state, level, message.as_str());
}

/// Logs a line a plugin sent about the run `state`, in-process or from its worker.
pub(crate) fn log_plugin_line(state: &RunState, level: LogLevel, message: &str) {
    let (job_id, plugin, method, attempt) = (state.job_id, state.plugin.as_str(), state.method.as_str(), state.attempt);
    match level {
        LogLevel::Debug => tracing::debug!(target: "jobhost::plugin", job_id, plugin = %plugin, method = %method, attempt, "{message}"),
        LogLevel::Info => tracing::info!(target: "jobhost::plugin", job_id, plugin = %plugin, method = %method, attempt, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "jobhost::plugin", job_id, plugin = %plugin, method = %method, attempt, "{message}"),
        LogLevel::Error => tracing::error!(target: "jobhost::plugin", job_id, plugin = %plugin, method = %method, attempt, "{message}"),
    }
}

extern "C" fn report_progress(host_data: *const c_void, fraction: f64) {
    // SAFETY: as in `log_line`.
    let state = unsafe { state(host_data) };
    state.set_progress(fraction);
}

extern "C" fn is_cancelled(host_data: *const c_void) -> bool {
    // SAFETY: as in `log_line`.
    let state = unsafe { state(host_data) };
    state.cancelled.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn job(attempt: u32, max_attempts: u32) -> ClaimedJob {
        ClaimedJob {
            id: 1,
            plugin: "demo".into(),
            method: "flaky".into(),
            params: "null".into(),
            attempt,
            max_attempts,
            priority: 5,
            run_at: Timestamp(0),
            created_at: Timestamp(0),
            started_at: Timestamp(0),
        }
    }

    #[test]
    fn retry_until_attempts_run_out() {
        let settings = MethodSettings::default();
        let retry = || Outcome::Retry { message: "busy".into(), delay_ms: None.into() };
        match apply_policy(retry(), &job(2, 3), &settings) {
            FinishedOutcome::Retry { delay, .. } => assert_eq!(delay, settings.retry_delay),
            other => panic!("expected a retry, got {other:?}"),
        }
        match apply_policy(retry(), &job(3, 3), &settings) {
            FinishedOutcome::Failed { error } => assert!(error.contains("gave up after 3 of 3 attempts"), "{error}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn plugin_delay_wins_over_backoff() {
        let outcome = Outcome::Retry { message: "later".into(), delay_ms: Some(250).into() };
        match apply_policy(outcome, &job(1, 3), &MethodSettings::default()) {
            FinishedOutcome::Retry { delay, .. } => assert_eq!(delay, Duration::from_millis(250)),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn fatal_error_never_retries() {
        let outcome = Outcome::Failed { message: "bad input".into() };
        assert!(matches!(apply_policy(outcome, &job(1, 3), &MethodSettings::default()), FinishedOutcome::Failed { .. }));
    }
}
