//! End-to-end: the HTTP server of `jobhost run`, driven over real sockets.
//! The JSON API with every error status, the token, the cross-site and Host
//! checks, the pages' escaping, `/metrics`, `/healthz` and the start-up checks.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Daemon, Env, HttpResponse, http, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);
const TOKEN: &str = "test-token-0123456789abcdef";
const JSON: (&str, &str) = ("Content-Type", "application/json");

/// Starts a daemon that serves HTTP on a free port, and returns it with that address.
fn serve(env: &Env) -> (Daemon, SocketAddr) {
    let mut daemon = env.start_daemon(&[]);
    let address = daemon.http_address();
    (daemon, address)
}

fn post_job(address: SocketAddr, body: &Value) -> HttpResponse {
    http(address, "POST", "/api/jobs", &[JSON], &body.to_string())
}

/// Asserts the status and that the body is `{"error": ...}` containing `expected`.
fn assert_error(response: &HttpResponse, status: u16, expected: &str) {
    assert_eq!(response.status, status, "{response:#?}");
    let error = response.json()["error"].as_str().map(str::to_owned);
    let error = error.unwrap_or_else(|| panic!("no error message in {}", response.body));
    assert!(error.contains(expected), "expected {expected:?} in {error:?}");
}

/// Waits until the API reports `status` for job `id`.
fn wait_for_api_status(address: SocketAddr, id: i64, status: &str) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(LONG, || {
        last = http(address, "GET", &format!("/api/jobs/{id}"), &[], "").json();
        last["status"] == status
    });
    assert!(reached, "job {id} did not reach {status}; last seen: {last:#}");
    last
}

// ---------------------------------------------------------------------------
// JSON API
// ---------------------------------------------------------------------------

#[test]
fn api_dispatch_runs_job_and_chain() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);

    let response = post_job(
        address,
        &json!({
            "plugin": "demo", "method": "handle", "params": "head", "priority": 2, "delay": 0.2,
            "chain": [{"plugin": "demo", "method": "handle", "params": "tail"}]
        }),
    );

    assert_eq!(response.status, 201, "{response:#?}");
    let id = response.json()["id"].as_i64().expect("the id is a number");
    assert_eq!(response.header("location"), Some(format!("/api/jobs/{id}").as_str()));
    let head = wait_for_api_status(address, id, "succeeded");
    assert_eq!(head["priority"], 2);
    assert_eq!(head["output"], "head");
    let children = head["children"].as_array().expect("children is an array");
    assert_eq!(children.len(), 1, "{head:#}");
    let tail = wait_for_api_status(address, children[0].as_i64().unwrap(), "succeeded");
    assert_eq!(tail["parent_id"], id);
    assert_eq!(tail["priority"], 2, "chained jobs take the head's priority");
}

#[test]
fn api_dispatch_rejects_bad_input() {
    let env = Env::new();
    let (mut daemon, address) = serve(&env);
    let cases = [
        (json!({"plugin": "demo"}), 400, "missing field `method`"),
        (json!({"plugin": "demo", "method": "handle", "colour": "red"}), 400, "unknown field `colour`"),
        (json!({"plugin": "demo", "method": "handle", "priority": 0}), 400, "invalid priority 0"),
        (json!({"plugin": "demo", "method": "handle", "priority": 11}), 400, "invalid priority 11"),
        (json!({"plugin": "demo", "method": "handle", "priority": "high"}), 400, "invalid job"),
        (json!({"plugin": "demo", "method": "handle", "delay": -1}), 400, "invalid delay -1"),
        (json!({"plugin": "demo", "method": "handle", "delay": 1e12}), 400, "at most 31622400 seconds"),
        (json!({"plugin": "demo", "method": "handle", "chain": [{"plugin": "demo"}]}), 400, "missing field `method`"),
        (json!({"plugin": "demo", "method": "handle", "chain": [{"plugin": "demo", "method": "handle", "delay": -2}]}), 400, "invalid chain[0].delay"),
        (json!({"plugin": "demo", "method": "update"}), 403, "method \"update\" is not in the whitelist"),
        (json!({"plugin": "mail", "method": "send"}), 403, "plugin \"mail\" is not in jobs.toml"),
        (json!({"plugin": "demo", "method": "handle", "chain": [{"plugin": "demo", "method": "update"}]}), 403, "not in the whitelist"),
    ];
    for (body, status, expected) in &cases {
        assert_error(&post_job(address, body), *status, expected);
    }
    assert_error(&http(address, "POST", "/api/jobs", &[JSON], "{not json"), 400, "invalid job");
    assert_error(&http(address, "POST", "/api/jobs", &[], r#"{"plugin": "demo", "method": "handle"}"#), 415, "Content-Type: application/json");
    assert_error(&http(address, "POST", "/api/jobs", &[("Content-Type", "text/plain")], "{}"), 415, "application/json");

    let listed = http(address, "GET", "/api/jobs", &[], "").json();
    assert_eq!(listed["jobs"], json!([]), "a rejected dispatch wrote a job");
    assert!(daemon.is_running(), "bad input must not stop the daemon");
}

#[test]
fn api_job_matches_show_json() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let id = env.dispatch(&["demo", "flaky", "--params", "1", "--then", "demo:handle:\"after\""]);
    wait_for_api_status(address, id, "succeeded");

    let response = http(address, "GET", &format!("/api/jobs/{id}"), &[], "");

    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.json(), env.show(id), "GET /api/jobs/ID returns the object of show --json");
    assert_eq!(response.json()["attempt_history"].as_array().unwrap().len(), 2);
}

