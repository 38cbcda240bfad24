//! Shared helpers for the end-to-end tests: build the real binary and plugins
//! once per test process, write a jobs.toml in a temporary folder, run
//! `jobhost` commands and daemons, and wait on conditions with deadlines.

#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod proxy;

/// Paths of the built binary and plugin libraries.
pub struct Build {
    pub jobhost: PathBuf,
    pub demo: PathBuf,
    pub files: PathBuf,
    /// A plugin built against an older jobhost-plugin-api.
    pub old_api: PathBuf,
}

/// Builds `jobhost` and the plugins with the profile of this test binary,
/// once per test process. `cargo test` builds neither the plugins' cdylib
/// files nor another package's binary, so the tests build them here.
pub fn build() -> &'static Build {
    static BUILD: OnceLock<Build> = OnceLock::new();
    BUILD.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", "jobhost", "-p", "jobhost-demo", "-p", "jobhost-files", "-p", "jobhost-old-plugin"]);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let status = command.status().expect("cargo should start");
        assert!(status.success(), "building jobhost and the plugins failed: {status}");

        // This test binary lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("the test binary has a path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned();
        let build = Build {
            jobhost: profile_dir.join("jobhost"),
            demo: profile_dir.join("libjobhost_demo.so"),
            files: profile_dir.join("libjobhost_files.so"),
            old_api: profile_dir.join("libjobhost_old_plugin.so"),
        };
        for path in [&build.jobhost, &build.demo, &build.files, &build.old_api] {
            assert!(path.exists(), "{} was not built", path.display());
        }
        build
    })
}

/// Host settings suited to tests: short polls, leases and retry delays.
pub const TEST_HOST: &str = r#"
database = "sqlite://jobs.db"
concurrency = 4
poll_interval = "200ms"
lease = "2s"
shutdown_grace = "5s"
retry_delay = "100ms"
log_dir = "logs"
"#;

/// HTTP settings suited to tests: a free loopback port for each daemon,
/// because many tests run daemons at once.
pub const TEST_HTTP: &str = r#"
bind = "127.0.0.1:0"
"#;

/// A temporary folder with a jobs.toml, where commands and daemons run.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The PostgreSQL schema of a PostgreSQL environment.
    pub schema: Option<jobhost_test_support::TestSchema>,
}

impl Env {
    /// The demo plugin with every method but `update` whitelisted, and the files plugin.
    pub fn new() -> Self {
        Self::with_host(TEST_HOST)
    }

    /// Like [`Env::new`], with the given `[host]` body.
    pub fn with_host(host: &str) -> Self {
        Self::with_parts(host, "")
    }

    /// Like [`Env::with_host`], with `demo_tables` (such as
    /// `[plugin.method.sleep]` tables) after the demo plugin's entry.
    pub fn with_parts(host: &str, demo_tables: &str) -> Self {
        Self::with_all(host, TEST_HTTP, demo_tables)
    }

    /// Like [`Env::new`], with the given `[http]` body.
    pub fn with_http(http: &str) -> Self {
        Self::with_all(TEST_HOST, http, "")
    }

    /// Creates a folder whose jobs.toml has the given `[host]` and `[http]`
    /// bodies, and `demo_tables` after the demo plugin's entry.
    pub fn with_all(host: &str, http: &str, demo_tables: &str) -> Self {
        let build = build();
        let plugins = format!(
            r#"
[[plugin]]
name = "demo"
path = {demo:?}
methods = ["handle", "noop", "flaky", "sleep", "panic", "fail", "record", "whoami"]
{demo_tables}

[[plugin]]
name = "files"
path = {files:?}
methods = ["sha256", "gzip"]
"#,
            demo = build.demo.display().to_string(),
            files = build.files.display().to_string(),
        );
        Self::with_config(&format!("[host]{host}\n[http]\n{http}\n{plugins}"))
    }

    /// Creates a folder whose jobs.toml is exactly `text`.
    pub fn with_config(text: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("jobhost-test-").tempdir().expect("temporary folder");
        let config = dir.path().join("jobs.toml");
        std::fs::write(&config, text).expect("write jobs.toml");
        Self { dir, config, schema: None }
    }

    /// Like [`Env::with_host`] on a fresh PostgreSQL schema, reached through
    /// `url_of(schema URL)` (for example through a proxy), or None when the
    /// server is unreachable and `CI` is not set.
    pub fn postgres(host: &str, url_of: impl FnOnce(&str) -> String) -> Option<Self> {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        let schema = runtime.block_on(jobhost_test_support::postgres_schema())?;
        let url = url_of(&schema.url());
        let host = host.replace("database = \"sqlite://jobs.db\"", &format!("database = {url:?}"));
        assert!(host.contains("postgres"), "the [host] settings must carry the default database line");
        let mut env = Self::with_host(&host);
        env.schema = Some(schema);
        Some(env)
    }

