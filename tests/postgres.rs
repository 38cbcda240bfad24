//! End-to-end on PostgreSQL: several real daemons share one queue.
//!
//! Each test gets its own schema on the local server. Without the server the
//! tests skip, unless `CI` is set, in which case they fail.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Env, TEST_HOST, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn host(concurrency: usize, lease: &str, poll_interval: &str) -> String {
    TEST_HOST
        .replace("concurrency = 4", &format!("concurrency = {concurrency}"))
        .replace("lease = \"2s\"", &format!("lease = {lease:?}"))
        .replace("poll_interval = \"200ms\"", &format!("poll_interval = {poll_interval:?}"))
}

/// Dispatches `count` `demo.record` jobs with `params_extra` merged in, in
/// batches through the Rust client, and returns their ids.
fn dispatch_records(env: &Env, file: &std::path::Path, count: usize, params_extra: serde_json::Value) -> Vec<i64> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let mut params = serde_json::json!({"file": file, "tag": "x"});
        params.as_object_mut().unwrap().extend(params_extra.as_object().unwrap().clone());
        let job = jobhost::client::Job::new("demo", "record").params(&params);
        let mut ids = Vec::with_capacity(count);
        for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
            ids.extend(client.dispatch_many(&vec![job.clone(); chunk.len()]).await.unwrap());
        }
        ids
    })
}

