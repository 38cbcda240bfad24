//! Reloading jobs.toml and the plugin libraries while the daemon runs.
//!
//! A reload is asked for by a change on disk (jobs.toml or a listed library,
//! seen by a file watcher), by SIGHUP, or by `jobhost reload`. Requests that
//! arrive within [`DEBOUNCE`] of each other make one reload, because editors
//! and builds write files in several steps.
//!
//! A reload validates everything before it changes anything: the new
//! jobs.toml, then every library. If anything is wrong, the daemon keeps
//! running on the old set, logs every problem, and records them in its state
//! file for `jobhost check` and `jobhost plugins`. Runs already queued keep
//! the plugin version they were claimed with.
//!
//! Only the plugin part of jobs.toml is applied; a changed `[host]` setting
//! is reported and waits for a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Config, HostSettings};
use crate::registry::Registry;
use crate::time::Timestamp;

/// Quiet time after the last request before a reload starts.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Source of a reload request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    FileChanged,
    Signal,
    Command,
}

/// The configuration and plugins a daemon runs on, replaced by reloads.
pub struct Live {
    /// The configuration the daemon started with; its `[host]` settings stay.
    pub started_with: Arc<Config>,
    /// The configuration and plugins in use, and how many reloads led to them.
    current: RwLock<(Arc<Config>, Arc<Registry>, u64)>,
    /// Problems of the last reload, empty when it succeeded.
    last_problems: RwLock<Vec<String>>,
    state_file: PathBuf,
    owner: String,
}

impl Live {
    pub fn new(config: Arc<Config>, registry: Arc<Registry>, owner: &str) -> Arc<Self> {
        let state_file = state_folder(&config).join(format!("{}.json", std::process::id()));
        let live = Arc::new(Self {
            started_with: config.clone(),
            current: RwLock::new((config, registry, 0)),
            last_problems: RwLock::new(Vec::new()),
            state_file,
            owner: owner.to_owned(),
        });
        live.write_state();
        live
    }

    /// Returns the plugins in use now.
    pub fn registry(&self) -> Arc<Registry> {
        self.current.read().unwrap().1.clone()
    }

    /// Returns the plugins in use now, with the number of reloads that led to them.
    pub fn registry_and_generation(&self) -> (Arc<Registry>, u64) {
        let current = self.current.read().unwrap();
        (current.1.clone(), current.2)
    }

    /// Returns the jobs.toml in use now.
    pub fn config(&self) -> Arc<Config> {
        self.current.read().unwrap().0.clone()
    }

    /// Reads jobs.toml and the libraries again and switches to them if all
    /// are valid. Returns true if the daemon now runs on the new set.
    pub fn reload(&self, trigger: Trigger) -> bool {
        let path = self.started_with.path.clone();
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(problems) => return self.reject(trigger, problems.problems()),
        };
        let previous = self.registry();
        let registry = match Registry::reload(&config, Some(&previous)) {
            Ok(registry) => registry,
            Err(errors) => return self.reject(trigger, errors.iter().map(ToString::to_string).collect()),
        };