#[test]
fn api_unknown_and_invalid_ids() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    for (method, path) in [("GET", "/api/jobs/999"), ("POST", "/api/jobs/999/cancel"), ("POST", "/api/jobs/999/retry")] {
        assert_error(&http(address, method, path, &[], ""), 404, "job 999 not found");
    }
    for (method, path) in [("GET", "/api/jobs/abc"), ("POST", "/api/jobs/-3/cancel"), ("POST", "/api/jobs/0/retry")] {
        assert_error(&http(address, method, path, &[], ""), 400, "invalid job id");
    }
    assert_error(&http(address, "GET", "/api/queues", &[], ""), 404, "no such API endpoint");
    assert_eq!(http(address, "DELETE", "/api/jobs/1", &[], "").status, 405);
}

#[test]
fn api_cancel_and_retry_follow_job_state() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let delayed = post_job(address, &json!({"plugin": "demo", "method": "handle", "params": "later", "delay": 3600, "chain": [{"plugin": "demo", "method": "handle", "params": "next"}]})).json()["id"].as_i64().unwrap();

    assert_error(&http(address, "POST", &format!("/api/jobs/{delayed}/retry"), &[], ""), 409, "is pending; only failed and cancelled jobs can be retried");
    let cancelled = http(address, "POST", &format!("/api/jobs/{delayed}/cancel"), &[], "");
    assert_eq!(cancelled.status, 200, "{cancelled:#?}");
    assert_eq!(cancelled.json()["previous_status"], "pending");
    assert_eq!(cancelled.json()["cancelled_chained_jobs"], json!([delayed + 1]));
    assert_eq!(env.status(delayed), "cancelled");
    assert_error(&http(address, "POST", &format!("/api/jobs/{delayed}/cancel"), &[], ""), 409, "has already been cancelled");
    let child = delayed + 1;
    assert_error(
        &http(address, "POST", &format!("/api/jobs/{child}/retry"), &[], ""),
        409,
        &format!("job {child} is chained behind job {delayed}, which was cancelled; retry job {delayed} instead"),
    );

    let retried = http(address, "POST", &format!("/api/jobs/{delayed}/retry"), &[], "");
    assert_eq!(retried.status, 200, "{retried:#?}");
    assert_eq!(retried.json()["status"], "pending");
    assert_eq!(retried.json()["waiting_chained_jobs"], json!([delayed + 1]));
    wait_for_api_status(address, delayed, "succeeded");
    wait_for_api_status(address, delayed + 1, "succeeded");
    assert_error(&http(address, "POST", &format!("/api/jobs/{delayed}/cancel"), &[], ""), 409, "has already succeeded");
    assert_error(&http(address, "POST", &format!("/api/jobs/{delayed}/retry"), &[], ""), 409, "has succeeded; only failed and cancelled jobs can be retried. Dispatch it again");
}

