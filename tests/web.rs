//! End-to-end in a real browser: headless Chromium, driven through
//! chromedriver (WebDriver), uses the dashboard of a real `jobhost run`.
//!
//! Each test starts its own chromedriver on a free loopback port and its
//! own Chromium profile. The tests take turns, because a browser per test at
//! once is too much for a 2-core machine. When a test fails, a screenshot
//! is saved in its temporary folder, which is then kept, and the path printed.
//!
//! Without Chromium or chromedriver the tests are skipped with a message,
//! except when `CI` is set: there they fail, since `.ci/run` installs both.

mod common;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, Env};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

/// One browser test at a time in this process. Each test has its own
/// runtime; tokio's mutex works across runtimes and is never poisoned.
static BROWSER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Returns the first of `names` found in `PATH`.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|folder| names.iter().map(move |name| folder.join(name))).find(|candidate| candidate.is_file())
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver on a free loopback port and waits until it accepts connections.
fn start_driver(chromedriver: &PathBuf, log: PathBuf) -> Driver {
    // The port is free when chosen; another process could take it before
    // chromedriver binds it, which would fail this test with chromedriver's log.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free port").port();
    let log_file = std::fs::File::create(&log).expect("chromedriver log file");
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(log_file.try_clone().expect("log file handle"))
        .stderr(log_file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {} failed: {error}", chromedriver.display()));
    let mut driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let ready = common::wait_until(LONG, || std::net::TcpStream::connect(address).is_ok() || driver.child.try_wait().ok().flatten().is_some());
    let exited = driver.child.try_wait().ok().flatten();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exited.is_none(), "chromedriver exited at start ({exited:?}); log:\n{}", log_text());
    assert!(ready, "chromedriver did not listen on port {port} within {LONG:?}; log:\n{}", log_text());
    driver
}

/// What a browser test body gets: the browser, the test folder and the dashboard's base URL.
struct Session {
    browser: Client,
    env: Arc<Env>,
    base: String,
}

impl Session {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits until `condition` returns `Some`, polling every 100 ms, and
    /// fails the test with `what` after `timeout`.
    async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut condition: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = condition().await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Returns the text of the first element matching `css`, if there is one.
    async fn text_of(&self, css: &str) -> Option<String> {
        let element = self.browser.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until the dashboard row of job `id` shows `status`. The page is
    /// not reloaded: the row changes through the page's live refresh.
    async fn wait_for_row_status(&self, id: i64, status: &str) {
        let css = format!("tr[data-job-id=\"{id}\"] [data-status]");
        self.eventually(&format!("job {id} to show {status} on the dashboard"), LONG, || async {
            (self.text_of(&css).await.as_deref() == Some(status)).then_some(())
        })
        .await;
    }

    /// Clicks a test-panel button and returns the id of the job it dispatched.
    async fn click_test_button(&self, kind: &str) -> i64 {
        self.browser.goto(&self.url("/test-jobs")).await.expect("open the test panel");
        self.browser.find(Locator::Id(&format!("test-{kind}"))).await.expect("the button").click().await.expect("click");
        let result = self.browser.wait().at_most(LONG).for_element(Locator::Css(&format!("#test-result[data-kind=\"{kind}\"]"))).await;
        let result = result.unwrap_or_else(|error| panic!("no result after clicking {kind}: {error}"));
        let id = result.attr("data-job-id").await.expect("read data-job-id");
        let id = id.unwrap_or_else(|| panic!("the {kind} button dispatched no job"));
        id.parse().expect("the job id is a number")
    }
}

/// Runs `body` with a fresh daemon, chromedriver and Chromium. On failure
/// it saves a screenshot in the test folder, keeps the folder and prints
/// where it is, then fails the test.
async fn with_browser<F, Fut>(name: &str, env: Env, body: F)
where
    F: FnOnce(Arc<Session>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (Some(chromium), Some(chromedriver)) =
        (find_program(&["chromium", "chromium-browser", "google-chrome"]), find_program(&["chromedriver"]))
    else {
        let message = "Chromium or chromedriver is not installed; install Debian's chromium and chromium-driver (.ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("skipping {name}: {message}");
        return;
    };
    let _turn = BROWSER_TURN.lock().await;

    let mut daemon: Daemon = env.start_daemon(&[]);
    let address = daemon.http_address();
    let driver = start_driver(&chromedriver, env.path("chromedriver.log"));
    let profile = env.path("chromium-profile");
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let capabilities = match capabilities {
        Value::Object(map) => map,
        _ => unreachable!("the capabilities are an object"),
    };
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|error| panic!("starting Chromium through chromedriver failed: {error}"));

