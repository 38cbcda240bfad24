//! The SQLite store: one file in WAL mode, shared by every process on the machine.
//!
//! Every write is a single `BEGIN IMMEDIATE` transaction, which takes the
//! write lock up front. A deferred transaction that reads first cannot
//! upgrade to a writer once another connection has committed, and SQLite
//! returns SQLITE_BUSY for that at once, whatever the busy timeout. With
//! IMMEDIATE, concurrent writers queue on the busy timeout instead.
//!
//! The jobs table has an index per access path, and the hot statements name
//! theirs with `INDEXED BY`, or keep an index out with a unary `+`, because
//! the planner otherwise prefers the `(status, id)` index and then sorts
//! every pending row on each claim.
//!
//! Batches travel as one JSON array bound to one parameter and are unpacked
//! with `json_each`, so a batch of any size costs a fixed number of
//! statements. Times come from this machine's clock, which every process
//! sharing the file also reads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnection, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::*;
use crate::config::Synchronous;
use crate::wake::{self, WakeListener};

/// How long a statement waits for another connection's write lock before it
/// fails. Long, because a failed claim or completion is worse than a slow one.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum delay stored, about a century; `micros` caps every delay at it,
/// so that `now + delay` stays within SQLite's 64-bit integers.
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const JOB_COLUMNS: &str = "id, plugin, method, params, status, priority, attempts, max_attempts, run_at, created_at, \
     started_at, finished_at, output, last_error, progress, parent_id, lease_owner, lease_expires_at";

/// The jobs table in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// Serializes this process's write transactions. Without it, two of our
    /// own connections would contend in SQLite's busy handler, which sleeps
    /// for milliseconds at a time. An async lock hands over at once.
    write_lock: Arc<Mutex<()>>,
}

/// A write transaction, holding this process's write lock until it ends.
struct WriteTransaction {
    tx: Transaction<'static, Sqlite>,
    _guard: OwnedMutexGuard<()>,
}

impl WriteTransaction {
    async fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit().await?)
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = SqliteConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl SqliteStore {
    /// Opens the database file at `path`, creating it if `create` is set.
    pub async fn open(path: &Path, synchronous: Synchronous, create: bool) -> Result<Self, StoreError> {
        let url = format!("sqlite://{}", path.display());
        if !create && !path.exists() {
            return Err(StoreError::Missing { path: path.to_owned() });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Off => SqliteSynchronous::Off,
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Extra => SqliteSynchronous::Extra,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // NOTE: guessed sizes: a 64 MiB page cache per connection keeps
            // the hot part of a table of millions of jobs in memory.
            .pragma("cache_size", "-65536");
        // NOTE: four connections is a guess: the claim loop, the completion
        // writer and the lease keeper each hold one briefly, and reads take
        // the rest. SQLite runs one writer at a time whatever the pool size.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open { url: url.clone(), source })?;
        Ok(Self { pool, path: path.to_owned(), write_lock: Arc::new(Mutex::new(())) })
    }

    /// Applies the migrations in `migrations/sqlite/` that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate { url: format!("sqlite://{}", self.path.display()), source })
    }

    /// Returns the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction. Callers read the clock after this
    /// returns, so that times written follow the commit order.
    async fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTransaction { tx, _guard: guard })
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.min(MAX_DELAY).as_micros()).unwrap_or(i64::MAX)
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("batch rows are plain data and always serialize")
}

#[derive(Serialize)]
struct EventRow<'a> {
    id: JobId,
    status: &'a str,
    message: Option<&'a str>,
}

