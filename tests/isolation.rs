//! Process isolation end to end: the real daemon, its worker processes and
//! the demo plugin's crashing, looping and hogging methods.

mod common;

use std::time::{Duration, Instant};

use common::{Env, TEST_HTTP, build, wait_until};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

/// Writes a jobs.toml with the demo plugin twice: as `demo` in worker processes
/// (the default), and as `inproc` in the daemon's own threads. `hog` only
/// ever runs under a memory limit.
fn env(host: &str, demo_tables: &str) -> Env {
    let demo = build().demo.display().to_string();
    let lease = if host.contains("lease") { "" } else { "lease = \"2s\"" };
    Env::with_config(&format!(
        r#"[host]
database = "sqlite://jobs.db"
poll_interval = "200ms"
{lease}
shutdown_grace = "1s"
retry_delay = "100ms"
max_attempts = 1
log_dir = "logs"
{host}

[http]
{TEST_HTTP}

[[plugin]]
name = "demo"
path = {demo:?}
methods = ["handle", "pid", "sleep", "record", "panic", "segfault", "abort", "exit", "spin", "hog"]

[plugin.method.hog]
memory_limit = "128MiB"
{demo_tables}

[[plugin]]
name = "inproc"
path = {demo:?}
methods = ["pid", "sleep", "record"]
isolation = "inprocess"
"#
    ))
}

/// Returns the pids of the worker processes of the daemon `parent`.
fn worker_pids(parent: i32) -> Vec<i32> {
    let marker = format!("worker\0--parent\0{parent}\0");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&marker) && is_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// True if `pid` exists and is not a zombie.
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn last_error(job: &Value) -> &str {
    job["last_error"].as_str().unwrap_or_default()
}

#[test]
fn each_crash_kind_is_contained() {
    let env = env("concurrency = 2", "");
    let segfault = env.dispatch(&["demo", "segfault"]);
    let abort = env.dispatch(&["demo", "abort"]);
    let exit = env.dispatch(&["demo", "exit", "--params", "7"]);
    let hog = env.dispatch(&["demo", "hog"]);
    let mut daemon = env.start_daemon(&[]);

    let job = env.wait_for_status(segfault, "failed", LONG);
    assert!(last_error(&job).contains("was killed by signal 11 (SIGSEGV"), "{job:#}");
    let job = env.wait_for_status(abort, "failed", LONG);
    assert!(last_error(&job).contains("was killed by signal 6 (SIGABRT"), "{job:#}");
    let job = env.wait_for_status(exit, "failed", LONG);
    assert!(last_error(&job).contains("exited with code 7 while it ran the job"), "{job:#}");
    let job = env.wait_for_status(hog, "failed", LONG);
    let error = last_error(&job);
    assert!(error.contains("ran out of memory: the job needed more than memory_limit = \"128MiB\""), "{job:#}");
    assert!(error.contains("memory allocation of"), "the worker's last words are quoted: {job:#}");

    // The daemon lives on and still runs jobs, in fresh workers.
    assert!(daemon.is_running(), "{}", daemon.stderr());
    let after = env.dispatch(&["demo", "handle", "--params", "\"still here\""]);
    let job = env.wait_for_status(after, "succeeded", LONG);
    assert_eq!(job["output"], "still here");
    assert!(daemon.stderr().contains("a new worker will take the next job"), "{}", daemon.stderr());

    let metrics = common::http(daemon.http_address(), "GET", "/metrics", &[], "").body;
    assert!(metrics.contains("jobhost_worker_deaths_total{cause=\"crashed\"} 4"), "{metrics}");
    assert!(metrics.contains("jobhost_worker_processes 1"), "{metrics}");
}