/// Counts the jobs per status with `jobhost list --json`.
fn status_counts(env: &Env) -> HashMap<String, usize> {
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--limit", "1000000", "--json"])).unwrap();
    let mut counts = HashMap::new();
    for job in listed.as_array().unwrap() {
        *counts.entry(job["status"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

/// Returns every job object from `jobhost list --json`, by id.
fn jobs_by_id(env: &Env) -> HashMap<i64, serde_json::Value> {
    let listed: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--limit", "1000000", "--json"])).unwrap();
    listed.as_array().unwrap().iter().map(|job| (job["id"].as_i64().unwrap(), job.clone())).collect()
}

/// Returns the runs the plugin recorded, per job id.
fn runs_per_job(env: &Env, file: &std::path::Path) -> HashMap<i64, Vec<u32>> {
    let mut runs: HashMap<i64, Vec<u32>> = HashMap::new();
    for (id, attempt, _) in env.records(file) {
        runs.entry(id).or_default().push(attempt);
    }
    runs
}

#[test]
fn three_daemons_drain_each_job_once() {
    let Some(env) = Env::postgres(&host(8, "30s", "1s"), str::to_owned) else { return };
    let file = env.path("runs.txt");
    const JOBS: usize = 20_000;
    let ids = dispatch_records(&env, &file, JOBS, serde_json::json!({}));

    let started = Instant::now();
    let daemons: Vec<_> = (0..3).map(|_| env.start_daemon(&[])).collect();
    let drained = wait_until(Duration::from_secs(180), || env.records(&file).len() >= JOBS);
    assert!(drained, "only {} of {JOBS} jobs ran", env.records(&file).len());
    let elapsed = started.elapsed();
    // Give a double run the chance to show up.
    std::thread::sleep(Duration::from_millis(500));

    let runs = runs_per_job(&env, &file);
    assert_eq!(runs.len(), JOBS, "every job ran");
    for id in &ids {
        assert_eq!(runs.get(id), Some(&vec![1]), "job {id} ran {:?}", runs.get(id));
    }
    let done = wait_until(LONG, || status_counts(&env).get("succeeded") == Some(&JOBS));
    assert!(done, "not every job was written as succeeded: {:?}", status_counts(&env));

    let mut busy_daemons = 0;
    for daemon in &daemons {
        let log = daemon.stderr();
        assert!(!log.contains("ERROR"), "a daemon logged an error:\n{log}");
        if log.contains("job started") {
            busy_daemons += 1;
        }
    }
    assert_eq!(busy_daemons, 3, "all three daemons took jobs");
    eprintln!("3 daemons drained {JOBS} jobs in {elapsed:?}");
}

#[test]
fn killed_daemon_jobs_are_rescued() {
    let Some(env) = Env::postgres(&host(4, "2s", "200ms"), str::to_owned) else { return };
    let file = env.path("runs.txt");
    const JOBS: usize = 300;
    let ids = dispatch_records(&env, &file, JOBS, serde_json::json!({"sleep_ms": 50}));

    let mut victim = env.start_daemon(&[]);
    let _others: Vec<_> = (0..2).map(|_| env.start_daemon(&[])).collect();
    let victim_ran = wait_until(LONG, || victim.stderr().matches("job started").count() >= 10);
    assert!(victim_ran, "the daemon to kill never started a job:\n{}", victim.stderr());
    victim.signal(libc::SIGKILL);
    victim.wait(LONG);

    let done = wait_until(LONG, || status_counts(&env).get("succeeded") == Some(&JOBS));
    assert!(done, "not every job succeeded: {:?}", status_counts(&env));

    let runs = runs_per_job(&env, &file);
    let jobs = jobs_by_id(&env);
    let mut rescued = 0;
    for id in &ids {
        let job = &jobs[id];
        let attempts = job["attempts"].as_u64().unwrap() as usize;
        let recorded = runs.get(id).map_or(0, Vec::len);
        if attempts == 1 {
            assert_eq!(recorded, 1, "job {id}: the plugin ran it {recorded} times in one attempt");
        } else {
            // The killed daemon may have claimed the job and died before its
            // worker process reached the plugin: that attempt is charged, and
            // nothing ran in it. No attempt may run the plugin twice.
            assert!(
                recorded == attempts || recorded + 1 == attempts,
                "job {id}: the plugin ran it {recorded} times, the job counts {attempts} attempts"
            );
        }
        if attempts > 1 {
            rescued += 1;
            let job = env.show(*id);
            let first_error = job["attempt_history"][0]["error"].as_str().unwrap_or_default();
            assert!(first_error.contains("lease of daemon"), "job {id}'s first attempt: {first_error:?}");
        }
    }
    assert!(rescued > 0, "the killed daemon had jobs running, so some jobs ran twice");
}

#[test]
fn daemons_survive_database_cut() {
    let server: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(server);
    let through_proxy = |url: &str| url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port()), 1);
    let Some(env) = Env::postgres(&host(4, "10s", "200ms"), through_proxy) else { return };
    let file = env.path("runs.txt");
    const JOBS: usize = 1000;

    // Dispatch around the proxy, before the daemons start.
    let direct = env.postgres_url();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ids = runtime.block_on(async {
        use jobhost::store::Store;
        let store = jobhost::store::PostgresStore::open(&direct, 2).await.unwrap();
        store.migrate().await.unwrap();
        let config = jobhost::config::Config::load(&env.config).unwrap();
        let job = jobhost::client::Job::new("demo", "record").params(&serde_json::json!({"file": file, "tag": "x", "sleep_ms": 20}));
        let chain = jobhost::client::prepare(&config, &job).unwrap();
        store.dispatch(&vec![chain; JOBS]).await.unwrap()
    });

    let mut daemons: Vec<_> = (0..2).map(|_| env.start_daemon(&[])).collect();
    let running = wait_until(LONG, || env.records(&file).len() >= 100);
    assert!(running, "the daemons never got going");
    proxy.cut();
    std::thread::sleep(Duration::from_secs(3));
    assert!(env.records(&file).len() < JOBS, "the cut should come while jobs remain");
    proxy.restore();
    let restored = Instant::now();

    let done = wait_until(Duration::from_secs(90), || status_counts(&env).get("succeeded") == Some(&JOBS));
    assert!(done, "not every job succeeded after the cut: {:?}", status_counts(&env));
    eprintln!("all jobs succeeded {:?} after the database came back", restored.elapsed());
    let runs = runs_per_job(&env, &file);
    let jobs = jobs_by_id(&env);
    for id in &ids {
        let attempts = jobs[id]["attempts"].as_u64().unwrap() as usize;
        assert_eq!(runs.get(id).map_or(0, Vec::len), attempts, "job {id}: runs and attempts differ");
    }
    for daemon in &mut daemons {
        assert!(daemon.is_running(), "a daemon exited:\n{}", daemon.stderr());
        let log = daemon.stderr();
        assert!(log.contains("failed"), "the cut should have been logged:\n{log}");
    }
}

#[test]
fn notify_wakes_idle_daemon() {
    // A 30 s poll interval: only the NOTIFY can start the job quickly.
    let Some(env) = Env::postgres(&host(2, "30s", "30s"), str::to_owned) else { return };
    let daemon = env.start_daemon(&[]);
    let ready = wait_until(LONG, || daemon.stderr().contains("daemon started"));
    assert!(ready, "{}", daemon.stderr());
    // The first poll happens at start; let it pass before dispatching.
    std::thread::sleep(Duration::from_millis(500));

    let id = env.dispatch(&["demo", "handle", "--params", "\"wake up\""]);
    let started = Instant::now();
    env.wait_for_status(id, "succeeded", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5), "the job waited {:?} for a poll", started.elapsed());
}

#[test]
fn rolled_back_dispatch_never_runs() {
    let Some(env) = Env::postgres(TEST_HOST, str::to_owned) else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (kept, dropped) = runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let pool = sqlx::PgPool::connect(&env.postgres_url()).await.unwrap();

        let mut rolled_back = pool.begin().await.unwrap();
        let dropped = client.dispatch_in(&mut rolled_back, jobhost::client::Job::new("demo", "handle").params("dropped")).await.unwrap();
        rolled_back.rollback().await.unwrap();

        let mut committed = pool.begin().await.unwrap();
        let kept = client.dispatch_in(&mut committed, jobhost::client::Job::new("demo", "handle").params("kept")).await.unwrap();
        committed.commit().await.unwrap();
        (kept, dropped)
    });

    env.ok(&["run", "--once"]);
    assert_eq!(env.show(kept)["output"], "kept");
    let stderr = env.fails(&["show", &dropped.to_string()]);
    assert!(stderr.contains(&format!("job {dropped} not found")), "{stderr}");
}

