//! The PostgreSQL store: one database shared by daemons on many machines.
//!
//! Claims take due rows with `FOR UPDATE SKIP LOCKED`, so concurrent claimers
//! skip each other's rows instead of waiting. Every time comes from the
//! database clock (`now()`, the start of the transaction), so daemons whose
//! clocks disagree never run a job early.
//!
//! Batches travel as arrays, one per column, unpacked with `UNNEST`, and the
//! history rows a change implies are written by data-modifying CTEs in the
//! same statement, so a claim or a batch of results is one round trip.
//!
//! Dispatch sends `NOTIFY` on a channel named after the schema, inside the
//! dispatching transaction, so that daemons hear of a job only once it is
//! committed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;

use super::*;
use crate::config::redact_password;
use crate::wake::{Wake, WakeSubscription};

/// Maximum delay stored, about a century, as for SQLite.
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long to wait for a free connection before an operation fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

const JOB_COLUMNS: &str = "id, plugin, method, params, status, priority, attempts, max_attempts, run_at, created_at, \
     started_at, finished_at, output, last_error, progress, parent_id, lease_owner, lease_expires_at";

/// A job's attempts: the rows of `job_attempts`, plus a succeeded job's last
/// attempt, which the job row keeps because a success writes no attempt row.
/// An attempt that an older version also stored is not repeated.
macro_rules! attempts_query {
    () => {
        "SELECT attempt, started_at, finished_at, duration_us, error, owner FROM job_attempts WHERE job_id = $1
         UNION ALL
         SELECT attempts, COALESCE(started_at, finished_at), finished_at, attempt_duration_us, NULL, attempt_owner
         FROM jobs
         WHERE id = $1 AND status = 'succeeded'
           AND NOT EXISTS (SELECT 1 FROM job_attempts WHERE job_id = $1 AND attempt = jobs.attempts)"
    };
}

/// Starts a claim's transaction. Sorting is off in it, so the due jobs come
/// from a walk of `jobs_due` in its order, which stops after the batch.
/// On a table not analyzed since a burst of dispatch, the planner expected a
/// few due rows and sorted all of them instead, spilling to disk. A claim of
/// 1,000 from 50,000 pending jobs then took 62 ms rather than 19 ms
/// (`EXPLAIN ANALYZE`, PostgreSQL 15 on a 2-core VM).
const CLAIM_BEGIN: &str = "BEGIN; SET LOCAL enable_sort = off";

