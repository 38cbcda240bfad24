//! End-to-end: the real `jobhost` binary runs real plugin jobs from a SQLite file.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Env, TEST_HOST, wait_until};

const LONG: Duration = Duration::from_secs(30);

#[test]
fn priority_then_age_order() {
    let env = Env::with_host(&TEST_HOST.replace("concurrency = 4", "concurrency = 1"));
    let file = env.path("runs.txt");
    let low = env.dispatch_record(&file, "low", &["--priority", "9"]);
    let normal_first = env.dispatch_record(&file, "normal-1", &[]);
    let urgent = env.dispatch_record(&file, "urgent", &["--priority", "1"]);
    let normal_second = env.dispatch_record(&file, "normal-2", &[]);

    env.ok(&["run", "--once"]);

    let order: Vec<i64> = env.records(&file).iter().map(|(id, _, _)| *id).collect();
    assert_eq!(order, vec![urgent, normal_first, normal_second, low]);
}

#[test]
fn delayed_job_never_runs_early() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let dispatched = std::time::Instant::now();
    let delayed = env.dispatch_record(&file, "delayed", &["--delay", "2s"]);
    let now = env.dispatch_record(&file, "now", &[]);
    let _daemon = env.start_daemon(&[]);

    env.wait_for_status(now, "succeeded", LONG);
    // On a loaded machine the first job may end after the delay; the start
    // times below are checked in every case.
    if dispatched.elapsed() < Duration::from_millis(1800) {
        assert_eq!(env.status(delayed), "pending", "a 2 s delay must hold the job back");
    }
    let job = env.wait_for_status(delayed, "succeeded", LONG);

    let created = parse_time(&job["created_at"]);
    let started = parse_time(&job["started_at"]);
    let waited = started - created;
    assert!(waited >= 2.0, "job started {waited:.3} s after dispatch, before its 2 s delay");
    assert!(waited < 4.5, "job started {waited:.3} s after dispatch; the daemon should wake when it is due");
}

#[test]
fn retryable_error_runs_exactly_max_attempts() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let params = serde_json::json!({"file": file, "tag": "again", "fail": "retry"}).to_string();
    let id = env.dispatch(&["demo", "record", "--params", &params]);
    let _daemon = env.start_daemon(&[]);

    let job = env.wait_for_status(id, "failed", LONG);
    let runs = env.records(&file);
    assert_eq!(runs.len(), 3, "default max_attempts is 3: {runs:?}");
    assert_eq!(runs.iter().map(|(_, attempt, _)| *attempt).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["attempt_history"].as_array().unwrap().len(), 3);
    assert!(job["last_error"].as_str().unwrap().contains("gave up after 3 of 3 attempts"), "{job:#}");
}

#[test]
fn fatal_error_runs_once() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let params = serde_json::json!({"file": file, "tag": "broken", "fail": "fatal"}).to_string();
    let id = env.dispatch(&["demo", "record", "--params", &params]);
    env.ok(&["run", "--once"]);

    let job = env.show(id);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["last_error"], "broken failed on purpose");
    assert_eq!(env.records(&file).len(), 1);
}

#[test]
fn flaky_job_succeeds_after_retries() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "flaky", "--params", "2"]);
    let _daemon = env.start_daemon(&[]);
    let job = env.wait_for_status(id, "succeeded", LONG);
    assert_eq!(job["attempts"], 3);
    assert_eq!(job["output"], "succeeded on attempt 3");
    assert_eq!(job["last_error"], serde_json::Value::Null, "a success clears the last error; the history keeps it");
    let history = job["attempt_history"].as_array().unwrap();
    assert_eq!(history[0]["error"], "flaky failure on attempt 1");
    assert_eq!(history[2]["error"], serde_json::Value::Null);
}

#[test]
fn chain_runs_in_order_after_run_once() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let step = |tag: &str| format!("demo:record:{}", serde_json::json!({"file": file, "tag": tag}));
    let head = env.dispatch_record(&file, "first", &["--then", &step("second"), "--then", &step("third")]);

    let second = env.show(head)["children"][0].as_i64().expect("head has a chained child");
    assert_eq!(env.status(second), "waiting");

    env.ok(&["run", "--once"]);
    let tags: Vec<String> = env.records(&file).into_iter().map(|(_, _, tag)| tag).collect();
    assert_eq!(tags, vec!["first", "second", "third"]);
    let third = env.show(second)["children"][0].as_i64().unwrap();
    assert_eq!(env.status(third), "succeeded");
    assert_eq!(env.show(third)["parent_id"], second);
}

