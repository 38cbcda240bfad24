//! The daemon: claims due jobs, runs them on a bounded pool of blocking
//! workers, writes their results, keeps their leases and rescues the jobs of
//! daemons that died.
//!
//! # Tasks
//!
//! - The claim loop (in [`Daemon::run`]) claims as many due jobs as there are
//!   free places (`concurrency + prefetch`), and sleeps until a run ends, a
//!   wake-up datagram arrives, the next delayed job is due, or the poll
//!   interval passes.
//! - The worker pool ([`WorkerPool`]) runs claimed jobs on `concurrency`
//!   threads and hands each result to the completion writer.
//! - The completion writer batches results into [`Store::finish`] calls.
//! - The lease keeper renews this daemon's leases, asks runs it no longer
//!   owns to stop, and rescues expired leases of any daemon.
//!
//! # Shutdown, in order
//!
//! 1. Stop claiming.
//! 2. Jobs claimed but not started are handed back at once.
//! 3. Running jobs get `shutdown_grace` to finish; their results are written.
//! 4. Runs still going are asked to stop and handed back as pending, without
//!    charging an attempt. The lease keeper runs until here, so that no lease
//!    expires while its job may still finish.
//! 5. The completion writer drains what it has, then the daemon returns.
//!
//! Handing back before draining the writer is safe: a result that arrives
//! for a handed-back run is discarded by the store, because the job is no
//! longer running under this owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::executor::{Run, RunSink, RunState, WorkerPool};
use crate::metrics::{Metrics, RunOutcome};
use crate::registry::Registry;
use crate::reload::{self, Live, Trigger};
use crate::store::{ClaimedJob, Finished, FinishedOutcome, JobId, Status, Store};
use crate::wake::{Wake, WakeSubscription};

/// Most jobs claimed in one transaction.
const MAX_CLAIM_BATCH: usize = 1000;
/// Most results written in one transaction.
const MAX_FINISH_BATCH: usize = 1000;
/// Maximum wait between attempts to reach a failing database.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);

/// Whether the daemon keeps running or stops when no job is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run until shut down.
    Forever,
    /// Run every job that is due, including chained jobs released on the
    /// way, then stop.
    Once,
}

/// Counts of what one run of the daemon did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub discarded: u64,
    pub handed_back: u64,
}

/// A daemon over one store, with the plugins of one registry.
pub struct Daemon {
    shared: Arc<Shared>,
    results: mpsc::UnboundedReceiver<Completion>,
    reloads: mpsc::UnboundedReceiver<Trigger>,
}

struct Shared {
    config: Arc<Config>,
    /// The plugins and whitelist in use, replaced by reloads.
    live: Arc<Live>,
    store: Arc<dyn Store>,
    owner: String,
    /// Asks the reload task for a reload.
    reload_requests: mpsc::UnboundedSender<Trigger>,
    /// Claimed jobs that have not produced a result yet.
    in_flight: Mutex<HashMap<JobId, Arc<RunState>>>,
    /// Claimed jobs that shutdown stopped before they started.
    not_started: Mutex<Vec<JobId>>,
    /// Results sent to the completion writer and not yet written.
    unwritten: AtomicUsize,
    /// Ids of the jobs whose results are not yet written.
    unwritten_ids: Mutex<std::collections::HashSet<JobId>>,
    /// Wakes the claim loop: a run ended, results were written, or a wake-up arrived.
    changed: Notify,
    /// Wakes the lease keeper early, after a cancel.
    check_leases: Notify,
    results: mpsc::UnboundedSender<Completion>,
    /// The claim loop wants waking when fewer jobs than this are in flight.
    refill_below: usize,
    /// Claims pause while this many results wait for the writer.
    unwritten_limit: usize,
    summary: Mutex<Summary>,
    metrics: Arc<Metrics>,
}

/// A finished run on its way to the completion writer.
struct Completion {
    finished: Finished,
    plugin: String,
    method: String,
    /// From when the job became due to the start of the run.
    start_delay: Duration,
}

