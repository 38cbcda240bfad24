//! End-to-end: the `jobhost` commands, and every bad input they reject.

mod common;

use common::{Env, build};

/// Asserts that stderr is one `error:` line containing `expected`.
fn assert_one_error_line(stderr: &str, expected: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(expected), "expected {expected:?} in {stderr:?}");
}

#[test]
fn dispatch_prints_only_the_id() {
    let env = Env::new();
    let output = env.ok(&["dispatch", "demo", "handle", "--params", "\"hi\""]);
    assert_eq!(output, "1\n");
    let output = env.ok(&["dispatch", "demo", "handle", "--params", "\"again\""]);
    assert_eq!(output, "2\n");
}

#[test]
fn bad_dispatch_input_writes_nothing() {
    let env = Env::new();
    let cases: &[(&[&str], &str)] = &[
        (&["dispatch", "demo", "update"], r#"plugin "demo": method "update" is not in the whitelist; add it to methods in jobs.toml"#),
        (&["dispatch", "mail", "send"], r#"plugin "mail" is not in jobs.toml"#),
        (&["dispatch", "demo", "handle", "--params", "hello"], r#"invalid --params "hello": not JSON"#),
        (&["dispatch", "demo", "handle", "--priority", "0"], r#"invalid --priority "0""#),
        (&["dispatch", "demo", "handle", "--priority", "11"], r#"invalid --priority "11""#),
        (&["dispatch", "demo", "handle", "--priority", "high"], r#"invalid --priority "high""#),
        (&["dispatch", "demo", "handle", "--delay", "-5s"], "a duration cannot be negative"),
        (&["dispatch", "demo", "handle", "--delay", "soon"], r#"invalid --delay "soon""#),
        (&["dispatch", "demo", "handle", "--then", "demo"], r#"invalid --then "demo""#),
        (&["dispatch", "demo", "handle", "--then", "demo:update"], r#"method "update" is not in the whitelist"#),
        (&["dispatch", "demo", "handle", "--then", "demo:handle:{oops"], r#"invalid --then "demo:handle:{oops": the params after PLUGIN:METHOD: are not JSON"#),
    ];
    for (args, expected) in cases {
        let stderr = env.fails(args);
        assert_one_error_line(&stderr, expected);
        assert!(!env.database().exists(), "jobhost {args:?} created the database");
    }
}

#[test]
fn bad_input_after_jobs_exist_changes_nothing() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "handle", "--params", "\"keep\""]);
    let before = std::fs::read(env.database()).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["dispatch", "demo", "update"], "not in the whitelist"),
        (&["show", "999"], "job 999 not found"),
        (&["cancel", "999"], "job 999 not found"),
        (&["retry", "999"], "job 999 not found"),
        (&["retry", &id.to_string()], &format!("job {id} is pending; only failed and cancelled jobs can be retried")),
        (&["list", "--status", "done"], r#"unknown status "done""#),
    ];
    for (args, expected) in cases {
        let stderr = env.fails(args);
        assert_one_error_line(&stderr, expected);
    }
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(env.status(id), "pending");
    drop(before);
}

#[test]
fn missing_config_is_one_line() {
    let env = Env::new();
    let missing = env.path("nowhere.toml");
    let output = std::process::Command::new(&build().jobhost)
        .current_dir(env.dir.path())
        .args(["--config", missing.to_str().unwrap(), "dispatch", "demo", "handle"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_one_error_line(&stderr, &format!("cannot read {}", missing.display()));
    assert!(stderr.contains("--config"), "the message says how to fix it: {stderr}");
}

#[test]
fn broken_config_names_the_line() {
    let env = Env::with_config("[host]\nconcurrency = 4\npoll_interval = \"1s\"\nlease = = 3\n");
    for command in [&["dispatch", "demo", "handle"][..], &["run", "--once"], &["check"], &["list"]] {
        let stderr = env.fails(command);
        assert_one_error_line(&stderr, "jobs.toml:4:");
        assert!(!env.database().exists());
    }
}

#[test]
fn config_problems_are_all_reported() {
    let demo = build().demo.display().to_string();
    let env = Env::with_config(&format!(
        r#"[host]
poll_interval = "fast"
backoff = "random"

[[plugin]]
name = "demo"
path = {demo:?}
methods = ["handle"]

[[plugin]]
name = "demo"
path = {demo:?}
methods = ["noop"]
"#
    ));
    let stderr = env.fails(&["check"]);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[0].contains("jobs.toml:2: poll_interval = \"fast\""), "{stderr}");
    assert!(lines[1].contains("jobs.toml:3: backoff = \"random\" is unknown"), "{stderr}");
    assert!(lines[2].contains("jobs.toml:11: duplicate plugin name \"demo\""), "{stderr}");
}

#[test]
fn plugin_problems_are_all_reported_at_start() {
    let build = build();
    let env = Env::with_config("");
    let text_file = env.path("notes.so");
    std::fs::write(&text_file, "not a library").unwrap();
    let missing = env.path("libgone.so");
    let plain_library = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("libm is installed");
    env.write_config(&format!(
        r#"[host]
database = "sqlite://jobs.db"

[[plugin]]
name = "gone"
path = {missing:?}
methods = ["a"]

[[plugin]]
name = "text"
path = {text:?}
methods = ["a"]

[[plugin]]
name = "libm"
path = {plain_library:?}
methods = ["cos"]

[[plugin]]
name = "demo"
path = {demo:?}
methods = ["handle", "resize", "update"]
"#,
        missing = missing.display().to_string(),
        text = text_file.display().to_string(),
        demo = build.demo.display().to_string(),
    ));

    for command in [&["check"][..], &["run"]] {
        let stderr = env.fails(command);
        let problems: Vec<&str> = stderr.lines().filter(|line| line.starts_with("error: ")).collect();
        assert_eq!(problems.len(), 4, "{stderr}");
        assert!(problems[0].contains(&format!("jobs.toml:5: plugin \"gone\": library {} does not exist", missing.display())), "{stderr}");
        assert!(problems[1].contains("plugin \"text\""), "{stderr}");
        assert!(problems[1].contains("cannot be loaded as a shared library"), "{stderr}");
        assert!(problems[2].contains(&format!("plugin \"libm\": {plain_library} is not a jobhost plugin")), "{stderr}");
        assert!(problems[3].contains("method \"resize\" is whitelisted but"), "{stderr}");
        assert!(problems[3].contains("does not export it"), "{stderr}");
    }
    assert!(!env.database().exists(), "a daemon that cannot start writes nothing");
}

#[test]
fn check_lists_plugins_and_methods() {
    let env = Env::new();
    let output = env.ok(&["check"]);
    assert!(output.contains("plugin demo 0.1.0"), "{output}");
    assert!(output.contains("whitelisted: fail, flaky, handle, noop, panic, record, sleep, whoami"), "{output}");
    assert!(output.contains("exported, not whitelisted: update"), "{output}");
    assert!(output.contains("plugin files 0.1.0"), "{output}");
}

#[test]
fn show_json_has_the_job_object() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "handle", "--params", "\"hi\"", "--priority", "3", "--delay", "1h"]);
    let job = env.show(id);
    for key in [
        "id", "plugin", "method", "params", "status", "priority", "attempts", "max_attempts", "run_at", "started_at",
        "finished_at", "output", "last_error", "parent_id",
    ] {
        assert!(job.get(key).is_some(), "show --json lacks {key}: {job:#}");
    }
    assert_eq!(job["id"], id);
    assert_eq!(job["params"], "hi");
    assert_eq!(job["priority"], 3);
    assert_eq!(job["status"], "pending");
    assert_eq!(job["max_attempts"], 3);
    let run_at = job["run_at"].as_str().unwrap();
    assert!(run_at.ends_with('Z'), "run_at is in UTC: {run_at}");
    assert!(run_at.contains('T'), "run_at is RFC 3339: {run_at}");

    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let listed = &listed.as_array().unwrap()[0];
    for (key, value) in listed.as_object().unwrap() {
        assert_eq!(&job[key], value, "list --json and show --json differ on {key}");
    }
}

#[test]
fn list_filters_and_pages() {
    let env = Env::new();
    let ids: Vec<i64> = (0..5).map(|n| env.dispatch(&["demo", "handle", "--params", &format!("\"{n}\"")])).collect();
    let other = env.dispatch(&["demo", "noop"]);
    env.ok(&["cancel", &ids[0].to_string()]);

    let json = |args: &[&str]| -> Vec<i64> {
        let mut full = vec!["list", "--json"];
        full.extend_from_slice(args);
        let value: serde_json::Value = serde_json::from_str(&env.ok(&full)).unwrap();
        value.as_array().unwrap().iter().map(|job| job["id"].as_i64().unwrap()).collect()
    };
    assert_eq!(json(&[]), vec![other, ids[4], ids[3], ids[2], ids[1], ids[0]]);
    assert_eq!(json(&["--status", "cancelled"]), vec![ids[0]]);
    assert_eq!(json(&["--method", "noop"]), vec![other]);
    assert_eq!(json(&["--limit", "2"]), vec![other, ids[4]]);
    assert_eq!(json(&["--limit", "2", "--before", &ids[4].to_string()]), vec![ids[3], ids[2]]);

    let table = env.ok(&["list", "--status", "pending"]);
    assert_eq!(table.lines().count(), 6, "a header and five jobs:\n{table}");
    assert!(table.contains("demo.noop"));
}

#[test]
fn cancel_pending_job_and_its_chain() {
    let env = Env::new();
    let head = env.dispatch(&["demo", "handle", "--params", "\"a\"", "--delay", "1h", "--then", "demo:handle:\"b\""]);
    let output = env.ok(&["cancel", &head.to_string()]);
    assert!(output.starts_with(&format!("cancelled job {head} (was pending)")), "{output}");
    let child = env.show(head)["children"][0].as_i64().unwrap();
    assert!(output.contains(&format!("also cancelled chained jobs {child}")), "{output}");
    assert_eq!(env.status(child), "cancelled");

    let stderr = env.fails(&["cancel", &head.to_string()]);
    assert_one_error_line(&stderr, &format!("job {head} has already been cancelled; nothing was changed"));
}

#[test]
fn retry_of_chained_job_names_its_parent() {
    let env = Env::new();
    let head = env.dispatch(&["demo", "handle", "--params", "\"a\"", "--delay", "1h", "--then", "demo:handle:\"b\""]);
    env.ok(&["cancel", &head.to_string()]);
    let child = env.show(head)["children"][0].as_i64().unwrap();

    let stderr = env.fails(&["retry", &child.to_string()]);
    assert_one_error_line(
        &stderr,
        &format!("job {child} is chained behind job {head}, which was cancelled; retry job {head} instead, and job {child} runs again after it succeeds"),
    );
    assert_eq!(env.status(child), "cancelled");

    let output = env.ok(&["retry", &head.to_string()]);
    assert!(output.contains(&format!("chained jobs {child} wait for it again")), "{output}");
}

#[test]
fn cancel_finished_job_changes_nothing() {
    let env = Env::new();
    let id = env.dispatch(&["demo", "handle", "--params", "\"done\""]);
    env.ok(&["run", "--once"]);
    let stderr = env.fails(&["cancel", &id.to_string()]);
    assert_one_error_line(&stderr, &format!("job {id} has already succeeded; nothing was changed"));
    assert_eq!(env.status(id), "succeeded");
    let stderr = env.fails(&["retry", &id.to_string()]);
    assert_one_error_line(
        &stderr,
        &format!("job {id} has succeeded; only failed and cancelled jobs can be retried. Dispatch it again to run it once more"),
    );
}

#[test]
fn retry_failed_job_runs_it_again() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let params = serde_json::json!({"file": file, "tag": "t", "fail": "fatal"}).to_string();
    let child = format!("demo:record:{}", serde_json::json!({"file": file, "tag": "child"}));
    let id = env.dispatch(&["demo", "record", "--params", &params, "--then", &child]);
    env.ok(&["run", "--once"]);
    assert_eq!(env.status(id), "failed");
    let child = env.show(id)["children"][0].as_i64().unwrap();
    assert_eq!(env.status(child), "cancelled");

    let output = env.ok(&["retry", &id.to_string()]);
    assert!(output.contains(&format!("job {id} is pending again (was failed), with 3 more attempts")), "{output}");
    assert_eq!(env.status(child), "waiting", "the chain waits for the retried job again");
    let job = env.show(id);
    assert_eq!(job["max_attempts"], 4);

    env.ok(&["run", "--once"]);
    assert_eq!(env.records(&file).len(), 2, "the retried job ran a second time");
    assert_eq!(env.show(id)["attempts"], 2);
}

#[test]
fn migrate_creates_the_database() {
    let env = Env::new();
    let output = env.ok(&["migrate"]);
    assert!(output.contains("schema is up to date"), "{output}");
    assert!(env.database().exists());
    env.ok(&["migrate"]);
}

#[test]
fn commands_on_a_missing_database_say_so() {
    let env = Env::new();
    let stderr = env.fails(&["list"]);
    assert_one_error_line(
        &stderr,
        &format!("database file {} does not exist; run `jobhost migrate` or dispatch a job to create it", env.database().display()),
    );
    assert!(!env.database().exists());
}

#[test]
fn prune_deletes_old_finished_jobs() {
    let env = Env::new();
    let done = env.dispatch(&["demo", "handle", "--params", "\"done\""]);
    env.ok(&["run", "--once"]);
    let waiting = env.dispatch(&["demo", "handle", "--params", "\"later\"", "--delay", "1h"]);

    let stderr = env.fails(&["prune", "--older-than", "-1d"]);
    assert_one_error_line(&stderr, r#"invalid --older-than "-1d": a duration cannot be negative"#);
    let output = env.ok(&["prune", "--older-than", "1h"]);
    assert_eq!(output, "deleted 0 jobs that ended more than 1h ago\n");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let output = env.ok(&["prune", "--older-than", "0s"]);
    assert_eq!(output, "deleted 1 jobs that ended more than 0s ago\n");

    let stderr = env.fails(&["show", &done.to_string()]);
    assert_one_error_line(&stderr, &format!("job {done} not found"));
    assert_eq!(env.status(waiting), "pending");
}

#[test]
fn list_into_closed_pipe_exits_quietly() {
    let env = Env::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let jobs = vec![jobhost::client::Job::new("demo", "handle").params("x"); 3000];
        client.dispatch_many(&jobs).await.unwrap();
    });
    let jobhost = build().jobhost.display().to_string();
    let config = env.config.display().to_string();
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{jobhost}' --config '{config}' list --json --limit 100000 | head -c 10 > /dev/null"))
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "nothing on stderr when the reader goes away: {stderr}");
}

#[test]
fn bench_analyze_needs_postgres() {
    let env = Env::new();
    let stderr = env.fails(&["bench", "--analyze", "--jobs", "10"]);
    assert!(stderr.contains("--analyze applies to PostgreSQL only"), "{stderr}");
    assert!(stderr.contains("--database postgres://"), "the message names the fix: {stderr}");
}
