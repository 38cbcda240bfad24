//! `jobhost bench --dashboard`: fills a jobs table with a million jobs and
//! times the dashboard's pages and the JSON API through a real server.
//!
//! Jobs are dispatched through the client in large batches, then one UPDATE
//! spreads them over statuses the way a long-lived table looks: mostly
//! succeeded, some failed and cancelled, a few pending, waiting and running.
//! Every page request is timed from connect to the last byte, with the
//! counts per status read again for each one (the server's counts cache is
//! left to expire first), so the figures are those of a first visit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{AppState, Server, actions};
use crate::client::{Client, Job};
use crate::config::{Config, Database};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Jobs per dispatch transaction while filling the table.
const FILL_BATCH: usize = 10_000;

/// Fills the table, serves it, times each page and prints the figures.
pub async fn run(config: &Arc<Config>, registry: Arc<Registry>, client: Client, jobs: usize, samples: usize, machine: &str) -> Result<(), String> {
    println!("jobhost bench --dashboard: {jobs} jobs on SQLite");
    println!("machine: {machine}");

    let started = Instant::now();
    fill(config, &client, jobs).await?;
    println!("filled the table in {:.1} s", started.elapsed().as_secs_f64());

    let server = Server::bind(&config.http).await.map_err(|error| error.to_string())?;
    let address = server.address();
    let stop = CancellationToken::new();
    let live = crate::reload::Live::new(config.clone(), registry, "bench");
    let state = AppState::new(config.clone(), live, client.clone(), Arc::new(Metrics::new()));
    let serving = tokio::spawn(server.serve(state, stop.clone()));

    let newest = client.store().list(&crate::store::ListFilter { limit: 1, ..Default::default() }).await.map_err(|error| error.to_string())?;
    let middle = newest.first().map_or(1, |job| job.id / 2);
    let pages = [
        ("dashboard, first page", "/".to_owned()),
        ("dashboard, status filter", "/?status=failed".to_owned()),
        ("dashboard, plugin filter", "/?plugin=demo".to_owned()),
        ("dashboard, method filter", "/?method=handle".to_owned()),
        ("dashboard, status, plugin and method filter", "/?status=failed&plugin=demo&method=handle".to_owned()),
        ("dashboard, page in the middle (keyset)", format!("/?before={middle}")),
        ("JSON API, first page of 50", "/api/jobs".to_owned()),
        ("JSON API, status and method filter", "/api/jobs?status=cancelled&method=noop".to_owned()),
        ("job detail", format!("/jobs/{middle}")),
        ("metrics", "/metrics".to_owned()),
    ];
    println!("{:<46} {:>9} {:>9} {:>9}", "page", "median", "p90", "max");
    for (label, path) in &pages {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples.max(1) {
            tokio::time::sleep(actions::COUNTS_MAX_AGE + Duration::from_millis(50)).await;
            times.push(get(address, path).await?);
        }
        times.sort_unstable();
        let at = |fraction: f64| times[((times.len() - 1) as f64 * fraction).round() as usize].as_secs_f64() * 1000.0;
        println!("{label:<46} {:>6.1} ms {:>6.1} ms {:>6.1} ms", at(0.5), at(0.9), at(1.0));
    }

    stop.cancel();
    let _ = serving.await;
    Ok(())
}

/// Dispatches `jobs` jobs, alternating two methods, then spreads them over statuses.
async fn fill(config: &Config, client: &Client, jobs: usize) -> Result<(), String> {
    let batch: Vec<Job> =
        (0..FILL_BATCH).map(|index| if index % 2 == 0 { Job::new("demo", "noop") } else { Job::new("demo", "handle").params(&"hello") }).collect();
    let mut dispatched = 0;
    while dispatched < jobs {
        let count = (jobs - dispatched).min(FILL_BATCH);
        client.dispatch_many(&batch[..count]).await.map_err(|error| error.to_string())?;
        dispatched += count;
    }

    // 90% succeeded, 5% failed, 2% cancelled, 1% each pending, waiting and running.
    let Database::Sqlite(path) = &config.host.database else {
        return Err("the dashboard benchmark fills the table through SQLite; run it without --database".to_owned());
    };
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.map_err(|error| error.to_string())?;
    sqlx::query(
        "UPDATE jobs SET
             status = CASE id % 100
                 WHEN 0 THEN 'pending' WHEN 1 THEN 'waiting' WHEN 2 THEN 'running'
                 WHEN 3 THEN 'cancelled' WHEN 4 THEN 'cancelled'
                 WHEN 5 THEN 'failed' WHEN 6 THEN 'failed' WHEN 7 THEN 'failed' WHEN 8 THEN 'failed' WHEN 9 THEN 'failed'
                 ELSE 'succeeded' END,
             attempts = 1,
             last_error = CASE WHEN id % 100 BETWEEN 5 AND 9 THEN 'failed on purpose for the benchmark' END,
             output = CASE WHEN id % 100 >= 10 THEN 'null' END",
    )
    .execute(&mut connection)
    .await
    .map_err(|error| error.to_string())?;
    connection.close().await.map_err(|error| error.to_string())?;
    Ok(())
}

/// Sends one GET and reads the whole response; returns the time taken.
async fn get(address: SocketAddr, path: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(address).await.map_err(|error| error.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|error| error.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|error| error.to_string())?;
    let elapsed = started.elapsed();
    let head = String::from_utf8_lossy(&response[..response.len().min(12)]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path} answered {head:?}, not 200"));
    }
    Ok(elapsed)
}
