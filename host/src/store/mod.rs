//! The jobs table: one database-agnostic interface, [`Store`], with one
//! implementation per backend.
//!
//! Every change of a job's status goes through this interface, in one
//! transaction with the history rows it implies: an attempt row when a run
//! ends, a status event for every change, and the release or cancellation of
//! chained children. Writes for a run are made only while the daemon that
//! claimed it still owns it (same lease owner, same attempt, still running),
//! so a late result never overwrites a newer state.

mod postgres;
mod sqlite;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::time::Timestamp;
use crate::wake::{Wake, WakeSubscription};

/// Primary key of a job.
pub type JobId = i64;

/// Stage of a job's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Chained behind a parent that has not succeeded yet.
    Waiting,
    /// Due at `run_at`, waiting for a worker.
    Pending,
    /// Claimed by a daemon, which holds its lease.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] = [Self::Waiting, Self::Pending, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// True for the states a job never leaves on its own.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| format!("unknown status {text:?}; use one of waiting, pending, running, succeeded, failed, cancelled"))
    }
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub plugin: String,
    pub method: String,
    /// Params as JSON text.
    pub params: String,
    /// 1 (runs first) to 10.
    pub priority: u8,
    /// How long after dispatch the job becomes due. Chained jobs count it
    /// from the moment their parent succeeds.
    pub delay: Duration,
    pub max_attempts: u32,
}

/// A job with the jobs chained behind it: `then[0]` runs after `head`
/// succeeds, `then[1]` after `then[0]`, and so on.
#[derive(Debug, Clone)]
pub struct NewChain {
    pub head: NewJob,
    pub then: Vec<NewJob>,
}

/// A job a daemon has claimed and now owns.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub plugin: String,
    pub method: String,
    pub params: String,
    /// This run's number, counting from 1.
    pub attempt: u32,
    pub max_attempts: u32,
    pub priority: u8,
    pub run_at: Timestamp,
    pub created_at: Timestamp,
    pub started_at: Timestamp,
}

/// The end of one run, to be written by [`Store::finish`].
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: JobId,
    pub attempt: u32,
    /// How long the method ran.
    pub duration: Duration,
    pub outcome: FinishedOutcome,
}

/// Result of a run, after the retry policy has been applied.
#[derive(Debug, Clone)]
pub enum FinishedOutcome {
    Succeeded { output: String },
    /// Run again after `delay`.
    Retry { error: String, delay: Duration },
    Failed { error: String },
}

/// Summary of what [`Store::finish`] wrote.
#[derive(Debug, Clone, Default)]
pub struct FinishReport {
    /// Results written, with the status each job ended in.
    pub written: Vec<(JobId, Status)>,
    /// Results dropped because the run was no longer owned: cancelled,
    /// rescued by another daemon, or already written.
    pub discarded: Vec<JobId>,
    /// Chained children that became pending.
    pub released: Vec<JobId>,
    /// Chained descendants cancelled because their parent failed.
    pub cancelled: Vec<JobId>,
}

/// A running job whose lease had expired, put back or failed by [`Store::rescue`].
#[derive(Debug, Clone)]
pub struct Rescued {
    pub id: JobId,
    pub plugin: String,
    pub method: String,
    /// The daemon that lost it.
    pub owner: String,
    pub attempt: u32,
    /// `Pending` when attempts remain, else `Failed`.
    pub status: Status,
}

/// A job as stored, for `show`, `list` and the API.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub plugin: String,
    pub method: String,
    pub params: String,
    pub status: Status,
    pub priority: u8,
    pub attempts: u32,
    pub max_attempts: u32,
    pub run_at: Timestamp,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub output: Option<String>,
    pub last_error: Option<String>,
    pub progress: Option<f64>,
    pub parent_id: Option<JobId>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<Timestamp>,
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub duration: Option<Duration>,
    /// None when the run succeeded.
    pub error: Option<String>,
    pub owner: Option<String>,
}

/// One change of a job's status.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub status: Status,
    pub at: Timestamp,
    pub message: Option<String>,
}

/// Filter of [`Store::list`]: newest first, `limit` at most, with
/// ids below `before_id` when it is set (keyset pagination).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub plugin: Option<String>,
    pub method: Option<String>,
    pub before_id: Option<JobId>,
    pub limit: u32,
}

/// Result of [`Store::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was cancelled from `previous`, with its chained descendants.
    Cancelled { previous: Status, descendants: Vec<JobId> },
    /// The job had already ended; nothing changed.
    AlreadyFinal(Status),
    NotFound,
}

/// Result of [`Store::retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The job is due again (`status` is pending), or waits for its parent
    /// to succeed first (`status` is waiting). Its cancelled descendants
    /// wait again.
    Requeued { previous: Status, status: Status, descendants: Vec<JobId> },
    /// Only failed and cancelled jobs can be retried.
    NotRetryable(Status),
    /// The job is chained behind a parent that failed or was cancelled, so it
    /// would run without the parent's work. The parent is the job to retry.
    ParentEnded { parent: JobId, status: Status },
    NotFound,
}

impl RetryOutcome {
    /// Returns why the retry of job `id` was rejected and what to do
    /// instead, or None if the job was requeued.
    pub fn rejection(&self, id: JobId) -> Option<String> {
        match self {
            Self::Requeued { .. } => None,
            Self::NotRetryable(Status::Succeeded) => Some(format!(
                "job {id} has succeeded; only failed and cancelled jobs can be retried. Dispatch it again to run it once more"
            )),
            Self::NotRetryable(status) => Some(format!("job {id} is {status}; only failed and cancelled jobs can be retried")),
            Self::ParentEnded { parent, status } => {
                let ended = if *status == Status::Cancelled { "was cancelled" } else { "failed" };
                Some(format!(
                    "job {id} is chained behind job {parent}, which {ended}; retry job {parent} instead, and job {id} runs again after it succeeds"
                ))
            }
            Self::NotFound => Some(format!("job {id} not found; `jobhost list` shows the jobs there are")),
        }
    }
}

