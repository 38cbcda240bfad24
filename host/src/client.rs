//! Dispatching jobs from an application.
//!
//! ```no_run
//! use std::time::Duration;
//! use jobhost::client::{Client, Job};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::open("jobs.toml").await?;
//! let id = client
//!     .dispatch(
//!         Job::new("files", "sha256")
//!             .params(&serde_json::json!({"path": "/var/data/report.csv"}))
//!             .priority(2)
//!             .delay(Duration::from_secs(30))
//!             .then(Job::new("files", "gzip").params(&serde_json::json!({"path": "/var/data/report.csv"}))),
//!     )
//!     .await?;
//! println!("dispatched job {id}");
//! # Ok(())
//! # }
//! ```
//!
//! Dispatch checks each job against the whitelist in jobs.toml before it
//! writes anything; the daemon checks again when the job runs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ConfigError, Database, NotWhitelisted};
use crate::store::{JobId, NewChain, NewJob, PostgresStore, SqliteStore, Store, StoreError};
use crate::wake::Wake;

/// Default priority: the middle of 1 (runs first) to 10.
pub const DEFAULT_PRIORITY: u8 = 5;

/// A job to dispatch, with the jobs chained behind it.
#[derive(Debug, Clone)]
pub struct Job {
    plugin: String,
    method: String,
    params: Result<serde_json::Value, String>,
    delay: Duration,
    priority: u8,
    chain: Vec<Job>,
}

impl Job {
    /// Creates a job that runs `plugin`'s `method` with `null` params, at priority 5, now.
    pub fn new(plugin: impl Into<String>, method: impl Into<String>) -> Self {
        Self {
            plugin: plugin.into(),
            method: method.into(),
            params: Ok(serde_json::Value::Null),
            delay: Duration::ZERO,
            priority: DEFAULT_PRIORITY,
            chain: Vec::new(),
        }
    }

    /// Sets the params, serialized to JSON. A value that cannot be serialized
    /// is reported by `dispatch`.
    pub fn params<T: Serialize + ?Sized>(mut self, params: &T) -> Self {
        self.params = serde_json::to_value(params).map_err(|error| error.to_string());
        self
    }

    /// Sets the params from JSON text, which `dispatch` checks.
    pub fn params_json(mut self, json: &str) -> Self {
        self.params = serde_json::from_str(json).map_err(|error| format!("{error} in {json:?}"));
        self
    }

    /// Runs the job no earlier than `delay` from now; for a chained job, from
    /// when its parent succeeds.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sets the priority, from 1 (runs first) to 10 (runs last).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Chains `next` to run after this job, and after the jobs already
    /// chained. If this job fails for good, `next` is cancelled.
    pub fn then(mut self, next: Job) -> Self {
        let mut next = next;
        let after = std::mem::take(&mut next.chain);
        self.chain.push(next);
        self.chain.extend(after);
        self
    }
}

