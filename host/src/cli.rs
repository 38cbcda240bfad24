//! The `jobhost` command line.
//!
//! Every command that takes user input validates all of it before it opens
//! the database, so bad input exits non-zero with one line on stderr and
//! writes nothing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::client::{self, Client, DEFAULT_PRIORITY, Job};
use crate::config::{self, Config};
use crate::http;
use crate::logging::{self, Stderr};
use crate::registry::Registry;
use crate::scheduler::{Daemon, Mode};
use crate::store::{CancelOutcome, JobId, ListFilter, RetryOutcome, Status};
use crate::view;

/// Runs jobs from plugin libraries, listed in jobs.toml, off a SQL table.
#[derive(Debug, Parser)]
#[command(name = "jobhost", version, about)]
pub struct Cli {
    /// The jobs.toml to use.
    #[arg(long, global = true, env = "JOBHOST_CONFIG", default_value = "jobs.toml")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: claim due jobs and run them until SIGINT or SIGTERM.
    Run {
        /// Run every job that is due now, including chained jobs released on
        /// the way, then exit (for cron).
        #[arg(long)]
        once: bool,
    },
    /// Add a job, and print its id on stdout.
    Dispatch {
        /// Plugin name, as in jobs.toml.
        plugin: String,
        /// Method name; it must be in the plugin's methods in jobs.toml.
        method: String,
        /// Params as JSON, such as '"hello"', '3' or '{"path": "/tmp/a"}'.
        #[arg(long, default_value = "null")]
        params: String,
        /// Run no earlier than this from now, such as 30s, 5m or 1h 30m.
        #[arg(long, default_value = "0s", allow_hyphen_values = true)]
        delay: String,
        /// 1 (runs first) to 10 (runs last).
        #[arg(long, default_value_t = DEFAULT_PRIORITY.to_string(), allow_hyphen_values = true)]
        priority: String,
        /// A job to run after this one succeeds, as PLUGIN:METHOD or
        /// PLUGIN:METHOD:JSON; repeat for a longer chain.
        #[arg(long = "then", value_name = "PLUGIN:METHOD[:JSON]")]
        then: Vec<String>,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this status: waiting, pending, running, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only jobs of this plugin.
        #[arg(long)]
        plugin: Option<String>,
        /// Only jobs of this method.
        #[arg(long)]
        method: Option<String>,
        /// Only jobs with an id below this one (the next page).
        #[arg(long)]
        before: Option<JobId>,
        /// Maximum number of jobs to list.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print a JSON array of job objects.
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its attempts and status history.
    Show {
        id: JobId,
        /// Print the job as a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job that has not ended, and the jobs chained behind it.
    Cancel { id: JobId },
    /// Run a failed or cancelled job again, with a fresh set of attempts.
    Retry { id: JobId },
    /// Check jobs.toml and load every plugin library, without running jobs.
    Check,
    /// Create the database or bring its schema up to date.
    Migrate,
    /// Ask the running daemons to read jobs.toml and the libraries again.
    Reload,
    /// Delete jobs that ended long ago, with their history.
    Prune {
        /// Delete jobs that ended more than this long ago, such as 7d or 12h.
        #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
        older_than: String,
    },
    /// List what the daemons running on this machine have loaded.
    Plugins {
        /// Print JSON: one object per daemon.
        #[arg(long)]
        json: bool,
    },
    /// Measure dispatch rate, drain throughput and dispatch-to-start latency.
    Bench(crate::bench::BenchArgs),
    /// Internal: dispatch jobs one by one for the latency benchmark.
    #[command(hide = true)]
    BenchDispatcher(crate::bench::DispatcherArgs),
    /// Internal: a worker process of the daemon, which runs the jobs it is sent.
    #[command(hide = true)]
    Worker(crate::worker::WorkerArgs),
}

/// An error for the user: printed as `error: ...` lines, exit status 1.
#[derive(Debug)]
pub struct Failure(pub Vec<String>);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure(vec![error.to_string()])
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure(vec![message.into()])
}

/// Runs the command and returns the process's exit status.
pub async fn main(cli: Cli) -> ExitCode {
    if !matches!(cli.command, Command::Run { .. } | Command::Bench(_)) {
        // Commands that print, such as `list | head`, end quietly when the
        // reader goes away, as Unix tools do. The daemon keeps Rust's default
        // of ignoring SIGPIPE, so a closed socket is an error, not a signal.
        // SAFETY: no other thread exists yet that could race on the handler.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run { once } => run(&cli.config, once).await,
        Command::Dispatch { plugin, method, params, delay, priority, then } => {
            dispatch(&cli.config, plugin, method, &params, &delay, &priority, &then).await
        }
        Command::List { status, plugin, method, before, limit, json } => {
            list(&cli.config, status, plugin, method, before, limit, json).await
        }
        Command::Show { id, json } => show(&cli.config, id, json).await,
        Command::Cancel { id } => cancel(&cli.config, id).await,
        Command::Retry { id } => retry(&cli.config, id).await,
        Command::Check => check(&cli.config),
        Command::Migrate => migrate(&cli.config).await,
        Command::Reload => reload(&cli.config).await,
        Command::Prune { older_than } => prune(&cli.config, &older_than).await,
        Command::Plugins { json } => plugins(&cli.config, json),
        Command::Bench(args) => crate::bench::run(args).await.map_err(Failure::from),
        Command::BenchDispatcher(args) => crate::bench::dispatcher(&cli.config, args).await.map_err(Failure::from),
        Command::Worker(args) => return crate::worker::serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(lines)) => {
            for line in lines {
                eprintln!("error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<Arc<Config>, Failure> {
    Config::load(path).map(Arc::new).map_err(|error| Failure(error.problems()))
}

fn load_registry(config: &Config) -> Result<Registry, Failure> {
    Registry::load(config).map_err(|errors| Failure(errors.iter().map(ToString::to_string).collect()))
}

/// Opens the database of `config` for a command that only reads or
/// changes existing jobs: a missing database file is an error.
async fn open_existing(config: Arc<Config>) -> Result<Client, Failure> {
    Ok(Client::with_config(config, false).await?)
}

async fn run(config_path: &std::path::Path, once: bool) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    // `run --once` is for cron and serves no HTTP.
    let serve_http = config.http.enabled && !once;
    if serve_http {
        config.http.check_exposure(&config.path)?;
    }
    let _logs = logging::init(Stderr::Info, Some(&config.host.log_dir));
    let registry = load_registry(&config)?;
    for plugin in registry.plugins() {
        tracing::info!(
            target: "jobhost::daemon",
            plugin = %plugin.name,
            version = %plugin.version,
            path = %plugin.path.display(),
            methods = ?plugin.whitelist.keys().collect::<Vec<_>>(),
            "plugin loaded"
        );
    }
    let client = Client::with_config(config.clone(), true).await?;
    let registry = Arc::new(registry);
    let server = if serve_http { Some(http::Server::bind(&config.http).await?) } else { None };

    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signals(shutdown.clone()));
    let daemon = Daemon::new(config.clone(), registry.clone(), client.store().clone());

    // The server starts after the daemon has its metrics, and stops after
    // the daemon has stopped, so the dashboard stays up while jobs finish.
    let http_stop = CancellationToken::new();
    let http_task = server.map(|server| {
        let address = server.address();
        tracing::info!(target: "jobhost::daemon", "dashboard listening on http://{address}/");
        let state = http::AppState::new(config, daemon.live(), client.clone(), daemon.metrics());
        tokio::spawn(server.serve(state, http_stop.clone()))
    });
    let mode = if once { Mode::Once } else { Mode::Forever };
    daemon.run(mode, shutdown).await;
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM, and exits at once on the second.
async fn wait_for_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::error!(target: "jobhost::daemon", "cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!(target: "jobhost::daemon", "shutting down: no new jobs are claimed; send the signal again to exit at once");
    shutdown.cancel();
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::warn!(target: "jobhost::daemon", "second signal: exiting now; running jobs will be rescued when their leases expire");
    std::process::exit(130);
}

/// Parses `--then PLUGIN:METHOD[:JSON]`.
fn parse_then(text: &str) -> Result<Job, Failure> {
    let mut parts = text.splitn(3, ':');
    let plugin = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    if plugin.is_empty() || method.is_empty() {
        return Err(fail(format!("invalid --then {text:?}: expected PLUGIN:METHOD or PLUGIN:METHOD:JSON, such as demo:handle:'\"hi\"'")));
    }
    let job = Job::new(plugin, method);
    Ok(match parts.next() {
        Some(json) => {
            if let Err(error) = serde_json::from_str::<serde_json::Value>(json) {
                return Err(fail(format!(
                    "invalid --then {text:?}: the params after PLUGIN:METHOD: are not JSON ({error}); quote text as JSON, such as demo:handle:'\"hi\"'"
                )));
            }
            job.params_json(json)
        }
        None => job,
    })
}

fn parse_priority(text: &str) -> Result<u8, Failure> {
    match text.trim().parse::<u8>() {
        Ok(priority) if (1..=10).contains(&priority) => Ok(priority),
        _ => Err(fail(format!("invalid --priority {text:?}: use a whole number from 1 (runs first) to 10 (runs last)"))),
    }
}

async fn dispatch(
    config_path: &std::path::Path,
    plugin: String,
    method: String,
    params: &str,
    delay: &str,
    priority: &str,
    then: &[String],
) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let delay = config::parse_duration(delay).map_err(|message| fail(format!("invalid --delay {delay:?}: {message}")))?;
    let priority = parse_priority(priority)?;
    if let Err(error) = serde_json::from_str::<serde_json::Value>(params) {
        return Err(fail(format!(
            "invalid --params {params:?}: not JSON ({error}); quote text as JSON, such as --params '\"hello\"'"
        )));
    }
    let mut job = Job::new(plugin, method).params_json(params).delay(delay).priority(priority);
    for next in then {
        job = job.then(parse_then(next)?.priority(priority));
    }
    // Everything is checked before the database is opened.
    client::prepare(&config, &job)?;

    let _logs = logging::init(Stderr::Quiet, Some(&config.host.log_dir));
    let client = Client::with_config(config, true).await?;
    let id = client.dispatch(job).await?;
    println!("{id}");
    Ok(())
}

async fn list(
    config_path: &std::path::Path,
    status: Option<String>,
    plugin: Option<String>,
    method: Option<String>,
    before_id: Option<JobId>,
    limit: u32,
    json: bool,
) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let status = status.map(|status| status.parse::<Status>()).transpose().map_err(|message| fail(format!("invalid --status: {message}")))?;
    let filter = ListFilter { status, plugin, method, before_id, limit };
    let client = open_existing(config).await?;
    let jobs = client.store().list(&filter).await?;
    if json {
        let array: Vec<_> = jobs.iter().map(view::job_json).collect();
        println!("{}", serde_json::to_string_pretty(&array)?);
    } else {
        print!("{}", view::job_table(&jobs));
    }
    Ok(())
}

async fn show(config_path: &std::path::Path, id: JobId, json: bool) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let client = open_existing(config).await?;
    let store = client.store();
    let job = store.get(id).await?.ok_or_else(|| fail(format!("job {id} not found; `jobhost list` shows the jobs there are")))?;
    let children = store.children(id).await?;
    let attempts = store.attempts(id).await?;
    let events = store.events(id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view::job_detail_json(&job, &children, &attempts, &events))?);
    } else {
        print!("{}", view::job_detail_text(&job, &children, &attempts, &events));
    }
    Ok(())
}