#[test]
fn dispatch_in_needs_postgres() {
    let env = Env::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(schema) = runtime.block_on(jobhost_test_support::postgres_schema()) else { return };
    let error = runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&schema.url()).await.unwrap();
        client.dispatch_in(&mut connection, jobhost::client::Job::new("demo", "handle")).await.unwrap_err()
    });
    assert!(error.to_string().starts_with("dispatching inside a caller's transaction needs a PostgreSQL database"), "{error}");
}

#[test]
fn cli_works_on_postgres() {
    let Some(env) = Env::postgres(TEST_HOST, str::to_owned) else { return };
    let head = env.dispatch(&["demo", "flaky", "--params", "1", "--priority", "2", "--then", "demo:handle:\"next\""]);
    let delayed = env.dispatch(&["demo", "handle", "--params", "\"later\"", "--delay", "1h"]);
    let stderr = env.fails(&["dispatch", "demo", "update"]);
    assert!(stderr.contains("not in the whitelist"), "{stderr}");

    let daemon = env.start_daemon(&[]);
    let job = env.wait_for_status(head, "succeeded", LONG);
    assert_eq!(job["attempts"], 2);
    let child = job["children"][0].as_i64().unwrap();
    env.wait_for_status(child, "succeeded", LONG);
    assert_eq!(env.status(delayed), "pending");

    let output = env.ok(&["cancel", &delayed.to_string()]);
    assert!(output.contains("(was pending)"), "{output}");
    let output = env.ok(&["retry", &delayed.to_string()]);
    assert!(output.contains("is pending again"), "{output}");
    env.wait_for_status(delayed, "succeeded", LONG);
    drop(daemon);
}

