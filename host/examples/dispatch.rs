//! Dispatches a chain of jobs from Rust: checksum a file, then compress it.
//!
//! Run it from the repository root, where jobs.toml is:
//!
//! ```text
//! cargo run -p jobhost --example dispatch -- /etc/hostname
//! ```

use std::time::Duration;

use jobhost::client::{Client, Job};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/etc/hostname".to_owned());
    let client = Client::open("jobs.toml").await?;

    let job = Job::new("files", "sha256")
        .params(&json!({ "path": path }))
        .priority(2)
        .delay(Duration::from_secs(1))
        .then(Job::new("files", "gzip").params(&json!({ "path": path })));
    let id = client.dispatch(job).await?;
    println!("dispatched job {id}; `jobhost show {id}` follows it");
    Ok(())
}
