//! `/metrics` in the Prometheus text format, and `/healthz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// `GET /metrics`: the daemon's counters and histograms, and the number of
/// jobs in each status in the jobs table.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.counts.get(&state).await {
        Ok(counts) => {
            let text = state.metrics.encode(&counts);
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(error) => {
            tracing::error!(target: "jobhost::http", %error, "reading job counts for /metrics failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot read the jobs table: {error}\n")).into_response()
        }
    }
}

/// `GET /healthz`: 200 `ok` when a read of the jobs table succeeds, else 503 with the reason.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.client.store().ping().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(error) => {
            tracing::error!(target: "jobhost::http", %error, "health check failed: reading the jobs table failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("database unreachable: {error}\n")).into_response()
        }
    }
}