/// Errors from dispatch. Nothing was written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    NotWhitelisted(#[from] NotWhitelisted),
    #[error("invalid priority {priority} for {plugin}.{method}; use a whole number from 1 (runs first) to 10")]
    InvalidPriority { plugin: String, method: String, priority: u8 },
    #[error("invalid params for {plugin}.{method}: {message}; pass valid JSON, such as '\"text\"', '42' or '{{\"path\": \"/tmp/a\"}}'")]
    InvalidParams { plugin: String, method: String, message: String },
    #[error("dispatching inside a caller's transaction needs a PostgreSQL database; this client uses {0}")]
    NotPostgres(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks `job` and its chain against `config` and turns them into rows.
pub fn prepare(config: &Config, job: &Job) -> Result<NewChain, DispatchError> {
    let head = prepare_one(config, job)?;
    let then = job.chain.iter().map(|next| prepare_one(config, next)).collect::<Result<_, _>>()?;
    Ok(NewChain { head, then })
}

fn prepare_one(config: &Config, job: &Job) -> Result<NewJob, DispatchError> {
    let settings = config.method(&job.plugin, &job.method)?;
    if !(1..=10).contains(&job.priority) {
        return Err(DispatchError::InvalidPriority { plugin: job.plugin.clone(), method: job.method.clone(), priority: job.priority });
    }
    let params = job.params.as_ref().map_err(|message| DispatchError::InvalidParams {
        plugin: job.plugin.clone(),
        method: job.method.clone(),
        message: message.clone(),
    })?;
    Ok(NewJob {
        plugin: job.plugin.clone(),
        method: job.method.clone(),
        params: params.to_string(),
        priority: job.priority,
        delay: job.delay,
        max_attempts: settings.max_attempts,
    })
}

/// Errors from opening a client.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A connection to the jobs table that jobs.toml names, for dispatching
/// and inspecting jobs.
#[derive(Clone)]
pub struct Client {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    /// The same store when it is PostgreSQL, for dispatch inside a caller's transaction.
    postgres: Option<PostgresStore>,
}

impl Client {
    /// Reads jobs.toml at `config`, opens its database (creating it if
    /// needed) and brings its schema up to date.
    pub async fn open(config: impl AsRef<Path>) -> Result<Self, OpenError> {
        let config = Config::load(config.as_ref())?;
        Self::with_config(Arc::new(config), true).await
    }

    /// Opens the database of an already validated `config`. With `create`
    /// unset, a missing database file is an error instead of a new file.
    pub async fn with_config(config: Arc<Config>, create: bool) -> Result<Self, OpenError> {
        match &config.host.database {
            Database::Sqlite(path) => {
                let store = SqliteStore::open(path, config.host.synchronous, create).await?;
                store.migrate().await?;
                Ok(Self { config, store: Arc::new(store), postgres: None })
            }
            Database::Postgres(url) => {
                let store = PostgresStore::open(url, config.host.pool_size).await?;
                store.migrate().await?;
                Ok(Self { config, store: Arc::new(store.clone()), postgres: Some(store) })
            }
        }
    }

    /// Returns the validated jobs.toml.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Returns the jobs table, for reading jobs and for cancel and retry.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Dispatches `job` and its chain in one transaction and returns the job's id.
    pub async fn dispatch(&self, job: Job) -> Result<JobId, DispatchError> {
        let ids = self.dispatch_many(std::slice::from_ref(&job)).await?;
        Ok(ids[0])
    }

    /// Dispatches many jobs in one transaction, returning their ids in order.
    /// If any job is invalid, none is written.
    pub async fn dispatch_many(&self, jobs: &[Job]) -> Result<Vec<JobId>, DispatchError> {
        let config = self.config.clone();
        self.dispatch_many_with(&config, jobs).await
    }

    /// Dispatches `job` checked against the whitelist of `config` instead of
    /// the client's own, as a daemon does after reloading jobs.toml.
    pub async fn dispatch_with(&self, config: &Config, job: Job) -> Result<JobId, DispatchError> {
        let ids = self.dispatch_many_with(config, std::slice::from_ref(&job)).await?;
        Ok(ids[0])
    }

    async fn dispatch_many_with(&self, config: &Config, jobs: &[Job]) -> Result<Vec<JobId>, DispatchError> {
        let chains = jobs.iter().map(|job| prepare(config, job)).collect::<Result<Vec<_>, _>>()?;
        let ids = self.store.dispatch(&chains).await?;
        for (id, chain) in ids.iter().zip(&chains) {
            let head = &chain.head;
            tracing::info!(
                target: "jobhost::job",
                job_id = id,
                plugin = %head.plugin,
                method = %head.method,
                priority = head.priority,
                delay_ms = head.delay.as_millis() as u64,
                chained = chain.then.len(),
                "job dispatched"
            );
        }
        Ok(ids)
    }

    /// Dispatches `job` and its chain through `transaction`, a PostgreSQL
    /// transaction of the caller's: the job exists, and runs, only if that
    /// transaction commits.
    pub async fn dispatch_in(&self, transaction: &mut sqlx::PgConnection, job: Job) -> Result<JobId, DispatchError> {
        let Some(store) = &self.postgres else {
            return Err(DispatchError::NotPostgres(self.config.host.database.to_string()));
        };
        let chain = prepare(&self.config, &job)?;
        let ids = store.dispatch_with(transaction, std::slice::from_ref(&chain)).await?;
        tracing::info!(target: "jobhost::job", job_id = ids[0], plugin = %job.plugin, method = %job.method, "job dispatched in the caller's transaction");
        Ok(ids[0])
    }

    /// Tells the daemons sharing this database that a job was cancelled, so
    /// that the one running it stops it now.
    pub async fn notify_cancelled(&self) {
        self.store.wake(Wake::Cancelled).await;
    }

    /// Tells the daemons sharing this database that jobs may be due.
    pub async fn notify_dispatched(&self) {
        self.store.wake(Wake::Dispatched).await;
    }
}