    let session = Arc::new(Session { browser: browser.clone(), env: Arc::new(env), base: format!("http://{address}") });
    let outcome = tokio::spawn(body(session.clone())).await;

    if let Err(failure) = outcome {
        let session = Arc::into_inner(session).expect("the test body has ended");
        let shot = session.env.path(&format!("failure-{name}.png"));
        match browser.screenshot().await {
            Ok(png) => match std::fs::write(&shot, png) {
                Ok(()) => eprintln!("{name} failed; screenshot: {}", shot.display()),
                Err(error) => eprintln!("{name} failed; saving the screenshot to {} failed: {error}", shot.display()),
            },
            Err(error) => eprintln!("{name} failed; taking a screenshot failed: {error}"),
        }
        eprintln!("daemon log:\n{}", daemon.stderr());
        let _ = browser.close().await;
        drop(driver);
        drop(daemon);
        if let Some(env) = Arc::into_inner(session.env) {
            eprintln!("test folder kept: {}", env.dir.keep().display());
        }
        std::panic::resume_unwind(failure.into_panic());
    }
    let _ = browser.close().await;
    assert!(daemon.is_running(), "the daemon stopped during the test; log:\n{}", daemon.stderr());
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn test_panel_jobs_reach_final_status() {
    with_browser("test_panel_jobs_reach_final_status", Env::new(), |session| async move {
        let basic = session.click_test_button("basic").await;
        let delayed = session.click_test_button("delayed").await;
        let chained = session.click_test_button("chained").await;
        let flaky = session.click_test_button("flaky").await;
        let chain = session.env.show(chained)["children"].clone();
        let second = chain[0].as_i64().expect("the chained job has a child");
        let third = session.env.show(second)["children"][0].as_i64().expect("the second job has a child");

        session.browser.goto(&session.url("/")).await.expect("open the dashboard");
        for id in [basic, chained, second, third, flaky, delayed] {
            session.wait_for_row_status(id, "succeeded").await;
        }

        let flaky_job = session.env.show(flaky);
        assert_eq!(flaky_job["attempts"], 3, "the flaky job fails twice, then succeeds: {flaky_job:#}");
        let delayed_job = session.env.show(delayed);
        let waited = time_of(&delayed_job["started_at"]) - time_of(&delayed_job["created_at"]);
        assert!(waited >= 5.0, "the delayed job started {waited:.2} s after dispatch");

        session.browser.goto(&session.url(&format!("/jobs/{third}"))).await.expect("open the last chained job");
        let chain_text = session.text_of("dd.chain").await.unwrap_or_default();
        assert!(chain_text.contains(&format!("#{second}")), "the page links the parent: {chain_text}");
    })
    .await;
}

#[tokio::test]
async fn disallowed_button_shows_rejection() {
    with_browser("disallowed_button_shows_rejection", Env::new(), |session| async move {
        session.browser.goto(&session.url("/test-jobs")).await.expect("open the test panel");
        session.browser.find(Locator::Id("test-disallowed")).await.expect("the button").click().await.expect("click");

        let reason = session.eventually("the rejection reason", LONG, || async { session.text_of("#rejection-reason").await }).await;
        assert_eq!(reason, "plugin \"demo\": method \"update\" is not in the whitelist; add it to methods in jobs.toml");
        let result = session.text_of("#test-result").await.unwrap_or_default();
        assert!(result.contains("rejected, nothing was dispatched"), "{result}");
        let jobs: Value = serde_json::from_str(&session.env.ok(&["list", "--json"])).unwrap();
        assert_eq!(jobs, json!([]), "the rejected job was written");
    })
    .await;
}

#[tokio::test]
async fn cancel_delayed_job_from_its_page() {
    with_browser("cancel_delayed_job_from_its_page", Env::new(), |session| async move {
        let id = session.env.dispatch(&["demo", "handle", "--params", "\"never\"", "--delay", "1h", "--then", "demo:handle:\"after\""]);
        session.browser.goto(&session.url(&format!("/jobs/{id}"))).await.expect("open the job page");

        session.browser.find(Locator::Id("cancel")).await.expect("a cancel button").click().await.expect("click");

        session
            .eventually("the page to show the job cancelled", LONG, || async {
                (session.text_of("#job-status").await.as_deref() == Some("cancelled")).then_some(())
            })
            .await;
        assert_eq!(session.text_of("p.notice").await.as_deref(), Some("Cancelled."));
        assert!(session.browser.find(Locator::Id("cancel")).await.is_err(), "a cancelled job has no cancel button");
        assert!(session.browser.find(Locator::Id("retry")).await.is_ok(), "a cancelled job has a retry button");
        assert_eq!(session.env.status(id), "cancelled");
        assert_eq!(session.env.status(id + 1), "cancelled", "the chained job is cancelled with it");
    })
    .await;
}

#[tokio::test]
async fn bulk_cancel_from_dashboard() {
    with_browser("bulk_cancel_from_dashboard", Env::new(), |session| async move {
        let kept = session.env.dispatch(&["demo", "handle", "--params", "\"kept\"", "--delay", "1h"]);
        let first = session.env.dispatch(&["demo", "handle", "--params", "\"one\"", "--delay", "1h"]);
        let second = session.env.dispatch(&["demo", "handle", "--params", "\"two\"", "--delay", "1h"]);
        session.browser.goto(&session.url("/")).await.expect("open the dashboard");

        for id in [first, second] {
            let css = format!("tr[data-job-id=\"{id}\"] input[type=checkbox]");
            session.browser.find(Locator::Css(&css)).await.expect("a checkbox per row").click().await.expect("tick");
        }
        // A live refresh in between must keep the ticks: dispatch a job so the list changes.
        let newer = session.env.dispatch(&["demo", "handle", "--params", "\"newer\"", "--delay", "1h"]);
        session.eventually("the new job to appear", LONG, || async { session.text_of(&format!("tr[data-job-id=\"{newer}\"]")).await }).await;
        session.browser.find(Locator::Id("bulk-cancel")).await.expect("the cancel button").click().await.expect("click");

        let notice = session.eventually("the bulk notice", LONG, || async { session.text_of("#bulk-notice").await }).await;
        assert_eq!(notice, "Cancelled 2 jobs.");
        session.wait_for_row_status(first, "cancelled").await;
        session.wait_for_row_status(second, "cancelled").await;
        assert_eq!(session.env.status(kept), "pending");
        assert_eq!(session.env.status(newer), "pending");
    })
    .await;
}

#[tokio::test]
async fn hostile_job_values_run_no_script() {
    with_browser("hostile_job_values_run_no_script", Env::new(), |session| async move {
        let hostile = "<script>document.title='pwned';window.pwned=1</script><img src=x onerror=\"window.pwned=2;document.title='pwned'\">";
        let id = session.env.dispatch(&["demo", "fail", "--params", &serde_json::to_string(hostile).unwrap()]);
        session.env.wait_for_status(id, "failed", LONG);

        session.browser.goto(&session.url(&format!("/jobs/{id}"))).await.expect("open the job page");
        assert_no_script_ran(&session, &format!("Job {id} · jobhost")).await;
        let params = session.text_of("#params").await.unwrap_or_default();
        assert_eq!(params, serde_json::to_string(hostile).unwrap(), "the params show as text");
        let error = session.text_of("#last-error").await.unwrap_or_default();
        assert_eq!(error, hostile, "the error shows as text");

        // The dashboard swaps in fresh rows through innerHTML, where an
        // unescaped <img onerror> would run: wait for one refresh.
        session.browser.goto(&session.url("/")).await.expect("open the dashboard");
        session
            .eventually("a live refresh of the dashboard", LONG, || async {
                let fetches = session
                    .browser
                    .execute("return performance.getEntriesByType('resource').filter(e => e.initiatorType === 'fetch').length", vec![])
                    .await
                    .ok()?;
                (fetches.as_u64()? >= 1).then_some(())
            })
            .await;
        assert_no_script_ran(&session, "Jobs · jobhost").await;
        let row = session.text_of(&format!("tr[data-job-id=\"{id}\"] td.error")).await.unwrap_or_default();
        assert!(row.starts_with("<script>document.title="), "the error shows as text in the list: {row}");
    })
    .await;
}

async fn assert_no_script_ran(session: &Session, title: &str) {
    let state = session
        .browser
        .execute(
            "return {title: document.title, pwned: typeof window.pwned, images: document.images.length, \
             requested: performance.getEntriesByType('resource').map(e => e.name).filter(n => n.endsWith('/x'))}",
            vec![],
        )
        .await
        .expect("read the page state");
    assert_eq!(state["title"], title, "the page title changed: {state}");
    assert_eq!(state["pwned"], "undefined", "a script from the job ran: {state}");
    assert_eq!(state["images"], 0, "the job's <img> became an element: {state}");
    assert_eq!(state["requested"], json!([]), "the job's <img> was requested: {state}");
}

#[tokio::test]
async fn cross_site_form_is_rejected() {
    with_browser("cross_site_form_is_rejected", Env::new(), |session| async move {
        let id = session.env.dispatch(&["demo", "handle", "--params", "\"keep\"", "--delay", "1h"]);
        // A page on another site (localhost is another site than 127.0.0.1)
        // that posts a cancel form to the dashboard as soon as it loads.
        let target = session.url(&format!("/jobs/{id}/cancel"));
        let attacker = serve_once(&format!(
            "<!doctype html><form id=f method=post action=\"{target}\"><input name=csrf value=guess></form>\
             <script>document.getElementById('f').submit()</script>"
        ));

        session.browser.goto(&format!("http://localhost:{}/", attacker.port())).await.expect("open the other site");

        let text = session
            .eventually("the dashboard's answer to the cross-site post", LONG, || async {
                let text = session.text_of("main").await?;
                text.contains("cross-site request rejected").then_some(text)
            })
            .await;
        assert!(text.contains("403"), "{text}");
        assert_eq!(session.env.status(id), "pending", "the cross-site post cancelled the job");
    })
    .await;
}

/// Serves `html` to every request on a free loopback port, from a thread
/// that ends with the process; returns the address.
fn serve_once(html: &str) -> SocketAddr {
    use std::io::{Read, Write};

    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let address = listener.local_addr().expect("its address");
    let response = format!("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}", html.len());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten().take(16) {
            let mut stream = stream;
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(response.as_bytes());
        }
    });
    address
}