#[test]
fn crashed_worker_is_replaced_for_the_next_job() {
    let env = env("concurrency = 1", "");
    let first = env.dispatch(&["demo", "pid"]);
    let crash = env.dispatch(&["demo", "segfault"]);
    let next = env.dispatch(&["demo", "pid"]);
    let daemon = env.start_daemon(&[]);

    let first_pid = env.wait_for_status(first, "succeeded", LONG)["output"].as_i64().unwrap();
    let job = env.wait_for_status(crash, "failed", LONG);
    assert!(last_error(&job).starts_with(&format!("worker process {first_pid} was killed by signal 11")), "{job:#}");
    let next_pid = env.wait_for_status(next, "succeeded", LONG)["output"].as_i64().unwrap();
    assert_ne!(next_pid, first_pid, "the dead worker cannot have run the next job");
    assert_ne!(next_pid, i64::from(daemon.pid()), "the job ran in a worker, not in the daemon");
}

#[test]
fn isolation_setting_picks_where_a_job_runs() {
    let env = env("concurrency = 1\nmax_jobs_per_worker = 2", "");
    let isolated: Vec<i64> = (0..5).map(|_| env.dispatch(&["demo", "pid"])).collect();
    let inproc = env.dispatch(&["inproc", "pid"]);
    let daemon = env.start_daemon(&[]);

    let pids: Vec<i64> = isolated.iter().map(|&id| env.wait_for_status(id, "succeeded", LONG)["output"].as_i64().unwrap()).collect();
    let daemon_pid = i64::from(daemon.pid());
    assert_eq!(env.wait_for_status(inproc, "succeeded", LONG)["output"].as_i64(), Some(daemon_pid));
    assert!(!pids.contains(&daemon_pid), "{pids:?}");
    // One worker at a time, each replaced after two jobs.
    assert_eq!(pids[0], pids[1], "{pids:?}");
    assert_eq!(pids[2], pids[3], "{pids:?}");
    assert_ne!(pids[0], pids[2], "{pids:?}");
    assert_ne!(pids[2], pids[4], "{pids:?}");
    assert_ne!(pids[0], pids[4], "{pids:?}");
}

#[test]
fn timeout_kills_a_looping_job() {
    let env = env("concurrency = 1", "[plugin.method.spin]\ntimeout = \"1s\"\n");
    let spin = env.dispatch(&["demo", "spin"]);
    let daemon = env.start_daemon(&[]);

    let job = env.wait_for_status(spin, "running", LONG);
    let started = Instant::now();
    let spinner = {
        let mut found = Vec::new();
        wait_until(LONG, || {
            found = worker_pids(daemon.pid());
            !found.is_empty()
        });
        found
    };
    assert_eq!(spinner.len(), 1, "one worker runs the job: {spinner:?}; job {job:#}");
    let job = env.wait_for_status(spin, "failed", LONG);
    assert!(started.elapsed() < Duration::from_secs(2), "the run ended {:?} after it was seen running", started.elapsed());
    assert!(last_error(&job).starts_with("timed out after 1s"), "{job:#}");
    let attempt = &job["attempt_history"][0];
    assert!(attempt["duration_ms"].as_f64().unwrap() < 2000.0, "within the timeout plus one second: {job:#}");
    assert!(wait_until(Duration::from_secs(2), || !is_alive(spinner[0])), "the looping worker {} was not killed", spinner[0]);

    // The only slot is free again.
    let next = env.dispatch(&["demo", "handle", "--params", "\"after\""]);
    env.wait_for_status(next, "succeeded", LONG);
}