async fn cancel(config_path: &std::path::Path, id: JobId) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let client = open_existing(config).await?;
    match client.store().cancel(id, "cancelled by hand").await? {
        CancelOutcome::Cancelled { previous, descendants } => {
            client.notify_cancelled().await;
            println!("cancelled job {id} (was {previous})");
            if !descendants.is_empty() {
                let ids: Vec<String> = descendants.iter().map(ToString::to_string).collect();
                println!("also cancelled chained jobs {}", ids.join(", "));
            }
            Ok(())
        }
        CancelOutcome::AlreadyFinal(status) => Err(fail(format!("job {id} has already {}; nothing was changed", past_tense(status)))),
        CancelOutcome::NotFound => Err(fail(format!("job {id} not found; `jobhost list` shows the jobs there are"))),
    }
}

fn past_tense(status: Status) -> &'static str {
    match status {
        Status::Succeeded => "succeeded",
        Status::Failed => "failed",
        Status::Cancelled => "been cancelled",
        Status::Waiting | Status::Pending | Status::Running => "started",
    }
}

async fn retry(config_path: &std::path::Path, id: JobId) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let client = open_existing(config.clone()).await?;
    let job = client.store().get(id).await?.ok_or_else(|| fail(format!("job {id} not found; `jobhost list` shows the jobs there are")))?;
    let attempts = config.method(&job.plugin, &job.method).map_or(config::DEFAULT_MAX_ATTEMPTS, |settings| settings.max_attempts);
    match client.store().retry(id, attempts).await? {
        RetryOutcome::Requeued { previous, status, descendants } => {
            client.notify_dispatched().await;
            if status == Status::Waiting {
                println!("job {id} is waiting again (was {previous}), with {attempts} more attempts; it runs once its parent job succeeds");
            } else {
                println!("job {id} is pending again (was {previous}), with {attempts} more attempts");
            }
            if !descendants.is_empty() {
                let ids: Vec<String> = descendants.iter().map(ToString::to_string).collect();
                println!("chained jobs {} wait for it again", ids.join(", "));
            }
            Ok(())
        }
        rejected => Err(fail(rejected.rejection(id).unwrap_or_default())),
    }
}