#[test]
fn api_list_pages_with_keyset_and_filters() {
    let env = Env::new();
    let mut ids = Vec::new();
    for index in 0..7 {
        let method = if index % 2 == 0 { "handle" } else { "noop" };
        ids.push(env.dispatch(&["demo", method, "--delay", "1h"]));
    }
    ids.push(env.dispatch(&["files", "sha256", "--delay", "1h"]));
    let (_daemon, address) = serve(&env);

    let mut seen = Vec::new();
    let mut path = "/api/jobs?limit=3".to_owned();
    loop {
        let page = http(address, "GET", &path, &[], "").json();
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 3);
        seen.extend(jobs.iter().map(|job| job["id"].as_i64().unwrap()));
        match page["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
    assert_eq!(seen, newest_first, "the pages hold every job once, newest first");

    let handle = http(address, "GET", "/api/jobs?plugin=demo&method=handle&limit=2", &[], "").json();
    let handle_ids: Vec<i64> = handle["jobs"].as_array().unwrap().iter().map(|job| job["id"].as_i64().unwrap()).collect();
    assert_eq!(handle_ids, vec![ids[6], ids[4]]);
    assert_eq!(handle["next_before"], ids[4]);
    let older = http(address, "GET", &format!("/api/jobs?plugin=demo&method=handle&limit=2&before={}", ids[4]), &[], "").json();
    let older_ids: Vec<i64> = older["jobs"].as_array().unwrap().iter().map(|job| job["id"].as_i64().unwrap()).collect();
    assert_eq!(older_ids, vec![ids[2], ids[0]]);
    assert_eq!(older["next"], Value::Null, "the last page has no next page");

    let files = http(address, "GET", "/api/jobs?plugin=files&status=pending", &[], "").json();
    assert_eq!(files["jobs"].as_array().unwrap().len(), 1);
    let none = http(address, "GET", "/api/jobs?status=failed", &[], "").json();
    assert_eq!(none["jobs"], json!([]));

    assert_error(&http(address, "GET", "/api/jobs?status=done", &[], ""), 400, "unknown status \"done\"");
    assert_error(&http(address, "GET", "/api/jobs?limit=0", &[], ""), 400, "invalid limit \"0\"");
    assert_error(&http(address, "GET", "/api/jobs?limit=100000", &[], ""), 400, "from 1 to 500");
    assert_error(&http(address, "GET", "/api/jobs?before=x", &[], ""), 400, "invalid before \"x\"");
}

// ---------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------

#[test]
fn token_is_required_on_every_path() {
    let env = Env::with_http(&format!("bind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"));
    let (_daemon, address) = serve(&env);
    let bearer = format!("Bearer {TOKEN}");
    let paths = ["/", "/jobs/1", "/plugins", "/test-jobs", "/metrics", "/healthz", "/api/jobs", "/api/jobs/1"];

    for path in paths {
        let missing = http(address, "GET", path, &[], "");
        assert_eq!(missing.status, 401, "GET {path} without a token: {missing:#?}");
        assert_eq!(missing.header("www-authenticate"), Some("Bearer realm=\"jobhost\""));
        let wrong = http(address, "GET", path, &[("Authorization", "Bearer not-the-token-at-all")], "");
        assert_eq!(wrong.status, 401, "GET {path} with a wrong token");
        let right = http(address, "GET", path, &[("Authorization", &bearer)], "");
        assert_ne!(right.status, 401, "GET {path} with the token: {right:#?}");
    }
    assert_error(&http(address, "GET", "/api/jobs", &[], ""), 401, "a token is required");
    assert_error(&http(address, "POST", "/api/jobs", &[JSON], r#"{"plugin": "demo", "method": "handle"}"#), 401, "a token is required");
    assert_error(&http(address, "GET", "/api/jobs", &[("Authorization", "Bearer wrong-token-wrong-token")], ""), 401, "the token is wrong");
    let page = http(address, "GET", "/", &[], "");
    assert!(page.body.contains("action=\"/login\""), "a page without the token shows the sign-in form");

    let dispatched = http(address, "POST", "/api/jobs", &[JSON, ("Authorization", &bearer)], r#"{"plugin": "demo", "method": "handle", "params": "x"}"#);
    assert_eq!(dispatched.status, 201, "{dispatched:#?}");

    let wrong_login = http(address, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], "token=nope");
    assert_eq!(wrong_login.status, 401);
    assert_eq!(wrong_login.header("set-cookie"), None);
    let login = http(address, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], &format!("token={TOKEN}"));
    assert_eq!(login.status, 303, "{login:#?}");
    let cookie = login.header("set-cookie").expect("sign-in sets a cookie").to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    let cookie_pair = cookie.split(';').next().unwrap();
    assert_eq!(http(address, "GET", "/api/jobs", &[("Cookie", cookie_pair)], "").status, 200);
}

#[test]
fn cross_site_posts_are_rejected() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let id = env.dispatch(&["demo", "handle", "--delay", "1h"]);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let cancel_path = format!("/jobs/{id}/cancel");
    let page = http(address, "GET", &format!("/jobs/{id}"), &[], "").body;
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).and_then(|rest| rest.split('"').next()).expect("the page has a csrf field").to_owned();

    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);
    let cases: [Case; 5] = [
        ("another origin", vec![form, ("Origin", "http://evil.example")], format!("csrf={csrf}")),
        ("another port", vec![form, ("Origin", "http://127.0.0.1:1")], format!("csrf={csrf}")),
        ("a cross-site fetch", vec![form, ("Sec-Fetch-Site", "cross-site")], format!("csrf={csrf}")),
        ("no form token", vec![form], String::new()),
        ("a wrong form token", vec![form], "csrf=0000".to_owned()),
    ];
    for (case, headers, body) in &cases {
        let response = http(address, "POST", &cancel_path, headers, body);
        assert_eq!(response.status, 403, "a post from {case} must be rejected: {response:#?}");
    }
    assert_error(&http(address, "POST", &format!("/api/jobs/{id}/cancel"), &[("Origin", "http://evil.example")], ""), 403, "cross-site request rejected");
    assert_eq!(env.status(id), "pending", "no rejected post may cancel the job");

    let same_origin = format!("http://{address}");
    let accepted = http(address, "POST", &cancel_path, &[form, ("Origin", &same_origin), ("Sec-Fetch-Site", "same-origin")], &format!("csrf={csrf}"));
    assert_eq!(accepted.status, 303, "{accepted:#?}");
    assert_eq!(accepted.header("location"), Some(format!("/jobs/{id}?done=cancelled").as_str()));
    assert_eq!(env.status(id), "cancelled");
}

