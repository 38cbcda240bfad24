//! `jobs.toml`: the whitelist of plugins and methods, and the host settings.
//!
//! Reading goes through two stages. [`RawConfig`] is what serde parses, with
//! the spans of the values that need checking; [`Config::parse`] validates it
//! into [`Config`], collecting every problem with its line instead of stopping
//! at the first. Only a validated `Config` builds runtime objects.
//!
//! Per-method settings inherit: a key in `[plugin.method.NAME]` overrides the
//! same key in its `[[plugin]]`, which overrides `[host]`, which overrides the
//! built-in default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default `max_attempts`: the first run and two retries.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default `retry_delay`.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Default `max_retry_delay`: the cap on exponential backoff.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Default `bind` of `[http]`: loopback only, so that nothing outside this
/// machine reaches the dashboard unless jobs.toml says so.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:8080";
/// Shortest `token` accepted in `[http]`.
pub const MIN_TOKEN_LENGTH: usize = 16;
/// Highest `max_attempts` accepted; far more than any job needs, and small
/// enough that attempt counters never come near overflowing.
pub const MAX_MAX_ATTEMPTS: u32 = 1_000_000;

// ---------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------

/// A validated jobs.toml.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    pub host: HostSettings,
    pub http: HttpSettings,
    /// Plugins by name, in file order.
    pub plugins: Vec<PluginConfig>,
}

/// The `[host]` table, with defaults filled in.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Database URL of the jobs table. Default: `sqlite://jobhost.db` beside jobs.toml.
    pub database: Database,
    /// Jobs run at once by one daemon. Default: the number of CPUs.
    pub concurrency: usize,
    /// Connections each daemon keeps to PostgreSQL. Default: 10.
    pub pool_size: u32,
    /// Due jobs claimed beyond the free workers, kept ready in memory so that
    /// short jobs do not wait for a database round trip. Default: 0.
    pub prefetch: usize,
    /// How often an idle daemon looks for due jobs when nothing wakes it. Default: 1 s.
    pub poll_interval: Duration,
    /// How long a claimed job stays owned without a renewal. Default: 30 s.
    pub lease: Duration,
    /// How long shutdown waits for running jobs. Default: 10 s.
    pub shutdown_grace: Duration,
    /// Folder of `jobs.log` and `jobs-errors.log`. Default: `logs` beside jobs.toml.
    pub log_dir: PathBuf,
    /// Folder of the copies of plugin libraries that the daemon loads, each
    /// named by its content hash. Default: `.jobhost/libraries` beside jobs.toml.
    pub library_cache: PathBuf,
    /// SQLite `synchronous` pragma. Default: `normal`.
    pub synchronous: Synchronous,
    /// Jobs a worker process runs before it is replaced by a fresh one.
    /// Default: none (a worker runs until it dies or the daemon stops).
    pub max_jobs_per_worker: Option<u64>,
}

/// The `[http]` table: the dashboard, test panel, JSON API and metrics that
/// `jobhost run` serves.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Whether `jobhost run` serves HTTP. Default: true.
    pub enabled: bool,
    /// Address and port to listen on; port 0 picks a free port. Default: 127.0.0.1:8080.
    pub bind: SocketAddr,
    /// Line of `bind` in jobs.toml, for messages about it.
    pub line: Option<usize>,
    /// Secret that every request must present when set. Default: none.
    pub token: Option<Token>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: DEFAULT_HTTP_BIND.parse().expect("the default bind address is valid"),
            line: None,
            token: None,
        }
    }
}

/// The `[http]` token: a secret, so `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Reason `jobhost run` rejects an `[http]` table at start-up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{location}[http] bind = \"{bind}\" accepts connections from other machines, but no token is set, so anyone who can reach this address could read, dispatch and cancel jobs; set token in [http] (at least {MIN_TOKEN_LENGTH} random characters), or bind to 127.0.0.1")]
pub struct ExposedWithoutToken {
    location: String,
    bind: SocketAddr,
}

impl HttpSettings {
    /// Rejects a bind address that other machines can reach when no token is set.
    ///
    /// This is checked when the server starts, not when jobs.toml is read, so
    /// that commands which serve nothing (`dispatch`, `list`) still work.
    pub fn check_exposure(&self, config_path: &Path) -> Result<(), ExposedWithoutToken> {
        if !self.enabled || self.token.is_some() || self.bind.ip().is_loopback() {
            return Ok(());
        }
        let location = match self.line {
            Some(line) => format!("{}:{line}: ", config_path.display()),
            None => format!("{}: ", config_path.display()),
        };
        Err(ExposedWithoutToken { location, bind: self.bind })
    }
}

/// Database that contains the jobs table.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, resolved against the folder of jobs.toml.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, shared by daemons on many machines.
    Postgres(String),
}

/// Shows the URL with any password replaced by `***`, so that it can be logged.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

/// SQLite's `synchronous` setting: how often commits wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Normal => "normal",
            Self::Full => "full",
            Self::Extra => "extra",
        }
    }
}