#[tokio::test]
async fn sign_in_with_token_opens_dashboard() {
    let token = "browser-token-0123456789";
    let env = Env::with_http(&format!("bind = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"));
    with_browser("sign_in_with_token_opens_dashboard", env, move |session| async move {
        session.browser.goto(&session.url("/")).await.expect("open the dashboard");
        let token_field = session.browser.wait().at_most(LONG).for_element(Locator::Id("token")).await.expect("a sign-in form");
        token_field.send_keys("wrong-token-wrong-token").await.expect("type");
        session.browser.find(Locator::Css("form.login button")).await.expect("the button").click().await.expect("click");
        // The first page already shows "a token is required", so wait for the new message.
        session
            .eventually("the wrong-token message", LONG, || async {
                session.text_of("p.error-message").await.filter(|message| message.contains("the token is wrong"))
            })
            .await;

        let token_field = session.browser.find(Locator::Id("token")).await.expect("the sign-in form again");
        token_field.send_keys(token).await.expect("type");
        session.browser.find(Locator::Css("form.login button")).await.expect("the button").click().await.expect("click");
        session
            .eventually("the dashboard after signing in", LONG, || async {
                (session.browser.title().await.ok()? == "Jobs · jobhost").then_some(())
            })
            .await;
    })
    .await;
}

/// Parses an RFC 3339 time from a job object into seconds since the epoch.
fn time_of(value: &Value) -> f64 {
    let text = value.as_str().unwrap_or_else(|| panic!("not a time: {value}"));
    let output = Command::new("date").args(["-u", "-d", text, "+%s.%N"]).output().expect("date should run");
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or_else(|_| panic!("date cannot parse {text}"))
}
