//! Binding the listener, the router, and shutdown.
//!
//! The listener is bound before the daemon starts, so that a taken port
//! stops `jobhost run` with an error instead of leaving a daemon without its
//! dashboard. The server stops after the daemon: the dashboard stays up
//! while running jobs finish within the shutdown grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{AppState, api, metrics, pages, security};
use crate::config::HttpSettings;

/// How long shutdown waits for requests in progress before it drops them.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from starting the server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {address} for the dashboard: {source}; set bind in [http] to a free address and port, or enabled = false")]
    Bind { address: SocketAddr, source: std::io::Error },
}

/// A bound listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    address: SocketAddr,
}

impl Server {
    /// Binds the address in `settings`. Port 0 picks a free port; see [`Server::address`].
    pub async fn bind(settings: &HttpSettings) -> Result<Self, HttpError> {
        let listener = TcpListener::bind(settings.bind).await.map_err(|source| HttpError::Bind { address: settings.bind, source })?;
        let address = listener.local_addr().map_err(|source| HttpError::Bind { address: settings.bind, source })?;
        Ok(Self { listener, address })
    }

    /// Returns the address the server listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves requests until `stop` is cancelled, then lets requests in
    /// progress finish for up to [`SHUTDOWN_TIMEOUT`].
    ///
    /// NOTE: `axum::serve` sets no timeout for reading a request's headers,
    /// so a client that opens many connections and sends nothing holds them
    /// open. Bind to loopback, or put a proxy in front, where that matters.
    pub async fn serve(self, state: Arc<AppState>, stop: CancellationToken) {
        let address = self.address;
        let app = router(state);
        let serving = axum::serve(self.listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let mut serving = std::pin::pin!(serving.into_future());
        tokio::select! {
            // Serving ends with Ok only after `stop`, when both branches may
            // be ready at once, so this branch reports a clean stop too.
            result = &mut serving => {
                match result {
                    Ok(()) => tracing::info!(target: "jobhost::http", %address, "HTTP server stopped"),
                    Err(error) => tracing::error!(target: "jobhost::http", %error, %address, "the HTTP server failed"),
                }
                return;
            }
            _ = stop.cancelled() => {}
        }
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, serving).await {
            Ok(Ok(())) => tracing::info!(target: "jobhost::http", %address, "HTTP server stopped"),
            Ok(Err(error)) => tracing::error!(target: "jobhost::http", %error, %address, "the HTTP server failed while stopping"),
            Err(_) => tracing::warn!(target: "jobhost::http", %address, "HTTP requests still open after 5 s were dropped at shutdown"),
        }
    }
}

/// Builds every route with the security layers of [`security`].
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/jobs", get(api::list).post(api::dispatch))
        .route("/jobs/{id}", get(api::show))
        .route("/jobs/{id}/cancel", post(api::cancel))
        .route("/jobs/{id}/retry", post(api::retry))
        .fallback(api::not_found);

    Router::new()
        .route("/", get(pages::dashboard))
        .route("/jobs/bulk", post(pages::bulk_action))
        .route("/jobs/{id}", get(pages::job))
        .route("/jobs/{id}/cancel", post(pages::cancel))
        .route("/jobs/{id}/retry", post(pages::retry))
        .route("/plugins", get(pages::plugins))
        .route("/test-jobs", get(pages::test_panel))
        .route("/test-jobs/{kind}", post(pages::run_test_job))
        .route("/login", get(pages::login).post(pages::submit_login))
        .route("/assets/app.css", get(pages::stylesheet))
        .route("/assets/app.js", get(pages::script))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(metrics::healthz))
        .nest("/api", api)
        .fallback(pages::not_found)
        .layer(middleware::from_fn(security::check_origin))
        .layer(middleware::from_fn_with_state(state.clone(), security::check_token))
        .layer(middleware::from_fn_with_state(state.clone(), security::check_host))
        .layer(middleware::from_fn(security::response_headers))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Logs each request at debug level, with its status and time taken.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::debug!(target: "jobhost::http", %method, %path, status, elapsed_ms, "request");
    response
}