async fn insert_events(tx: &mut WriteTransaction, now: Timestamp, events: &[EventRow<'_>]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO job_events (job_id, status, at, message)
         SELECT value ->> 'id', value ->> 'status', ?2, value ->> 'message' FROM json_each(?1)",
    )
    .bind(to_json(&events))
    .bind(now.0)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Cancels every waiting or pending descendant of `parent`, recording `reason`.
async fn cancel_descendants(
    tx: &mut WriteTransaction,
    now: Timestamp,
    parent: JobId,
    reason: &str,
) -> Result<Vec<JobId>, StoreError> {
    let ids: Vec<JobId> = sqlx::query_scalar(
        "WITH RECURSIVE descendants(id) AS (
             SELECT id FROM jobs WHERE parent_id = ?1
             UNION ALL
             SELECT jobs.id FROM jobs JOIN descendants ON jobs.parent_id = descendants.id
         )
         UPDATE jobs SET status = 'cancelled', last_error = ?2, finished_at = ?3, updated_at = ?3,
                lease_owner = NULL, lease_expires_at = NULL
         WHERE id IN (SELECT id FROM descendants) AND status IN ('waiting', 'pending')
         RETURNING id",
    )
    .bind(parent)
    .bind(reason)
    .bind(now.0)
    .fetch_all(&mut **tx)
    .await?;
    let events: Vec<_> = ids.iter().map(|&id| EventRow { id, status: "cancelled", message: Some(reason) }).collect();
    insert_events(tx, now, &events).await?;
    Ok(ids)
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    let id: JobId = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    Ok(JobRecord {
        id,
        plugin: row.try_get("plugin")?,
        method: row.try_get("method")?,
        params: row.try_get("params")?,
        status: status_of(id, &status)?,
        priority: row.try_get::<i64, _>("priority")? as u8,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        run_at: Timestamp(row.try_get("run_at")?),
        created_at: Timestamp(row.try_get("created_at")?),
        started_at: row.try_get::<Option<i64>, _>("started_at")?.map(Timestamp),
        finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(Timestamp),
        output: row.try_get("output")?,
        last_error: row.try_get("last_error")?,
        progress: row.try_get("progress")?,
        parent_id: row.try_get("parent_id")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get::<Option<i64>, _>("lease_expires_at")?.map(Timestamp),
    })
}