#[test]
fn in_process_timeout_asks_the_job_to_stop() {
    let env = env("concurrency = 1", "");
    std::fs::write(
        &env.config,
        std::fs::read_to_string(&env.config).unwrap() + "\n[plugin.method.sleep]\ntimeout = \"300ms\"\n",
    )
    .unwrap();
    let sleep = env.dispatch(&["inproc", "sleep", "--params", "10000"]);
    let daemon = env.start_daemon(&[]);
    let job = env.wait_for_status(sleep, "failed", LONG);
    assert!(last_error(&job).starts_with("timed out after 300ms"), "{job:#}");
    assert!(worker_pids(daemon.pid()).is_empty(), "an in-process job starts no worker");
    // The sleep saw the cancellation; its thread was replaced meanwhile.
    let next = env.dispatch(&["inproc", "pid"]);
    env.wait_for_status(next, "succeeded", LONG);
    let returned = format!("job_id={sleep} plugin=inproc method=sleep attempt=1");
    assert!(
        wait_until(LONG, || daemon.stderr().lines().any(|line| line.contains("returned after its run was reported") && line.contains(&returned))),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn cancel_kills_an_isolated_job() {
    let env = env("concurrency = 1\nlease = \"30s\"", "");
    let spin = env.dispatch(&["demo", "spin", "--then", "demo:handle:\"never\""]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(spin, "running", LONG);
    let mut spinner = Vec::new();
    assert!(wait_until(LONG, || {
        spinner = worker_pids(daemon.pid());
        !spinner.is_empty()
    }));

    let output = env.ok(&["cancel", &spin.to_string()]);
    assert!(output.starts_with(&format!("cancelled job {spin} (was running)")), "{output}");
    let child = env.show(spin)["children"][0].as_i64().unwrap();
    assert_eq!(env.status(child), "cancelled");
    assert!(wait_until(Duration::from_secs(5), || !is_alive(spinner[0])), "the cancelled job's worker {} still runs", spinner[0]);

    let next = env.dispatch(&["demo", "handle", "--params", "\"next\""]);
    env.wait_for_status(next, "succeeded", LONG);
    let job = env.show(spin);
    assert_eq!(job["status"], "cancelled", "the killed worker's failure must not overwrite the cancel: {job:#}");
    assert_eq!(job["last_error"], "cancelled by hand");
    assert!(daemon.is_running());

    // Cancelling it again changes nothing, and reports that.
    let output = env.fails(&["cancel", &spin.to_string()]);
    assert!(output.contains(&format!("job {spin} has already been cancelled; nothing was changed")), "{output}");
}

#[test]
fn late_in_process_result_after_cancel_is_discarded() {
    let env = env("concurrency = 1\nlease = \"30s\"", "");
    let file = env.path("runs.txt");
    // `record` sleeps without looking at cancellation, so its result arrives after the cancel.
    let params = serde_json::json!({"file": file, "tag": "late", "sleep_ms": 1500}).to_string();
    let id = env.dispatch(&["inproc", "record", "--params", &params]);
    let daemon = env.start_daemon(&[]);
    assert!(wait_until(LONG, || env.records(&file).len() == 1), "the job never ran");

    env.ok(&["cancel", &id.to_string()]);
    assert!(wait_until(LONG, || daemon.stderr().contains("result discarded")), "{}", daemon.stderr());
    let job = env.show(id);
    assert_eq!(job["status"], "cancelled", "{job:#}");
    assert_eq!(job["last_error"], "cancelled by hand");
}

#[test]
fn graceful_shutdown_hands_back_and_leaves_no_worker() {
    let env = env("concurrency = 2", "");
    let spins = [env.dispatch(&["demo", "spin"]), env.dispatch(&["demo", "spin"])];
    let waiting = env.dispatch(&["demo", "handle", "--params", "\"later\""]);
    let mut daemon = env.start_daemon(&[]);
    for &id in &spins {
        env.wait_for_status(id, "running", LONG);
    }
    let mut workers = Vec::new();
    assert!(wait_until(LONG, || {
        workers = worker_pids(daemon.pid());
        workers.len() == 2
    }));
    let parent = daemon.pid();

    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0), "{}", daemon.stderr());
    for &id in &spins {
        let job = env.show(id);
        assert_eq!(job["status"], "pending", "handed back: {job:#}");
        assert_eq!(job["attempts"], 0, "a handed-back run is not charged: {job:#}");
    }
    assert_eq!(env.status(waiting), "pending");
    assert!(workers.iter().all(|&pid| !is_alive(pid)), "workers {workers:?} outlived the daemon");
    assert!(worker_pids(parent).is_empty());
}

#[test]
fn workers_die_with_a_killed_daemon() {
    let env = env("concurrency = 1", "");
    let spin = env.dispatch(&["demo", "spin"]);
    let mut daemon = env.start_daemon(&[]);
    env.wait_for_status(spin, "running", LONG);
    let mut workers = Vec::new();
    assert!(wait_until(LONG, || {
        workers = worker_pids(daemon.pid());
        !workers.is_empty()
    }));

    daemon.signal(libc::SIGKILL);
    daemon.wait(LONG);
    assert!(wait_until(Duration::from_secs(5), || !is_alive(workers[0])), "worker {} kept spinning after the daemon died", workers[0]);
}

#[test]
fn check_shows_where_methods_run() {
    let env = env("", "");
    let output = env.ok(&["check"]);
    assert!(output.contains("  memory limits: hog 128MiB\n"), "{output}");
    assert!(output.contains("plugin inproc 0.1.0"), "{output}");
    assert!(output.contains("  in-process (not isolated): pid, record, sleep\n"), "{output}");

    let mut daemon = env.start_daemon(&[]);
    let address = daemon.http_address();
    let output = env.ok(&["plugins"]);
    assert!(output.contains("    memory limits: hog 128MiB\n"), "{output}");
    assert!(output.contains("    in-process (not isolated): pid, record, sleep\n"), "{output}");

    let page = common::http(address, "GET", "/plugins", &[], "").body;
    assert!(page.contains("<td class=\"memory-limit\">128MiB</td>"), "{page}");
    assert!(page.contains("<td class=\"isolation\">inprocess</td>"), "{page}");
    assert!(page.contains("<td class=\"isolation\">process</td>"), "{page}");
}

#[test]
fn logs_and_progress_cross_the_pipe() {
    let env = env("concurrency = 1", "");
    let greet = env.dispatch(&["demo", "handle", "--params", "\"over the pipe\""]);
    let sleep = env.dispatch(&["demo", "sleep", "--params", "4000"]);
    let daemon = env.start_daemon(&[]);

    env.wait_for_status(greet, "succeeded", LONG);
    let logged = format!("handling \"over the pipe\" job_id={greet} plugin=demo method=handle attempt=1");
    assert!(wait_until(LONG, || daemon.stderr().contains(&logged)), "{}", daemon.stderr());

    // Progress reaches the table with the lease renewals, every third of the 2 s lease.
    let mut job = Value::Null;
    let reported = wait_until(LONG, || {
        job = env.show(sleep);
        job["status"] == "running" && job["progress"].as_f64().is_some_and(|progress| progress > 0.0)
    });
    assert!(reported, "no progress while running: {job:#}");
    env.wait_for_status(sleep, "succeeded", LONG);
}

#[test]
fn reload_starts_fresh_workers() {
    let env = env("concurrency = 1", "");
    let before = env.dispatch(&["demo", "pid"]);
    let daemon = env.start_daemon(&[]);
    let old_worker = env.wait_for_status(before, "succeeded", LONG)["output"].as_i64().unwrap();
    assert!(is_alive(old_worker as i32), "the idle worker stays for the next job");

    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, config.replace("\"hog\"]", "\"hog\", \"whoami\"]")).unwrap();
    assert!(wait_until(LONG, || daemon.stderr().contains("reloaded jobs.toml and plugins")), "{}", daemon.stderr());

    let after = env.dispatch(&["demo", "pid"]);
    let new_worker = env.wait_for_status(after, "succeeded", LONG)["output"].as_i64().unwrap();
    assert_ne!(new_worker, old_worker, "a job after the reload runs in a new worker");
    assert!(wait_until(Duration::from_secs(5), || !is_alive(old_worker as i32)), "the worker from before the reload was not retired");
}