/// Claims up to `$3` due jobs for `$1`, with a lease of `$2` microseconds.
///
/// A claim writes no `running` event, because the run's start is
/// `started_at`, which the attempt row (or the job row, after a success)
/// keeps once the run ends. `events` reads it from there, and each job costs
/// one insert fewer.
///
/// The chosen ids go to the update as an array, so it finds each row by its
/// key. Joined to the subquery, the update was planned as a hash join over a
/// scan of the whole table.
const CLAIM: &str = "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = now(), updated_at = now(),
        finished_at = NULL, progress = NULL, lease_owner = $1,
        lease_expires_at = now() + $2 * interval '1 microsecond'
    WHERE id = ANY(ARRAY(
        SELECT id FROM jobs WHERE status = 'pending' AND run_at <= now()
        ORDER BY priority, run_at, id LIMIT $3
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, plugin, method, params, attempts, max_attempts, priority, run_at, created_at, started_at";

/// The jobs table in a PostgreSQL database (in the first schema of the
/// connection's `search_path`).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The URL with its password hidden, for messages.
    url: String,
    /// The LISTEN/NOTIFY channel of this schema's jobs table.
    channel: String,
}

impl PostgresStore {
    /// Connects to `url` with at most `pool_size` connections.
    pub async fn open(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let shown = redact_password(url);
        let options: PgConnectOptions =
            url.parse().map_err(|source| StoreError::Open { url: shown.clone(), source })?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open { url: shown.clone(), source })?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(|source| StoreError::Open { url: shown.clone(), source })?;
        // Channel names are identifiers of at most 63 bytes.
        let channel: String = format!("jobhost_{schema}").chars().take(63).collect();
        Ok(Self { pool, url: shown, channel })
    }

    /// Applies the migrations in `migrations/postgres/` that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|source| StoreError::Migrate { url: self.url.clone(), source })
    }

    /// Returns the connection pool, for callers that run their own transactions.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Inserts `chains` through `connection`, which may be inside the
    /// caller's transaction: the jobs then exist, and daemons hear of them,
    /// only if that transaction commits.
    pub async fn dispatch_with(&self, connection: &mut PgConnection, chains: &[NewChain]) -> Result<Vec<JobId>, StoreError> {
        let mut heads = Vec::with_capacity(chains.len());
        let mut parents: Vec<Option<JobId>> = vec![None; chains.len()];
        let depth = chains.iter().map(|chain| chain.then.len() + 1).max().unwrap_or(0);
        for level in 0..depth {
            let mut members = Vec::new();
            let mut columns = DispatchColumns::default();
            for (index, chain) in chains.iter().enumerate() {
                let job = if level == 0 { Some(&chain.head) } else { chain.then.get(level - 1) };
                let Some(job) = job else { continue };
                columns.push(job, level > 0, parents[index]);
                members.push(index);
            }

            // nextval() runs in the order of the ordered SELECT, so the
            // sorted ids of this INSERT line up with its input rows. No event
            // row is written, because `events` reads the first from created_at.
            let mut ids: Vec<JobId> = sqlx::query_scalar(
                "WITH inserted AS (
                     INSERT INTO jobs (plugin, method, params, priority, status, run_at, delay_us, max_attempts,
                                       created_at, updated_at, parent_id)
                     SELECT plugin, method, params, priority, status,
                            now() + delay_us * interval '1 microsecond', delay_us, max_attempts, now(), now(), parent
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::smallint[], $5::text[], $6::bigint[],
                                 $7::int[], $8::bigint[])
                          WITH ORDINALITY AS input(plugin, method, params, priority, status, delay_us, max_attempts, parent, position)
                     ORDER BY position
                     RETURNING id
                 )
                 SELECT id FROM inserted",
            )
            .bind(&columns.plugin)
            .bind(&columns.method)
            .bind(&columns.params)
            .bind(&columns.priority)
            .bind(&columns.status)
            .bind(&columns.delay_us)
            .bind(&columns.max_attempts)
            .bind(&columns.parent)
            .fetch_all(&mut *connection)
            .await?;
            ids.sort_unstable();
            debug_assert_eq!(ids.len(), members.len());

            for (&index, &id) in members.iter().zip(&ids) {
                if level == 0 {
                    heads.push(id);
                }
                parents[index] = Some(id);
            }
        }

        if !heads.is_empty() {
            sqlx::query("SELECT pg_notify($1, 'd')").bind(&self.channel).execute(&mut *connection).await?;
        }
        Ok(heads)
    }

    async fn notify(&self, connection: &mut PgConnection, wake: Wake) -> Result<(), StoreError> {
        let payload = match wake {
            Wake::Dispatched => "d",
            Wake::Cancelled => "c",
            Wake::Reload => "r",
        };
        sqlx::query("SELECT pg_notify($1, $2)").bind(&self.channel).bind(payload).execute(connection).await?;
        Ok(())
    }
}

#[derive(Default)]
struct DispatchColumns {
    plugin: Vec<String>,
    method: Vec<String>,
    params: Vec<String>,
    priority: Vec<i16>,
    status: Vec<&'static str>,
    delay_us: Vec<i64>,
    max_attempts: Vec<i32>,
    parent: Vec<Option<JobId>>,
}

impl DispatchColumns {
    fn push(&mut self, job: &NewJob, waiting: bool, parent: Option<JobId>) {
        self.plugin.push(job.plugin.clone());
        self.method.push(job.method.clone());
        self.params.push(job.params.clone());
        self.priority.push(i16::from(job.priority));
        self.status.push(if waiting { "waiting" } else { "pending" });
        self.delay_us.push(micros(job.delay));
        self.max_attempts.push(i32::try_from(job.max_attempts).unwrap_or(i32::MAX));
        self.parent.push(parent);
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.min(MAX_DELAY).as_micros()).unwrap_or(i64::MAX)
}

fn timestamp(at: OffsetDateTime) -> Timestamp {
    Timestamp(i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX))
}

fn optional_timestamp(row: &PgRow, column: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(row.try_get::<Option<OffsetDateTime>, _>(column)?.map(timestamp))
}

fn job_from_row(row: &PgRow) -> Result<JobRecord, StoreError> {
    let id: JobId = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    Ok(JobRecord {
        id,
        plugin: row.try_get("plugin")?,
        method: row.try_get("method")?,
        params: row.try_get("params")?,
        status: status_of(id, &status)?,
        priority: row.try_get::<i16, _>("priority")? as u8,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
        max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
        run_at: timestamp(row.try_get("run_at")?),
        created_at: timestamp(row.try_get("created_at")?),
        started_at: optional_timestamp(row, "started_at")?,
        finished_at: optional_timestamp(row, "finished_at")?,
        output: row.try_get("output")?,
        last_error: row.try_get("last_error")?,
        progress: row.try_get("progress")?,
        parent_id: row.try_get("parent_id")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: optional_timestamp(row, "lease_expires_at")?,
    })
}