/// Builds the query of [`Store::list`], after `prefix` (such as `EXPLAIN QUERY PLAN `).
///
/// Every filter reads an index in id order, so a page stops after `limit`
/// matching rows without sorting: `jobs_status (status, id)`,
/// `jobs_plugin_method (plugin, method, id)`, or the rowid, checking the
/// other conditions on each row. NOTE: so a rare plugin or method alone, or
/// inside a common status, reads many rows before the page fills.
fn list_query<'a>(prefix: &str, filter: &'a ListFilter) -> QueryBuilder<'a, Sqlite> {
    let mut query = QueryBuilder::<Sqlite>::new(format!("{prefix}SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    match (&filter.plugin, &filter.method) {
        (Some(plugin), Some(method)) => {
            query.push(" AND plugin = ").push_bind(plugin).push(" AND method = ").push_bind(method);
        }
        // The (plugin, method, id) index would give this plugin's rows in
        // method order, to be sorted in full; the rowid walk stops after a page.
        (Some(plugin), None) => {
            query.push(" AND +plugin = ").push_bind(plugin);
        }
        (None, Some(method)) => {
            query.push(" AND method = ").push_bind(method);
        }
        (None, None) => {}
    }
    if let Some(before_id) = filter.before_id {
        query.push(" AND id < ").push_bind(before_id);
    }
    query.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(filter.limit));
    query
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn dispatch(&self, chains: &[NewChain]) -> Result<Vec<JobId>, StoreError> {
        #[derive(Serialize)]
        struct Row<'a> {
            plugin: &'a str,
            method: &'a str,
            params: &'a str,
            priority: u8,
            status: &'a str,
            run_at: i64,
            delay_us: i64,
            max_attempts: u32,
            parent: Option<JobId>,
        }

        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let mut heads = Vec::with_capacity(chains.len());
        let mut events = Vec::new();

        // Level 0 contains every chain's head, level 1 every chain's first
        // child, and so on. Each level is one INSERT, with parents from the
        // level before.
        let mut parents: Vec<Option<JobId>> = vec![None; chains.len()];
        let depth = chains.iter().map(|chain| chain.then.len() + 1).max().unwrap_or(0);
        for level in 0..depth {
            let mut members = Vec::new();
            let mut rows = Vec::new();
            for (index, chain) in chains.iter().enumerate() {
                let job = if level == 0 { Some(&chain.head) } else { chain.then.get(level - 1) };
                let Some(job) = job else { continue };
                let waiting = level > 0;
                rows.push(Row {
                    plugin: &job.plugin,
                    method: &job.method,
                    params: &job.params,
                    priority: job.priority,
                    status: if waiting { "waiting" } else { "pending" },
                    run_at: now.plus(job.delay.min(MAX_DELAY)).0,
                    delay_us: micros(job.delay),
                    max_attempts: job.max_attempts,
                    parent: parents[index],
                });
                members.push(index);
            }

            // Inside this write transaction nothing else inserts, and SQLite
            // gives each new row the next rowid in SELECT order, so the sorted
            // ids line up with `rows`.
            let mut ids: Vec<JobId> = sqlx::query_scalar(
                "INSERT INTO jobs (plugin, method, params, priority, status, run_at, delay_us, max_attempts,
                                   created_at, updated_at, parent_id)
                 SELECT value ->> 'plugin', value ->> 'method', value ->> 'params', value ->> 'priority',
                        value ->> 'status', value ->> 'run_at', value ->> 'delay_us', value ->> 'max_attempts',
                        ?2, ?2, value ->> 'parent'
                 FROM json_each(?1) ORDER BY key
                 RETURNING id",
            )
            .bind(to_json(&rows))
            .bind(now.0)
            .fetch_all(&mut *tx)
            .await?;
            ids.sort_unstable();
            debug_assert_eq!(ids.len(), rows.len());
            debug_assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "rowids of one INSERT are consecutive");

            for ((&index, &id), row) in members.iter().zip(&ids).zip(&rows) {
                if level == 0 {
                    heads.push(id);
                }
                parents[index] = Some(id);
                events.push((id, row.status));
            }
        }

        let events: Vec<_> = events.iter().map(|&(id, status)| EventRow { id, status, message: None }).collect();
        insert_events(&mut tx, now, &events).await?;
        tx.commit().await?;
        wake::notify(&self.path, Wake::Dispatched);
        Ok(heads)
    }

    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<ClaimedJob>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let rows = sqlx::query(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?1, updated_at = ?1,
                    finished_at = NULL, progress = NULL, lease_owner = ?2, lease_expires_at = ?3
             WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_due WHERE status = 'pending' AND run_at <= ?1
                          ORDER BY priority, run_at, id LIMIT ?4)
             RETURNING id, plugin, method, params, attempts, max_attempts, priority, run_at, created_at",
        )
        .bind(now.0)
        .bind(owner)
        .bind(now.plus(lease).0)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }

        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            claimed.push(ClaimedJob {
                id: row.try_get("id")?,
                plugin: row.try_get("plugin")?,
                method: row.try_get("method")?,
                params: row.try_get("params")?,
                attempt: row.try_get::<i64, _>("attempts")? as u32,
                max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
                priority: row.try_get::<i64, _>("priority")? as u8,
                run_at: Timestamp(row.try_get("run_at")?),
                created_at: Timestamp(row.try_get("created_at")?),
                started_at: now,
            });
        }
        // RETURNING gives no order; start them in the order they were chosen.
        claimed.sort_unstable_by_key(|job| (job.priority, job.run_at, job.id));

        let events: Vec<_> = claimed.iter().map(|job| EventRow { id: job.id, status: "running", message: None }).collect();
        insert_events(&mut tx, now, &events).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn finish(&self, owner: &str, results: &[Finished]) -> Result<FinishReport, StoreError> {
        #[derive(Serialize)]
        struct ResultRow<'a> {
            id: JobId,
            attempt: u32,
            kind: &'a str,
            output: Option<&'a str>,
            error: Option<&'a str>,
            delay_us: i64,
        }
        #[derive(Serialize)]
        struct AttemptRow<'a> {
            id: JobId,
            attempt: u32,
            started_at: i64,
            duration_us: i64,
            error: Option<&'a str>,
        }

        let mut report = FinishReport::default();
        if results.is_empty() {
            return Ok(report);
        }
        let rows: Vec<_> = results
            .iter()
            .map(|result| {
                let (kind, output, error, delay) = match &result.outcome {
                    FinishedOutcome::Succeeded { output } => ("succeeded", Some(output.as_str()), None, Duration::ZERO),
                    FinishedOutcome::Retry { error, delay } => ("retry", None, Some(error.as_str()), *delay),
                    FinishedOutcome::Failed { error } => ("failed", None, Some(error.as_str()), Duration::ZERO),
                };
                ResultRow { id: result.id, attempt: result.attempt, kind, output, error, delay_us: micros(delay) }
            })
            .collect();
        // UPDATE ... FROM applies an arbitrary one of several rows that match
        // a job, so only the first result for each run goes to the database.
        // Repeats are discarded below, like any result already written.
        let mut runs = std::collections::HashSet::with_capacity(results.len());
        let first_for_run: Vec<bool> = results.iter().map(|result| runs.insert((result.id, result.attempt))).collect();
        let unique_rows: Vec<&ResultRow> =
            rows.iter().zip(&first_for_run).filter(|&(_, &first)| first).map(|(row, _)| row).collect();

        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let written = sqlx::query(
            "UPDATE jobs SET
                 status = CASE r.kind WHEN 'retry' THEN 'pending' ELSE r.kind END,
                 output = CASE r.kind WHEN 'succeeded' THEN r.output ELSE jobs.output END,
                 last_error = CASE r.kind WHEN 'succeeded' THEN NULL ELSE r.error END,
                 run_at = CASE r.kind WHEN 'retry' THEN ?3 + r.delay_us ELSE jobs.run_at END,
                 finished_at = CASE r.kind WHEN 'retry' THEN NULL ELSE ?3 END,
                 progress = CASE r.kind WHEN 'succeeded' THEN 1.0 ELSE jobs.progress END,
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3
             FROM (SELECT value ->> 'id' AS id, value ->> 'attempt' AS attempt, value ->> 'kind' AS kind,
                          value ->> 'output' AS output, value ->> 'error' AS error, value ->> 'delay_us' AS delay_us
                   FROM json_each(?1)) AS r
             WHERE jobs.id = r.id AND +jobs.status = 'running' AND +jobs.lease_owner = ?2 AND jobs.attempts = r.attempt
             RETURNING jobs.id, jobs.status, jobs.started_at, jobs.attempts",
        )
        .bind(to_json(&unique_rows))
        .bind(owner)
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await?;

        let mut started = std::collections::HashMap::with_capacity(written.len());
        for row in &written {
            let id: JobId = row.try_get("id")?;
            let status: String = row.try_get("status")?;
            report.written.push((id, status_of(id, &status)?));
            let attempt = row.try_get::<i64, _>("attempts")? as u32;
            started.insert(id, (attempt, row.try_get::<Option<i64>, _>("started_at")?.unwrap_or(now.0)));
        }

        let mut attempts = Vec::with_capacity(written.len());
        let mut events = Vec::with_capacity(written.len());
        for ((result, row), &first) in results.iter().zip(&rows).zip(&first_for_run) {
            // A batch may also hold a stale attempt's result next to the
            // current one, so a result counts only for the attempt written.
            let written_run = started.get(&result.id).filter(|&&(attempt, _)| first && attempt == result.attempt);
            let Some(&(_, started_at)) = written_run else {
                report.discarded.push(result.id);
                continue;
            };
            attempts.push(AttemptRow {
                id: result.id,
                attempt: result.attempt,
                started_at,
                duration_us: micros(result.duration),
                error: row.error,
            });
            let status = if row.kind == "retry" { "pending" } else { row.kind };
            events.push(EventRow { id: result.id, status, message: row.error });
        }
        if !attempts.is_empty() {
            sqlx::query(
                "INSERT OR REPLACE INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 SELECT value ->> 'id', value ->> 'attempt', value ->> 'started_at', ?2, value ->> 'duration_us',
                        value ->> 'error', ?3
                 FROM json_each(?1)",
            )
            .bind(to_json(&attempts))
            .bind(now.0)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        }
        insert_events(&mut tx, now, &events).await?;

        // Chains: children of a success become due; descendants of a final
        // failure are cancelled with the reason.
        let succeeded: Vec<JobId> =
            report.written.iter().filter(|(_, status)| *status == Status::Succeeded).map(|(id, _)| *id).collect();
        if !succeeded.is_empty() {
            report.released = sqlx::query_scalar(
                "UPDATE jobs SET status = 'pending', run_at = ?2 + delay_us, updated_at = ?2
                 WHERE parent_id IN (SELECT value FROM json_each(?1)) AND +status = 'waiting'
                 RETURNING id",
            )
            .bind(to_json(&succeeded))
            .bind(now.0)
            .fetch_all(&mut *tx)
            .await?;
            let events: Vec<_> = report
                .released
                .iter()
                .map(|&id| EventRow { id, status: "pending", message: Some("released: the parent job succeeded") })
                .collect();
            insert_events(&mut tx, now, &events).await?;
        }
        for &(id, status) in &report.written {
            if status == Status::Failed {
                let reason = format!("cancelled because parent job {id} failed");
                let cancelled = cancel_descendants(&mut tx, now, id, &reason).await?;
                report.cancelled.extend(cancelled);
            }
        }

        tx.commit().await?;
        Ok(report)
    }

    async fn renew(&self, owner: &str, lease: Duration, running: &[(JobId, Option<f64>)]) -> Result<Vec<JobId>, StoreError> {
        #[derive(Serialize)]
        struct ProgressRow {
            id: JobId,
            progress: f64,
        }

        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let ids: Vec<JobId> = running.iter().map(|&(id, _)| id).collect();
        let owned: Vec<JobId> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ?1
             WHERE id IN (SELECT value FROM json_each(?3)) AND +status = 'running' AND +lease_owner = ?2
             RETURNING id",
        )
        .bind(now.plus(lease).0)
        .bind(owner)
        .bind(to_json(&ids))
        .fetch_all(&mut *tx)
        .await?;

        let progress: Vec<_> = running
            .iter()
            .filter_map(|&(id, progress)| progress.map(|progress| ProgressRow { id, progress }))
            .collect();
        if !progress.is_empty() {
            sqlx::query(
                "UPDATE jobs SET progress = p.progress
                 FROM (SELECT value ->> 'id' AS id, value ->> 'progress' AS progress FROM json_each(?1)) AS p
                 WHERE jobs.id = p.id AND +jobs.status = 'running' AND +jobs.lease_owner = ?2",
            )
            .bind(to_json(&progress))
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        let owned: std::collections::HashSet<JobId> = owned.into_iter().collect();
        Ok(running.iter().map(|&(id, _)| id).filter(|id| !owned.contains(id)).collect())
    }

    async fn rescue(&self) -> Result<Vec<Rescued>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let expired = sqlx::query(
            "SELECT id, plugin, method, lease_owner, attempts, max_attempts, started_at FROM jobs INDEXED BY jobs_status
             WHERE status = 'running' AND lease_expires_at < ?1",
        )
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await?;
        if expired.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }

        let mut rescued = Vec::with_capacity(expired.len());
        for row in &expired {
            let id: JobId = row.try_get("id")?;
            let owner: String = row.try_get::<Option<String>, _>("lease_owner")?.unwrap_or_default();
            let attempt = row.try_get::<i64, _>("attempts")? as u32;
            let max_attempts = row.try_get::<i64, _>("max_attempts")? as u32;
            let started_at: i64 = row.try_get::<Option<i64>, _>("started_at")?.unwrap_or(now.0);
            let status = if attempt >= max_attempts { Status::Failed } else { Status::Pending };
            let error = format!("the lease of daemon {owner} expired before attempt {attempt} finished; the daemon probably died");

            sqlx::query(
                "UPDATE jobs SET status = ?2, last_error = ?3, run_at = ?4, updated_at = ?4,
                        finished_at = CASE ?2 WHEN 'failed' THEN ?4 ELSE NULL END,
                        lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = ?1",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(&error)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT OR IGNORE INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)",
            )
            .bind(id)
            .bind(attempt)
            .bind(started_at)
            .bind(now.0)
            .bind(&error)
            .bind(&owner)
            .execute(&mut *tx)
            .await?;
            insert_events(&mut tx, now, &[EventRow { id, status: status.as_str(), message: Some(&error) }]).await?;
            if status == Status::Failed {
                cancel_descendants(&mut tx, now, id, &format!("cancelled because parent job {id} failed")).await?;
            }
            rescued.push(Rescued {
                id,
                plugin: row.try_get("plugin")?,
                method: row.try_get("method")?,
                owner,
                attempt,
                status,
            });
        }
        tx.commit().await?;
        Ok(rescued)
    }

    async fn owned(&self, owner: &str) -> Result<Vec<JobId>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM jobs INDEXED BY jobs_status WHERE status = 'running' AND lease_owner = ?1 ORDER BY id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn hand_back(&self, owner: &str, ids: &[JobId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let handed: Vec<JobId> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, run_at = ?3, updated_at = ?3,
                    started_at = NULL, progress = NULL, lease_owner = NULL, lease_expires_at = NULL
             WHERE id IN (SELECT value FROM json_each(?1)) AND +status = 'running' AND +lease_owner = ?2
             RETURNING id",
        )
        .bind(to_json(&ids))
        .bind(owner)
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await?;
        let message = "handed back unfinished; the interrupted run does not count as an attempt";
        let events: Vec<_> = handed.iter().map(|&id| EventRow { id, status: "pending", message: Some(message) }).collect();
        insert_events(&mut tx, now, &events).await?;
        tx.commit().await?;
        Ok(handed.len() as u64)
    }

    async fn next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        // One index seek per priority instead of an index of its own, which
        // every claim would have to update.
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next) FROM (
                 SELECT (SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due
                         WHERE status = 'pending' AND priority = p.value) AS next
                 FROM json_each('[1,2,3,4,5,6,7,8,9,10]') AS p
             )",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next.map(Timestamp))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let rows = list_query("", filter).build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn attempts(&self, id: JobId) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, started_at, finished_at, duration_us, error, owner FROM job_attempts
             WHERE job_id = ?1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AttemptRecord {
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    started_at: Timestamp(row.try_get("started_at")?),
                    finished_at: Timestamp(row.try_get("finished_at")?),
                    duration: row
                        .try_get::<Option<i64>, _>("duration_us")?
                        .map(|micros| Duration::from_micros(micros.max(0) as u64)),
                    error: row.try_get("error")?,
                    owner: row.try_get("owner")?,
                })
            })
            .collect()
    }

    async fn events(&self, id: JobId) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query("SELECT status, at, message FROM job_events WHERE job_id = ?1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(EventRecord { status: status_of(id, &status)?, at: Timestamp(row.try_get("at")?), message: row.try_get("message")? })
            })
            .collect()
    }

    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE parent_id = ?1 ORDER BY id").bind(id).fetch_all(&self.pool).await?)
    }

    async fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError> {
        // Succeeded jobs pile up until they are pruned, so they are counted
        // as the total minus the other statuses. A bare COUNT(*) takes
        // SQLite's fast path, which counts cells page by page. On the
        // million-row table of `jobhost bench --dashboard` it was about five
        // times faster than a range count of the same rows. The other
        // statuses are range counts on the (status, id) index, and the read
        // transaction makes all of it one snapshot.
        let mut read = self.pool.begin().await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs").fetch_one(&mut *read).await?;
        let mut counts = Vec::with_capacity(Status::ALL.len());
        let mut others = 0;
        for status in Status::ALL.into_iter().filter(|status| *status != Status::Succeeded) {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs INDEXED BY jobs_status WHERE status = ?1")
                .bind(status.as_str())
                .fetch_one(&mut *read)
                .await?;
            others += count;
            counts.push((status, count as u64));
        }
        read.rollback().await?;
        let succeeded = (total - others).max(0) as u64;
        counts.insert(Status::ALL.iter().position(|status| *status == Status::Succeeded).unwrap_or(0), (Status::Succeeded, succeeded));
        Ok(counts)
    }

    async fn prune(&self, age: Duration) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let cutoff = Timestamp::now().0.saturating_sub(micros(age));
        // Leaves first: a job goes only once no remaining job names it as parent.
        let mut deleted = 0;
        loop {
            let ids: Vec<JobId> = sqlx::query_scalar(
                "SELECT id FROM jobs AS job
                 WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM jobs AS child WHERE child.parent_id = job.id)
                 LIMIT 10000",
            )
            .bind(cutoff)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                break;
            }
            let ids = to_json(&ids);
            for table in ["job_events", "job_attempts"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id IN (SELECT value FROM json_each(?1))"))
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?;
            }
            deleted += sqlx::query("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?1))").bind(&ids).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Reads the jobs table, not just `SELECT 1`, so that a file whose
        // schema is gone or damaged fails the check.
        sqlx::query("SELECT id FROM jobs LIMIT 1").fetch_optional(&self.pool).await?;
        Ok(())
    }

    async fn cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?1").bind(id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else {
            return Ok(CancelOutcome::NotFound);
        };
        let previous = status_of(id, &status)?;
        if previous.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(previous));
        }

        if previous == Status::Running {
            // The interrupted run is an attempt too; its result, if it comes, is discarded.
            sqlx::query(
                "INSERT OR IGNORE INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 SELECT id, attempts, COALESCE(started_at, ?2), ?2, ?2 - COALESCE(started_at, ?2), ?3, lease_owner FROM jobs WHERE id = ?1",
            )
            .bind(id)
            .bind(now.0)
            .bind(format!("cancelled while running: {reason}"))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', last_error = ?2, finished_at = ?3, updated_at = ?3,
                    lease_owner = NULL, lease_expires_at = NULL
             WHERE id = ?1",
        )
        .bind(id)
        .bind(reason)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        insert_events(&mut tx, now, &[EventRow { id, status: "cancelled", message: Some(reason) }]).await?;
        let descendants = cancel_descendants(&mut tx, now, id, &format!("cancelled because parent job {id} was cancelled")).await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled { previous, descendants })
    }

    async fn retry(&self, id: JobId, extra_attempts: u32) -> Result<RetryOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Timestamp::now();
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?1").bind(id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else {
            return Ok(RetryOutcome::NotFound);
        };
        let previous = status_of(id, &status)?;
        if !matches!(previous, Status::Failed | Status::Cancelled) {
            return Ok(RetryOutcome::NotRetryable(previous));
        }
        let parent: Option<(JobId, String)> =
            sqlx::query_as("SELECT parent.id, parent.status FROM jobs AS child JOIN jobs AS parent ON parent.id = child.parent_id WHERE child.id = ?1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let status = match retried_status(parent)? {
            Ok(status) => status,
            Err(rejected) => return Ok(rejected),
        };

        sqlx::query(
            "UPDATE jobs SET status = ?4, run_at = ?2, updated_at = ?2, finished_at = NULL, last_error = NULL,
                    max_attempts = attempts + ?3
             WHERE id = ?1",
        )
        .bind(id)
        .bind(now.0)
        .bind(extra_attempts.max(1))
        .bind(status.as_str())
        .execute(&mut *tx)
        .await?;
        insert_events(&mut tx, now, &[EventRow { id, status: status.as_str(), message: Some("retried by hand") }]).await?;

        // The chain behind the job waits for it again.
        let descendants: Vec<JobId> = sqlx::query_scalar(
            "WITH RECURSIVE descendants(id) AS (
                 SELECT id FROM jobs WHERE parent_id = ?1
                 UNION ALL
                 SELECT jobs.id FROM jobs JOIN descendants ON jobs.parent_id = descendants.id
             )
             UPDATE jobs SET status = 'waiting', finished_at = NULL, last_error = NULL, updated_at = ?2
             WHERE id IN (SELECT id FROM descendants) AND status = 'cancelled'
             RETURNING id",
        )
        .bind(id)
        .bind(now.0)
        .fetch_all(&mut *tx)
        .await?;
        let message = format!("waiting again: parent job {id} was retried");
        let events: Vec<_> = descendants.iter().map(|&id| EventRow { id, status: "waiting", message: Some(&message) }).collect();
        insert_events(&mut tx, now, &events).await?;
        tx.commit().await?;
        Ok(RetryOutcome::Requeued { previous, status, descendants })
    }

    async fn wake(&self, wake: Wake) {
        wake::notify(&self.path, wake);
    }

    async fn subscribe(&self) -> Result<WakeSubscription, StoreError> {
        Ok(WakeSubscription::Socket(WakeListener::bind(&self.path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every list filter the dashboard offers must read an index in id order:
    /// a full scan with a sort would make each page cost the whole table.
    #[tokio::test]
    async fn list_queries_use_an_index_without_sorting() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let store = SqliteStore::open(&folder.path().join("jobs.db"), Synchronous::Normal, true).await.expect("open");
        store.migrate().await.expect("migrate");
        let text = |value: &str| Some(value.to_owned());
        let filters = [
            ListFilter { limit: 50, ..ListFilter::default() },
            ListFilter { before_id: Some(500), limit: 50, ..ListFilter::default() },
            ListFilter { status: Some(Status::Failed), limit: 50, ..ListFilter::default() },
            ListFilter { status: Some(Status::Failed), before_id: Some(500), limit: 50, ..ListFilter::default() },
            ListFilter { plugin: text("demo"), limit: 50, ..ListFilter::default() },
            ListFilter { plugin: text("demo"), method: text("handle"), before_id: Some(500), limit: 50, ..ListFilter::default() },
            ListFilter { status: Some(Status::Pending), plugin: text("demo"), method: text("handle"), limit: 50, ..ListFilter::default() },
        ];
        for filter in &filters {
            let plan: Vec<String> = list_query("EXPLAIN QUERY PLAN ", filter)
                .build()
                .fetch_all(&store.pool)
                .await
                .expect("explain")
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            let plan = plan.join("; ");
            assert!(!plan.contains("TEMP B-TREE"), "{filter:?} sorts: {plan}");
            let uses_index = plan.contains("USING INDEX") || plan.contains("USING INTEGER PRIMARY KEY") || plan == "SCAN jobs";
            assert!(uses_index, "{filter:?} reads no index: {plan}");
            if filter.status.is_some() || (filter.plugin.is_some() && filter.method.is_some()) {
                assert!(plan.contains("SEARCH jobs USING INDEX"), "{filter:?} scans instead of searching: {plan}");
            }
        }
    }
}