#[test]
fn worker_output_carries_its_job_id() {
    let env = env("concurrency = 1", "");
    let first = env.dispatch(&["demo", "panic", "--params", "\"first words\""]);
    let next = env.dispatch(&["demo", "panic", "--params", "\"second words\""]);
    let daemon = env.start_daemon(&[]);
    env.wait_for_status(first, "failed", LONG);
    env.wait_for_status(next, "failed", LONG);

    for (id, words) in [(first, "first words"), (next, "second words")] {
        let expected = format!("worker output: {words} job_id={id} ");
        assert!(wait_until(LONG, || daemon.stderr().contains(&expected)), "no {expected:?} in:\n{}", daemon.stderr());
    }
}

#[test]
fn dead_idle_worker_costs_no_attempt() {
    let env = env("concurrency = 1", "");
    let first = env.dispatch(&["demo", "pid"]);
    let mut daemon = env.start_daemon(&[]);
    let idle = env.wait_for_status(first, "succeeded", LONG)["output"].as_i64().unwrap() as i32;

    // SAFETY: kill has no memory-safety requirements; the pid is the idle worker's.
    assert_eq!(unsafe { libc::kill(idle, libc::SIGKILL) }, 0);
    assert!(wait_until(LONG, || !is_alive(idle)));
    let next = env.dispatch(&["demo", "pid"]);
    let job = env.wait_for_status(next, "succeeded", LONG);
    assert_eq!(job["attempts"], 1, "the job never reached the dead worker: {job:#}");
    assert_ne!(job["output"].as_i64(), Some(i64::from(idle)));

    let expected = format!("idle worker process {idle} was killed by signal 9 (SIGKILL) before it received the job; starting another worker");
    assert!(daemon.stderr().contains(&expected), "{}", daemon.stderr());
    let metrics = common::http(daemon.http_address(), "GET", "/metrics", &[], "").body;
    assert!(!metrics.contains("jobhost_worker_deaths_total{cause=\"crashed\"}"), "not a death during a job: {metrics}");
}

