//! jobhost: a background job runner for native plugin libraries.
//!
//! Data flows one way: [`config`] (jobs.toml) → [`registry`] (loaded plugin
//! libraries) → [`scheduler`] (claims, leases, rescue) → [`executor`] (runs a
//! job) → [`store`] (the jobs table). [`client`] dispatches jobs from an
//! application; [`cli`] is the `jobhost` command. [`http`] serves the
//! dashboard, the test panel, the JSON API and [`metrics`]: it reads the
//! store and dispatches through the client, and never drives the daemon.
pub mod config;
pub mod executor;
pub mod isolation;
pub mod registry;
pub mod reload;
pub mod scheduler;
pub mod store;
pub mod time;
pub mod wake;
pub mod bench;
pub mod cli;
pub mod client;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod view;
pub mod worker;
