//! Operations that the pages and the JSON API share: reading a list filter
//! from a query string, cancel, retry, and the cached counts per status.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tokio::sync::Mutex;

use super::AppState;
use crate::config;
use crate::store::{CancelOutcome, JobId, JobRecord, ListFilter, RetryOutcome, Status, StoreError};

/// Jobs per page when the request names no limit.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most jobs one page may hold.
pub const MAX_PAGE_SIZE: u32 = 500;

/// How long counts per status are reused. Counting a table of millions of
/// rows takes milliseconds to tens of milliseconds on SQLite, and every open
/// dashboard refreshes every two seconds. NOTE: so counts may lag changes by up to this.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(1);

/// A failed operation, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    BadRequest(String),
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ActionError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Reads `status`, `plugin`, `method`, `before` and `limit` from a query
/// string. Empty values mean no filter, as an unset select in a form sends.
pub fn list_filter(query: &HashMap<String, String>) -> Result<ListFilter, ActionError> {
    let value = |key: &str| query.get(key).map(|value| value.trim()).filter(|value| !value.is_empty());
    let status = value("status")
        .map(|text| text.parse::<Status>().map_err(|message| ActionError::BadRequest(format!("invalid status: {message}"))))
        .transpose()?;
    let before_id = value("before")
        .map(|text| match text.parse::<JobId>() {
            Ok(id) if id > 0 => Ok(id),
            _ => Err(ActionError::BadRequest(format!("invalid before {text:?}: use a job id, a whole number above 0"))),
        })
        .transpose()?;
    let limit = match value("limit") {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => match text.parse::<u32>() {
            Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => limit,
            _ => return Err(ActionError::BadRequest(format!("invalid limit {text:?}: use a whole number from 1 to {MAX_PAGE_SIZE}"))),
        },
    };
    Ok(ListFilter {
        status,
        plugin: value("plugin").map(str::to_owned),
        method: value("method").map(str::to_owned),
        before_id,
        limit,
    })
}

/// One page of jobs, newest first, and the cursor of the next page.
pub struct Page {
    pub jobs: Vec<JobRecord>,
    /// The `before` value of the next, older page, if there is one.
    pub next_before: Option<JobId>,
}

/// Reads one page. It requests one job more than the limit, to know
/// whether an older page exists without counting.
pub async fn list_page(state: &AppState, filter: &ListFilter) -> Result<Page, ActionError> {
    let probe = ListFilter { limit: filter.limit + 1, ..filter.clone() };
    let mut jobs = state.client.store().list(&probe).await?;
    let more = jobs.len() > filter.limit as usize;
    jobs.truncate(filter.limit as usize);
    let next_before = if more { jobs.last().map(|job| job.id) } else { None };
    Ok(Page { jobs, next_before })
}

/// Result of a cancel: the status before it and the chained jobs cancelled with it.
pub struct Cancelled {
    pub previous: Status,
    pub descendants: Vec<JobId>,
}

/// Cancels a job that has not ended, and its chain, as `jobhost cancel` does.
pub async fn cancel(state: &AppState, id: JobId, reason: &str) -> Result<Cancelled, ActionError> {
    match state.client.store().cancel(id, reason).await? {
        CancelOutcome::Cancelled { previous, descendants } => {
            state.client.notify_cancelled().await;
            state.counts.invalidate().await;
            tracing::info!(target: "jobhost::job", job_id = id, previous = %previous, chained = descendants.len(), "job cancelled over HTTP");
            Ok(Cancelled { previous, descendants })
        }
        CancelOutcome::AlreadyFinal(status) => Err(ActionError::Conflict(format!(
            "job {id} has already {}; nothing was changed",
            match status {
                Status::Cancelled => "been cancelled",
                other => other.as_str(),
            }
        ))),
        CancelOutcome::NotFound => Err(ActionError::NotFound(id)),
    }
}

/// Result of a retry: the status before it, the attempts added and the chained jobs waiting again.
pub struct Retried {
    pub previous: Status,
    /// Pending, or waiting when the job's parent has not succeeded yet.
    pub status: Status,
    pub attempts: u32,
    pub descendants: Vec<JobId>,
}

/// Runs a failed or cancelled job again with the attempts its method has
/// in jobs.toml now, as `jobhost retry` does.
pub async fn retry(state: &AppState, id: JobId) -> Result<Retried, ActionError> {
    let store = state.client.store();
    let job = store.get(id).await?.ok_or(ActionError::NotFound(id))?;
    let attempts = state
        .live
        .config()
        .method(&job.plugin, &job.method)
        .map_or(config::DEFAULT_MAX_ATTEMPTS, |settings| settings.max_attempts);
    match store.retry(id, attempts).await? {
        RetryOutcome::Requeued { previous, status, descendants } => {
            state.client.notify_dispatched().await;
            state.counts.invalidate().await;
            tracing::info!(target: "jobhost::job", job_id = id, previous = %previous, attempts, "job retried over HTTP");
            Ok(Retried { previous, status, attempts, descendants })
        }
        RetryOutcome::NotFound => Err(ActionError::NotFound(id)),
        rejected => Err(ActionError::Conflict(rejected.rejection(id).unwrap_or_default())),
    }
}

/// Counts per status, with the time they were read.
type TimedCounts = (Instant, Vec<(Status, u64)>);

/// Counts per status, shared by every request for [`COUNTS_MAX_AGE`].
#[derive(Default)]
pub struct CountsCache {
    latest: Mutex<Option<TimedCounts>>,
}

impl CountsCache {
    /// Returns the counts, reading them again if the cached ones are too old.
    /// Concurrent requests wait for one read instead of each starting one.
    pub async fn get(&self, state: &AppState) -> Result<Vec<(Status, u64)>, StoreError> {
        let mut latest = self.latest.lock().await;
        if let Some((at, counts)) = &*latest
            && at.elapsed() < COUNTS_MAX_AGE
        {
            return Ok(counts.clone());
        }
        let counts = state.client.store().counts().await?;
        *latest = Some((Instant::now(), counts.clone()));
        Ok(counts)
    }

    /// Forgets the cached counts, after a change made through this server.
    pub async fn invalidate(&self) {
        *self.latest.lock().await = None;
    }
}
