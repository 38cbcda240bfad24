//! End-to-end: a running daemon follows edits of jobs.toml and rebuilt
//! libraries, and rejects libraries it must not load.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Env, TEST_HOST, TEST_HTTP, build, wait_until};

const LONG: Duration = Duration::from_secs(30);

/// Creates an environment whose demo plugin is a copy in its own folder,
/// which the test may replace, with `methods` whitelisted and `extra` after
/// the entry.
fn env_with_copy(methods: &[&str], extra: &str) -> (Env, PathBuf) {
    let env = Env::with_config("");
    let library = env.path("plugins/libdemo.so");
    std::fs::create_dir_all(library.parent().unwrap()).unwrap();
    std::fs::copy(&build().demo, &library).unwrap();
    env.write_config(&config_text(&library, methods, extra));
    (env, library)
}

fn config_text(library: &Path, methods: &[&str], extra: &str) -> String {
    let methods: Vec<String> = methods.iter().map(|method| format!("{method:?}")).collect();
    format!(
        "[host]{TEST_HOST}\n[http]{TEST_HTTP}\n[[plugin]]\nname = \"demo\"\npath = {:?}\nmethods = [{}]\n{extra}\n",
        library.display().to_string(),
        methods.join(", ")
    )
}

/// Replaces the file at `path` the way a build does: write beside, then rename.
fn replace_file(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Waits until the daemon's log has `count` lines containing `text`.
fn wait_for_log(daemon: &Daemon, text: &str, count: usize) {
    let found = wait_until(LONG, || daemon.stderr().matches(text).count() >= count);
    assert!(found, "the daemon never logged {text:?} {count} times:\n{}", daemon.stderr());
}

fn sha256_of(path: &Path) -> String {
    let output = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

#[test]
fn whitelist_edit_applies_without_restart() {
    let (env, library) = env_with_copy(&["handle", "whoami"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);
    let stderr = env.fails(&["dispatch", "demo", "update"]);
    assert!(stderr.contains("not in the whitelist"), "{stderr}");

    env.write_config(&config_text(&library, &["handle", "whoami", "update"], ""));
    wait_for_log(&daemon, "reloaded jobs.toml and plugins", 1);
    let id = env.dispatch(&["demo", "update"]);
    env.wait_for_status(id, "succeeded", LONG);

    let plugins = env.ok(&["plugins"]);
    assert!(plugins.contains("whitelisted: handle, update, whoami"), "{plugins}");
}

#[test]
fn removed_method_fails_pending_jobs() {
    let (env, library) = env_with_copy(&["handle", "whoami"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);
    let pending = env.dispatch(&["demo", "handle", "--params", "\"too late\"", "--delay", "2s"]);

    env.write_config(&config_text(&library, &["whoami"], ""));
    wait_for_log(&daemon, "reloaded jobs.toml and plugins", 1);
    let job = env.wait_for_status(pending, "failed", LONG);
    assert_eq!(job["attempts"], 1, "a job whose method was removed is not retried");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains(r#"method "handle" is not in the whitelist"#), "{error}");
}

#[test]
fn rebuilt_library_loads_beside_old() {
    let (env, library) = env_with_copy(&["sleep", "whoami"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);

    let before = env.dispatch(&["demo", "whoami"]);
    let old_path = env.wait_for_status(before, "succeeded", LONG)["output"].as_str().unwrap().to_owned();
    let old_hash = sha256_of(&library);
    assert!(old_path.contains(&old_hash[..16]), "loaded from the hash-named copy: {old_path}");
    let long = env.dispatch(&["demo", "sleep", "--params", "3000"]);
    env.wait_for_status(long, "running", LONG);

    // A new build: the same code with bytes appended, which the loader ignores
    // but which changes the file's hash, as a real rebuild does.
    let mut bytes = std::fs::read(&library).unwrap();
    bytes.extend_from_slice(b"a rebuilt library");
    replace_file(&library, &bytes);
    let new_hash = sha256_of(&library);
    wait_for_log(&daemon, "new build of plugin loaded", 1);

    let after = env.dispatch(&["demo", "whoami"]);
    let new_path = env.wait_for_status(after, "succeeded", LONG)["output"].as_str().unwrap().to_owned();
    assert!(new_path.contains(&new_hash[..16]), "a new job runs the new build: {new_path}");
    assert_ne!(new_path, old_path);

    assert_eq!(env.status(long), "running", "the long job is still running on the old build");
    let job = env.wait_for_status(long, "succeeded", LONG);
    assert_eq!(job["attempts"], 1, "the old job finished on the old build without a retry");
    assert!(Path::new(&old_path).exists(), "the old copy stays in place");
}

#[test]
fn broken_config_keeps_daemon_on_old_set() {
    let (env, library) = env_with_copy(&["handle", "whoami"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);

    let good = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&good.replace("concurrency = 4", "concurrency = \"four\""));
    wait_for_log(&daemon, "reload rejected, still running the previous configuration", 1);
    assert!(daemon.stderr().contains("jobs.toml:3: invalid type"), "the problem names its line:\n{}", daemon.stderr());

    // The daemon still runs jobs, with the old whitelist.
    // The CLI refuses the broken jobs.toml, so the job goes in through the store.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(jobhost::store::SqliteStore::open(&env.database(), jobhost::config::Synchronous::Normal, false)).unwrap();
    let id = runtime.block_on(async {
        use jobhost::store::Store;
        let job = jobhost::store::NewJob {
            plugin: "demo".into(),
            method: "handle".into(),
            params: "\"still working\"".into(),
            priority: 5,
            delay: Duration::ZERO,
            max_attempts: 3,
        };
        store.dispatch(&[jobhost::store::NewChain { head: job, then: Vec::new() }]).await.unwrap()[0]
    });
    let succeeded = wait_until(LONG, || {
        use jobhost::store::Store;
        let job = runtime.block_on(store.get(id)).unwrap().unwrap();
        job.status == jobhost::store::Status::Succeeded
    });
    assert!(succeeded, "the daemon stopped running jobs:\n{}", daemon.stderr());

    let plugins = env.ok(&["plugins"]);
    assert!(plugins.contains("last reload rejected; still running the set above"), "{plugins}");
    assert!(plugins.contains("jobs.toml:3:"), "{plugins}");
    let stderr = env.fails(&["check"]);
    assert!(stderr.contains("rejected its last reload and runs its previous configuration"), "{stderr}");

    env.write_config(&config_text(&library, &["handle", "whoami"], ""));
    wait_for_log(&daemon, "reloaded jobs.toml and plugins", 1);
    let plugins = env.ok(&["plugins"]);
    assert!(!plugins.contains("last reload rejected"), "{plugins}");
}

#[test]
fn sighup_and_reload_command_reload() {
    let (env, _library) = env_with_copy(&["handle"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);
    // The wake-up socket is bound once the daemon has started.
    env.dispatch(&["demo", "handle", "--params", "\"ready\""]);

    daemon.signal(libc::SIGHUP);
    wait_for_log(&daemon, "trigger=Signal", 1);
    let output = env.ok(&["reload"]);
    assert!(output.contains("asked the daemons of sqlite://"), "{output}");
    wait_for_log(&daemon, "trigger=Command", 1);
    assert_eq!(daemon.stderr().matches("reloaded jobs.toml and plugins").count(), 2);
}

#[test]
fn hash_mismatch_is_rejected() {
    let wrong = "0".repeat(64);
    let (env, library) = env_with_copy(&["handle"], &format!("sha256 = {wrong:?}"));
    let stderr = env.fails(&["check"]);
    let actual = sha256_of(&library);
    assert!(stderr.contains(&format!("has SHA-256 {actual}, but jobs.toml pins {wrong}")), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    env.write_config(&config_text(&library, &["handle"], &format!("sha256 = {actual:?}")));
    env.ok(&["check"]);
}

#[test]
fn writable_library_is_rejected() {
    let (env, library) = env_with_copy(&["handle"], "");
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o775)).unwrap();
    let stderr = env.fails(&["check"]);
    assert!(stderr.contains("is writable by its group (mode 775)"), "{stderr}");
    assert!(stderr.contains("chmod go-w"), "{stderr}");
    let stderr = env.fails(&["run", "--once"]);
    assert!(stderr.contains("is writable by its group"), "{stderr}");

    env.write_config(&config_text(&library, &["handle"], "allow_insecure_permissions = true"));
    env.ok(&["check"]);
}

#[test]
fn library_of_other_user_is_rejected() {
    let (env, library) = env_with_copy(&["handle"], "");
    // SAFETY: geteuid has no preconditions.
    let daemon_user = unsafe { libc::geteuid() };
    let other_user = if daemon_user == 65534 { 65533 } else { 65534 };
    let path = std::ffi::CString::new(library.to_str().unwrap()).unwrap();
    // SAFETY: the path is a valid NUL-terminated string; -1 keeps the group.
    let changed = unsafe { libc::chown(path.as_ptr(), other_user, u32::MAX) };
    if changed != 0 {
        // Only root can give a file away; as another user this case cannot be set up.
        assert_ne!(daemon_user, 0, "root failed to chown {}", library.display());
        eprintln!("skipped: only root can give a file to another user");
        return;
    }
    let stderr = env.fails(&["check"]);
    assert!(stderr.contains(&format!("is owned by user id {other_user}, not by the daemon's user id {daemon_user}")), "{stderr}");

    env.write_config(&config_text(&library, &["handle"], "allow_insecure_permissions = true"));
    env.ok(&["check"]);
}

#[test]
fn older_plugin_api_is_rejected_briefly() {
    let env = Env::with_config(&format!(
        "[host]{TEST_HOST}\n[http]{TEST_HTTP}\n[[plugin]]\nname = \"old\"\npath = {:?}\nmethods = [\"handle\"]\n",
        build().old_api.display().to_string()
    ));
    let stderr = env.fails(&["check"]);
    assert_eq!(stderr.lines().count(), 1, "one short line, not a layout report:\n{stderr}");
    assert!(
        stderr.contains("was built against jobhost-plugin-api 0.0.9, which this host (0.1.0) cannot load; rebuild the plugin against jobhost-plugin-api 0.1.0"),
        "{stderr}"
    );
    assert!(stderr.contains(&build().old_api.display().to_string()), "the message names the file: {stderr}");
}

#[test]
fn reload_waits_for_edits_to_settle() {
    let (env, library) = env_with_copy(&["handle"], "");
    let daemon = env.start_daemon(&[]);
    wait_for_log(&daemon, "daemon started", 1);
    let started = Instant::now();
    for methods in [&["handle", "whoami"][..], &["handle", "whoami", "noop"], &["handle", "noop"]] {
        env.write_config(&config_text(&library, methods, ""));
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_log(&daemon, "reloaded jobs.toml and plugins", 1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(daemon.stderr().matches("reloaded jobs.toml and plugins").count(), 1, "three quick edits make one reload");
    let plugins = env.ok(&["plugins"]);
    assert!(plugins.contains("whitelisted: handle, noop\n"), "the last edit wins: {plugins}");
    assert!(started.elapsed() < LONG);
}