impl Daemon {
    pub fn new(config: Arc<Config>, registry: Arc<Registry>, store: Arc<dyn Store>) -> Self {
        let (results_sender, results) = mpsc::unbounded_channel();
        let (reload_requests, reloads) = mpsc::unbounded_channel();
        let (concurrency, prefetch) = (config.host.concurrency, config.host.prefetch);
        let owner = owner_id();
        let shared = Arc::new(Shared {
            live: Live::new(config.clone(), registry, &owner),
            config,
            store,
            owner,
            reload_requests,
            in_flight: Mutex::new(HashMap::new()),
            not_started: Mutex::new(Vec::new()),
            unwritten: AtomicUsize::new(0),
            unwritten_ids: Mutex::new(std::collections::HashSet::new()),
            changed: Notify::new(),
            check_leases: Notify::new(),
            results: results_sender,
            refill_below: refill_below(concurrency, prefetch),
            unwritten_limit: unwritten_limit(concurrency + prefetch),
            summary: Mutex::new(Summary::default()),
            metrics: Arc::new(Metrics::new()),
        });
        Self { shared, results, reloads }
    }

    /// Returns the metrics this daemon records as it writes results.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Returns the configuration and plugins in use, which reloads replace.
    pub fn live(&self) -> Arc<Live> {
        self.shared.live.clone()
    }

    /// Returns the lease owner this daemon writes into the jobs it claims.
    pub fn owner(&self) -> &str {
        &self.shared.owner
    }

    /// Runs until `shutdown` is cancelled, or, in [`Mode::Once`], until no
    /// job is due and every run has been written.
    pub async fn run(self, mode: Mode, shutdown: CancellationToken) -> Summary {
        let shared = self.shared;
        let host = &shared.config.host;

        // `run --once` finishes with the configuration it started with. The
        // watcher and the SIGHUP handler are in place before this returns.
        let reloader = (mode == Mode::Forever)
            .then(|| reload::start(shared.live.clone(), shared.reload_requests.clone(), self.reloads));
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(write_results(shared.clone(), self.results, writer_stop.clone()));
        let keeper_stop = CancellationToken::new();
        let keeper = tokio::spawn(keep_leases(shared.clone(), keeper_stop.clone()));
        let listener = match shared.store.subscribe().await {
            Ok(subscription) => Some(tokio::spawn(listen_for_wakeups(shared.clone(), subscription))),
            Err(error) => {
                warn!(target: "jobhost::daemon", %error, "cannot listen for wake-ups; new jobs are found by polling only");
                None
            }
        };

        info!(
            target: "jobhost::daemon",
            owner = %shared.owner,
            database = %host.database,
            concurrency = host.concurrency,
            prefetch = host.prefetch,
            "daemon started"
        );

        let runtime = tokio::runtime::Handle::current();
        let pool = WorkerPool::start(host.concurrency, host.max_jobs_per_worker, shared.metrics.clone(), shared.clone(), runtime);
        rescue(&shared).await;
        claim_loop(&shared, &pool, mode, &shutdown).await;
        shut_down(&shared, &pool).await;

        keeper_stop.cancel();
        let _ = keeper.await;
        if let Some(listener) = listener {
            listener.abort();
        }
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        shared.live.remove_state();
        writer_stop.cancel();
        let _ = writer.await;
        let summary = *shared.summary.lock().unwrap();
        info!(
            target: "jobhost::daemon",
            succeeded = summary.succeeded,
            failed = summary.failed,
            retried = summary.retried,
            handed_back = summary.handed_back,
            "daemon stopped"
        );
        summary
    }
}