/// Cancels every waiting or pending descendant of `parent`, recording `reason`.
async fn cancel_descendants(tx: &mut Transaction<'static, Postgres>, parent: JobId, reason: &str) -> Result<Vec<JobId>, StoreError> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE descendants(id) AS (
             SELECT id FROM jobs WHERE parent_id = $1
             UNION ALL
             SELECT jobs.id FROM jobs JOIN descendants ON jobs.parent_id = descendants.id
         ), cancelled AS (
             UPDATE jobs SET status = 'cancelled', last_error = $2, finished_at = now(), updated_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL
             WHERE id IN (SELECT id FROM descendants) AND status IN ('waiting', 'pending')
             RETURNING id
         ), events AS (
             INSERT INTO job_events (job_id, status, at, message) SELECT id, 'cancelled', now(), $2 FROM cancelled
         )
         SELECT id FROM cancelled",
    )
    .bind(parent)
    .bind(reason)
    .fetch_all(&mut **tx)
    .await?)
}

async fn insert_event(tx: &mut Transaction<'static, Postgres>, id: JobId, status: Status, message: Option<&str>) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO job_events (job_id, status, at, message) VALUES ($1, $2, now(), $3)")
        .bind(id)
        .bind(status.as_str())
        .bind(message)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn dispatch(&self, chains: &[NewChain]) -> Result<Vec<JobId>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let heads = self.dispatch_with(&mut tx, chains).await?;
        tx.commit().await?;
        Ok(heads)
    }

    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<ClaimedJob>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with(CLAIM_BEGIN).await?;
        let rows = sqlx::query(CLAIM)
            .bind(owner)
            .bind(micros(lease))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;

        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            claimed.push(ClaimedJob {
                id: row.try_get("id")?,
                plugin: row.try_get("plugin")?,
                method: row.try_get("method")?,
                params: row.try_get("params")?,
                attempt: row.try_get::<i32, _>("attempts")? as u32,
                max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
                priority: row.try_get::<i16, _>("priority")? as u8,
                run_at: timestamp(row.try_get("run_at")?),
                created_at: timestamp(row.try_get("created_at")?),
                started_at: timestamp(row.try_get("started_at")?),
            });
        }
        // RETURNING gives no order; start them in the order they were chosen.
        claimed.sort_unstable_by_key(|job| (job.priority, job.run_at, job.id));
        Ok(claimed)
    }

    async fn finish(&self, owner: &str, results: &[Finished]) -> Result<FinishReport, StoreError> {
        let mut report = FinishReport::default();
        if results.is_empty() {
            return Ok(report);
        }

        // Only the first result for each run goes to the database; repeats
        // are discarded below, like any result already written.
        let mut runs = HashSet::with_capacity(results.len());
        let first_for_run: Vec<bool> = results.iter().map(|result| runs.insert((result.id, result.attempt))).collect();
        let (mut ids, mut attempts, mut kinds, mut outputs, mut errors, mut delays, mut durations) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (result, _) in results.iter().zip(&first_for_run).filter(|(_, first)| **first) {
            let (kind, output, error, delay) = match &result.outcome {
                FinishedOutcome::Succeeded { output } => ("succeeded", Some(output.as_str()), None, Duration::ZERO),
                FinishedOutcome::Retry { error, delay } => ("retry", None, Some(error.as_str()), *delay),
                FinishedOutcome::Failed { error } => ("failed", None, Some(error.as_str()), Duration::ZERO),
            };
            ids.push(result.id);
            attempts.push(i32::try_from(result.attempt).unwrap_or(i32::MAX));
            kinds.push(kind);
            outputs.push(output);
            errors.push(error);
            delays.push(micros(delay));
            durations.push(micros(result.duration));
        }

        // A success writes no history rows, because the job row keeps its
        // owner and duration for `attempts` and `events` to read.
        let mut tx = self.pool.begin().await?;
        let written = sqlx::query(
            "WITH results AS (
                 SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
                     AS r(id, attempt, kind, output, error, delay_us, duration_us)
             ), written AS (
                 UPDATE jobs SET
                     status = CASE r.kind WHEN 'retry' THEN 'pending' ELSE r.kind END,
                     output = CASE r.kind WHEN 'succeeded' THEN r.output ELSE jobs.output END,
                     last_error = CASE r.kind WHEN 'succeeded' THEN NULL ELSE r.error END,
                     run_at = CASE r.kind WHEN 'retry' THEN now() + r.delay_us * interval '1 microsecond' ELSE jobs.run_at END,
                     finished_at = CASE r.kind WHEN 'retry' THEN NULL ELSE now() END,
                     progress = CASE r.kind WHEN 'succeeded' THEN 1.0 ELSE jobs.progress END,
                     attempt_owner = CASE r.kind WHEN 'succeeded' THEN $8 END,
                     attempt_duration_us = CASE r.kind WHEN 'succeeded' THEN r.duration_us END,
                     lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
                 FROM results AS r
                 WHERE jobs.id = r.id AND jobs.status = 'running' AND jobs.lease_owner = $8 AND jobs.attempts = r.attempt
                 RETURNING jobs.id, jobs.status, jobs.attempts, jobs.started_at, r.error, r.duration_us
             ), attempts AS (
                 INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 SELECT id, attempts, COALESCE(started_at, now()), now(), duration_us, error, $8 FROM written
                 WHERE status <> 'succeeded'
                 ON CONFLICT (job_id, attempt) DO UPDATE SET
                     finished_at = EXCLUDED.finished_at, duration_us = EXCLUDED.duration_us,
                     error = EXCLUDED.error, owner = EXCLUDED.owner
             ), events AS (
                 INSERT INTO job_events (job_id, status, at, message)
                 SELECT id, status, now(), error FROM written WHERE status <> 'succeeded'
             )
             SELECT id, status, attempts FROM written",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&kinds)
        .bind(&outputs)
        .bind(&errors)
        .bind(&delays)
        .bind(&durations)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;

        let mut written_runs = HashMap::with_capacity(written.len());
        for row in &written {
            let id: JobId = row.try_get("id")?;
            let status: String = row.try_get("status")?;
            let attempt = row.try_get::<i32, _>("attempts")? as u32;
            let status = status_of(id, &status)?;
            report.written.push((id, status));
            written_runs.insert(id, attempt);
        }
        for (result, &first) in results.iter().zip(&first_for_run) {
            // A batch may also hold a stale attempt's result next to the
            // current one, so a result counts only for the attempt written.
            if !(first && written_runs.get(&result.id) == Some(&result.attempt)) {
                report.discarded.push(result.id);
            }
        }

        // Chains: children of a success become due; descendants of a final
        // failure are cancelled with the reason.
        let succeeded: Vec<JobId> =
            report.written.iter().filter(|(_, status)| *status == Status::Succeeded).map(|(id, _)| *id).collect();
        if !succeeded.is_empty() {
            report.released = sqlx::query_scalar(
                "WITH released AS (
                     UPDATE jobs SET status = 'pending', run_at = now() + delay_us * interval '1 microsecond', updated_at = now()
                     WHERE parent_id = ANY($1) AND status = 'waiting'
                     RETURNING id
                 ), events AS (
                     INSERT INTO job_events (job_id, status, at, message)
                     SELECT id, 'pending', now(), 'released: the parent job succeeded' FROM released
                 )
                 SELECT id FROM released",
            )
            .bind(&succeeded)
            .fetch_all(&mut *tx)
            .await?;
        }
        for &(id, status) in &report.written {
            if status == Status::Failed {
                let reason = format!("cancelled because parent job {id} failed");
                report.cancelled.extend(cancel_descendants(&mut tx, id, &reason).await?);
            }
        }
        if !report.released.is_empty() {
            // Other daemons may run the released jobs; this one is woken locally.
            self.notify(&mut tx, Wake::Dispatched).await?;
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn renew(&self, owner: &str, lease: Duration, running: &[(JobId, Option<f64>)]) -> Result<Vec<JobId>, StoreError> {
        let ids: Vec<JobId> = running.iter().map(|&(id, _)| id).collect();
        let progress: Vec<Option<f64>> = running.iter().map(|&(_, progress)| progress).collect();
        let owned: Vec<JobId> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = now() + $2 * interval '1 microsecond',
                    progress = COALESCE(p.progress, jobs.progress)
             FROM UNNEST($3::bigint[], $4::float8[]) AS p(id, progress)
             WHERE jobs.id = p.id AND jobs.status = 'running' AND jobs.lease_owner = $1
             RETURNING jobs.id",
        )
        .bind(owner)
        .bind(micros(lease))
        .bind(&ids)
        .bind(&progress)
        .fetch_all(&self.pool)
        .await?;
        let owned: HashSet<JobId> = owned.into_iter().collect();
        Ok(ids.into_iter().filter(|id| !owned.contains(id)).collect())
    }

    async fn rescue(&self) -> Result<Vec<Rescued>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // SKIP LOCKED: a row another daemon is finishing or rescuing right
        // now is left to it.
        let expired = sqlx::query(
            "SELECT id, plugin, method, lease_owner, attempts, max_attempts, started_at FROM jobs
             WHERE status = 'running' AND lease_expires_at < now()
             FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await?;

        let mut rescued = Vec::with_capacity(expired.len());
        for row in &expired {
            let id: JobId = row.try_get("id")?;
            let owner: String = row.try_get::<Option<String>, _>("lease_owner")?.unwrap_or_default();
            let attempt = row.try_get::<i32, _>("attempts")? as u32;
            let max_attempts = row.try_get::<i32, _>("max_attempts")? as u32;
            let status = if attempt >= max_attempts { Status::Failed } else { Status::Pending };
            let error = format!("the lease of daemon {owner} expired before attempt {attempt} finished; the daemon probably died");

            sqlx::query(
                "UPDATE jobs SET status = $2, last_error = $3, run_at = now(), updated_at = now(),
                        finished_at = CASE $2 WHEN 'failed' THEN now() ELSE NULL END,
                        lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = $1",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(&error)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 VALUES ($1, $2, COALESCE($3, now()), now(), NULL, $4, $5)
                 ON CONFLICT (job_id, attempt) DO NOTHING",
            )
            .bind(id)
            .bind(attempt as i32)
            .bind(row.try_get::<Option<OffsetDateTime>, _>("started_at")?)
            .bind(&error)
            .bind(&owner)
            .execute(&mut *tx)
            .await?;
            insert_event(&mut tx, id, status, Some(&error)).await?;
            if status == Status::Failed {
                cancel_descendants(&mut tx, id, &format!("cancelled because parent job {id} failed")).await?;
            }
            rescued.push(Rescued { id, plugin: row.try_get("plugin")?, method: row.try_get("method")?, owner, attempt, status });
        }
        if rescued.iter().any(|job| job.status == Status::Pending) {
            self.notify(&mut tx, Wake::Dispatched).await?;
        }
        tx.commit().await?;
        Ok(rescued)
    }

    async fn owned(&self, owner: &str) -> Result<Vec<JobId>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE status = 'running' AND lease_owner = $1 ORDER BY id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn hand_back(&self, owner: &str, ids: &[JobId]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        // A handed-back run leaves no attempt row, so its start is written
        // here as a `running` event, before the `pending` one.
        let handed: Vec<JobId> = sqlx::query_scalar(
            "WITH running AS (
                 SELECT id, started_at FROM jobs
                 WHERE id = ANY($1) AND status = 'running' AND lease_owner = $2
                 FOR UPDATE
             ), handed AS (
                 UPDATE jobs SET status = 'pending', attempts = attempts - 1, run_at = now(), updated_at = now(),
                        started_at = NULL, progress = NULL, lease_owner = NULL, lease_expires_at = NULL
                 FROM running WHERE jobs.id = running.id
                 RETURNING jobs.id, running.started_at
             ), events AS (
                 INSERT INTO job_events (job_id, status, at, message)
                 SELECT id, event.status, event.at, event.message
                 FROM handed CROSS JOIN LATERAL (VALUES
                     (1, 'running', COALESCE(handed.started_at, now()), NULL),
                     (2, 'pending', now(), 'handed back unfinished; the interrupted run does not count as an attempt')
                 ) AS event(position, status, at, message)
                 ORDER BY id, event.position
             )
             SELECT id FROM handed",
        )
        .bind(ids)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;
        if !handed.is_empty() {
            self.notify(&mut tx, Wake::Dispatched).await?;
        }
        tx.commit().await?;
        Ok(handed.len() as u64)
    }

    async fn next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let next: Option<OffsetDateTime> = sqlx::query_scalar(NEXT_DUE).fetch_one(&self.pool).await?;
        Ok(next.map(timestamp))
    }

    async fn until_next_due(&self) -> Result<Option<Duration>, StoreError> {
        // Both ends on the database clock.
        let micros: Option<i64> =
            sqlx::query_scalar(&format!("SELECT (EXTRACT(EPOCH FROM (({NEXT_DUE}) - now())) * 1000000)::bigint"))
                .fetch_one(&self.pool)
                .await?;
        Ok(micros.map(|micros| Duration::from_micros(micros.max(0) as u64)))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR plugin = $2)
               AND ($3::text IS NULL OR method = $3) AND ($4::bigint IS NULL OR id < $4)
             ORDER BY id DESC LIMIT $5"
        ))
        .bind(filter.status.map(Status::as_str))
        .bind(&filter.plugin)
        .bind(&filter.method)
        .bind(filter.before_id)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn attempts(&self, id: JobId) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(concat!(attempts_query!(), " ORDER BY attempt")).bind(id).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(AttemptRecord {
                    attempt: row.try_get::<i32, _>("attempt")? as u32,
                    started_at: timestamp(row.try_get("started_at")?),
                    finished_at: timestamp(row.try_get("finished_at")?),
                    duration: row.try_get::<Option<i64>, _>("duration_us")?.map(|micros| Duration::from_micros(micros.max(0) as u64)),
                    error: row.try_get("error")?,
                    owner: row.try_get("owner")?,
                })
            })
            .collect()
    }

    async fn events(&self, id: JobId) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(EVENTS).bind(id).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(EventRecord { status: status_of(id, &status)?, at: timestamp(row.try_get("at")?), message: row.try_get("message")? })
            })
            .collect()
    }

    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError> {
        Ok(sqlx::query_scalar("SELECT id FROM jobs WHERE parent_id = $1 ORDER BY id").bind(id).fetch_all(&self.pool).await?)
    }

    async fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetch_all(&self.pool).await?;
        counts_of(rows)
    }

    async fn prune(&self, age: Duration) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Leaves first: a job goes only once no remaining job names it as parent.
        let mut deleted = 0;
        loop {
            let ids: Vec<JobId> = sqlx::query_scalar(
                "SELECT id FROM jobs AS job
                 WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished_at < now() - $1 * interval '1 microsecond'
                   AND NOT EXISTS (SELECT 1 FROM jobs AS child WHERE child.parent_id = job.id)
                 LIMIT 10000
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(micros(age))
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                break;
            }
            sqlx::query("DELETE FROM job_events WHERE job_id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM job_attempts WHERE job_id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
            deleted += sqlx::query("DELETE FROM jobs WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
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
                "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
                 SELECT id, attempts, COALESCE(started_at, now()), now(),
                        (extract(epoch FROM now() - COALESCE(started_at, now())) * 1000000)::bigint, $2, lease_owner
                 FROM jobs WHERE id = $1
                 ON CONFLICT (job_id, attempt) DO NOTHING",
            )
            .bind(id)
            .bind(format!("cancelled while running: {reason}"))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', last_error = $2, finished_at = now(), updated_at = now(),
                    lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, id, Status::Cancelled, Some(reason)).await?;
        let descendants = cancel_descendants(&mut tx, id, &format!("cancelled because parent job {id} was cancelled")).await?;
        if previous == Status::Running {
            self.notify(&mut tx, Wake::Cancelled).await?;
        }
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled { previous, descendants })
    }

    async fn retry(&self, id: JobId, extra_attempts: u32) -> Result<RetryOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The parent is locked first, as a result locks a parent before it
        // releases or cancels its children. FOR SHARE holds back the parent's
        // result until this commits, so no release can slip past the child.
        let parent: Option<(JobId, String)> = sqlx::query_as(
            "SELECT parent.id, parent.status FROM jobs AS child JOIN jobs AS parent ON parent.id = child.parent_id
             WHERE child.id = $1
             FOR SHARE OF parent",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
        let Some(status) = status else {
            return Ok(RetryOutcome::NotFound);
        };
        let previous = status_of(id, &status)?;
        if !matches!(previous, Status::Failed | Status::Cancelled) {
            return Ok(RetryOutcome::NotRetryable(previous));
        }
        let status = match retried_status(parent)? {
            Ok(status) => status,
            Err(rejected) => return Ok(rejected),
        };

        sqlx::query(
            "UPDATE jobs SET status = $3, run_at = now(), updated_at = now(), finished_at = NULL, last_error = NULL,
                    max_attempts = attempts + $2
             WHERE id = $1",
        )
        .bind(id)
        .bind(i32::try_from(extra_attempts.max(1)).unwrap_or(i32::MAX))
        .bind(status.as_str())
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, id, status, Some("retried by hand")).await?;

        // The chain behind the job waits for it again.
        let message = format!("waiting again: parent job {id} was retried");
        let descendants: Vec<JobId> = sqlx::query_scalar(
            "WITH RECURSIVE descendants(id) AS (
                 SELECT id FROM jobs WHERE parent_id = $1
                 UNION ALL
                 SELECT jobs.id FROM jobs JOIN descendants ON jobs.parent_id = descendants.id
             ), waiting AS (
                 UPDATE jobs SET status = 'waiting', finished_at = NULL, last_error = NULL, updated_at = now()
                 WHERE id IN (SELECT id FROM descendants) AND status = 'cancelled'
                 RETURNING id
             ), events AS (
                 INSERT INTO job_events (job_id, status, at, message) SELECT id, 'waiting', now(), $2 FROM waiting
             )
             SELECT id FROM waiting",
        )
        .bind(id)
        .bind(&message)
        .fetch_all(&mut *tx)
        .await?;
        self.notify(&mut tx, Wake::Dispatched).await?;
        tx.commit().await?;
        Ok(RetryOutcome::Requeued { previous, status, descendants })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Reads the jobs table, not just `SELECT 1`, so that a schema whose
        // table is gone fails the check.
        sqlx::query("SELECT id FROM jobs LIMIT 1").fetch_optional(&self.pool).await?;
        Ok(())
    }

    async fn wake(&self, wake: Wake) {
        match self.pool.acquire().await {
            Ok(mut connection) => {
                if let Err(error) = self.notify(&mut connection, wake).await {
                    tracing::warn!(target: "jobhost::store", %error, "sending a wake-up NOTIFY failed; daemons will see the change at their next poll");
                }
            }
            Err(error) => {
                tracing::warn!(target: "jobhost::store", %error, "sending a wake-up NOTIFY failed; daemons will see the change at their next poll");
            }
        }
    }

    async fn subscribe(&self) -> Result<WakeSubscription, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&self.channel).await?;
        Ok(WakeSubscription::Postgres(listener))
    }
}

