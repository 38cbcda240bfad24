//! `jobhost bench`: batch dispatch rate, drain throughput of no-op jobs, and
//! dispatch-to-start latency, on a fresh SQLite file or a fresh schema of a
//! PostgreSQL database.
//!
//! The drain runs the real daemon code with the real demo plugin, history
//! included (attempt rows and status events) and `jobs.log` written: first
//! one daemon in this process, then `--daemons` daemon processes
//! (`jobhost run --once`) sharing the queue. The latency phase dispatches
//! from a second process, one job at a time into an idle daemon, as
//! `jobhost dispatch` or an application would.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, Job};
use crate::config::{Config, Synchronous};
use crate::logging::{self, Stderr};
use crate::registry::Registry;
use crate::scheduler::{Daemon, Mode};
use crate::store::{ListFilter, Status};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// No-op jobs to dispatch and drain.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Jobs dispatched per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Worker threads of the daemon.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Jobs claimed ahead of free workers.
    #[arg(long, default_value_t = 1024)]
    prefetch: usize,
    /// SQLite synchronous setting: off, normal, full or extra.
    #[arg(long, default_value = "normal")]
    synchronous: String,
    /// Jobs dispatched one by one from another process for the latency figures.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// The demo plugin library. Default: libjobhost_demo.so beside this executable.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// A PostgreSQL URL to measure instead of SQLite; the benchmark works in
    /// a schema of its own there and drops it at the end.
    #[arg(long)]
    database: Option<String>,
    /// Analyze the jobs table after each dispatch phase, as autovacuum does
    /// within a minute of a burst of dispatch (PostgreSQL only). Without
    /// statistics, each batch of results reads every running job.
    #[arg(long)]
    analyze: bool,
    /// Daemon processes sharing the queue in the second drain; 0 or 1 skips it.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// The place the no-op jobs run: process (worker processes) or inprocess.
    #[arg(long, default_value = "process", value_parser = ["process", "inprocess"])]
    isolation: String,
    /// Replace each worker process after this many jobs; 1 starts a process
    /// per job, as runners without long-lived workers do.
    #[arg(long)]
    max_jobs_per_worker: Option<u64>,
    /// Connections per daemon to PostgreSQL.
    #[arg(long, default_value_t = 10)]
    pool_size: u32,
    /// Instead of the phases above, fill the table with --dashboard-jobs jobs
    /// and time the dashboard's pages and the JSON API over HTTP.
    #[arg(long)]
    dashboard: bool,
    /// Jobs in the table for --dashboard.
    #[arg(long, default_value_t = 1_000_000)]
    dashboard_jobs: usize,
    /// Requests timed per page for --dashboard.
    #[arg(long, default_value_t = 10)]
    dashboard_samples: usize,
}

#[derive(Debug, clap::Args)]
pub struct DispatcherArgs {
    #[arg(long)]
    count: usize,
    #[arg(long)]
    interval_ms: u64,
}

/// Errors that stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("demo plugin {} not found; build it with `cargo build --release -p jobhost-demo` or pass --plugin", .0.display())]
    PluginMissing(PathBuf),
    #[error("invalid --synchronous {0:?}; use off, normal, full or extra")]
    Synchronous(String),
    #[error("--analyze applies to PostgreSQL only; add --database postgres://… or leave --analyze out")]
    AnalyzeNeedsPostgres,
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    fn setup(error: impl std::fmt::Display) -> Self {
        Self::Setup(error.to_string())
    }
}

pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    if args.analyze && args.database.is_none() {
        return Err(BenchError::AnalyzeNeedsPostgres);
    }
    let synchronous: Synchronous = serde_json::from_value(serde_json::Value::String(args.synchronous.clone()))
        .map_err(|_| BenchError::Synchronous(args.synchronous.clone()))?;
    let plugin = match args.plugin.clone() {
        Some(path) => path,
        None => std::env::current_exe().map_err(BenchError::setup)?.with_file_name("libjobhost_demo.so"),
    };
    if !plugin.is_file() {
        return Err(BenchError::PluginMissing(plugin));
    }
    let plugin = std::path::absolute(&plugin).map_err(BenchError::setup)?;

    let folder = tempfile::Builder::new().prefix("jobhost-bench-").tempdir().map_err(BenchError::setup)?;
    let schema = match &args.database {
        Some(url) => Some(BenchSchema::create(url).await?),
        None => None,
    };
    let (database, backend) = match &schema {
        Some(schema) => (schema.url(), "PostgreSQL".to_owned()),
        None => ("sqlite://bench.db".to_owned(), format!("SQLite (synchronous = {})", synchronous.as_str())),
    };
    let config_path = folder.path().join("jobs.toml");
    let max_jobs_per_worker = args.max_jobs_per_worker.map(|count| format!("max_jobs_per_worker = {count}\n")).unwrap_or_default();
    std::fs::write(
        &config_path,
        format!(
            "[host]\ndatabase = {database:?}\nconcurrency = {}\nprefetch = {}\npool_size = {}\nsynchronous = \"{}\"\nlog_dir = \"logs\"\n\
             isolation = \"{}\"\n{max_jobs_per_worker}\n\
             [http]\nbind = \"127.0.0.1:0\"\n\n\
             [[plugin]]\nname = \"demo\"\npath = {:?}\nmethods = [\"noop\", \"handle\"]\n",
            args.concurrency,
            args.prefetch,
            args.pool_size,
            synchronous.as_str(),
            args.isolation,
            plugin.display().to_string()
        ),
    )
    .map_err(BenchError::setup)?;
    let config = Arc::new(Config::load(&config_path).map_err(BenchError::setup)?);
    let _logs = logging::init(Stderr::Off, Some(&config.host.log_dir));
    let registry = Arc::new(Registry::load(&config).map_err(|errors| BenchError::setup(&errors[0]))?);
    let client = Client::with_config(config.clone(), true).await.map_err(BenchError::setup)?;

    if args.dashboard {
        let result = crate::http::bench::run(&config, registry, client, args.dashboard_jobs, args.dashboard_samples, &machine())
            .await
            .map_err(BenchError::Setup);
        if let Some(schema) = schema {
            schema.drop_schema().await;
        }
        return result;
    }

    println!("jobhost bench: {} no-op jobs on {backend}", args.jobs);
    println!("machine: {}", machine());
    let workers = match (args.isolation.as_str(), args.max_jobs_per_worker) {
        ("inprocess", _) => "jobs run in-process".to_owned(),
        (_, Some(1)) => "each job runs in a new worker process".to_owned(),
        (_, Some(count)) => format!("jobs run in worker processes, each replaced after {count} jobs"),
        (_, None) => "jobs run in long-lived worker processes".to_owned(),
    };
    println!(
        "daemon: concurrency {}, prefetch {}; {workers}; history recorded; jobs.log written",
        args.concurrency, args.prefetch
    );

    dispatch_phase(&client, args.jobs, args.batch).await?;
    if let Some(schema) = schema.as_ref().filter(|_| args.analyze) {
        schema.analyze().await?;
    }

    // Phase 2: drain with one daemon in this process.
    let bar = progress_bar(args.jobs as u64, "drain");
    let watcher = watch_progress(&client, &bar, 0);
    let started = Instant::now();
    let summary = Daemon::new(config.clone(), registry.clone(), client.store().clone()).run(Mode::Once, CancellationToken::new()).await;
    let drain_time = started.elapsed();
    watcher.abort();
    bar.finish_and_clear();
    if summary.succeeded != args.jobs as u64 {
        return Err(BenchError::Setup(format!("drain ran {} of {} jobs: {summary:?}", summary.succeeded, args.jobs)));
    }
    println!(
        "drain, 1 daemon: {} jobs in {:.2} s = {:.0} jobs/s",
        args.jobs,
        drain_time.as_secs_f64(),
        args.jobs as f64 / drain_time.as_secs_f64()
    );

    // Phase 3: drain with several daemon processes.
    if args.daemons > 1 {
        // The second drain starts from empty tables, as the first one did.
        // Without autovacuum, the first drain's dead row versions would slow
        // it down on PostgreSQL.
        match &schema {
            Some(schema) => schema.empty().await?,
            None => {
                client.store().prune(Duration::ZERO).await.map_err(BenchError::setup)?;
            }
        }
        dispatch_phase(&client, args.jobs, args.batch).await?;
        if let Some(schema) = schema.as_ref().filter(|_| args.analyze) {
            schema.analyze().await?;
        }
        drain_with_processes(&config_path, &client, args.jobs, args.daemons).await?;
    }

    // Phase 4: dispatch-to-start latency from another process into an idle daemon.
    if args.latency_samples > 0 {
        latency(&config_path, &config, &registry, &client, args.latency_samples).await?;
    }
    drop(client);
    if let Some(schema) = schema {
        schema.drop_schema().await;
    }
    Ok(())
}