#[test]
fn chain_cancelled_when_parent_fails() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let fails = serde_json::json!({"file": file, "tag": "parent", "fail": "fatal"}).to_string();
    let child = format!("demo:record:{}", serde_json::json!({"file": file, "tag": "child"}));
    let grandchild = format!("demo:record:{}", serde_json::json!({"file": file, "tag": "grandchild"}));
    let parent = env.dispatch(&["demo", "record", "--params", &fails, "--then", &child, "--then", &grandchild]);

    env.ok(&["run", "--once"]);

    assert_eq!(env.status(parent), "failed");
    let child = env.show(parent)["children"][0].as_i64().unwrap();
    let child_job = env.show(child);
    assert_eq!(child_job["status"], "cancelled");
    assert_eq!(child_job["last_error"], format!("cancelled because parent job {parent} failed"));
    let grandchild = child_job["children"][0].as_i64().unwrap();
    assert_eq!(env.status(grandchild), "cancelled");
    assert_eq!(env.records(&file).len(), 1, "only the parent ran");
}

#[test]
fn panic_is_contained() {
    let env = Env::new();
    let panics = env.dispatch(&["demo", "panic", "--params", "\"boom\""]);
    let mut daemon = env.start_daemon(&[]);
    let job = env.wait_for_status(panics, "failed", LONG);
    assert_eq!(job["last_error"], "panicked: boom");
    assert_eq!(job["attempts"], 1, "a panic is fatal and not retried");

    let after = env.dispatch(&["demo", "handle", "--params", "\"still here\""]);
    let job = env.wait_for_status(after, "succeeded", LONG);
    assert_eq!(job["output"], "still here");
    assert!(daemon.is_running());
}

#[test]
fn method_removed_from_whitelist_fails_at_run_time() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "handle", "--params", "\"hi\""]);
    let text = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&text.replace(r#"methods = ["handle", "#, "methods = ["));

    env.ok(&["run", "--once"]);

    let job = env.show(id);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1, "a job that is no longer allowed is not retried");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains(r#"method "handle" is not in the whitelist"#), "{error}");
}

#[test]
fn many_daemons_run_each_job_exactly_once() {
    let env = Env::with_host(&TEST_HOST.replace("lease = \"2s\"", "lease = \"30s\""));
    let file = env.path("runs.txt");
    const DAEMONS: usize = 4;
    const JOBS_PER_DAEMON: usize = 2000;

    // Dispatch from two processes while four daemons claim, so that
    // dispatches and claims contend for the write lock.
    let daemons: Vec<_> = (0..DAEMONS).map(|_| env.start_daemon(&[])).collect();
    let dispatchers: Vec<_> = (0..2)
        .map(|half| {
            let path = env.path(&format!("dispatch-{half}.sh"));
            let params = serde_json::json!({"file": file, "tag": "x"}).to_string();
            let jobhost = common::build().jobhost.display().to_string();
            let config = env.config.display().to_string();
            let script = format!(
                "for i in $(seq 1 {count}); do '{jobhost}' --config '{config}' dispatch demo record --params '{params}' > /dev/null || exit 1; done\n",
                count = DAEMONS * JOBS_PER_DAEMON / 20,
            );
            std::fs::write(&path, script).unwrap();
            std::process::Command::new("sh").arg(&path).spawn().unwrap()
        })
        .collect();
    // The rest arrive in one batch from the Rust client.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let job = jobhost::client::Job::new("demo", "record").params(&serde_json::json!({"file": file, "tag": "x"}));
        let jobs = vec![job; DAEMONS * JOBS_PER_DAEMON - DAEMONS * JOBS_PER_DAEMON / 10];
        client.dispatch_many(&jobs).await.unwrap();
    });
    for mut dispatcher in dispatchers {
        assert!(dispatcher.wait().unwrap().success(), "a dispatcher process failed");
    }

    let total = DAEMONS * JOBS_PER_DAEMON;
    let drained = wait_until(Duration::from_secs(120), || env.records(&file).len() >= total);
    assert!(drained, "only {} of {total} jobs ran", env.records(&file).len());
    // Give a double run the chance to show up.
    std::thread::sleep(Duration::from_millis(500));

    let runs = env.records(&file);
    assert_eq!(runs.len(), total);
    let mut per_job: HashMap<i64, usize> = HashMap::new();
    for (id, attempt, _) in &runs {
        assert_eq!(*attempt, 1, "job {id} ran a second attempt");
        *per_job.entry(*id).or_default() += 1;
    }
    assert_eq!(per_job.len(), total);
    assert!(per_job.values().all(|&count| count == 1));

    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--status", "succeeded", "--limit", "100000", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), total);
    for daemon in &daemons {
        let log = daemon.stderr();
        assert!(!log.contains("database is locked"), "a daemon met a locked database:\n{log}");
        assert!(!log.contains("ERROR"), "a daemon logged an error:\n{log}");
    }
}