#[test]
fn foreign_host_header_is_rejected_without_token() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    for host in ["evil.example", "evil.example:8080", "10.1.2.3"] {
        assert_eq!(http(address, "GET", "/", &[("Host", host)], "").status, 403, "Host {host}");
    }
    assert_error(&http(address, "GET", "/api/jobs", &[("Host", "rebound.example")], ""), 403, "DNS rebinding");
    for host in ["localhost", "127.0.0.1", &address.to_string()] {
        assert_eq!(http(address, "GET", "/", &[("Host", host)], "").status, 200, "Host {host}");
    }
}

#[test]
fn pages_escape_job_values() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let hostile = "<script>document.title='pwned'</script><img src=x onerror=\"window.pwned=1\">";
    let params = serde_json::to_string(hostile).unwrap();
    let id = env.dispatch(&["demo", "fail", "--params", &params]);
    wait_for_api_status(address, id, "failed");

    for path in ["/".to_owned(), format!("/jobs/{id}")] {
        let page = http(address, "GET", &path, &[], "");
        assert_eq!(page.status, 200);
        assert!(!page.body.contains("<script>document"), "{path} has the params as markup:\n{}", page.body);
        assert!(!page.body.contains("<img src=x"), "{path} has the params as markup:\n{}", page.body);
        assert!(page.body.contains("&lt;script&gt;document.title="), "{path} shows the error as text:\n{}", page.body);
        let policy = page.header("content-security-policy").expect("pages send a Content Security Policy");
        assert!(policy.contains("script-src 'self'"), "{policy}");
    }
}

// ---------------------------------------------------------------------------
// Pages, metrics and health
// ---------------------------------------------------------------------------

#[test]
fn pages_render_and_unknown_pages_are_404() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let id = env.dispatch(&["demo", "handle", "--params", "\"shown\""]);
    wait_for_api_status(address, id, "succeeded");

    let dashboard = http(address, "GET", "/?status=succeeded&plugin=demo&method=handle", &[], "");
    assert_eq!(dashboard.status, 200);
    assert!(dashboard.body.contains(&format!("data-job-id=\"{id}\"")), "{}", dashboard.body);
    assert_eq!(http(address, "GET", "/?status=done", &[], "").status, 400);
    let detail = http(address, "GET", &format!("/jobs/{id}"), &[], "");
    assert!(detail.body.contains("Status history"), "{}", detail.body);
    assert_eq!(http(address, "GET", "/jobs/999", &[], "").status, 404);
    assert_eq!(http(address, "GET", "/jobs/abc", &[], "").status, 400);
    assert_eq!(http(address, "GET", "/nowhere", &[], "").status, 404);

    let plugins = http(address, "GET", "/plugins", &[], "").body;
    assert!(plugins.contains("data-method=\"update\" data-whitelisted=\"false\""), "{plugins}");
    assert!(plugins.contains("data-method=\"handle\" data-whitelisted=\"true\""), "{plugins}");
    assert!(plugins.contains(&common::build().demo.display().to_string()), "the page names the library file");

    let script = http(address, "GET", "/assets/app.js", &[], "");
    assert_eq!(script.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert!(script.body.contains("DOMParser"));
}