/// Dispatches `jobs` no-op jobs, `batch` per transaction, and prints the rate.
async fn dispatch_phase(client: &Client, jobs: usize, batch: usize) -> Result<(), BenchError> {
    let bar = progress_bar(jobs as u64, "dispatch");
    let started = Instant::now();
    let batch_jobs: Vec<Job> = (0..batch.max(1)).map(|_| Job::new("demo", "noop")).collect();
    let mut dispatched = 0;
    while dispatched < jobs {
        let count = (jobs - dispatched).min(batch_jobs.len());
        client.dispatch_many(&batch_jobs[..count]).await.map_err(BenchError::setup)?;
        dispatched += count;
        bar.set_position(dispatched as u64);
    }
    let dispatch_time = started.elapsed();
    bar.finish_and_clear();
    println!(
        "batch dispatch: {jobs} jobs in {:.2} s = {:.0} jobs/s ({batch} per transaction)",
        dispatch_time.as_secs_f64(),
        jobs as f64 / dispatch_time.as_secs_f64(),
    );
    Ok(())
}

/// Moves `bar` to the number of succeeded jobs beyond `already`, once a
/// second while the bar is drawn.
///
/// Each update counts the jobs table in the database being measured. That
/// took about 25 ms of PostgreSQL's CPU time on 50,000 jobs, so the count
/// runs once a second at most, and not at all when the bar is hidden
/// (stderr is not a terminal).
fn watch_progress(client: &Client, bar: &ProgressBar, already: u64) -> tokio::task::JoinHandle<()> {
    let (store, bar) = (client.store().clone(), bar.clone());
    tokio::spawn(async move {
        if bar.is_hidden() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(counts) = store.counts().await {
                let done = counts.iter().find(|(status, _)| *status == Status::Succeeded).map_or(0, |(_, count)| *count);
                bar.set_position(done.saturating_sub(already));
            }
        }
    })
}

/// Drains the queue with `daemons` processes of `jobhost run --once` and prints the rate.
async fn drain_with_processes(config_path: &Path, client: &Client, jobs: usize, daemons: usize) -> Result<(), BenchError> {
    let succeeded_before = succeeded(client).await?;
    let bar = progress_bar(jobs as u64, "drain");
    let watcher = watch_progress(client, &bar, succeeded_before);
    let exe = std::env::current_exe().map_err(BenchError::setup)?;

    let started = Instant::now();
    let mut children = Vec::with_capacity(daemons);
    for _ in 0..daemons {
        let child = tokio::process::Command::new(&exe)
            .arg("--config")
            .arg(config_path)
            .args(["run", "--once"])
            .env("RUST_LOG", "warn")
            .spawn()
            .map_err(BenchError::setup)?;
        children.push(child);
    }

    for mut child in children {
        let status = child.wait().await.map_err(BenchError::setup)?;
        if !status.success() {
            return Err(BenchError::Setup(format!("a daemon process failed: {status}")));
        }
    }
    let drain_time = started.elapsed();
    watcher.abort();
    bar.finish_and_clear();

    let done = succeeded(client).await? - succeeded_before;
    if done != jobs as u64 {
        return Err(BenchError::Setup(format!("{daemons} daemons ran {done} of {jobs} jobs")));
    }
    println!(
        "drain, {daemons} daemon processes: {jobs} jobs in {:.2} s = {:.0} jobs/s (process start-up included)",
        drain_time.as_secs_f64(),
        jobs as f64 / drain_time.as_secs_f64()
    );
    Ok(())
}

async fn succeeded(client: &Client) -> Result<u64, BenchError> {
    let counts = client.store().counts().await.map_err(BenchError::setup)?;
    Ok(counts.iter().find(|(status, _)| *status == Status::Succeeded).map_or(0, |(_, count)| *count))
}