#[test]
fn sigkill_mid_job_loses_nothing() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "sleep", "--params", "3000"]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(id, "running", LONG);

    daemon.signal(libc::SIGKILL);
    daemon.wait(LONG);
    assert_eq!(env.status(id), "running", "the killed daemon still holds the lease");

    let _restarted = env.start_daemon(&[]);
    let job = env.wait_for_status(id, "succeeded", LONG);
    assert_eq!(job["attempts"], 2, "the interrupted run counts as an attempt");
    let first = &job["attempt_history"][0];
    assert!(first["error"].as_str().unwrap().contains("expired"), "{job:#}");
}

#[test]
fn sigterm_waits_for_running_job() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "sleep", "--params", "1000"]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(id, "running", LONG);

    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(LONG), Some(0));
    let job = env.show(id);
    assert_eq!(job["status"], "succeeded", "the job finished within the grace period: {job:#}");
}

#[test]
fn sigint_hands_back_job_after_grace() {
    let env = Env::with_host(&TEST_HOST.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"500ms\""));
    let id = env.dispatch(&["demo", "sleep", "--params", "20000"]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(id, "running", LONG);

    daemon.signal(libc::SIGINT);
    assert_eq!(daemon.wait(LONG), Some(0));
    let job = env.show(id);
    assert_eq!(job["status"], "pending");
    assert_eq!(job["attempts"], 0, "a handed-back run is not charged an attempt");
    assert_eq!(job["lease_owner"], serde_json::Value::Null);
    let history = job["status_history"].as_array().unwrap();
    assert!(history.last().unwrap()["message"].as_str().unwrap().contains("handed back unfinished"));
}

#[test]
fn timeout_marks_run_failed() {
    let env = Env::with_parts(TEST_HOST, "[plugin.method.sleep]\ntimeout = \"300ms\"\nmax_attempts = 1\n");
    let id = env.dispatch(&["demo", "sleep", "--params", "5000"]);
    let _daemon = env.start_daemon(&[]);
    let job = env.wait_for_status(id, "failed", LONG);
    assert!(job["last_error"].as_str().unwrap().starts_with("timed out after 300ms"), "{job:#}");
}