/// One `[[plugin]]` entry.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    /// Absolute path of the library.
    pub path: PathBuf,
    /// Line of the entry's `name`, for messages about the plugin.
    pub line: usize,
    /// The whitelist: each allowed method with its resolved settings.
    pub methods: BTreeMap<String, MethodSettings>,
    /// The SHA-256 the library file must have, in lowercase hex, if pinned.
    pub sha256: Option<String>,
    /// Load the library even if others can write it or another user owns it.
    pub allow_insecure_permissions: bool,
}

/// Retry and timeout settings of one whitelisted method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSettings {
    /// Runs in all, counting the first. Default: 3.
    pub max_attempts: u32,
    /// Wait before the first retry. Default: 5 s.
    pub retry_delay: Duration,
    /// Growth of the wait between retries. Default: fixed.
    pub backoff: Backoff,
    /// Cap on the wait between retries. Default: 1 h.
    pub max_retry_delay: Duration,
    /// Maximum run time before a run counts as failed. Default: none.
    pub timeout: Option<Duration>,
    /// The place the method runs: a worker process, or the daemon itself. Default: process.
    pub isolation: Isolation,
    /// Cap on the memory of the worker processes that run the method, in
    /// bytes. Default: none.
    pub memory_limit: Option<u64>,
}

impl Default for MethodSettings {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_delay: DEFAULT_RETRY_DELAY,
            backoff: Backoff::Fixed,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            timeout: None,
            isolation: Isolation::Process,
            memory_limit: None,
        }
    }
}

impl MethodSettings {
    /// Returns the wait before the run that follows failed run number `attempt` (1-based).
    ///
    /// Exponential backoff doubles `retry_delay` per retry and never exceeds
    /// `max_retry_delay`, whatever the attempt number.
    pub fn retry_delay_after(&self, attempt: u32) -> Duration {
        match self.backoff {
            Backoff::Fixed => self.retry_delay.min(self.max_retry_delay),
            Backoff::Exponential => {
                let doublings = attempt.saturating_sub(1).min(63);
                let factor = 1u64 << doublings;
                let millis = (self.retry_delay.as_millis() as u64).saturating_mul(factor);
                Duration::from_millis(millis).min(self.max_retry_delay)
            }
        }
    }
}

/// Growth of the wait between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// The same `retry_delay` every time.
    Fixed,
    /// `retry_delay`, then twice that, four times, and so on up to `max_retry_delay`.
    Exponential,
}

/// The place a method runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// In a long-lived worker process: a crash, an endless loop or runaway
    /// memory kills only that worker, and timeouts and cancels kill it.
    Process,
    /// On a thread of the daemon: no hand-off, but a crash takes the daemon
    /// down, and a timed-out method can only be asked to stop.
    InProcess,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::InProcess => "inprocess",
        }
    }
}

/// Smallest `memory_limit` accepted: a worker needs about this much to start
/// and load a plugin before the job's own allocations count.
pub const MIN_MEMORY_LIMIT: u64 = 32 << 20;
/// Largest `memory_limit` accepted: 1 PiB, far above any machine's memory,
/// so that a larger value is a typing error rather than a limit.
pub const MAX_MEMORY_LIMIT: u64 = 1 << 50;