/// A schema of the benchmark's own in a PostgreSQL database.
struct BenchSchema {
    server: String,
    name: String,
}

impl BenchSchema {
    async fn create(server: &str) -> Result<Self, BenchError> {
        let name = format!("jobhost_bench_{}", std::process::id());
        execute(server, &format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")).await?;
        Ok(Self { server: server.to_owned(), name })
    }

    fn url(&self) -> String {
        let separator = if self.server.contains('?') { '&' } else { '?' };
        format!("{}{separator}options=-c%20search_path%3D{}", self.server, self.name)
    }

    /// Deletes every job and its history, with `TRUNCATE`, which leaves no
    /// dead row versions behind.
    async fn empty(&self) -> Result<(), BenchError> {
        let name = &self.name;
        execute(&self.server, &format!("TRUNCATE {name}.jobs, {name}.job_attempts, {name}.job_events RESTART IDENTITY")).await
    }

    /// Gathers the planner's statistics on the jobs table.
    async fn analyze(&self) -> Result<(), BenchError> {
        execute(&self.server, &format!("ANALYZE {}.jobs", self.name)).await
    }

    async fn drop_schema(self) {
        let _ = execute(&self.server, &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)).await;
    }
}

/// Runs `sql` on a connection of its own to `server`.
async fn execute(server: &str, sql: &str) -> Result<(), BenchError> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(server).await.map_err(BenchError::setup)?;
    sqlx::raw_sql(sql).execute(&mut connection).await.map_err(BenchError::setup)?;
    Ok(())
}

async fn latency(config_path: &Path, config: &Arc<Config>, registry: &Arc<Registry>, client: &Client, samples: usize) -> Result<(), BenchError> {
    let shutdown = CancellationToken::new();
    let daemon = Daemon::new(config.clone(), registry.clone(), client.store().clone());
    let daemon = tokio::spawn(daemon.run(Mode::Forever, shutdown.clone()));
    // Let the daemon bind its wake-up socket and go idle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let bar = progress_bar(samples as u64, "latency");
    let interval_ms = 20;
    let mut child = tokio::process::Command::new(std::env::current_exe().map_err(BenchError::setup)?)
        .arg("--config")
        .arg(config_path)
        .arg("bench-dispatcher")
        .arg("--count")
        .arg(samples.to_string())
        .arg("--interval-ms")
        .arg(interval_ms.to_string())
        .spawn()
        .map_err(BenchError::setup)?;
    let status = child.wait().await.map_err(BenchError::setup)?;
    if !status.success() {
        return Err(BenchError::Setup(format!("the dispatcher process failed: {status}")));
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let jobs = loop {
        let jobs = client.store().list(&ListFilter { limit: samples as u32, ..ListFilter::default() }).await.map_err(BenchError::setup)?;
        let done = jobs.iter().filter(|job| job.status == Status::Succeeded).count();
        bar.set_position(done as u64);
        if done == samples || Instant::now() > deadline {
            break jobs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    bar.finish_and_clear();
    shutdown.cancel();
    let _ = daemon.await;

    let mut delays: Vec<Duration> = jobs.iter().filter_map(|job| job.started_at.map(|started| started.since(job.created_at))).collect();
    if delays.len() < samples {
        return Err(BenchError::Setup(format!("only {} of {samples} latency jobs started within 30 s", delays.len())));
    }
    delays.sort_unstable();
    let percentile = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
    println!(
        "dispatch to start ({samples} jobs from another process, {interval_ms} ms apart, poll interval {} ms): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        config.host.poll_interval.as_millis(),
        percentile(0.50).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        delays[delays.len() - 1].as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Dispatches `count` no-op jobs one at a time, `interval_ms` apart.
pub async fn dispatcher(config: &Path, args: DispatcherArgs) -> Result<(), BenchError> {
    let client = Client::open(config).await.map_err(BenchError::setup)?;
    for _ in 0..args.count {
        client.dispatch(Job::new("demo", "noop")).await.map_err(BenchError::setup)?;
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    Ok(())
}

fn progress_bar(length: u64, phase: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} ({per_sec}, {eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(phase);
    bar
}

/// Describes the CPU, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|line| line.starts_with("model name")).map(|line| line.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs, {model}")
}
