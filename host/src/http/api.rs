//! The JSON API under `/api/jobs`: dispatch, list, show, cancel and retry.
//!
//! Every error is `{"error": MESSAGE}` with its status. The statuses are 400
//! for bad input, 401 without the token, 403 for a method outside the
//! whitelist or a cross-site request, and 404 for an unknown job. A job in
//! the wrong state gets 409, and a body that is not JSON gets 415.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::actions::{self, ActionError};
use crate::client::{DEFAULT_PRIORITY, DispatchError, Job};
use crate::store::JobId;
use crate::view;

/// Maximum delay accepted: a year. Anything longer is almost certainly a
/// unit mistake (milliseconds sent as seconds).
const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// An API error: a status and a message, sent as `{"error": MESSAGE}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(target: "jobhost::http", status = self.status.as_u16(), error = %self.message, "API request failed");
        }
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> Self {
        Self::new(error.status(), error.to_string())
    }
}

impl From<DispatchError> for ApiError {
    fn from(error: DispatchError) -> Self {
        let status = match &error {
            DispatchError::NotWhitelisted(_) => StatusCode::FORBIDDEN,
            DispatchError::InvalidPriority { .. } | DispatchError::InvalidParams { .. } => StatusCode::BAD_REQUEST,
            DispatchError::Store(_) | DispatchError::NotPostgres(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

/// The body of `POST /api/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchRequest {
    plugin: String,
    method: String,
    #[serde(default)]
    params: Value,
    /// Seconds from now; for chained jobs, from when the job before succeeds.
    #[serde(default)]
    delay: Option<f64>,
    /// Signed, so that out-of-range numbers get the range message, not a type error.
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    chain: Vec<ChainedRequest>,
}

/// One entry of `chain`: runs after the job before it succeeds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainedRequest {
    plugin: String,
    method: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    delay: Option<f64>,
}

/// `POST /api/jobs`: checks the job and its chain against the whitelist and
/// dispatches them in one transaction. Returns 201 and `{"id": ID}`.
pub async fn dispatch(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON sent with Content-Type: application/json",
        ));
    }
    let request: DispatchRequest = serde_json::from_slice(&body).map_err(|error| ApiError::bad_request(format!("invalid job: {error}")))?;

    let priority = match request.priority {
        None => DEFAULT_PRIORITY,
        Some(priority @ 1..=10) => priority as u8,
        Some(other) => return Err(ApiError::bad_request(format!("invalid priority {other}: use a whole number from 1 (runs first) to 10 (runs last)"))),
    };
    let mut job = Job::new(&request.plugin, &request.method)
        .params(&request.params)
        .priority(priority)
        .delay(delay(request.delay, "delay")?);
    for (index, next) in request.chain.iter().enumerate() {
        let field = format!("chain[{index}].delay");
        job = job.then(Job::new(&next.plugin, &next.method).params(&next.params).priority(priority).delay(delay(next.delay, &field)?));
    }

    let id = state.client.dispatch_with(&state.live.config(), job).await?;
    let location = format!("/api/jobs/{id}");
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(json!({ "id": id }))).into_response())
}

/// Turns a delay in seconds into a duration, rejecting negative, infinite and too long ones.
fn delay(seconds: Option<f64>, field: &str) -> Result<Duration, ApiError> {
    let Some(seconds) = seconds else { return Ok(Duration::ZERO) };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(ApiError::bad_request(format!("invalid {field} {seconds}: use a number of seconds, 0 or more")));
    }
    if seconds > MAX_DELAY.as_secs_f64() {
        return Err(ApiError::bad_request(format!("invalid {field} {seconds}: at most {} seconds (a year)", MAX_DELAY.as_secs())));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `GET /api/jobs`: one page of jobs, newest first, with `status`, `plugin`,
/// `method`, `before` and `limit` from the query string.
pub async fn list(State(state): State<Arc<AppState>>, Query(query): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let filter = actions::list_filter(&query)?;
    let page = actions::list_page(&state, &filter).await?;
    let next = page.next_before.map(|before| {
        let mut url = url_with(&query, "before", &before.to_string());
        url.insert_str(0, "/api/jobs?");
        url
    });
    let jobs: Vec<Value> = page.jobs.iter().map(view::job_json).collect();
    Ok(Json(json!({ "jobs": jobs, "next_before": page.next_before, "next": next })).into_response())
}

/// Returns `query` as a query string with `key` set to `value`.
pub fn url_with(query: &HashMap<String, String>, key: &str, value: &str) -> String {
    let mut pairs: Vec<(&str, &str)> =
        query.iter().filter(|(name, text)| name.as_str() != key && !text.is_empty()).map(|(name, text)| (name.as_str(), text.as_str())).collect();
    pairs.push((key, value));
    pairs.sort_unstable();
    pairs.iter().map(|(name, text)| format!("{}={}", percent_encode(name), percent_encode(text))).collect::<Vec<_>>().join("&")
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Reads the job id of a path such as `/api/jobs/{id}`.
fn job_id(text: &str) -> Result<JobId, ApiError> {
    match text.parse::<JobId>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::bad_request(format!("invalid job id {text:?}: use a whole number above 0"))),
    }
}

/// `GET /api/jobs/{id}`: the job object of `jobhost show --json`.
pub async fn show(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let store = state.client.store();
    let job = store.get(id).await.map_err(ActionError::from)?.ok_or(ActionError::NotFound(id))?;
    let children = store.children(id).await.map_err(ActionError::from)?;
    let attempts = store.attempts(id).await.map_err(ActionError::from)?;
    let events = store.events(id).await.map_err(ActionError::from)?;
    Ok(Json(view::job_detail_json(&job, &children, &attempts, &events)).into_response())
}

/// `POST /api/jobs/{id}/cancel`.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let cancelled = actions::cancel(&state, id, "cancelled over the HTTP API").await?;
    Ok(Json(json!({
        "id": id,
        "status": "cancelled",
        "previous_status": cancelled.previous,
        "cancelled_chained_jobs": cancelled.descendants,
    }))
    .into_response())
}

/// `POST /api/jobs/{id}/retry`.
pub async fn retry(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let retried = actions::retry(&state, id).await?;
    Ok(Json(json!({
        "id": id,
        "status": retried.status,
        "previous_status": retried.previous,
        "attempts_added": retried.attempts,
        "waiting_chained_jobs": retried.descendants,
    }))
    .into_response())
}

/// Any other path under `/api`.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such API endpoint; the API is POST /api/jobs, GET /api/jobs, GET /api/jobs/ID, POST /api/jobs/ID/cancel and POST /api/jobs/ID/retry")
}