fn check(config_path: &std::path::Path) -> Result<(), Failure> {
    // A daemon that rejected a reload is still on its previous set.
    for daemon in running_daemons(config_path) {
        let problems = daemon["reload_problems"].as_array().cloned().unwrap_or_default();
        if !problems.is_empty() {
            eprintln!("warning: daemon {} rejected its last reload and runs its previous configuration:", daemon["pid"]);
            for problem in problems {
                eprintln!("warning:   {}", problem.as_str().unwrap_or_default());
            }
        }
    }
    let config = load_config(config_path)?;
    let registry = load_registry(&config)?;
    if config.plugins.is_empty() {
        eprintln!("warning: {} lists no [[plugin]], so no job can run", config.path.display());
    }
    println!("{}: valid", config.path.display());
    println!("database: {}", config.host.database);
    for plugin in registry.plugins() {
        let whitelisted: Vec<&str> = plugin.whitelist.keys().map(String::as_str).collect();
        let other: Vec<&str> = plugin.exported.iter().map(String::as_str).filter(|method| !plugin.whitelist.contains_key(*method)).collect();
        println!("plugin {} {} ({})", plugin.name, plugin.version, plugin.path.display());
        println!("  sha256:      {}", plugin.sha256);
        println!("  whitelisted: {}", whitelisted.join(", "));
        let limits = plugin.memory_limits().into_iter().map(|(method, limit)| format!("{method} {limit}")).collect();
        print_isolation("  ", &plugin.in_process_methods(), limits);
        if !other.is_empty() {
            println!("  exported, not whitelisted: {}", other.join(", "));
        }
    }
    Ok(())
}