        log_changes(&previous, &registry);
        let changed_host = changed_host_settings(&self.started_with, &config);
        if !changed_host.is_empty() {
            warn!(target: "jobhost::daemon", settings = ?changed_host, "[host] settings changed in jobs.toml; restart the daemon to apply them");
        }
        {
            let mut current = self.current.write().unwrap();
            let generation = current.2 + 1;
            *current = (Arc::new(config), Arc::new(registry), generation);
        }
        self.last_problems.write().unwrap().clear();
        self.write_state();
        info!(target: "jobhost::daemon", ?trigger, "reloaded jobs.toml and plugins");
        true
    }

    fn reject(&self, trigger: Trigger, problems: Vec<String>) -> bool {
        for problem in &problems {
            error!(target: "jobhost::daemon", ?trigger, "reload rejected, still running the previous configuration: {problem}");
        }
        *self.last_problems.write().unwrap() = problems;
        self.write_state();
        false
    }

    /// Returns the problems of the last reload, empty when it succeeded.
    pub fn last_problems(&self) -> Vec<String> {
        self.last_problems.read().unwrap().clone()
    }

    /// Returns the files whose change triggers a reload: jobs.toml and every listed library.
    pub fn watched_files(&self) -> BTreeSet<PathBuf> {
        let config = self.config();
        let mut files: BTreeSet<PathBuf> = config.plugins.iter().map(|plugin| plugin.path.clone()).collect();
        files.insert(self.started_with.path.clone());
        files
    }

    /// Writes what this daemon has loaded, for `jobhost plugins` and `jobhost check`.
    fn write_state(&self) {
        let registry = self.registry();
        let plugins: Vec<_> = registry
            .plugins()
            .map(|plugin| {
                json!({
                    "name": plugin.name,
                    "version": plugin.version,
                    "path": plugin.path,
                    "loaded_from": plugin.loaded_from,
                    "sha256": plugin.sha256,
                    "exported": plugin.exported,
                    "whitelisted": plugin.whitelist.keys().collect::<Vec<_>>(),
                    "in_process": plugin.in_process_methods(),
                    "memory_limits": plugin.memory_limits(),
                })
            })
            .collect();
        let state = json!({
            "pid": std::process::id(),
            "owner": self.owner,
            "config": self.started_with.path,
            "updated_at": Timestamp::now().to_rfc3339(),
            "plugins": plugins,
            "reload_problems": *self.last_problems.read().unwrap(),
        });
        let written = std::fs::create_dir_all(self.state_file.parent().unwrap_or(Path::new(".")))
            .and_then(|()| {
                let partial = self.state_file.with_extension("json.partial");
                std::fs::write(&partial, serde_json::to_vec_pretty(&state).unwrap_or_default())?;
                std::fs::rename(&partial, &self.state_file)
            });
        if let Err(error) = written {
            warn!(target: "jobhost::daemon", %error, path = %self.state_file.display(), "cannot write the daemon state file; `jobhost plugins` will not see this daemon");
        }
    }

    /// Removes the state file at shutdown.
    pub fn remove_state(&self) {
        let _ = std::fs::remove_file(&self.state_file);
    }
}

/// Folder of the state files of the daemons using `config`.
pub fn state_folder(config: &Config) -> PathBuf {
    config.host.log_dir.join("daemons")
}

fn log_changes(previous: &Registry, next: &Registry) {
    for plugin in next.plugins() {
        match previous.plugins().find(|old| old.name == plugin.name) {
            None => info!(target: "jobhost::daemon", plugin = %plugin.name, version = %plugin.version, sha256 = %plugin.sha256, "plugin added"),
            Some(old) if old.sha256 != plugin.sha256 => info!(
                target: "jobhost::daemon",
                plugin = %plugin.name,
                version = %plugin.version,
                sha256 = %plugin.sha256,
                previous_sha256 = %old.sha256,
                "new build of plugin loaded; running jobs finish on the previous one"
            ),
            Some(old) if old.whitelist != plugin.whitelist => info!(
                target: "jobhost::daemon",
                plugin = %plugin.name,
                methods = ?plugin.whitelist.keys().collect::<Vec<_>>(),
                "plugin whitelist changed"
            ),
            Some(_) => {}
        }
    }
    for old in previous.plugins() {
        if next.plugins().all(|plugin| plugin.name != old.name) {
            info!(target: "jobhost::daemon", plugin = %old.name, "plugin removed; its pending jobs will fail when they come up");
        }
    }
}

/// Names the `[host]` settings that differ between two configurations.
fn changed_host_settings(before: &Config, after: &Config) -> Vec<&'static str> {
    // Naming every field makes a new [host] setting fail to compile here
    // until it is compared.
    let HostSettings {
        database,
        concurrency,
        pool_size,
        prefetch,
        poll_interval,
        lease,
        shutdown_grace,
        log_dir,
        library_cache,
        synchronous,
        max_jobs_per_worker,
    } = &before.host;
    let b = &after.host;
    let mut changed = Vec::new();
    let pairs: [(&'static str, bool); 11] = [
        ("database", *database != b.database),
        ("concurrency", *concurrency != b.concurrency),
        ("pool_size", *pool_size != b.pool_size),
        ("prefetch", *prefetch != b.prefetch),
        ("poll_interval", *poll_interval != b.poll_interval),
        ("lease", *lease != b.lease),
        ("shutdown_grace", *shutdown_grace != b.shutdown_grace),
        ("log_dir", *log_dir != b.log_dir),
        ("library_cache", *library_cache != b.library_cache),
        ("synchronous", *synchronous != b.synchronous),
        ("max_jobs_per_worker", *max_jobs_per_worker != b.max_jobs_per_worker),
    ];
    for (name, differs) in pairs {
        if differs {
            changed.push(name);
        }
    }
    changed
}