#[test]
fn test_panel_post_dispatches_or_explains() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let panel = http(address, "GET", "/test-jobs", &[], "").body;
    let csrf = panel.split("name=\"csrf\" value=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap().to_owned();
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let body = format!("csrf={csrf}");

    let rejected = http(address, "POST", "/test-jobs/disallowed", &[form], &body);
    assert_eq!(rejected.status, 403);
    assert!(rejected.body.contains("method &quot;update&quot; is not in the whitelist"), "{}", rejected.body);
    let basic = http(address, "POST", "/test-jobs/basic", &[form], &body);
    assert_eq!(basic.status, 200);
    assert!(basic.body.contains("id=\"test-job-link\" href=\"/jobs/1\""), "{}", basic.body);
    assert_eq!(http(address, "POST", "/test-jobs/unknown", &[form], &body).status, 404);
    assert_eq!(http(address, "POST", "/test-jobs/basic", &[form], "").status, 403, "a post without the form token");
}

#[test]
fn metrics_count_runs_and_statuses() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let ok = env.dispatch(&["demo", "handle", "--params", "\"fine\""]);
    let failed = env.dispatch(&["demo", "fail", "--params", "\"broken\""]);
    env.dispatch(&["demo", "handle", "--delay", "1h"]);
    wait_for_api_status(address, ok, "succeeded");
    wait_for_api_status(address, failed, "failed");

    let metrics = http(address, "GET", "/metrics", &[], "");

    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let body = &metrics.body;
    for expected in [
        "jobhost_jobs_succeeded_total{method=\"handle\",plugin=\"demo\"} 1",
        "jobhost_jobs_failed_total{method=\"fail\",plugin=\"demo\"} 1",
        "jobhost_job_run_seconds_count{method=\"handle\",plugin=\"demo\"} 1",
        "jobhost_job_start_delay_seconds_count{method=\"fail\",plugin=\"demo\"} 1",
        "jobhost_jobs{status=\"pending\"} 1",
        "# TYPE jobhost_job_run_seconds histogram",
    ] {
        assert!(body.contains(expected), "no {expected:?} in:\n{body}");
    }
    let health = http(address, "GET", "/healthz", &[], "");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
}

// ---------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------

#[test]
fn exposed_bind_without_token_is_refused() {
    let env = Env::with_http("\nbind = \"0.0.0.0:0\"\n");
    let output = env.run(&["run"]);
    assert!(!output.status.success(), "{}", common::describe(&output));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains("jobs.toml:"), "the message names the line: {stderr}");
    assert!(lines[0].contains("accepts connections from other machines, but no token is set"), "{stderr}");
    assert!(lines[0].contains("set token in [http]"), "{stderr}");
    assert!(!env.database().exists(), "a refused start must not create the database");

    // `run --once` serves nothing, so the same file is fine for cron.
    env.ok(&["run", "--once"]);
}

#[test]
fn taken_port_stops_the_daemon_with_the_reason() {
    let occupant = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = occupant.local_addr().unwrap().port();
    let env = Env::with_http(&format!("\nbind = \"127.0.0.1:{port}\"\n"));

    let output = env.run(&["run"]);

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("error: cannot listen on 127.0.0.1:{port} for the dashboard")), "{stderr}");
    assert!(last.contains("set bind in [http]"), "{stderr}");
}

#[test]
fn disabled_http_serves_nothing_and_runs_jobs() {
    let env = Env::with_http("\nenabled = false\nbind = \"0.0.0.0:0\"\n");
    let mut daemon = env.start_daemon(&[]);
    let id = env.dispatch(&["demo", "handle", "--params", "\"quiet\""]);
    env.wait_for_status(id, "succeeded", LONG);
    assert!(daemon.is_running());
    assert!(!daemon.stderr().contains("dashboard listening"), "{}", daemon.stderr());
}