#[test]
fn workers_are_named_in_ps() {
    let env = env("concurrency = 1", "");
    let first = env.dispatch(&["demo", "pid"]);
    let _daemon = env.start_daemon(&[]);
    let worker = env.wait_for_status(first, "succeeded", LONG)["output"].as_i64().unwrap();

    let name = std::fs::read_to_string(format!("/proc/{worker}/comm")).unwrap();
    assert_eq!(name.trim(), "jobhost-worker");
    let cmdline = std::fs::read_to_string(format!("/proc/{worker}/cmdline")).unwrap();
    let program = cmdline.split('\0').next().unwrap();
    assert_eq!(std::path::Path::new(program), build().jobhost, "argv[0] is the binary's path");
}

#[test]
fn worker_runs_jobs_with_stderr_closed() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let mut worker = Command::new(&build().jobhost)
        .args(["worker", "--parent", &std::process::id().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    // The read end of its stderr is closed, so each write there fails with EPIPE.
    drop(worker.stderr.take());
    let request = serde_json::json!({
        "job_id": 7, "attempt": 1, "library": build().demo, "method": "handle", "params": "\"still runs\"",
    });
    let mut input = worker.stdin.take().unwrap();
    writeln!(input, "{request}").unwrap();

    let mut output = BufReader::new(worker.stdout.take().unwrap());
    let mut replies = Vec::new();
    let mut line = String::new();
    while output.read_line(&mut line).unwrap() > 0 {
        let reply: Value = serde_json::from_str(&line).unwrap();
        line.clear();
        let done = reply["kind"] != "log" && reply["kind"] != "progress";
        replies.push(reply);
        if done {
            break;
        }
    }
    drop(input);
    assert_eq!(replies.last().map(|reply| reply["kind"].clone()), Some(Value::from("succeeded")), "{replies:?}");
    assert_eq!(replies.last().unwrap()["output"], "\"still runs\"");
    assert!(worker.wait().unwrap().success(), "the worker exits cleanly when stdin closes");
}