/// The earliest run_at among pending jobs: one index seek per priority.
const NEXT_DUE: &str = "SELECT MIN(next.run_at) FROM generate_series(1, 10) AS p(priority),
     LATERAL (SELECT run_at FROM jobs WHERE status = 'pending' AND jobs.priority = p.priority
              ORDER BY run_at LIMIT 1) AS next";

/// A job's status events, oldest first. Three kinds are read from other rows
/// instead of being stored:
///
/// - the first event, `pending` (or `waiting` for a chained job), at the
///   job's creation;
/// - a `running` event at the start of each attempt, and one for the run
///   going on now;
/// - the `succeeded` event, at the job's end.
///
/// Databases migrated from older versions store some of these too, and a
/// stored event of the same status and time is not repeated.
///
/// Stored events keep their insertion order, because each sorts at the
/// latest `at` up to it. A start sorts at its time, after `pending` and
/// `waiting` events of the same time and before the others. A run cancelled
/// by a transaction that began just before the claim committed ends before
/// it starts (`at` is the start of each transaction), so its start sorts at
/// the earlier of the two.
const EVENTS: &str = concat!(
    "WITH stored AS (
         SELECT id, status, at, message, max(at) OVER (ORDER BY id) AS sort_at FROM job_events WHERE job_id = $1
     ), job AS (
         SELECT status, parent_id, created_at, started_at, finished_at FROM jobs WHERE id = $1
     ), runs AS (",
    attempts_query!(),
    "), starts AS (
         SELECT started_at AS at, LEAST(started_at, finished_at) AS sort_at FROM runs
         UNION ALL
         SELECT started_at, started_at FROM job WHERE status = 'running' AND started_at IS NOT NULL
     ), read AS (
         SELECT CASE WHEN parent_id IS NULL THEN 'pending' ELSE 'waiting' END AS status, created_at AS at,
                created_at AS sort_at, -1 AS rank
         FROM job
         UNION ALL
         SELECT 'running', at, sort_at, 1 FROM starts
         UNION ALL
         SELECT 'succeeded', finished_at, finished_at, 3 FROM job WHERE status = 'succeeded'
     )
     SELECT status, at, message FROM (
         SELECT status, at, message, sort_at, CASE WHEN status IN ('pending', 'waiting') THEN 0 ELSE 2 END AS rank, id
         FROM stored
         UNION ALL
         SELECT status, at, NULL, sort_at, rank, NULL FROM read
         WHERE NOT EXISTS (SELECT 1 FROM stored WHERE stored.status = read.status AND stored.at = read.at)
     ) AS events
     ORDER BY sort_at, rank, id"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a `demo.echo` job that is due at once.
    fn echo_job() -> NewJob {
        NewJob {
            plugin: "demo".to_owned(),
            method: "echo".to_owned(),
            params: "null".to_owned(),
            priority: 5,
            delay: Duration::ZERO,
            max_attempts: 3,
        }
    }

    /// Opens a store in a new schema and dispatches one job to it.
    async fn store_with_one_job() -> Option<(jobhost_test_support::TestSchema, PostgresStore, JobId)> {
        let schema = jobhost_test_support::postgres_schema().await?;
        let store = PostgresStore::open(&schema.url(), 2).await.expect("open");
        store.migrate().await.expect("migrate");
        let ids = store.dispatch(&[NewChain { head: echo_job(), then: Vec::new() }]).await.expect("dispatch");
        let [id] = ids[..] else { panic!("dispatching one job returned ids {ids:?}") };
        Some((schema, store, id))
    }

    async fn execute(store: &PostgresStore, sql: &str, id: JobId) {
        sqlx::query(sql).bind(id).execute(&store.pool).await.unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    async fn statuses(store: &PostgresStore, id: JobId) -> Vec<Status> {
        store.events(id).await.expect("events").into_iter().map(|event| event.status).collect()
    }

    /// Databases written by older versions hold history rows that the store
    /// now reads from the job row instead: the dispatch event, a `running`
    /// event at each claim, and the attempt row and event of a success. None
    /// of them may show twice.
    #[tokio::test]
    async fn events_of_older_versions_not_repeated() {
        let Some((_schema, store, id)) = store_with_one_job().await else { return };
        // Each row is written where an older version wrote it.
        execute(&store, "INSERT INTO job_events (job_id, status, at) SELECT id, 'pending', created_at FROM jobs WHERE id = $1", id)
            .await;
        assert_eq!(statuses(&store, id).await, vec![Status::Pending], "events of the pending job");

        let claimed = store.claim("owner", 1, Duration::from_secs(30)).await.expect("claim");
        assert_eq!(claimed.len(), 1, "claimed jobs");
        execute(&store, "INSERT INTO job_events (job_id, status, at) SELECT id, 'running', started_at FROM jobs WHERE id = $1", id)
            .await;
        assert_eq!(statuses(&store, id).await, vec![Status::Pending, Status::Running], "events while the job runs");

        let result = Finished {
            id,
            attempt: 1,
            duration: Duration::from_millis(7),
            outcome: FinishedOutcome::Succeeded { output: "null".to_owned() },
        };
        store.finish("owner", &[result]).await.expect("finish");
        let derived = store.attempts(id).await.expect("attempts");
        execute(
            &store,
            "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, duration_us, error, owner)
             SELECT id, attempts, started_at, finished_at, 7000, NULL, 'owner' FROM jobs WHERE id = $1",
            id,
        )
        .await;
        execute(&store, "INSERT INTO job_events (job_id, status, at) SELECT id, 'succeeded', finished_at FROM jobs WHERE id = $1", id)
            .await;

        assert_eq!(statuses(&store, id).await, vec![Status::Pending, Status::Running, Status::Succeeded], "events after the run");
        let stored = store.attempts(id).await.expect("attempts");
        assert_eq!(stored, derived, "the stored attempt row and the one read from the job differ");
        assert_eq!(stored.len(), 1, "attempts: {stored:?}");
        assert_eq!(stored[0].owner.as_deref(), Some("owner"));
        assert_eq!(stored[0].duration, Some(Duration::from_millis(7)));
    }

    /// A claim walks `jobs_due` in order and stops after its batch, even on
    /// a table never analyzed. Planned from guesses, it sorted every due job.
    #[tokio::test]
    async fn claim_walks_due_index_without_statistics() {
        let Some((_schema, store, _)) = store_with_one_job().await else { return };
        let burst: Vec<NewChain> = (0..20_000).map(|_| NewChain { head: echo_job(), then: Vec::new() }).collect();
        store.dispatch(&burst).await.expect("dispatch");

        let mut tx = store.pool.begin_with(CLAIM_BEGIN).await.expect("begin");
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {CLAIM}"))
            .bind("owner")
            .bind(30_000_000_i64)
            .bind(500_i64)
            .fetch_one(&mut *tx)
            .await
            .expect("explain the claim");
        // Ended before asserting: an open transaction would block the
        // schema's removal when a failed assertion drops it.
        tx.rollback().await.expect("rollback");
        let plan = plan.to_string();
        assert!(!plan.contains(r#""Node Type":"Sort""#), "the claim sorts the due jobs: {plan}");
        assert!(plan.contains(r#""Index Name":"jobs_due""#), "the claim does not walk jobs_due: {plan}");
    }

    /// A success, the commonest end of a job, writes no history row.
    #[tokio::test]
    async fn success_writes_no_history_rows() {
        let Some((_schema, store, id)) = store_with_one_job().await else { return };
        let claimed = store.claim("owner", 1, Duration::from_secs(30)).await.expect("claim");
        let result = Finished {
            id,
            attempt: claimed[0].attempt,
            duration: Duration::from_millis(3),
            outcome: FinishedOutcome::Succeeded { output: "null".to_owned() },
        };
        store.finish("owner", &[result]).await.expect("finish");

        let rows: i64 = sqlx::query_scalar("SELECT (SELECT count(*) FROM job_events) + (SELECT count(*) FROM job_attempts)")
            .fetch_one(&store.pool)
            .await
            .expect("count history rows");
        assert_eq!(rows, 0, "history rows written for one successful job");
        assert_eq!(statuses(&store, id).await, vec![Status::Pending, Status::Running, Status::Succeeded]);
    }
}
