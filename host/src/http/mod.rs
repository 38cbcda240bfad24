//! The HTTP server that `jobhost run` starts next to the daemon: the
//! dashboard, job detail, plugins page, test panel, JSON API, Prometheus
//! metrics and health check.
//!
//! It reads jobs through the same [`Store`](crate::store::Store) as the CLI,
//! dispatches through [`Client`], and shows the plugins of the daemon's
//! [`Registry`]. It never drives the daemon: a dispatch or retry wakes the
//! daemons through the client, as `jobhost dispatch` does.
//!
//! - [`server`]: binding, the router and shutdown.
//! - [`security`]: token, cross-site and Host checks, response headers.
//! - [`actions`]: what pages and API share: list filters, cancel, retry, counts.
//! - [`api`]: the JSON API under `/api/jobs`.
//! - [`pages`]: the HTML pages.
//! - [`metrics`]: `/metrics` and `/healthz`.
//! - [`bench`]: `jobhost bench --dashboard`.

mod actions;
mod api;
pub mod bench;
mod metrics;
mod pages;
mod security;
mod server;

use std::sync::Arc;

pub use server::{HttpError, Server};

use crate::client::Client;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::Live;

/// State shared by every handler: settings, plugins, the client, metrics and the form secret.
pub struct AppState {
    /// The jobs.toml the daemon started with, for the `[http]` settings.
    config: Arc<Config>,
    /// The whitelist and plugins in use now, which reloads replace.
    live: Arc<Live>,
    client: Client,
    metrics: Arc<Metrics>,
    csrf: security::CsrfToken,
    counts: actions::CountsCache,
}

impl AppState {
    pub fn new(config: Arc<Config>, live: Arc<Live>, client: Client, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            live,
            client,
            metrics,
            csrf: security::CsrfToken::generate(),
            counts: actions::CountsCache::default(),
        })
    }
}