#[test]
fn two_plugins_do_real_file_work() {
    let env = Env::new();
    let data = env.path("data.txt");
    std::fs::write(&data, "hello jobhost\n".repeat(1000)).unwrap();
    let params = serde_json::json!({"path": data}).to_string();
    let checksum = env.dispatch(&["files", "sha256", "--params", &params]);
    let compress = env.dispatch(&["files", "gzip", "--params", &params]);
    let greet = env.dispatch(&["demo", "handle", "--params", "\"hi\""]);

    env.ok(&["run", "--once"]);

    let job = env.show(checksum);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let expected = {
        use std::process::Command;
        let output = Command::new("sha256sum").arg(&data).output().unwrap();
        String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(job["output"]["sha256"], expected);
    assert_eq!(job["output"]["bytes"], 14_000);

    let job = env.show(compress);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let gzip_path = env.path("data.txt.gz");
    assert_eq!(job["output"]["gzip_path"], gzip_path.display().to_string());
    assert_eq!(job["output"]["original_bytes"], 14_000);
    let unpacked = std::process::Command::new("gzip").arg("-dc").arg(&gzip_path).output().unwrap();
    assert_eq!(unpacked.stdout.len(), 14_000);
    assert!(job["output"]["compressed_bytes"].as_u64().unwrap() < 14_000);

    assert_eq!(env.show(greet)["output"], "hi");
}

#[test]
fn files_errors_name_the_path() {
    let env = Env::new();
    let missing = env.path("missing.txt");
    let folder = env.path("folder");
    std::fs::create_dir(&folder).unwrap();
    // A socket file exists but cannot be opened for reading, even by root.
    let socket = env.path("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

    let cases = [
        (missing.clone(), format!("{} does not exist", missing.display())),
        (folder.clone(), format!("{} is a directory, not a file", folder.display())),
        (socket.clone(), format!("cannot read {}", socket.display())),
    ];
    let ids: Vec<i64> = cases
        .iter()
        .map(|(path, _)| env.dispatch(&["files", "sha256", "--params", &serde_json::json!({"path": path}).to_string()]))
        .collect();
    env.ok(&["run", "--once"]);

    for (id, (_, expected)) in ids.iter().zip(&cases) {
        let job = env.show(*id);
        assert_eq!(job["status"], "failed");
        assert_eq!(job["attempts"], 1, "a bad path is fatal");
        let error = job["last_error"].as_str().unwrap();
        assert!(error.starts_with(expected.as_str()), "expected {expected:?}, got {error:?}");
    }
}

#[test]
fn logs_record_job_lifecycle() {
    let env = Env::new();
    let good = env.dispatch(&["demo", "handle", "--params", "\"logged\""]);
    let bad = env.dispatch(&["demo", "fail", "--params", "\"nope\""]);
    let flaky = env.dispatch(&["demo", "flaky", "--params", "1"]);
    let _daemon = env.start_daemon(&[]);
    env.wait_for_status(good, "succeeded", LONG);
    env.wait_for_status(bad, "failed", LONG);
    env.wait_for_status(flaky, "succeeded", LONG);

    let read = |name: &str| {
        let path = env.path("logs").join(name);
        let mut text = String::new();
        wait_until(Duration::from_secs(5), || {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            text.contains(&format!("job_id={flaky}")) || name == "jobs-errors.log" && text.contains("job failed")
        });
        text
    };
    let jobs_log = read("jobs.log");
    for expected in [
        format!("job dispatched job_id={good} plugin=demo method=handle"),
        format!("job started job_id={good} plugin=demo method=handle attempt=1"),
        format!("handling \"logged\" job_id={good}"),
        format!("job succeeded job_id={good}"),
        format!("job failed; will retry job_id={flaky}"),
        format!("job failed job_id={bad}"),
    ] {
        assert!(jobs_log.contains(&expected), "jobs.log lacks {expected:?}:\n{jobs_log}");
    }
    let errors_log = read("jobs-errors.log");
    assert!(errors_log.contains(&format!("job failed job_id={bad}")), "{errors_log}");
    assert!(errors_log.lines().all(|line| line.contains("ERROR")), "jobs-errors.log has a line that is not an error:\n{errors_log}");
}

fn parse_time(value: &serde_json::Value) -> f64 {
    let text = value.as_str().expect("a timestamp string");
    let output = std::process::Command::new("date").args(["-u", "-d", text, "+%s.%N"]).output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().parse().unwrap()
}

#[test]
fn cancel_running_job_stops_it() {
    let env = Env::with_host(&TEST_HOST.replace("concurrency = 4", "concurrency = 1").replace("lease = \"2s\"", "lease = \"30s\""));
    let long = env.dispatch(&["demo", "sleep", "--params", "60000", "--then", "demo:handle:\"never\""]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(long, "running", LONG);

    let output = env.ok(&["cancel", &long.to_string()]);
    assert!(output.starts_with(&format!("cancelled job {long} (was running)")), "{output}");
    let child = env.show(long)["children"][0].as_i64().unwrap();
    assert_eq!(env.status(child), "cancelled");

    // The only worker is free again well before the 60 s sleep would end,
    // and long before the 10 s lease renewal: the cancel woke the daemon.
    let next = env.dispatch(&["demo", "handle", "--params", "\"next\""]);
    let started = std::time::Instant::now();
    env.wait_for_status(next, "succeeded", LONG);
    assert!(started.elapsed() < Duration::from_secs(5), "the cancelled run kept its worker for {:?}", started.elapsed());

    let job = env.show(long);
    assert_eq!(job["status"], "cancelled", "the late result must not overwrite the cancel: {job:#}");
    assert_eq!(job["last_error"], "cancelled by hand");
    let stopped = wait_until(LONG, || daemon.stderr().contains("result discarded"));
    assert!(stopped, "the daemon never discarded the cancelled run's result:\n{}", daemon.stderr());
    assert!(daemon.is_running());
}