async fn prune(config_path: &std::path::Path, older_than: &str) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let age = config::parse_duration(older_than).map_err(|message| fail(format!("invalid --older-than {older_than:?}: {message}")))?;
    let client = open_existing(config).await?;
    let deleted = client.store().prune(age).await?;
    println!("deleted {deleted} jobs that ended more than {} ago", humantime::format_duration(age));
    Ok(())
}

async fn reload(config_path: &std::path::Path) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let database = config.host.database.to_string();
    let client = open_existing(config).await?;
    client.store().wake(crate::wake::Wake::Reload).await;
    println!("asked the daemons of {database} to reload; `jobhost plugins` shows what they loaded");
    Ok(())
}

/// Returns the state of each daemon running on this machine with this
/// jobs.toml. While the file is broken, looks in the default log folder.
fn running_daemons(config_path: &std::path::Path) -> Vec<serde_json::Value> {
    let folder = match Config::load(config_path) {
        Ok(config) => crate::reload::state_folder(&config),
        Err(_) => {
            let absolute = std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_owned());
            absolute.parent().unwrap_or(std::path::Path::new(".")).join("logs").join("daemons")
        }
    };
    let Ok(entries) = std::fs::read_dir(&folder) else { return Vec::new() };
    let mut daemons: Vec<serde_json::Value> = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "json"))
        .filter_map(|entry| serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok())
        .filter(|state: &serde_json::Value| {
            // SAFETY: kill with signal 0 only checks that the process exists.
            state["pid"].as_i64().is_some_and(|pid| unsafe { libc::kill(pid as i32, 0) } == 0)
        })
        .collect();
    daemons.sort_by_key(|state| state["pid"].as_i64());
    daemons
}