    /// Returns the URL of this environment's PostgreSQL schema, without any proxy.
    pub fn postgres_url(&self) -> String {
        self.schema.as_ref().expect("a PostgreSQL environment").url()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn database(&self) -> PathBuf {
        self.path("jobs.db")
    }

    /// Replaces jobs.toml with `text`.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write jobs.toml");
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&build().jobhost);
        command.current_dir(self.dir.path()).arg("--config").arg(&self.config).args(args).env_remove("RUST_LOG");
        command
    }

    /// Runs `jobhost ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("jobhost should start")
    }

    /// Runs `jobhost ARGS`, asserts that it succeeded, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(output.status.success(), "jobhost {args:?} failed: {}", describe(&output));
        String::from_utf8(output.stdout).expect("utf-8 stdout")
    }

    /// Runs `jobhost ARGS`, asserts that it failed, and returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "jobhost {args:?} should fail: {}", describe(&output));
        String::from_utf8(output.stderr).expect("utf-8 stderr")
    }

    /// Dispatches a job and returns its id.
    pub fn dispatch(&self, args: &[&str]) -> i64 {
        let mut full = vec!["dispatch"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full);
        stdout.trim().parse().unwrap_or_else(|_| panic!("dispatch printed {stdout:?}, not a job id"))
    }

    /// Dispatches a `demo.record` job that appends to `file` with `tag`.
    pub fn dispatch_record(&self, file: &Path, tag: &str, extra: &[&str]) -> i64 {
        let params = serde_json::json!({"file": file, "tag": tag}).to_string();
        let mut args = vec!["demo", "record", "--params", &params];
        args.extend_from_slice(extra);
        self.dispatch(&args)
    }

    /// Returns `jobhost show ID --json`.
    pub fn show(&self, id: i64) -> Value {
        let stdout = self.ok(&["show", &id.to_string(), "--json"]);
        serde_json::from_str(&stdout).expect("show --json prints JSON")
    }

    pub fn status(&self, id: i64) -> String {
        self.show(id)["status"].as_str().expect("status is a string").to_owned()
    }

    /// Waits until job `id` has `status`, failing after `timeout`.
    pub fn wait_for_status(&self, id: i64, status: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let reached = wait_until(timeout, || {
            last = self.show(id);
            last["status"] == status
        });
        assert!(reached, "job {id} did not reach {status} within {timeout:?}; last seen: {last:#}");
        last
    }

    /// Starts `jobhost run` in the background; it is killed when dropped.
    pub fn start_daemon(&self, args: &[&str]) -> Daemon {
        let log = self.path(&format!("daemon-{}.stderr", rand_suffix()));
        let stderr = std::fs::File::create(&log).expect("daemon log file");
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let child = self.command(&full).stdout(Stdio::null()).stderr(stderr).spawn().expect("daemon should start");
        Daemon { child: Some(child), log }
    }

    /// Reads a file that `demo.record` jobs append to: one (job id, attempt, tag) per run.
    pub fn records(&self, file: &Path) -> Vec<(i64, u32, String)> {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        text.lines()
            .map(|line| {
                let mut parts = line.splitn(3, ' ');
                let id = parts.next().and_then(|id| id.parse().ok()).expect("job id");
                let attempt = parts.next().and_then(|attempt| attempt.parse().ok()).expect("attempt");
                (id, attempt, parts.next().unwrap_or_default().to_owned())
            })
            .collect()
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A `jobhost run` process, killed on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety requirements.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("daemon running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            assert!(Instant::now() < deadline, "daemon did not exit within {timeout:?}; log:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the daemon to log the address of its HTTP server, and returns it.
    pub fn http_address(&mut self) -> SocketAddr {
        let mut address = None;
        let found = wait_until(Duration::from_secs(20), || {
            address = self.stderr().lines().find_map(|line| {
                let rest = line.split("dashboard listening on http://").nth(1)?;
                rest.split('/').next()?.parse::<SocketAddr>().ok()
            });
            address.is_some() || !self.is_running()
        });
        assert!(found, "the daemon did not log its HTTP address within 20 s; log:\n{}", self.stderr());
        address.unwrap_or_else(|| panic!("the daemon exited without serving HTTP; log:\n{}", self.stderr()))
    }
}

/// A response read by [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// Parses the body as JSON, failing the test with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("the body is not JSON ({error}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request to `address` and reads the whole response.
/// `headers` may override `Host`. Written on a plain TCP stream so that tests
/// control every header, including the ones browsers set.
pub fn http(address: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    use std::io::Read;

    let mut stream = std::net::TcpStream::connect(address).unwrap_or_else(|error| panic!("connecting to {address} failed: {error}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {address}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("sending the request");

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading the response");
    let text = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect::<Vec<_>>();
    let body = if headers.iter().any(|(name, value)| name == "transfer-encoding" && value.contains("chunked")) {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse { status, headers, body }
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return body };
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            return body;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `condition` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Appends `text` to the file at `path`.
pub fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).expect("open for append");
    file.write_all(text.as_bytes()).expect("append");
}