/// Returns the status a retried job takes, given its parent's id and stored
/// status: pending without a parent or after its success, waiting while the
/// parent has not ended. The inner error is the rejection when the parent
/// failed or was cancelled.
fn retried_status(parent: Option<(JobId, String)>) -> Result<Result<Status, RetryOutcome>, StoreError> {
    let Some((parent, text)) = parent else { return Ok(Ok(Status::Pending)) };
    Ok(match status_of(parent, &text)? {
        Status::Succeeded => Ok(Status::Pending),
        ended @ (Status::Failed | Status::Cancelled) => Err(RetryOutcome::ParentEnded { parent, status: ended }),
        Status::Waiting | Status::Pending | Status::Running => Ok(Status::Waiting),
    })
}

/// Parses a stored status, naming the job when the value is not one.
fn status_of(id: JobId, text: &str) -> Result<Status, StoreError> {
    Status::from_str(text).map_err(|_| StoreError::Corrupt { id, column: "status", value: text.to_owned() })
}

/// Turns `(status, count)` rows into a count for every status, zero for the missing ones.
fn counts_of(rows: Vec<(String, i64)>) -> Result<Vec<(Status, u64)>, StoreError> {
    let mut counts: Vec<(Status, u64)> = Status::ALL.iter().map(|&status| (status, 0)).collect();
    for (status, count) in rows {
        let status = status_of(0, &status)?;
        if let Some(entry) = counts.iter_mut().find(|(known, _)| *known == status) {
            entry.1 = u64::try_from(count).unwrap_or(0);
        }
    }
    Ok(counts)
}

/// Errors from store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("database file {} does not exist; run `jobhost migrate` or dispatch a job to create it", path.display())]
    Missing { path: std::path::PathBuf },
    #[error("database migration failed on {url}: {source}; the database may be newer than this jobhost")]
    Migrate { url: String, source: sqlx::migrate::MigrateError },
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("cannot listen for wake-ups: {0}")]
    Listen(#[from] std::io::Error),
    #[error("job {id} has an invalid {column} value {value:?} in the database")]
    Corrupt { id: JobId, column: &'static str, value: String },
}

/// The jobs table, whatever database contains it.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts each chain in one transaction, returning the id of each head,
    /// and wakes the daemons sharing the database.
    async fn dispatch(&self, chains: &[NewChain]) -> Result<Vec<JobId>, StoreError>;

    /// Claims up to `limit` due jobs for `owner`, in priority, run-at, id
    /// order, and leases them for `lease`.
    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<ClaimedJob>, StoreError>;

    /// Writes the results of runs that `owner` still owns, discarding the rest.
    async fn finish(&self, owner: &str, results: &[Finished]) -> Result<FinishReport, StoreError>;

    /// Extends the leases of `owner`'s running jobs and records their
    /// progress. Returns the ids among `running` that `owner` no longer owns
    /// (cancelled or rescued), so that their runs can be asked to stop.
    async fn renew(&self, owner: &str, lease: Duration, running: &[(JobId, Option<f64>)]) -> Result<Vec<JobId>, StoreError>;

    /// Puts back, or fails when out of attempts, every running job whose lease
    /// has expired. The interrupted run counts as an attempt.
    async fn rescue(&self) -> Result<Vec<Rescued>, StoreError>;

    /// Returns the ids of the jobs running under `owner`'s lease.
    async fn owned(&self, owner: &str) -> Result<Vec<JobId>, StoreError>;

    /// Returns `owner`'s unfinished runs to pending, without charging them
    /// an attempt: at shutdown, and for claims whose reply was lost.
    async fn hand_back(&self, owner: &str, ids: &[JobId]) -> Result<u64, StoreError>;

    /// When the next pending job becomes due, if any is pending.
    async fn next_due(&self) -> Result<Option<Timestamp>, StoreError>;

    /// Returns how long until the next pending job is due (zero if one is
    /// due now), measured on the clock that decides whether a job is due.
    async fn until_next_due(&self) -> Result<Option<Duration>, StoreError> {
        Ok(self.next_due().await?.map(|next| next.since(Timestamp::now())))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError>;
    async fn attempts(&self, id: JobId) -> Result<Vec<AttemptRecord>, StoreError>;
    async fn events(&self, id: JobId) -> Result<Vec<EventRecord>, StoreError>;
    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError>;
    /// Returns the number of jobs in each status, every status included.
    async fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError>;

    /// Deletes jobs that ended (succeeded, failed or cancelled) more than
    /// `age` ago, with their history, and returns how many were deleted. A
    /// job stays while a job chained to it is still there.
    async fn prune(&self, age: Duration) -> Result<u64, StoreError>;

    /// Checks that the database returns a read of the jobs table, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Cancels a job that has not ended, and its chained descendants.
    async fn cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError>;

    /// Requeues a failed or cancelled job with `extra_attempts` more runs
    /// (at least one).
    async fn retry(&self, id: JobId, extra_attempts: u32) -> Result<RetryOutcome, StoreError>;

    /// Wakes the daemons sharing the database, as a hint: failures are
    /// logged, and daemons find the change at their next poll anyway.
    async fn wake(&self, wake: Wake);

    /// Subscribes to the wake-ups sent by [`Store::dispatch`] and [`Store::wake`].
    async fn subscribe(&self) -> Result<WakeSubscription, StoreError>;
}