/// Prints the methods of a plugin that run in-process, and those with a memory limit, if any.
fn print_isolation(indent: &str, in_process: &[impl AsRef<str>], limits: Vec<String>) {
    if !in_process.is_empty() {
        let names: Vec<&str> = in_process.iter().map(AsRef::as_ref).collect();
        println!("{indent}in-process (not isolated): {}", names.join(", "));
    }
    if !limits.is_empty() {
        println!("{indent}memory limits: {}", limits.join(", "));
    }
}

fn plugins(config_path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let daemons = running_daemons(config_path);
    if json {
        println!("{}", serde_json::to_string_pretty(&daemons)?);
        return Ok(());
    }
    if daemons.is_empty() {
        return Err(fail(format!(
            "no daemon using {} is running on this machine; start one with `jobhost run`",
            config_path.display()
        )));
    }
    for daemon in &daemons {
        println!("daemon {} ({}), updated {}", daemon["pid"], daemon["owner"].as_str().unwrap_or_default(), daemon["updated_at"].as_str().unwrap_or_default());
        for plugin in daemon["plugins"].as_array().into_iter().flatten() {
            let list = |key: &str| -> Vec<String> {
                plugin[key].as_array().into_iter().flatten().filter_map(|value| value.as_str().map(str::to_owned)).collect()
            };
            let whitelisted = list("whitelisted");
            let other: Vec<String> = list("exported").into_iter().filter(|method| !whitelisted.contains(method)).collect();
            println!(
                "  plugin {} {} ({})",
                plugin["name"].as_str().unwrap_or_default(),
                plugin["version"].as_str().unwrap_or_default(),
                plugin["path"].as_str().unwrap_or_default()
            );
            println!("    sha256:      {}", plugin["sha256"].as_str().unwrap_or_default());
            println!("    whitelisted: {}", whitelisted.join(", "));
            let limits = plugin["memory_limits"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(method, limit)| format!("{method} {}", limit.as_str().unwrap_or_default()))
                .collect();
            print_isolation("    ", &list("in_process"), limits);
            if !other.is_empty() {
                println!("    exported, not whitelisted: {}", other.join(", "));
            }
        }
        let problems = daemon["reload_problems"].as_array().cloned().unwrap_or_default();
        if !problems.is_empty() {
            println!("  last reload rejected; still running the set above:");
            for problem in problems {
                println!("    {}", problem.as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

async fn migrate(config_path: &std::path::Path) -> Result<(), Failure> {
    let config = load_config(config_path)?;
    let database = config.host.database.to_string();
    Client::with_config(config, true).await?;
    println!("{database}: schema is up to date");
    Ok(())
}