/// Returns an owner id unique to this process: host name, process id and a random part.
fn owner_id() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname
    // writes at most that many bytes.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let host = if result == 0 {
        let end = buffer.iter().position(|&byte| byte == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "unknown-host".to_owned()
    };
    format!("{host}:{}:{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

// ---------------------------------------------------------------------------
// Claiming
// ---------------------------------------------------------------------------

/// Returns the number of jobs in flight below which the claim loop claims
/// again. Without prefetch, that is when any worker is free. With prefetch,
/// the loop refills the buffer once it is half empty, so that each claim
/// moves a batch.
fn refill_below(concurrency: usize, prefetch: usize) -> usize {
    if prefetch == 0 { concurrency } else { concurrency + prefetch - prefetch / 2 + 1 }
}

/// Returns the number of results waiting for the writer at which claims
/// pause. Their jobs stay `running`, and the lease keeper does not renew
/// them, so a writer that falls behind (a slow or locked table) must not let
/// claims run ahead without bound. The limit is at least a full buffer and
/// a full batch, so that a writer busy with one batch never holds up the
/// claims.
fn unwritten_limit(capacity: usize) -> usize {
    capacity.max(MAX_FINISH_BATCH)
}

async fn claim_loop(shared: &Arc<Shared>, pool: &WorkerPool, mode: Mode, shutdown: &CancellationToken) {
    let host = &shared.config.host;
    let capacity = host.concurrency + host.prefetch;
    let mut backoff = Duration::from_millis(100);
    // Set when a claim failed: its transaction may still have committed,
    // leaving jobs running under this daemon's lease that it never started.
    let mut claim_in_doubt = false;

    while !shutdown.is_cancelled() {
        if claim_in_doubt && recover_lost_claims(shared).await {
            claim_in_doubt = false;
        }
        let in_flight = shared.in_flight.lock().unwrap().len();
        let wanted = capacity.saturating_sub(in_flight).min(MAX_CLAIM_BATCH);
        let writer_behind = shared.unwritten.load(Ordering::Acquire) >= shared.unwritten_limit;
        let worth_claiming = in_flight < shared.refill_below && !writer_behind;
        let mut claimed = 0;
        if wanted > 0 && worth_claiming {
            match shared.store.claim(&shared.owner, wanted, host.lease).await {
                Ok(jobs) => {
                    backoff = Duration::from_millis(100);
                    claimed = jobs.len();
                    for job in jobs {
                        start(shared, pool, job);
                    }
                }
                Err(error) => {
                    claim_in_doubt = true;
                    error!(target: "jobhost::daemon", %error, retry_in_ms = backoff.as_millis() as u64, "claiming jobs failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
                    continue;
                }
            }
        }

        // A full batch means more may be due: claim again as soon as a place is free.
        let more_due = wanted > 0 && worth_claiming && claimed == wanted;
        if more_due && shared.in_flight.lock().unwrap().len() < capacity {
            continue;
        }
        if mode == Mode::Once
            && claimed == 0
            && shared.in_flight.lock().unwrap().is_empty()
            && shared.unwritten.load(Ordering::Acquire) == 0
        {
            break;
        }

        let wait = if wanted > 0 && worth_claiming && !more_due { time_until_due(shared).await } else { host.poll_interval };
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

/// Hands back the jobs running under this daemon's lease that it is not
/// running: claims that committed although their reply was lost. Returns
/// false if the database could not be asked.
///
/// Only the claim loop calls this, between claims, so no job it has just
/// claimed can be missing from `in_flight`.
async fn recover_lost_claims(shared: &Shared) -> bool {
    let owned = match shared.store.owned(&shared.owner).await {
        Ok(owned) => owned,
        Err(error) => {
            error!(target: "jobhost::daemon", %error, "looking for claims lost to a database error failed");
            return false;
        }
    };
    let lost: Vec<JobId> = {
        let in_flight = shared.in_flight.lock().unwrap();
        let unwritten = shared.unwritten_ids.lock().unwrap();
        owned.into_iter().filter(|id| !in_flight.contains_key(id) && !unwritten.contains(id)).collect()
    };
    if !lost.is_empty() {
        warn!(target: "jobhost::daemon", jobs = ?lost, "handing back jobs claimed by a claim whose reply was lost");
        hand_back(shared, lost).await;
    }
    true
}

/// Returns how long to sleep when nothing is due: until the next delayed
/// job, at most the poll interval.
async fn time_until_due(shared: &Shared) -> Duration {
    let poll_interval = shared.config.host.poll_interval;
    match shared.store.until_next_due().await {
        Ok(Some(wait)) => wait.min(poll_interval),
        Ok(None) => poll_interval,
        Err(error) => {
            error!(target: "jobhost::daemon", %error, "reading the next due time failed");
            poll_interval
        }
    }
}

/// Queues a claimed job on the worker pool, or fails it at once if its
/// method may no longer run.
fn start(shared: &Arc<Shared>, pool: &WorkerPool, job: ClaimedJob) {
    let state = RunState::new(&job);
    shared.in_flight.lock().unwrap().insert(job.id, state.clone());

    // The whitelist is checked again here, because jobs.toml may have
    // changed since the job was dispatched.
    let (registry, generation) = shared.live.registry_and_generation();
    match registry.method(&job.plugin, &job.method) {
        Ok((plugin, settings)) => pool.submit(Run { plugin: plugin.clone(), settings: settings.clone(), state, job, generation }),
        Err(reason) => {
            let error = format!("{reason}; the job was not run");
            complete(shared, &job, FinishedOutcome::Failed { error }, Duration::ZERO);
        }
    }
}

impl RunSink for Shared {
    fn finished(&self, job: &ClaimedJob, outcome: FinishedOutcome, duration: Duration) {
        complete(self, job, outcome, duration);
    }

    fn skipped(&self, job: &ClaimedJob) {
        // Cancelled or rescued while queued: the store no longer expects a result.
        self.leave(job.id);
    }

    fn not_started(&self, job: &ClaimedJob) {
        self.not_started.lock().unwrap().push(job.id);
        self.leave(job.id);
    }
}

impl Shared {
    /// Removes a job from the in-flight set, waking the claim loop when it
    /// has room to claim again.
    fn leave(&self, id: JobId) {
        let remaining = {
            let mut in_flight = self.in_flight.lock().unwrap();
            in_flight.remove(&id);
            in_flight.len()
        };
        if remaining < self.refill_below {
            self.changed.notify_one();
        }
    }
}

/// Hands a run's result to the completion writer.
fn complete(shared: &Shared, job: &ClaimedJob, outcome: FinishedOutcome, duration: Duration) {
    shared.unwritten.fetch_add(1, Ordering::AcqRel);
    shared.unwritten_ids.lock().unwrap().insert(job.id);
    let completion = Completion {
        finished: Finished { id: job.id, attempt: job.attempt, duration, outcome },
        plugin: job.plugin.clone(),
        method: job.method.clone(),
        start_delay: job.started_at.since(job.run_at),
    };
    if shared.results.send(completion).is_err() {
        // Only after the writer has stopped, which happens after every run.
        shared.unwritten.fetch_sub(1, Ordering::AcqRel);
        error!(target: "jobhost::daemon", job_id = job.id, "the result writer has stopped; the result is lost and the lease will expire");
    }
    shared.leave(job.id);
}

// ---------------------------------------------------------------------------
// Writing results
// ---------------------------------------------------------------------------

async fn write_results(shared: Arc<Shared>, mut results: mpsc::UnboundedReceiver<Completion>, stop: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = results.recv_many(&mut batch, MAX_FINISH_BATCH) => {}
            _ = stop.cancelled() => {
                while let Ok(completion) = results.try_recv() {
                    batch.push(completion);
                }
                if batch.is_empty() {
                    return;
                }
            }
        }
        let made_due = write_batch(&shared, &batch, &stop).await;
        {
            let mut unwritten_ids = shared.unwritten_ids.lock().unwrap();
            for completion in &batch {
                unwritten_ids.remove(&completion.finished.id);
            }
        }
        let before = shared.unwritten.fetch_sub(batch.len(), Ordering::AcqRel);
        let unwritten = before - batch.len();
        batch.clear();
        // Released children and immediate retries are due now, `run --once`
        // waits for the last write before it stops, and claims paused while
        // the writer was behind may go on.
        if made_due || unwritten == 0 || before >= shared.unwritten_limit {
            shared.changed.notify_one();
        }
    }
}

/// Attempts made to write results once shutdown has begun, before giving up.
const FINAL_WRITE_ATTEMPTS: u32 = 5;

/// Writes one batch of results, retrying while the database fails. Returns
/// true if the write may have made jobs due (released chained jobs, retries).
async fn write_batch(shared: &Shared, batch: &[Completion], stop: &CancellationToken) -> bool {
    let finished: Vec<Finished> = batch.iter().map(|completion| completion.finished.clone()).collect();
    let mut backoff = Duration::from_millis(100);
    let mut attempts_after_stop = 0;
    let report = loop {
        match shared.store.finish(&shared.owner, &finished).await {
            Ok(report) => break report,
            Err(error) => {
                if stop.is_cancelled() {
                    attempts_after_stop += 1;
                    if attempts_after_stop >= FINAL_WRITE_ATTEMPTS {
                        error!(target: "jobhost::daemon", %error, results = finished.len(), "giving up writing job results at shutdown; their leases will expire and the jobs will run again");
                        return false;
                    }
                }
                error!(target: "jobhost::daemon", %error, results = finished.len(), retry_in_ms = backoff.as_millis() as u64, "writing job results failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
            }
        }
    };

    let statuses: HashMap<JobId, Status> = report.written.iter().copied().collect();
    let mut summary = Summary::default();
    for completion in batch {
        log_result(completion, statuses.get(&completion.finished.id).copied(), &mut summary);
        record_metrics(&shared.metrics, completion, statuses.contains_key(&completion.finished.id));
    }
    for id in &report.cancelled {
        warn!(target: "jobhost::job", job_id = id, "chained job cancelled because its parent failed");
    }
    let mut total = shared.summary.lock().unwrap();
    total.succeeded += summary.succeeded;
    total.failed += summary.failed;
    total.retried += summary.retried;
    total.discarded += summary.discarded;
    !report.released.is_empty() || summary.retried > 0
}

fn record_metrics(metrics: &Metrics, completion: &Completion, written: bool) {
    if !written {
        return;
    }
    let outcome = match completion.finished.outcome {
        FinishedOutcome::Succeeded { .. } => RunOutcome::Succeeded,
        FinishedOutcome::Retry { .. } => RunOutcome::Retried,
        FinishedOutcome::Failed { .. } => RunOutcome::Failed,
    };
    metrics.record_run(&completion.plugin, &completion.method, outcome, completion.finished.duration, completion.start_delay);
}

fn log_result(completion: &Completion, written: Option<Status>, summary: &mut Summary) {
    let Finished { id: job_id, attempt, duration, outcome } = &completion.finished;
    let (job_id, attempt) = (*job_id, *attempt);
    let (plugin, method) = (completion.plugin.as_str(), completion.method.as_str());
    let duration_ms = format!("{:.3}", duration.as_secs_f64() * 1000.0);
    let duration_ms = duration_ms.as_str();
    match (written, outcome) {
        (None, _) => {
            summary.discarded += 1;
            warn!(target: "jobhost::job", job_id, plugin = %plugin, method = %method, attempt, "result discarded: the job was cancelled or rescued while it ran");
        }
        (Some(_), FinishedOutcome::Succeeded { .. }) => {
            summary.succeeded += 1;
            info!(target: "jobhost::job", job_id, plugin = %plugin, method = %method, attempt, duration_ms = %duration_ms, "job succeeded");
        }
        (Some(_), FinishedOutcome::Retry { error, delay }) => {
            summary.retried += 1;
            warn!(target: "jobhost::job", job_id, plugin = %plugin, method = %method, attempt, duration_ms = %duration_ms, retry_in_ms = delay.as_millis() as u64, %error, "job failed; will retry");
        }
        (Some(_), FinishedOutcome::Failed { error }) => {
            summary.failed += 1;
            error!(target: "jobhost::job", job_id, plugin = %plugin, method = %method, attempt, duration_ms = %duration_ms, %error, "job failed");
        }
    }
}

// ---------------------------------------------------------------------------
// Leases, rescue and wake-ups
// ---------------------------------------------------------------------------

async fn keep_leases(shared: Arc<Shared>, stop: CancellationToken) {
    let period = shared.config.host.lease / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.check_leases.notified() => {}
            _ = stop.cancelled() => return,
        }
        renew(&shared).await;
        rescue(&shared).await;
    }
}

async fn renew(shared: &Shared) {
    let running: Vec<(JobId, Option<f64>)> =
        shared.in_flight.lock().unwrap().values().map(|state| (state.job_id, state.progress())).collect();
    if running.is_empty() {
        return;
    }
    match shared.store.renew(&shared.owner, shared.config.host.lease, &running).await {
        Ok(lost) => {
            let in_flight = shared.in_flight.lock().unwrap();
            for id in lost {
                if let Some(state) = in_flight.get(&id)
                    && state.cancel()
                {
                    warn!(target: "jobhost::job", job_id = id, plugin = %state.plugin, method = %state.method, "job no longer owned (cancelled, or rescued by another daemon); the run was asked to stop");
                }
            }
        }
        Err(error) => error!(target: "jobhost::daemon", %error, "renewing leases failed"),
    }
}

async fn rescue(shared: &Shared) {
    match shared.store.rescue().await {
        Ok(rescued) => {
            for job in &rescued {
                warn!(
                    target: "jobhost::job",
                    job_id = job.id,
                    plugin = %job.plugin,
                    method = %job.method,
                    attempt = job.attempt,
                    owner = %job.owner,
                    status = %job.status,
                    "rescued a job whose lease expired"
                );
            }
            if !rescued.is_empty() {
                shared.changed.notify_one();
            }
        }
        Err(error) => error!(target: "jobhost::daemon", %error, "rescuing expired leases failed"),
    }
}

async fn listen_for_wakeups(shared: Arc<Shared>, mut subscription: WakeSubscription) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscription.recv().await {
            Ok(wake) => {
                backoff = Duration::from_millis(100);
                if wake == Wake::Reload {
                    let _ = shared.reload_requests.send(Trigger::Command);
                }
                if wake != Wake::Dispatched {
                    shared.check_leases.notify_one();
                }
                shared.changed.notify_one();
            }
            Err(error) if subscription.recovers() => {
                error!(target: "jobhost::daemon", %error, retry_in_ms = backoff.as_millis() as u64, "listening for wake-ups failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
            }
            Err(error) => {
                warn!(target: "jobhost::daemon", %error, "wake-up socket failed; new jobs are found by polling only");
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

async fn shut_down(shared: &Arc<Shared>, pool: &WorkerPool) {
    pool.stop();

    let deadline = tokio::time::Instant::now() + shared.config.host.shutdown_grace;
    let running = shared.in_flight.lock().unwrap().len();
    if running > 0 {
        info!(target: "jobhost::daemon", running, grace_ms = shared.config.host.shutdown_grace.as_millis() as u64, "waiting for running jobs to finish");
    }
    loop {
        let not_started = std::mem::take(&mut *shared.not_started.lock().unwrap());
        hand_back(shared, not_started).await;
        if shared.in_flight.lock().unwrap().is_empty() {
            break;
        }
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }

    // Claiming each run's report first keeps a result that arrives during
    // the hand-back, such as the failure of a killed worker, from being
    // written over it.
    let still_running: Vec<JobId> = {
        let in_flight = shared.in_flight.lock().unwrap();
        in_flight
            .values()
            .filter(|state| state.finish())
            .map(|state| {
                state.cancel();
                state.job_id
            })
            .collect()
    };
    if !still_running.is_empty() {
        warn!(target: "jobhost::daemon", jobs = ?still_running, "shutdown grace period over; handing back jobs still running");
    }
    hand_back(shared, still_running).await;
    let not_started = std::mem::take(&mut *shared.not_started.lock().unwrap());
    hand_back(shared, not_started).await;

    let workers = pool.worker_processes();
    let left = tokio::task::spawn_blocking(move || workers.wait_until_reaped(WORKER_EXIT_WAIT)).await.unwrap_or(0);
    if left > 0 {
        warn!(target: "jobhost::daemon", worker_processes = left, "worker processes did not exit in time; they are killed when the daemon exits");
    }
}

/// How long shutdown waits for worker processes to exit after their jobs
/// were handed back.
const WORKER_EXIT_WAIT: Duration = Duration::from_secs(5);

async fn hand_back(shared: &Shared, ids: Vec<JobId>) {
    if ids.is_empty() {
        return;
    }
    match shared.store.hand_back(&shared.owner, &ids).await {
        Ok(count) => {
            shared.summary.lock().unwrap().handed_back += count;
            debug!(target: "jobhost::daemon", count, "handed jobs back as pending");
        }
        Err(error) => {
            error!(target: "jobhost::daemon", %error, jobs = ?ids, "handing jobs back failed; they will be rescued when their leases expire");
        }
    }
}