#[tokio::test]
async fn healthz_reports_broken_database() {
    use sqlx::Connection;

    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let get = move || tokio::task::spawn_blocking(move || http(address, "GET", "/healthz", &[], ""));
    assert_eq!(get().await.unwrap().status, 200);

    // Another program damages the database: the jobs table is gone.
    let url = format!("sqlite://{}", env.database().display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("open the database");
    sqlx::query("PRAGMA foreign_keys = OFF").execute(&mut connection).await.unwrap();
    sqlx::query("ALTER TABLE jobs RENAME TO jobs_moved").execute(&mut connection).await.expect("rename the jobs table");
    connection.close().await.unwrap();

    let response = get().await.unwrap();
    assert_eq!(response.status, 503, "{response:#?}");
    assert!(response.body.starts_with("database unreachable: "), "{}", response.body);
    assert!(response.body.contains("no such table: jobs"), "{}", response.body);
}

#[test]
fn server_stops_with_the_daemon() {
    use std::io::{Read, Write};

    let env = Env::new();
    let (mut daemon, address) = serve(&env);
    // A browser keeps its connection open between requests.
    let mut idle = std::net::TcpStream::connect(address).unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes()).unwrap();
    let mut first_bytes = [0u8; 12];
    idle.read_exact(&mut first_bytes).unwrap();
    assert_eq!(&first_bytes, b"HTTP/1.1 200");

    daemon.signal(libc::SIGTERM);

    assert_eq!(daemon.wait(Duration::from_secs(15)), Some(0), "log:\n{}", daemon.stderr());
    assert!(daemon.stderr().contains("HTTP server stopped"), "{}", daemon.stderr());
    assert!(std::net::TcpStream::connect(address).is_err(), "the port still accepts connections after exit");
}

#[test]
fn bulk_form_cancels_and_retries_selected_jobs() {
    let env = Env::new();
    let (_daemon, address) = serve(&env);
    let done = env.dispatch(&["demo", "handle", "--params", "\"done\""]);
    wait_for_api_status(address, done, "succeeded");
    let first = env.dispatch(&["demo", "handle", "--params", "\"one\"", "--delay", "1h"]);
    let second = env.dispatch(&["demo", "handle", "--params", "\"two\"", "--delay", "1h"]);
    let page = http(address, "GET", "/", &[], "").body;
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).and_then(|rest| rest.split('"').next()).expect("a csrf field").to_owned();
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let post = |body: String| http(address, "POST", "/jobs/bulk", &[form], &body);

    let cancelled = post(format!("csrf={csrf}&action=cancel&id={first}&id={second}&id={done}"));

    assert_eq!(cancelled.status, 303, "{cancelled:#?}");
    assert_eq!(cancelled.header("location"), Some("/?bulk=cancel&changed=2&skipped=1"));
    assert_eq!(env.status(first), "cancelled");
    assert_eq!(env.status(second), "cancelled");
    assert_eq!(env.status(done), "succeeded");
    let notice = http(address, "GET", "/?bulk=cancel&changed=2&skipped=1", &[], "").body;
    assert!(notice.contains("Cancelled 2 jobs. 1 job could not be changed"), "{notice}");

    let retried = post(format!("csrf={csrf}&action=retry&id={first}"));
    assert_eq!(retried.header("location"), Some("/?bulk=retry&changed=1&skipped=0"));
    wait_for_api_status(address, first, "succeeded");

    let rejected = [
        (format!("action=cancel&id={second}"), 403, "security token"),
        (format!("csrf={csrf}&action=delete&id={second}"), 400, "invalid action &quot;delete&quot;"),
        (format!("csrf={csrf}&action=retry"), 400, "no job selected"),
        (format!("csrf={csrf}&action=retry&id=abc"), 400, "invalid job id &quot;abc&quot;"),
    ];
    for (body, status, expected) in rejected {
        let response = post(body.clone());
        assert_eq!(response.status, status, "{body}: {response:#?}");
        assert!(response.body.contains(expected), "{body}: {}", response.body);
    }
    let too_many: String = (1..=501).map(|id| format!("&id={id}")).collect();
    assert_eq!(post(format!("csrf={csrf}&action=retry{too_many}")).status, 400);
    assert_eq!(env.status(second), "cancelled", "no rejected post changed the job");
}
