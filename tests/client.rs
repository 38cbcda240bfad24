//! End-to-end: the Rust client in the `jobhost` library, with the real daemon.

mod common;

use std::time::Duration;

use common::Env;
use jobhost::client::{Client, DispatchError, Job};
use jobhost::store::ListFilter;

#[tokio::test]
async fn client_dispatches_chain_with_priority_and_delay() {
    let env = Env::new();
    let file = env.path("runs.txt");
    let client = Client::open(&env.config).await.unwrap();
    let record = |tag: &str| Job::new("demo", "record").params(&serde_json::json!({"file": file, "tag": tag}));

    let head = client
        .dispatch(record("head").priority(2).delay(Duration::from_millis(300)).then(record("middle")).then(record("tail")))
        .await
        .unwrap();

    let job = client.store().get(head).await.unwrap().unwrap();
    assert_eq!(job.priority, 2);
    assert!(job.run_at.since(job.created_at) >= Duration::from_millis(300));
    let jobs = client.store().list(&ListFilter { limit: 10, ..ListFilter::default() }).await.unwrap();
    assert_eq!(jobs.len(), 3);

    let mut daemon = env.start_daemon(&[]);
    let done = common::wait_until(Duration::from_secs(30), || env.records(&file).len() == 3);
    assert!(done, "the chain did not finish:\n{}", daemon.stderr());
    let tags: Vec<String> = env.records(&file).into_iter().map(|(_, _, tag)| tag).collect();
    assert_eq!(tags, vec!["head", "middle", "tail"]);
    daemon.signal(libc::SIGTERM);
    daemon.wait(Duration::from_secs(30));
}

#[tokio::test]
async fn client_rejects_invalid_jobs_and_writes_nothing() {
    let env = Env::new();
    let client = Client::open(&env.config).await.unwrap();

    let error = client.dispatch(Job::new("demo", "update")).await.unwrap_err();
    assert!(matches!(error, DispatchError::NotWhitelisted(_)), "{error}");
    let error = client.dispatch(Job::new("demo", "handle").priority(0)).await.unwrap_err();
    assert_eq!(error.to_string(), "invalid priority 0 for demo.handle; use a whole number from 1 (runs first) to 10");
    let error = client.dispatch(Job::new("demo", "handle").params_json("{not json")).await.unwrap_err();
    assert!(error.to_string().starts_with("invalid params for demo.handle"), "{error}");
    // One bad job in a batch rejects the whole batch.
    let batch = [Job::new("demo", "handle"), Job::new("demo", "handle").then(Job::new("demo", "update"))];
    assert!(client.dispatch_many(&batch).await.is_err());

    let jobs = client.store().list(&ListFilter { limit: 10, ..ListFilter::default() }).await.unwrap();
    assert!(jobs.is_empty(), "nothing may be written: {jobs:?}");
}