impl Config {
    /// Reads and validates the jobs.toml at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        Self::parse(&absolute, &text)
    }

    /// Validates `text` as the contents of the jobs.toml at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let source = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| source.line(&span));
            // serde names Rust types; a whole number is what the file needs.
            let mut message = error.message().trim().replace('\n', " ").replace("expected i64", "expected a whole number");
            // The message of a type error names no key, so quote the line.
            if let Some(quoted) = line.and_then(|line| text.lines().nth(line - 1)).map(str::trim)
                && !quoted.is_empty()
                && !quoted.starts_with('[')
            {
                message = format!("{message}, in `{quoted}`");
            }
            ConfigError::Invalid(vec![Problem { path: path.to_owned(), line, message }])
        })?;
        let mut problems = Vec::new();
        let config = validate(&source, raw, &mut problems);
        // Validation goes table by table; the reader goes line by line.
        problems.sort_by_key(|problem| problem.line);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Returns the entry of the plugin called `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginConfig> {
        self.plugins.iter().find(|plugin| plugin.name == name)
    }

    /// Returns the settings of `plugin`'s `method`, if the whitelist allows it.
    pub fn method(&self, plugin: &str, method: &str) -> Result<&MethodSettings, NotWhitelisted> {
        let entry = self.plugin(plugin).ok_or_else(|| NotWhitelisted::UnknownPlugin {
            plugin: plugin.to_owned(),
            known: self.plugins.iter().map(|plugin| plugin.name.clone()).collect(),
        })?;
        entry.methods.get(method).ok_or_else(|| NotWhitelisted::Method {
            plugin: plugin.to_owned(),
            method: method.to_owned(),
        })
    }

    /// Folder of jobs.toml, which relative paths in it are resolved against.
    pub fn folder(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Reasons a plugin method may not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotWhitelisted {
    #[error("plugin {plugin:?} is not in jobs.toml (known plugins: {}); add a [[plugin]] entry for it", known.join(", "))]
    UnknownPlugin { plugin: String, known: Vec<String> },
    #[error("plugin {plugin:?}: method {method:?} is not in the whitelist; add it to methods in jobs.toml")]
    Method { plugin: String, method: String },
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Errors from reading jobs.toml.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}; pass the right file with --config", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Returns every problem found, one per line of output.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Read { .. } => vec![self.to_string()],
            Self::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// One problem in jobs.toml, with the line it is on.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing and validation
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    plugin: Vec<RawPlugin>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    enabled: Option<bool>,
    bind: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    database: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
    pool_size: Option<Spanned<i64>>,
    prefetch: Option<Spanned<i64>>,
    poll_interval: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    log_dir: Option<String>,
    library_cache: Option<String>,
    synchronous: Option<Synchronous>,
    max_jobs_per_worker: Option<Spanned<i64>>,
    // The method settings that `[host]` sets for every plugin. They are
    // spelled out, not flattened, because serde cannot combine
    // `flatten` with `deny_unknown_fields`.
    max_attempts: Option<Spanned<i64>>,
    retry_delay: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    max_retry_delay: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    isolation: Option<Spanned<String>>,
    memory_limit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    path: Spanned<String>,
    methods: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    method: BTreeMap<Spanned<String>, RawMethodSettings>,
    sha256: Option<Spanned<String>>,
    #[serde(default)]
    allow_insecure_permissions: bool,
    max_attempts: Option<Spanned<i64>>,
    retry_delay: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    max_retry_delay: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    isolation: Option<Spanned<String>>,
    memory_limit: Option<Spanned<String>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawMethodSettings {
    max_attempts: Option<Spanned<i64>>,
    retry_delay: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    max_retry_delay: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    isolation: Option<Spanned<String>>,
    memory_limit: Option<Spanned<String>>,
}

/// Copies the method settings a `[host]` or `[[plugin]]` table sets.
macro_rules! method_settings_of {
    ($table:expr) => {
        RawMethodSettings {
            max_attempts: $table.max_attempts.clone(),
            retry_delay: $table.retry_delay.clone(),
            backoff: $table.backoff.clone(),
            max_retry_delay: $table.max_retry_delay.clone(),
            timeout: $table.timeout.clone(),
            isolation: $table.isolation.clone(),
            memory_limit: $table.memory_limit.clone(),
        }
    };
}

struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    /// Returns the 1-based line of the byte range `span`.
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&byte| byte == b'\n').count() + 1
    }

    fn problem(&self, span: &Range<usize>, message: impl Into<String>) -> Problem {
        Problem { path: self.path.to_owned(), line: Some(self.line(span)), message: message.into() }
    }
}

fn validate(source: &Source<'_>, raw: RawConfig, problems: &mut Vec<Problem>) -> Config {
    let folder = source.path.parent().unwrap_or(Path::new(".")).to_owned();
    let host = &raw.host;

    let database = match &host.database {
        None => Database::Sqlite(folder.join("jobhost.db")),
        Some(url) => parse_database(url.get_ref(), &folder).unwrap_or_else(|message| {
            problems.push(source.problem(&url.span(), message));
            Database::Sqlite(folder.join("jobhost.db"))
        }),
    };

    let default_concurrency = std::thread::available_parallelism().map_or(4, usize::from);
    let concurrency = positive_count(source, "concurrency", host.concurrency.as_ref(), 1, 1024, problems)
        .unwrap_or(default_concurrency);
    let prefetch = positive_count(source, "prefetch", host.prefetch.as_ref(), 0, 100_000, problems).unwrap_or(0);
    // One connection of the pool is held by the listener for wake-ups.
    let pool_size = positive_count(source, "pool_size", host.pool_size.as_ref(), 2, 1000, problems).unwrap_or(10) as u32;

    let poll_interval = duration_setting(source, "poll_interval", host.poll_interval.as_ref(), false, problems)
        .unwrap_or(Duration::from_secs(1));
    let lease = duration_setting(source, "lease", host.lease.as_ref(), false, problems).unwrap_or(Duration::from_secs(30));
    if let Some(spanned) = &host.lease
        && lease < Duration::from_secs(1)
    {
        problems.push(source.problem(&spanned.span(), "lease must be at least 1s, so that renewals can keep up"));
    }
    let shutdown_grace = duration_setting(source, "shutdown_grace", host.shutdown_grace.as_ref(), true, problems)
        .unwrap_or(Duration::from_secs(10));

    let max_jobs_per_worker =
        positive_count(source, "max_jobs_per_worker", host.max_jobs_per_worker.as_ref(), 1, 1_000_000_000, problems).map(|count| count as u64);

    let log_dir = folder.join(host.log_dir.as_deref().unwrap_or("logs"));
    let library_cache = folder.join(host.library_cache.as_deref().unwrap_or(".jobhost/libraries"));
    let host_defaults = method_settings(source, &method_settings_of!(host), &MethodSettings::default(), problems);

    let mut plugins: Vec<PluginConfig> = Vec::new();
    let mut seen_names = BTreeSet::new();
    for raw_plugin in &raw.plugin {
        let name = raw_plugin.name.get_ref().trim().to_owned();
        let name_span = raw_plugin.name.span();
        if name.is_empty() {
            problems.push(source.problem(&name_span, "plugin name is empty; give the plugin a name"));
        } else if !seen_names.insert(name.clone()) {
            problems.push(source.problem(&name_span, format!("duplicate plugin name {name:?}; each [[plugin]] needs its own name")));
        }

        let path = raw_plugin.path.get_ref();
        if path.trim().is_empty() {
            problems.push(source.problem(&raw_plugin.path.span(), format!("plugin {name:?}: path is empty; set it to the library file")));
        }
        let path = folder.join(path);

        let plugin_defaults = method_settings(source, &method_settings_of!(raw_plugin), &host_defaults, problems);
        let mut methods = BTreeMap::new();
        if raw_plugin.methods.get_ref().is_empty() {
            problems.push(source.problem(
                &raw_plugin.methods.span(),
                format!("plugin {name:?}: methods is empty, so nothing could run; list the methods to allow"),
            ));
        }
        for method in raw_plugin.methods.get_ref() {
            if methods.insert(method.get_ref().clone(), plugin_defaults.clone()).is_some() {
                problems.push(source.problem(&method.span(), format!("plugin {name:?}: method {:?} is listed twice", method.get_ref())));
            }
        }
        for (method, raw_settings) in &raw_plugin.method {
            match methods.get_mut(method.get_ref()) {
                Some(settings) => *settings = method_settings(source, raw_settings, &plugin_defaults, problems),
                None => problems.push(source.problem(
                    &method.span(),
                    format!(
                        "plugin {name:?}: [plugin.method.{}] sets a method that is not in methods; add it to methods or remove the table",
                        method.get_ref()
                    ),
                )),
            }
        }

        let sha256 = raw_plugin.sha256.as_ref().and_then(|pin| {
            let hex = pin.get_ref().trim().to_ascii_lowercase();
            if hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                Some(hex)
            } else {
                problems.push(source.problem(
                    &pin.span(),
                    format!("plugin {name:?}: sha256 = {:?} is not a SHA-256 digest; use the 64 hex digits that `sha256sum` prints", pin.get_ref()),
                ));
                None
            }
        });

        plugins.push(PluginConfig {
            name,
            path,
            line: source.line(&name_span),
            methods,
            sha256,
            allow_insecure_permissions: raw_plugin.allow_insecure_permissions,
        });
    }

    let http = http_settings(source, &raw.http, problems);

    Config {
        path: source.path.to_owned(),
        http,
        host: HostSettings {
            database,
            concurrency,
            pool_size,
            prefetch,
            poll_interval,
            lease,
            shutdown_grace,
            log_dir,
            library_cache,
            synchronous: host.synchronous.unwrap_or(Synchronous::Normal),
            max_jobs_per_worker,
        },
        plugins,
    }
}

fn http_settings(source: &Source<'_>, raw: &RawHttp, problems: &mut Vec<Problem>) -> HttpSettings {
    let mut settings = HttpSettings { enabled: raw.enabled.unwrap_or(true), ..HttpSettings::default() };
    if let Some(bind) = &raw.bind {
        settings.line = Some(source.line(&bind.span()));
        match bind.get_ref().trim().parse::<SocketAddr>() {
            Ok(address) => settings.bind = address,
            Err(_) => problems.push(source.problem(
                &bind.span(),
                format!(
                    "bind = {:?} is not an address and port; use an IP address with a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\" (port 0 picks a free port)",
                    bind.get_ref()
                ),
            )),
        }
    }
    if let Some(token) = &raw.token {
        let text = token.get_ref();
        let invalid = text.chars().find(|&character| !is_token_char(character));
        if let Some(character) = invalid {
            problems.push(source.problem(
                &token.span(),
                format!("token contains {character:?}; use only letters, digits and - . _ ~ + / =, such as the output of `openssl rand -hex 32`"),
            ));
        } else if text.len() < MIN_TOKEN_LENGTH {
            problems.push(source.problem(
                &token.span(),
                format!(
                    "token is {} characters long; use at least {MIN_TOKEN_LENGTH} random characters, such as the output of `openssl rand -hex 32`",
                    text.len()
                ),
            ));
        } else {
            settings.token = Some(Token(text.clone()));
        }
    }
    settings
}

/// Returns true for the characters a token may contain: those that are safe
/// unquoted in an HTTP header and in a cookie value.
fn is_token_char(character: char) -> bool {
    character.is_ascii_alphanumeric() || "-._~+/=".contains(character)
}

fn parse_database(url: &str, folder: &Path) -> Result<Database, String> {
    if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() || path == ":memory:" {
            return Err(format!(
                "database {url:?} has no file; give a path such as \"sqlite://jobhost.db\", because daemons and the CLI share jobs through the file"
            ));
        }
        return Ok(Database::Sqlite(folder.join(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Database::Postgres(url.to_owned()));
    }
    Err(format!(
        "database {:?} is not a supported URL; use \"sqlite://PATH\" or \"postgres://USER@HOST/DATABASE\"",
        redact_password(url)
    ))
}

fn positive_count(
    source: &Source<'_>,
    key: &str,
    value: Option<&Spanned<i64>>,
    min: i64,
    max: i64,
    problems: &mut Vec<Problem>,
) -> Option<usize> {
    let value = value?;
    let number = *value.get_ref();
    if number < min || number > max {
        problems.push(source.problem(&value.span(), format!("{key} = {number} is out of range; use a whole number from {min} to {max}")));
        return None;
    }
    Some(number as usize)
}

/// Parses a duration setting such as `"5s"`, `"250ms"` or `"1h 30m"`.
fn duration_setting(
    source: &Source<'_>,
    key: &str,
    value: Option<&Spanned<String>>,
    allow_zero: bool,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    let value = value?;
    match parse_duration(value.get_ref()) {
        Ok(duration) if duration.is_zero() && !allow_zero => {
            problems.push(source.problem(&value.span(), format!("{key} = {:?} must be longer than zero; use a value such as \"30s\"", value.get_ref())));
            None
        }
        Ok(duration) => Some(duration),
        Err(message) => {
            problems.push(source.problem(&value.span(), format!("{key} = {:?}: {message}", value.get_ref())));
            None
        }
    }
}

/// Parses a human duration (`"5s"`, `"250ms"`, `"2m 30s"`), rejecting negative ones.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err("a duration cannot be negative; use a value such as \"30s\"".to_owned());
    }
    humantime::parse_duration(trimmed)
        .map_err(|_| "not a duration; use a number with a unit, such as \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\"".to_owned())
}

fn method_settings(
    source: &Source<'_>,
    raw: &RawMethodSettings,
    inherited: &MethodSettings,
    problems: &mut Vec<Problem>,
) -> MethodSettings {
    let mut settings = inherited.clone();
    if let Some(value) = &raw.max_attempts {
        let number = *value.get_ref();
        if (1..=i64::from(MAX_MAX_ATTEMPTS)).contains(&number) {
            settings.max_attempts = number as u32;
        } else {
            problems.push(source.problem(
                &value.span(),
                format!("max_attempts = {number} is out of range; use 1 (no retry) up to {MAX_MAX_ATTEMPTS}"),
            ));
        }
    }
    if let Some(delay) = duration_setting(source, "retry_delay", raw.retry_delay.as_ref(), true, problems) {
        settings.retry_delay = delay;
    }
    if let Some(delay) = duration_setting(source, "max_retry_delay", raw.max_retry_delay.as_ref(), true, problems) {
        settings.max_retry_delay = delay;
    }
    if let Some(timeout) = duration_setting(source, "timeout", raw.timeout.as_ref(), false, problems) {
        settings.timeout = Some(timeout);
    }
    if let Some(value) = &raw.backoff {
        match value.get_ref().as_str() {
            "fixed" => settings.backoff = Backoff::Fixed,
            "exponential" => settings.backoff = Backoff::Exponential,
            other => problems.push(source.problem(&value.span(), format!("backoff = {other:?} is unknown; use \"fixed\" or \"exponential\""))),
        }
    }
    if let Some(value) = &raw.isolation {
        match value.get_ref().as_str() {
            "process" => settings.isolation = Isolation::Process,
            "inprocess" => settings.isolation = Isolation::InProcess,
            other => problems.push(source.problem(&value.span(), format!("isolation = {other:?} is unknown; use \"process\" or \"inprocess\""))),
        }
    }
    let mut limit_valid = true;
    if let Some(value) = &raw.memory_limit {
        match parse_memory_limit(value.get_ref()) {
            Ok(limit) => settings.memory_limit = limit,
            Err(message) => {
                problems.push(source.problem(&value.span(), format!("memory_limit = {:?} {message}", value.get_ref())));
                limit_valid = false;
            }
        }
    }
    if limit_valid
        && settings.isolation == Isolation::InProcess
        && let Some(limit) = settings.memory_limit
    {
        // The daemon cannot cap the memory of one of its threads.
        let limit = format_size(limit);
        if let Some(value) = &raw.memory_limit {
            problems.push(source.problem(
                &value.span(),
                format!("memory_limit = \"{limit}\" cannot apply to isolation = \"inprocess\", because the daemon cannot cap the memory of one of its threads; use isolation = \"process\", or remove memory_limit"),
            ));
        } else if let Some(value) = &raw.isolation {
            problems.push(source.problem(
                &value.span(),
                format!("isolation = \"inprocess\" cannot keep the memory_limit = \"{limit}\" it inherits, because the daemon cannot cap the memory of one of its threads; add memory_limit = \"none\" beside it, or use isolation = \"process\""),
            ));
        }
    }
    settings
}

/// Writes a size in bytes the way jobs.toml spells it: `"256MiB"`, `"1GiB"`, `"1500B"`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    match UNITS.iter().find(|(unit, _)| bytes >= *unit && bytes.is_multiple_of(*unit)) {
        Some((unit, name)) => format!("{}{name}", bytes / unit),
        None => format!("{bytes}B"),
    }
}

/// Parses a `memory_limit`: a size such as `"256MiB"`, `"1 GiB"` or
/// `"512MB"`, or `"none"` for no limit. An error message completes the
/// sentence `memory_limit = "…" ` and names what to write instead.
pub fn parse_memory_limit(text: &str) -> Result<Option<u64>, String> {
    let trimmed = text.trim();
    if trimmed == "none" {
        return Ok(None);
    }
    let invalid = || "is not a memory size; use a number with a unit, such as \"256MiB\" or \"2GiB\", or \"none\" for no limit".to_owned();
    if !trimmed.starts_with(|character: char| character.is_ascii_digit()) {
        return Err(invalid());
    }
    if trimmed.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!("has no unit; write the unit, such as \"{trimmed}MiB\" (or \"{trimmed}B\" for bytes)"));
    }
    let bytes = trimmed.parse::<bytesize::ByteSize>().map_err(|_| invalid())?.as_u64();
    if bytes < MIN_MEMORY_LIMIT {
        let minimum = format_size(MIN_MEMORY_LIMIT);
        return Err(format!("is below the minimum of \"{minimum}\", which a worker needs to start; use \"{minimum}\" or more"));
    }
    if bytes > MAX_MEMORY_LIMIT {
        return Err(format!("is above the maximum of \"{}\"; use a smaller size, or \"none\" for no limit", format_size(MAX_MEMORY_LIMIT)));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/srv/jobs.toml"), text)
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text).expect_err("config should be invalid").problems()
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let config = parse("").unwrap();
        assert_eq!(config.host.database, Database::Sqlite(PathBuf::from("/srv/jobhost.db")));
        assert_eq!(config.host.poll_interval, Duration::from_secs(1));
        assert_eq!(config.host.log_dir, PathBuf::from("/srv/logs"));
        assert!(config.plugins.is_empty());
    }

    #[test]
    fn settings_inherit_host_then_plugin_then_method() {
        let config = parse(
            r#"
            [host]
            max_attempts = 7
            retry_delay = "1s"

            [[plugin]]
            name = "demo"
            path = "libdemo.so"
            methods = ["a", "b", "c"]
            backoff = "exponential"

            [plugin.method.b]
            max_attempts = 2
            timeout = "30s"
            "#,
        )
        .unwrap();
        let plugin = config.plugin("demo").unwrap();
        assert_eq!(plugin.path, PathBuf::from("/srv/libdemo.so"));
        let a = &plugin.methods["a"];
        assert_eq!(a.max_attempts, 7);
        assert_eq!(a.retry_delay, Duration::from_secs(1));
        assert_eq!(a.backoff, Backoff::Exponential);
        let b = &plugin.methods["b"];
        assert_eq!(b.max_attempts, 2);
        assert_eq!(b.backoff, Backoff::Exponential);
        assert_eq!(b.timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let found = problems(
            r#"[host]
poll_interval = "soon"
concurrency = 0

[[plugin]]
name = "demo"
path = "a.so"
methods = ["x", "x"]
backoff = "linear"

[[plugin]]
name = "demo"
path = "b.so"
methods = ["y"]

[plugin.method.z]
max_attempts = 0
"#,
        );
        let expected_lines = ["jobs.toml:2:", "jobs.toml:3:", "jobs.toml:8:", "jobs.toml:9:", "jobs.toml:12:", "jobs.toml:16:"];
        for expected in expected_lines {
            assert!(found.iter().any(|problem| problem.contains(expected)), "no problem at {expected} in {found:#?}");
        }
    }

    #[test]
    fn isolation_and_memory_limit_inherit() {
        let config = parse(
            r#"
            [host]
            memory_limit = "1GiB"
            max_jobs_per_worker = 500

            [[plugin]]
            name = "demo"
            path = "libdemo.so"
            methods = ["a", "b", "c"]

            [plugin.method.b]
            memory_limit = "256 MiB"

            [plugin.method.c]
            isolation = "inprocess"
            memory_limit = "1MiB"
            "#,
        );
        let found = config.expect_err("c is invalid").problems();
        assert_eq!(
            found,
            vec![
                "/srv/jobs.toml:16: memory_limit = \"1MiB\" is below the minimum of \"32MiB\", which a worker needs to start; use \"32MiB\" or more"
                    .to_owned()
            ]
        );

        let config = parse(
            r#"
            [host]
            memory_limit = "1GiB"
            max_jobs_per_worker = 500

            [[plugin]]
            name = "demo"
            path = "libdemo.so"
            methods = ["a", "b"]
            isolation = "process"

            [plugin.method.b]
            memory_limit = "256 MiB"
            "#,
        )
        .unwrap();
        assert_eq!(config.host.max_jobs_per_worker, Some(500));
        let plugin = config.plugin("demo").unwrap();
        assert_eq!(plugin.methods["a"].isolation, Isolation::Process);
        assert_eq!(plugin.methods["a"].memory_limit, Some(1 << 30));
        assert_eq!(plugin.methods["b"].memory_limit, Some(256 << 20));
        assert_eq!(MethodSettings::default().isolation, Isolation::Process, "process isolation is the default");
    }

    #[test]
    fn isolation_problems_name_their_lines() {
        let mut found = problems(
            r#"[host]
isolation = "thread"
max_jobs_per_worker = 0

[[plugin]]
name = "demo"
path = "a.so"
methods = ["x", "y"]
memory_limit = "lots"

[plugin.method.y]
isolation = "inprocess"
"#,
        );
        found.sort();
        assert_eq!(
            found,
            vec![
                "/srv/jobs.toml:2: isolation = \"thread\" is unknown; use \"process\" or \"inprocess\"".to_owned(),
                "/srv/jobs.toml:3: max_jobs_per_worker = 0 is out of range; use a whole number from 1 to 1000000000".to_owned(),
                "/srv/jobs.toml:9: memory_limit = \"lots\" is not a memory size; use a number with a unit, such as \"256MiB\" or \"2GiB\", or \"none\" for no limit".to_owned(),
            ]
        );

        let found = problems("[[plugin]]\nname = \"demo\"\npath = \"a.so\"\nmethods = [\"x\"]\nmemory_limit = \"64MiB\"\n\n[plugin.method.x]\nisolation = \"inprocess\"\n");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("/srv/jobs.toml:8: isolation = \"inprocess\" cannot keep the memory_limit = \"64MiB\" it inherits"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn inherited_memory_limit_can_be_lifted() {
        let text = "[host]\nmemory_limit = \"64MiB\"\n\n[[plugin]]\nname = \"demo\"\npath = \"a.so\"\nmethods = [\"x\", \"y\"]\n\n[plugin.method.x]\nisolation = \"inprocess\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("/srv/jobs.toml:10: isolation = \"inprocess\" cannot keep the memory_limit = \"64MiB\" it inherits"),
            "{}",
            found[0]
        );
        assert!(found[0].ends_with("add memory_limit = \"none\" beside it, or use isolation = \"process\""), "{}", found[0]);

        let config = parse(&text.replace("isolation = \"inprocess\"\n", "isolation = \"inprocess\"\nmemory_limit = \"none\"\n")).unwrap();
        let methods = &config.plugin("demo").unwrap().methods;
        assert_eq!(methods["x"].memory_limit, None);
        assert_eq!(methods["y"].memory_limit, Some(64 << 20));

        let found = problems(&text.replace("isolation = \"inprocess\"\n", "isolation = \"inprocess\"\nmemory_limit = \"128MiB\"\n"));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with("/srv/jobs.toml:11: memory_limit = \"128MiB\" cannot apply to isolation = \"inprocess\""),
            "{}",
            found[0]
        );
    }

    #[test]
    fn memory_sizes_parse_and_print_alike() {
        assert_eq!(parse_memory_limit("256MiB"), Ok(Some(256 << 20)));
        assert_eq!(parse_memory_limit(" 2 GiB "), Ok(Some(2 << 30)));
        assert_eq!(parse_memory_limit("512MB"), Ok(Some(512_000_000)));
        assert_eq!(parse_memory_limit("none"), Ok(None));
        assert!(parse_memory_limit("-5MiB").is_err());
        assert!(parse_memory_limit("MiB").is_err());
        assert_eq!(parse_memory_limit("256"), Err("has no unit; write the unit, such as \"256MiB\" (or \"256B\" for bytes)".to_owned()));
        assert!(parse_memory_limit("100000000TiB").unwrap_err().starts_with("is above the maximum of \"1024TiB\""));
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size(512_000_000), "500000KiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn type_error_names_its_line() {
        let found = problems("[host]\nconcurrency = \"many\"\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("/srv/jobs.toml:2:"), "{}", found[0]);
        assert!(found[0].ends_with("in `concurrency = \"many\"`"), "the line is quoted: {}", found[0]);
        assert!(found[0].contains("expected a whole number"), "no Rust type names: {}", found[0]);
        assert!(!found[0].contains('\n'));
    }

    #[test]
    fn syntax_error_names_its_line() {
        let found = problems("[host]\n\nconcurrency = = 3\n");
        assert!(found[0].starts_with("/srv/jobs.toml:3:"), "{}", found[0]);
    }

    #[test]
    fn unknown_key_is_rejected() {
        let found = problems("[host]\nconcurency = 3\n");
        assert!(found[0].contains("concurency"), "{}", found[0]);
    }

    #[test]
    fn negative_duration_is_rejected() {
        let found = problems("[host]\nretry_delay = \"-5s\"\n");
        assert!(found[0].contains("cannot be negative"), "{}", found[0]);
    }

    #[test]
    fn postgres_url_is_accepted() {
        let config = parse("[host]\ndatabase = \"postgres://jobs:secret@db.internal:5432/queue\"\npool_size = 20\n").unwrap();
        assert_eq!(config.host.database, Database::Postgres("postgres://jobs:secret@db.internal:5432/queue".into()));
        assert_eq!(config.host.pool_size, 20);
    }

    #[test]
    fn sha256_pin_must_be_a_digest() {
        let found = problems("[[plugin]]\nname = \"demo\"\npath = \"a.so\"\nmethods = [\"x\"]\nsha256 = \"abc\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("/srv/jobs.toml:5: plugin \"demo\": sha256 = \"abc\" is not a SHA-256 digest"), "{}", found[0]);
        let digest = "AB".repeat(32);
        let config = parse(&format!("[[plugin]]\nname = \"demo\"\npath = \"a.so\"\nmethods = [\"x\"]\nsha256 = \"{digest}\"\n")).unwrap();
        assert_eq!(config.plugins[0].sha256.as_deref(), Some("ab".repeat(32).as_str()));
    }

    #[test]
    fn pool_of_one_is_rejected() {
        let found = problems("[host]\npool_size = 1\n");
        assert_eq!(found, vec!["/srv/jobs.toml:2: pool_size = 1 is out of range; use a whole number from 2 to 1000".to_owned()]);
    }

    #[test]
    fn unknown_database_scheme_is_rejected() {
        let found = problems("[host]\ndatabase = \"mysql://root:hunter2@localhost/jobs\"\n");
        assert!(found[0].contains("not a supported URL"), "{}", found[0]);
        assert!(!found[0].contains("hunter2"), "the password must not be shown: {}", found[0]);
    }

    #[test]
    fn database_display_hides_password() {
        let database = Database::Postgres("postgres://jobs:secret@db:5432/queue?sslmode=require".into());
        assert_eq!(database.to_string(), "postgres://jobs:***@db:5432/queue?sslmode=require");
        assert_eq!(redact_password("postgres://jobs@db/queue"), "postgres://jobs@db/queue");
    }

    #[test]
    fn exponential_backoff_is_capped_and_never_overflows() {
        let settings = MethodSettings {
            retry_delay: Duration::from_secs(5),
            backoff: Backoff::Exponential,
            max_retry_delay: Duration::from_secs(60),
            ..MethodSettings::default()
        };
        assert_eq!(settings.retry_delay_after(1), Duration::from_secs(5));
        assert_eq!(settings.retry_delay_after(2), Duration::from_secs(10));
        assert_eq!(settings.retry_delay_after(4), Duration::from_secs(40));
        assert_eq!(settings.retry_delay_after(5), Duration::from_secs(60));
        assert_eq!(settings.retry_delay_after(u32::MAX), Duration::from_secs(60));
        let uncapped = MethodSettings { max_retry_delay: Duration::MAX, ..settings };
        assert!(uncapped.retry_delay_after(u32::MAX) > Duration::from_secs(1 << 40));
    }

    #[test]
    fn http_defaults_to_loopback_without_token() {
        let config = parse("").unwrap();
        assert!(config.http.enabled);
        assert_eq!(config.http.bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.http.token, None);
    }

    #[test]
    fn http_settings_are_read() {
        let config = parse("[http]\nenabled = false\nbind = \"[::1]:0\"\ntoken = \"0123456789abcdef\"\n").unwrap();
        assert!(!config.http.enabled);
        assert_eq!(config.http.bind, "[::1]:0".parse().unwrap());
        assert_eq!(config.http.token.as_ref().map(Token::expose), Some("0123456789abcdef"));
        assert_eq!(format!("{:?}", config.http.token), "Some(Token(<redacted>))");
    }

    #[test]
    fn http_problems_name_their_lines() {
        let found = problems("[http]\nbind = \"localhost\"\ntoken = \"short\"\n");
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].starts_with("/srv/jobs.toml:2: bind = \"localhost\" is not an address"), "{}", found[0]);
        assert!(found[1].starts_with("/srv/jobs.toml:3: token is 5 characters long"), "{}", found[1]);
        let found = problems("[http]\ntoken = \"has a space in it, oh\"\n");
        assert!(found[0].contains("token contains ' '"), "{}", found[0]);
    }

    #[test]
    fn exposed_bind_needs_a_token() {
        let path = Path::new("/srv/jobs.toml");
        let exposed = parse("[http]\nbind = \"0.0.0.0:8080\"\n").unwrap();
        let error = exposed.http.check_exposure(path).unwrap_err().to_string();
        assert!(error.starts_with("/srv/jobs.toml:2: [http] bind = \"0.0.0.0:8080\" accepts connections from other machines"), "{error}");
        assert!(error.contains("set token in [http]"), "{error}");

        let with_token = parse("[http]\nbind = \"0.0.0.0:8080\"\ntoken = \"0123456789abcdef\"\n").unwrap();
        assert!(with_token.http.check_exposure(path).is_ok());
        let disabled = parse("[http]\nbind = \"0.0.0.0:8080\"\nenabled = false\n").unwrap();
        assert!(disabled.http.check_exposure(path).is_ok());
        for loopback in ["127.0.0.1:0", "[::1]:8080", "127.0.0.2:80"] {
            let config = parse(&format!("[http]\nbind = \"{loopback}\"\n")).unwrap();
            assert!(config.http.check_exposure(path).is_ok(), "{loopback}");
        }
    }

    #[test]
    fn whitelist_lookup_explains_rejection() {
        let config = parse("[[plugin]]\nname = \"demo\"\npath = \"a.so\"\nmethods = [\"handle\"]\n").unwrap();
        assert!(config.method("demo", "handle").is_ok());
        let error = config.method("demo", "update").unwrap_err();
        assert_eq!(error.to_string(), "plugin \"demo\": method \"update\" is not in the whitelist; add it to methods in jobs.toml");
        let error = config.method("mail", "send").unwrap_err();
        assert!(error.to_string().contains("known plugins: demo"), "{error}");
    }
}