/// Starts watching jobs.toml and the libraries and listening for SIGHUP,
/// before it returns, then runs reloads for the requests on `receiver` in a
/// task until that channel closes.
pub fn start(
    live: Arc<Live>,
    requests: mpsc::UnboundedSender<Trigger>,
    receiver: mpsc::UnboundedReceiver<Trigger>,
) -> tokio::task::JoinHandle<()> {
    let watcher = start_watcher(&live, requests.clone());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => {
            tokio::spawn(forward_sighup(hangup, requests));
        }
        Err(error) => {
            warn!(target: "jobhost::daemon", %error, "cannot listen for SIGHUP; reload with `jobhost reload` instead");
        }
    }
    tokio::spawn(run(live, watcher, receiver))
}

async fn run(live: Arc<Live>, mut watcher: Option<FileWatcher>, mut receiver: mpsc::UnboundedReceiver<Trigger>) {
    while let Some(first) = receiver.recv().await {
        let mut trigger = first;
        // Debounce: wait until requests stop for a moment.
        loop {
            match tokio::time::timeout(DEBOUNCE, receiver.recv()).await {
                Ok(Some(next)) => {
                    if next != Trigger::FileChanged {
                        trigger = next;
                    }
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let live_for_reload = live.clone();
        let reloaded = tokio::task::spawn_blocking(move || live_for_reload.reload(trigger)).await.unwrap_or(false);
        if reloaded && let Some(watcher) = &mut watcher {
            watch_files(watcher, &live);
        }
    }
}

async fn forward_sighup(mut hangup: tokio::signal::unix::Signal, requests: mpsc::UnboundedSender<Trigger>) {
    while hangup.recv().await.is_some() {
        if requests.send(Trigger::Signal).is_err() {
            return;
        }
    }
}

struct FileWatcher {
    watcher: notify::RecommendedWatcher,
    folders: BTreeSet<PathBuf>,
    /// The files whose events ask for a reload, shared with the event handler.
    files: Arc<RwLock<BTreeSet<PathBuf>>>,
}

fn start_watcher(live: &Arc<Live>, requests: mpsc::UnboundedSender<Trigger>) -> Option<FileWatcher> {
    let files = Arc::new(RwLock::new(live.watched_files()));
    let watched = files.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let files = watched.read().unwrap();
        if event.paths.iter().any(|path| files.contains(path)) {
            let _ = requests.send(Trigger::FileChanged);
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(watcher) => {
            let mut watcher = FileWatcher { watcher, folders: BTreeSet::new(), files };
            watch_files(&mut watcher, live);
            Some(watcher)
        }
        Err(error) => {
            warn!(target: "jobhost::daemon", %error, "cannot watch jobs.toml and the libraries; reload with SIGHUP or `jobhost reload`");
            None
        }
    }
}

/// Watches the folders of the files to watch: editors and builds replace a
/// file by renaming another over it, which a watch on the file would miss.
fn watch_files(watcher: &mut FileWatcher, live: &Live) {
    let files = live.watched_files();
    let folders: BTreeSet<PathBuf> = files.iter().filter_map(|file| file.parent().map(Path::to_owned)).collect();
    for folder in folders.difference(&watcher.folders.clone()) {
        if let Err(error) = watcher.watcher.watch(folder, RecursiveMode::NonRecursive) {
            warn!(target: "jobhost::daemon", %error, folder = %folder.display(), "cannot watch a folder; changes there need SIGHUP or `jobhost reload`");
        }
    }
    for folder in watcher.folders.difference(&folders.clone()) {
        let _ = watcher.watcher.unwatch(folder);
    }
    watcher.folders = folders;
    *watcher.files.write().unwrap() = files;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_host_settings_are_named() {
        let parse = |text: &str| Config::parse(Path::new("/srv/jobs.toml"), text).unwrap();
        let before = parse("[host]\nconcurrency = 2\n");
        let after = parse("[host]\nconcurrency = 4\nmax_jobs_per_worker = 2\nmax_attempts = 9\n");
        assert_eq!(changed_host_settings(&before, &after), vec!["concurrency", "max_jobs_per_worker"]);
        assert!(changed_host_settings(&before, &before).is_empty());
    }
}