#[test]
fn listener_reconnects_after_cut() {
    let server: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(server);
    let through_proxy = |url: &str| url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port()), 1);
    // A 60 s poll interval: after the cut, only a re-established LISTEN can
    // start a new job quickly.
    let Some(env) = Env::postgres(&host(2, "30s", "60s"), through_proxy) else { return };
    let mut daemon = env.start_daemon(&[]);
    let schema = env.schema.as_ref().unwrap().name.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listeners_since = |since: &str| -> i64 {
        runtime.block_on(async {
            let pool = sqlx::PgPool::connect(&env.postgres_url()).await.unwrap();
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE query ILIKE 'LISTEN%' AND query LIKE '%' || $1 || '%' AND backend_start > $2::timestamptz",
            )
            .bind(&schema)
            .bind(since)
            .fetch_one(&pool)
            .await
            .unwrap()
        })
    };
    let listening = wait_until(LONG, || listeners_since("-infinity") == 1);
    assert!(listening, "the daemon never listened:\n{}", daemon.stderr());

    proxy.cut();
    std::thread::sleep(Duration::from_secs(2));
    let restored_at: String = runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&env.postgres_url()).await.unwrap();
        sqlx::query_scalar("SELECT now()::text").fetch_one(&pool).await.unwrap()
    });
    proxy.restore();

    let relistened = wait_until(LONG, || listeners_since(&restored_at) == 1);
    assert!(relistened, "the daemon did not listen again after the cut:\n{}", daemon.stderr());
    let id = env.dispatch(&["demo", "handle", "--params", "\"after the cut\""]);
    let started = Instant::now();
    env.wait_for_status(id, "succeeded", Duration::from_secs(20));
    assert!(started.elapsed() < Duration::from_secs(5), "the job waited {:?} for a poll", started.elapsed());
    assert!(daemon.is_running());
}

/// A result writer that cannot write (here, `job_attempts` locked by another
/// transaction) stops the claims once a full batch of results waits. The
/// waiting jobs stay `running` and their leases are not renewed, so claims
/// that ran on would leave ever more jobs to expire and run again.
#[test]
fn claims_pause_while_results_wait() {
    const JOBS: usize = 1_500;
    let config = format!("{}max_attempts = 1\n", host(2, "60s", "200ms"));
    let Some(env) = Env::postgres(&config, str::to_owned) else { return };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The pool's connections are dropped with this context.
    let _context = runtime.enter();
    let pool = runtime.block_on(async {
        let client = jobhost::client::Client::open(&env.config).await.unwrap();
        let job = jobhost::client::Job::new("demo", "fail").params("writer blocked");
        client.dispatch_many(&vec![job; JOBS]).await.unwrap();
        sqlx::PgPool::connect(&env.postgres_url()).await.unwrap()
    });
    let count = |status: &str| -> i64 {
        runtime.block_on(sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = $1").bind(status).fetch_one(&pool)).unwrap()
    };

    // A failure writes an attempt row, which waits for this lock.
    let mut lock = runtime.block_on(pool.begin()).unwrap();
    runtime.block_on(sqlx::query("LOCK TABLE job_attempts IN SHARE MODE").execute(&mut *lock)).unwrap();
    let daemon = env.start_daemon(&[]);
    let reached = wait_until(LONG, || count("running") >= 1_000);
    std::thread::sleep(Duration::from_secs(2));
    let (running, pending) = (count("running"), count("pending"));
    // Released before asserting, so that a failure cannot leave the schema locked.
    runtime.block_on(lock.rollback()).unwrap();
    assert!(reached, "the daemon did not run 1,000 jobs: {running} running; {}", daemon.stderr());
    assert!(running <= 1_004, "{running} jobs claimed while the writer could not write");
    assert!(pending >= (JOBS - 1_004) as i64, "pending jobs: {pending}");

    let drained = wait_until(LONG, || count("failed") == JOBS as i64);
    assert!(drained, "failed jobs: {} of {JOBS}; {}", count("failed"), daemon.stderr());
    let attempts: i64 = runtime.block_on(sqlx::query_scalar("SELECT count(*) FROM job_attempts").fetch_one(&pool)).unwrap();
    assert_eq!(attempts, JOBS as i64, "each job ran once");
}
