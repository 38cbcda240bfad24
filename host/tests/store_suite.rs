//! Tests the contract of `jobhost::store::Store` with one suite of cases
//! that every backend must pass.
//!
//! Each case is an async function that receives a fresh, migrated database.
//! `store_suite!(backend, opener)` expands the whole list into one
//! `#[tokio::test]` per case, so a new backend adds an opener and one
//! `store_suite!` line and runs exactly these cases.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jobhost::config::Synchronous;
use jobhost::store::{
    PostgresStore,
    AttemptRecord, CancelOutcome, ClaimedJob, Finished, FinishedOutcome, JobId, JobRecord, ListFilter, NewChain,
    NewJob, Rescued, RetryOutcome, SqliteStore, Status, Store, StoreError,
};
use jobhost::time::Timestamp;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

type StoreFuture = Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>>;

/// The return type of every case. A store error fails the test with its message.
type CaseResult = Result<(), StoreError>;

/// A fresh, migrated database that one test runs against.
struct Harness {
    store: Arc<dyn Store>,
    /// Opens another store on the same database with its own connections,
    /// as a second daemon process would.
    open_another: Box<dyn Fn() -> StoreFuture + Send + Sync>,
    /// Whatever must outlive the database's users, such as its temporary folder.
    _guard: Box<dyn Any + Send + Sync>,
}

/// Expands into one `#[tokio::test]` per case, inside `mod $backend`, each on
/// a database from `$open`, an `async fn() -> Option<Harness>` that returns
/// None to skip when its server is unreachable and `CI` is not set.
macro_rules! store_suite {
    ($backend:ident, $open:path) => {
        mod $backend {
            use super::*;

            store_suite!(@cases $open, store: [
                dispatch_returns_head_ids_in_order,
                dispatch_chain_links_children_as_waiting,
                dispatch_batch_links_chains_of_mixed_length,
                claim_orders_by_priority_then_run_at_then_id,
                claim_skips_jobs_not_yet_due,
                claim_marks_jobs_running_under_lease,
                finish_success_writes_output_and_history,
                finish_retry_requeues_after_delay,
                finish_failure_sets_last_error,
                finish_discards_result_of_other_owner,
                finish_discards_stale_attempt,
                finish_discards_result_after_cancel,
                finish_discards_repeated_result,
                chain_success_releases_child_after_its_delay,
                chain_failure_cancels_all_descendants,
                renew_extends_lease_and_reports_lost_jobs,
                rescue_requeues_job_with_expired_lease,
                rescue_fails_last_attempt_and_cancels_chain,
                hand_back_requeues_without_charging_attempt,
                owned_lists_running_jobs_of_owner,
                prune_deletes_old_finished_jobs,
                cancel_stops_unfinished_jobs_and_descendants,
                cancel_leaves_finished_job_unchanged,
                cancel_unknown_job_returns_not_found,
                retry_requeues_failed_job_and_chain,
                retry_requeues_cancelled_job,
                retry_of_chained_job_follows_its_parent,
                retry_rejects_jobs_not_failed_or_cancelled,
                retry_unknown_job_returns_not_found,
                list_returns_newest_first_with_filters,
                list_pages_with_before_id,
                next_due_returns_earliest_pending_run_at,
                counts_reports_every_status,
                ping_answers_on_open_database,
                list_pages_cover_filtered_jobs_exactly_once,
                history_records_every_attempt_and_event,
                lookups_of_unknown_job_return_nothing,
            ]);

            store_suite!(@cases $open, harness: [
                concurrent_claims_hand_out_each_job_once,
            ]);
        }
    };
    (@cases $open:path, store: [$($case:ident),+ $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $open().await else { return };
                if let Err(error) = super::$case(Arc::clone(&harness.store)).await {
                    panic!("{}: {error}", stringify!($case));
                }
            }
        )+
    };
    (@cases $open:path, harness: [$($case:ident),+ $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $open().await else { return };
                if let Err(error) = super::$case(&harness).await {
                    panic!("{}: {error}", stringify!($case));
                }
            }
        )+
    };
}

/// Opens a new, migrated SQLite file in a temporary folder that lives as
/// long as the harness.
async fn open_sqlite() -> Option<Harness> {
    let folder = tempfile::tempdir().expect("creating a temporary folder failed");
    let path = folder.path().join("jobs.db");
    let store = SqliteStore::open(&path, Synchronous::Normal, true)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    store.migrate().await.unwrap_or_else(|error| panic!("{error}"));

    let open_another = move || -> StoreFuture {
        let path = path.clone();
        Box::pin(async move {
            // The file already exists, as it does for a second daemon.
            let store = SqliteStore::open(&path, Synchronous::Normal, false)
                .await
                .unwrap_or_else(|error| panic!("{error}"));
            Arc::new(store) as Arc<dyn Store>
        })
    };
    Some(Harness { store: Arc::new(store), open_another: Box::new(open_another), _guard: Box::new(folder) })
}

async fn open_postgres() -> Option<Harness> {
    let schema = jobhost_test_support::postgres_schema().await?;
    let url = schema.url();
    let store = PostgresStore::open(&url, 10).await.unwrap_or_else(|error| panic!("{error}"));
    store.migrate().await.unwrap_or_else(|error| panic!("{error}"));

    let open_another = move || -> StoreFuture {
        let url = url.clone();
        Box::pin(async move {
            let store = PostgresStore::open(&url, 4).await.unwrap_or_else(|error| panic!("{error}"));
            Arc::new(store) as Arc<dyn Store>
        })
    };
    Some(Harness { store: Arc::new(store), open_another: Box::new(open_another), _guard: Box::new(schema) })
}

store_suite!(sqlite, open_sqlite);
store_suite!(postgres, open_postgres);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const OWNER: &str = "daemon-a";
const OTHER_OWNER: &str = "daemon-b";
/// A lease that outlives every case, so that only leases of `SHORT_LEASE` expire.
const LEASE: Duration = Duration::from_secs(600);
/// A lease that has expired by the time the case calls `rescue`.
const SHORT_LEASE: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
/// The run duration that every result in these cases reports.
const RUN_TIME: Duration = Duration::from_millis(250);
/// How long a case waits for a condition before it fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// Builds a due job with priority 5 and three attempts.
fn job(plugin: &str, method: &str) -> NewJob {
    NewJob {
        plugin: plugin.to_owned(),
        method: method.to_owned(),
        params: "{}".to_owned(),
        priority: 5,
        delay: Duration::ZERO,
        max_attempts: 3,
    }
}

fn echo() -> NewJob {
    job("demo", "echo")
}

fn echo_with_params(params: &str) -> NewJob {
    NewJob { params: params.to_owned(), ..echo() }
}

fn single(job: NewJob) -> NewChain {
    NewChain { head: job, then: Vec::new() }
}

async fn dispatch_one(store: &dyn Store, job: NewJob) -> Result<JobId, StoreError> {
    let heads = store.dispatch(&[single(job)]).await?;
    assert_eq!(heads.len(), 1, "dispatching one chain returned heads {heads:?}");
    Ok(heads[0])
}

/// Dispatches one chain and returns the ids of all its jobs, head first,
/// found by following `children`.
async fn dispatch_chain(store: &dyn Store, head: NewJob, then: Vec<NewJob>) -> Result<Vec<JobId>, StoreError> {
    let length = then.len() + 1;
    let heads = store.dispatch(&[NewChain { head, then }]).await?;
    assert_eq!(heads.len(), 1, "dispatching one chain returned heads {heads:?}");

    let mut ids = vec![heads[0]];
    loop {
        let parent = ids[ids.len() - 1];
        let children = store.children(parent).await?;
        match children.as_slice() {
            [] => break,
            [child] => ids.push(*child),
            several => panic!("job {parent} of a chain has several children {several:?}"),
        }
    }
    assert_eq!(ids.len(), length, "the chain {ids:?} does not have {length} jobs");
    Ok(ids)
}

async fn record(store: &dyn Store, id: JobId) -> Result<JobRecord, StoreError> {
    Ok(store.get(id).await?.unwrap_or_else(|| panic!("job {id} was not found")))
}

async fn status_of(store: &dyn Store, id: JobId) -> Result<Status, StoreError> {
    Ok(record(store, id).await?.status)
}

async fn event_statuses(store: &dyn Store, id: JobId) -> Result<Vec<Status>, StoreError> {
    Ok(store.events(id).await?.into_iter().map(|event| event.status).collect())
}

/// Claims one job for `owner` and checks that it is `expected`.
async fn claim_expecting(store: &dyn Store, owner: &str, lease: Duration, expected: JobId) -> Result<ClaimedJob, StoreError> {
    let mut claimed = store.claim(owner, 1, lease).await?;
    assert_eq!(ids_of(&claimed), vec![expected], "{owner} claimed the wrong jobs");
    Ok(claimed.remove(0))
}

fn ids_of(claimed: &[ClaimedJob]) -> Vec<JobId> {
    claimed.iter().map(|job| job.id).collect()
}

fn sorted(mut ids: Vec<JobId>) -> Vec<JobId> {
    ids.sort_unstable();
    ids
}

/// Builds the result of the run `job`, as the daemon that claimed it reports it.
fn result_of(job: &ClaimedJob, outcome: FinishedOutcome) -> Finished {
    Finished { id: job.id, attempt: job.attempt, duration: RUN_TIME, outcome }
}

fn success(output: &str) -> FinishedOutcome {
    FinishedOutcome::Succeeded { output: output.to_owned() }
}

fn retry_after(error: &str, delay: Duration) -> FinishedOutcome {
    FinishedOutcome::Retry { error: error.to_owned(), delay }
}

fn failure(error: &str) -> FinishedOutcome {
    FinishedOutcome::Failed { error: error.to_owned() }
}

fn all_jobs() -> ListFilter {
    ListFilter { limit: 1000, ..ListFilter::default() }
}

/// Checks `earliest <= at <= latest`, with one assert per bound.
fn assert_within(label: &str, at: Timestamp, earliest: Timestamp, latest: Timestamp) {
    assert!(at >= earliest, "{label} is {at}, before the earliest allowed {earliest}");
    assert!(at <= latest, "{label} is {at}, after the latest allowed {latest}");
}

/// True if `text` contains `id` as a whole number, not only as part of one.
fn names_job(text: &str, id: JobId) -> bool {
    let id = id.to_string();
    text.split(|c: char| !c.is_ascii_digit()).any(|number| number == id)
}

/// Sorts the descendants, whose order the contract leaves open.
fn sort_cancel(outcome: CancelOutcome) -> CancelOutcome {
    match outcome {
        CancelOutcome::Cancelled { previous, descendants } => {
            CancelOutcome::Cancelled { previous, descendants: sorted(descendants) }
        }
        other => other,
    }
}

/// Sorts the descendants, whose order the contract leaves open.
fn sort_retry(outcome: RetryOutcome) -> RetryOutcome {
    match outcome {
        RetryOutcome::Requeued { previous, status, descendants } => RetryOutcome::Requeued { previous, status, descendants: sorted(descendants) },
        other => other,
    }
}

/// Polls `poll` every 5 ms until it returns `Some`, and fails the test if
/// that takes longer than `DEADLINE`.
async fn wait_for<T, F, Fut>(condition: &str, mut poll: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, StoreError>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = poll().await? {
            return Ok(value);
        }
        assert!(Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {condition}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the clock has passed `at`.
async fn wait_until(at: Timestamp) -> Result<(), StoreError> {
    wait_for(&format!("the clock to pass {at}"), || async move { Ok((Timestamp::now() > at).then_some(())) }).await
}

/// Calls `rescue` until it puts back or fails at least one job, and returns
/// what it rescued.
async fn rescue_expired(store: &dyn Store) -> Result<Vec<Rescued>, StoreError> {
    wait_for("a job with an expired lease to be rescued", || async move {
        let rescued = store.rescue().await?;
        Ok((!rescued.is_empty()).then_some(rescued))
    })
    .await
}

// ---------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------

async fn dispatch_returns_head_ids_in_order(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let jobs = vec![
        NewJob { params: r#"{"n":1}"#.to_owned(), priority: 3, max_attempts: 1, ..echo() },
        NewJob { params: r#"{"n":2}"#.to_owned(), delay: HOUR, ..job("files", "copy") },
        NewJob { params: r#"{"n":3}"#.to_owned(), priority: 10, max_attempts: 7, ..echo() },
    ];
    let chains: Vec<NewChain> = jobs.iter().cloned().map(single).collect();

    let before = Timestamp::now();
    let heads = store.dispatch(&chains).await?;
    let after = Timestamp::now();

    assert_eq!(heads.len(), jobs.len(), "one head id per chain: {heads:?}");
    assert!(heads.windows(2).all(|pair| pair[0] < pair[1]), "head ids {heads:?} are not ascending");
    for (&id, job) in heads.iter().zip(&jobs) {
        let stored = record(store, id).await?;
        assert_eq!(stored.id, id);
        assert_eq!(stored.plugin, job.plugin, "plugin of job {id}");
        assert_eq!(stored.method, job.method, "method of job {id}");
        assert_eq!(stored.params, job.params, "params of job {id}");
        assert_eq!(stored.priority, job.priority, "priority of job {id}");
        assert_eq!(stored.max_attempts, job.max_attempts, "max_attempts of job {id}");
        assert_eq!(stored.status, Status::Pending, "status of job {id}");
        assert_eq!(stored.attempts, 0, "attempts of job {id}");
        assert_eq!(stored.parent_id, None, "parent of job {id}");
        assert_within(&format!("created_at of job {id}"), stored.created_at, before, after);
        assert_eq!(stored.run_at, stored.created_at.plus(job.delay), "run_at of job {id} is not created_at plus its delay");
        assert_eq!(stored.started_at, None, "started_at of job {id}");
        assert_eq!(stored.finished_at, None, "finished_at of job {id}");
        assert_eq!(stored.output, None, "output of job {id}");
        assert_eq!(stored.last_error, None, "last_error of job {id}");
        assert_eq!(stored.lease_owner, None, "lease_owner of job {id}");
        assert_eq!(stored.lease_expires_at, None, "lease_expires_at of job {id}");
        assert_eq!(event_statuses(store, id).await?, vec![Status::Pending], "events of job {id}");
    }

    let empty = store.dispatch(&[]).await?;
    assert!(empty.is_empty(), "dispatching no chains returned heads {empty:?}");
    assert_eq!(store.list(&all_jobs()).await?.len(), jobs.len(), "an empty dispatch inserted rows");
    Ok(())
}

async fn dispatch_chain_links_children_as_waiting(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let chain = NewChain {
        head: echo_with_params(r#"{"step":0}"#),
        then: vec![
            NewJob { delay: HOUR, ..echo_with_params(r#"{"step":1}"#) },
            NewJob { priority: 2, ..job("files", "copy") },
        ],
    };

    let heads = store.dispatch(&[chain.clone()]).await?;
    assert_eq!(heads.len(), 1, "one chain, one head: {heads:?}");
    let head = heads[0];

    let first = store.children(head).await?;
    assert_eq!(first.len(), 1, "children of head {head}: {first:?}");
    let first = first[0];
    let second = store.children(first).await?;
    assert_eq!(second.len(), 1, "children of job {first}: {second:?}");
    let second = second[0];
    let after_last = store.children(second).await?;
    assert!(after_last.is_empty(), "the last job {second} of the chain has children {after_last:?}");

    let head_record = record(store, head).await?;
    assert_eq!(head_record.status, Status::Pending);
    assert_eq!(head_record.parent_id, None);
    assert_eq!(head_record.params, chain.head.params);

    let first_record = record(store, first).await?;
    assert_eq!(first_record.status, Status::Waiting);
    assert_eq!(first_record.parent_id, Some(head));
    assert_eq!(first_record.params, chain.then[0].params);
    assert_eq!(first_record.attempts, 0);

    let second_record = record(store, second).await?;
    assert_eq!(second_record.status, Status::Waiting);
    assert_eq!(second_record.parent_id, Some(first));
    assert_eq!(second_record.plugin, "files");
    assert_eq!(second_record.priority, 2);

    assert_eq!(event_statuses(store, first).await?, vec![Status::Waiting]);
    assert_eq!(event_statuses(store, second).await?, vec![Status::Waiting]);
    Ok(())
}

async fn dispatch_batch_links_chains_of_mixed_length(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let lengths = [1, 3, 2, 4, 1];
    let step_params = |chain: usize, step: usize| format!(r#"{{"chain":{chain},"step":{step}}}"#);
    let chains: Vec<NewChain> = lengths
        .iter()
        .enumerate()
        .map(|(chain, &length)| NewChain {
            head: echo_with_params(&step_params(chain, 0)),
            then: (1..length).map(|step| echo_with_params(&step_params(chain, step))).collect(),
        })
        .collect();

    let heads = store.dispatch(&chains).await?;
    assert_eq!(heads.len(), lengths.len(), "one head id per chain: {heads:?}");

    for (chain, (&head, &length)) in heads.iter().zip(&lengths).enumerate() {
        let mut parent: Option<JobId> = None;
        let mut id = head;
        for step in 0..length {
            let stored = record(store, id).await?;
            assert_eq!(stored.params, step_params(chain, step), "job {id} is not step {step} of chain {chain}");
            assert_eq!(stored.parent_id, parent, "parent of step {step} of chain {chain}");
            let expected_status = if step == 0 { Status::Pending } else { Status::Waiting };
            assert_eq!(stored.status, expected_status, "status of step {step} of chain {chain}");

            let children = store.children(id).await?;
            if step + 1 == length {
                assert!(children.is_empty(), "the last step of chain {chain} has children {children:?}");
            } else {
                assert_eq!(children.len(), 1, "children of step {step} of chain {chain}: {children:?}");
                parent = Some(id);
                id = children[0];
            }
        }
    }

    let counts: HashMap<Status, u64> = store.counts().await?.into_iter().collect();
    assert_eq!(counts[&Status::Pending], lengths.len() as u64, "one pending head per chain");
    assert_eq!(counts[&Status::Waiting], lengths.iter().map(|length| length - 1).sum::<usize>() as u64);
    Ok(())
}

// ---------------------------------------------------------------------------
// claim
// ---------------------------------------------------------------------------

async fn claim_orders_by_priority_then_run_at_then_id(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    // One batch, so every delay counts from the same moment and the run_at
    // order below stays true however slowly the test runs.
    let late = Duration::from_millis(30);
    let early = Duration::from_millis(10);
    let heads = store
        .dispatch(&[
            single(NewJob { delay: late, ..echo() }),
            single(NewJob { delay: early, ..echo() }),
            single(NewJob { delay: early, ..echo() }),
            single(NewJob { priority: 1, delay: late, ..echo() }),
            single(NewJob { priority: 9, ..echo() }),
            single(NewJob { delay: HOUR, ..echo() }),
        ])
        .await?;
    let [late_5, early_5, early_5_later_id, late_1, due_9, not_due] = heads[..] else {
        panic!("dispatching six chains returned heads {heads:?}");
    };
    wait_until(record(store, late_1).await?.run_at).await?;

    assert!(store.claim(OWNER, 0, LEASE).await?.is_empty(), "a claim with limit 0 returned jobs");
    let first = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&first), vec![late_1, early_5], "first batch of 2");
    let second = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&second), vec![early_5_later_id, late_5], "second batch of 2");
    let third = store.claim(OWNER, 10, LEASE).await?;
    assert_eq!(ids_of(&third), vec![due_9], "third batch, limit 10");
    let fourth = store.claim(OWNER, 10, LEASE).await?;
    assert!(fourth.is_empty(), "claimed {:?} after every due job was claimed", ids_of(&fourth));

    assert_eq!(status_of(store, not_due).await?, Status::Pending, "the job due in an hour");
    Ok(())
}

async fn claim_skips_jobs_not_yet_due(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let in_an_hour = dispatch_one(store, NewJob { delay: HOUR, ..echo() }).await?;
    let soon = dispatch_one(store, NewJob { delay: Duration::from_millis(50), ..echo() }).await?;
    let soon_run_at = record(store, soon).await?.run_at;

    // Claim until the 50 ms job comes out. It must never come out early,
    // and the job due in an hour must never come out at all.
    let claimed = wait_for("the 50 ms job to be claimed", || async move {
        let claimed = store.claim(OWNER, 10, LEASE).await?;
        Ok((!claimed.is_empty()).then_some(claimed))
    })
    .await?;
    assert_eq!(ids_of(&claimed), vec![soon]);
    assert!(
        claimed[0].started_at >= soon_run_at,
        "job {soon} was claimed at {}, before its run_at {soon_run_at}",
        claimed[0].started_at
    );

    let stored = record(store, in_an_hour).await?;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.lease_owner, None);
    Ok(())
}

async fn claim_marks_jobs_running_under_lease(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store
        .dispatch(&[
            single(NewJob { params: r#"{"n":1}"#.to_owned(), max_attempts: 4, ..echo() }),
            single(NewJob { params: r#"{"n":2}"#.to_owned(), priority: 7, ..job("files", "copy") }),
        ])
        .await?;

    let before = Timestamp::now();
    let claimed = store.claim(OWNER, 10, LEASE).await?;
    let after = Timestamp::now();
    assert_eq!(ids_of(&claimed), heads, "both due jobs, in priority order");

    for job in &claimed {
        let id = job.id;
        let stored = record(store, id).await?;
        assert_eq!(job.attempt, 1, "attempt of job {id}");
        assert_eq!(job.plugin, stored.plugin, "plugin of job {id}");
        assert_eq!(job.method, stored.method, "method of job {id}");
        assert_eq!(job.params, stored.params, "params of job {id}");
        assert_eq!(job.priority, stored.priority, "priority of job {id}");
        assert_eq!(job.max_attempts, stored.max_attempts, "max_attempts of job {id}");
        assert_eq!(job.run_at, stored.run_at, "run_at of job {id}");
        assert_eq!(job.created_at, stored.created_at, "created_at of job {id}");
        assert_within(&format!("started_at of job {id}"), job.started_at, before, after);

        assert_eq!(stored.status, Status::Running, "status of job {id}");
        assert_eq!(stored.attempts, 1, "attempts of job {id}");
        assert_eq!(stored.started_at, Some(job.started_at), "stored started_at of job {id}");
        assert_eq!(stored.lease_owner.as_deref(), Some(OWNER), "lease_owner of job {id}");
        let expires = stored.lease_expires_at.unwrap_or_else(|| panic!("job {id} has no lease expiry"));
        assert_within(&format!("lease expiry of job {id}"), expires, before.plus(LEASE), after.plus(LEASE));
        assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running], "events of job {id}");
    }
    Ok(())
}

/// Eight stores, each with its own connections as separate daemon processes
/// would have, claim from one database while a ninth dispatches more jobs.
async fn concurrent_claims_hand_out_each_job_once(harness: &Harness) -> CaseResult {
    const CLAIMERS: usize = 8;
    const CLAIM_BATCH: usize = 7;
    const PREFILLED: usize = 500;
    const LATE_BATCHES: usize = 20;
    const LATE_BATCH_SIZE: usize = 10;

    let mixed_priorities =
        |count: usize| -> Vec<NewChain> { (0..count).map(|i| single(NewJob { priority: (i % 10 + 1) as u8, ..echo() })).collect() };
    let mut dispatched: HashSet<JobId> = HashSet::new();
    for batch in mixed_priorities(PREFILLED).chunks(100) {
        dispatched.extend(harness.store.dispatch(batch).await?);
    }

    let dispatching_done = Arc::new(AtomicBool::new(false));
    let mut claimers = Vec::new();
    for index in 0..CLAIMERS {
        let store = (harness.open_another)().await;
        let dispatching_done = Arc::clone(&dispatching_done);
        let owner = format!("daemon-{index}");
        claimers.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            loop {
                // Read the flag before claiming, because only an empty claim
                // that started after the last dispatch committed means nothing is left.
                let drained_if_empty = dispatching_done.load(Ordering::Acquire);
                let batch = store.claim(&owner, CLAIM_BATCH, LEASE).await?;
                assert!(batch.len() <= CLAIM_BATCH, "{owner} claimed {} jobs with limit {CLAIM_BATCH}", batch.len());
                if batch.is_empty() {
                    if drained_if_empty {
                        return Ok::<_, StoreError>((owner, claimed));
                    }
                    tokio::task::yield_now().await;
                }
                claimed.extend(batch);
            }
        }));
    }

    let dispatcher = (harness.open_another)().await;
    let late_dispatch = tokio::spawn(async move {
        let mut heads = Vec::new();
        for _ in 0..LATE_BATCHES {
            heads.extend(dispatcher.dispatch(&mixed_priorities(LATE_BATCH_SIZE)).await?);
            tokio::task::yield_now().await;
        }
        Ok::<_, StoreError>(heads)
    });

    let everything = async {
        let late_heads = late_dispatch.await.expect("the dispatching task panicked");
        dispatching_done.store(true, Ordering::Release);
        let mut claims = Vec::new();
        for claimer in claimers {
            claims.push(claimer.await.expect("a claiming task panicked"));
        }
        (late_heads, claims)
    };
    let (late_heads, claims) = tokio::time::timeout(Duration::from_secs(120), everything)
        .await
        .expect("claiming every job took longer than 120 s");

    // Any store error, such as "database is locked", fails the case here.
    dispatched.extend(late_heads?);
    assert_eq!(dispatched.len(), PREFILLED + LATE_BATCHES * LATE_BATCH_SIZE, "dispatch returned duplicate ids");

    let mut owner_of: HashMap<JobId, String> = HashMap::new();
    let mut claimed_twice = Vec::new();
    let mut wrong_attempts = Vec::new();
    for claim in claims {
        let (owner, jobs) = claim?;
        for job in jobs {
            if job.attempt != 1 {
                wrong_attempts.push((job.id, job.attempt));
            }
            if let Some(first_owner) = owner_of.insert(job.id, owner.clone()) {
                claimed_twice.push((job.id, first_owner, owner.clone()));
            }
        }
    }
    assert!(claimed_twice.is_empty(), "jobs claimed twice (id, first owner, second owner): {claimed_twice:?}");
    assert!(wrong_attempts.is_empty(), "first claims with an attempt other than 1 (id, attempt): {wrong_attempts:?}");

    let claimed: HashSet<JobId> = owner_of.keys().copied().collect();
    let never_claimed: Vec<JobId> = sorted(dispatched.difference(&claimed).copied().collect());
    assert!(never_claimed.is_empty(), "jobs never claimed: {never_claimed:?}");
    let never_dispatched: Vec<JobId> = sorted(claimed.difference(&dispatched).copied().collect());
    assert!(never_dispatched.is_empty(), "claimed ids that dispatch never returned: {never_dispatched:?}");

    let counts: HashMap<Status, u64> = harness.store.counts().await?.into_iter().collect();
    assert_eq!(counts[&Status::Pending], 0, "pending jobs left");
    assert_eq!(counts[&Status::Running], dispatched.len() as u64, "running jobs");

    let running = harness.store.list(&ListFilter { status: Some(Status::Running), ..all_jobs() }).await?;
    let wrong_owner: Vec<(JobId, Option<String>)> = running
        .iter()
        .filter(|job| job.lease_owner.as_ref() != owner_of.get(&job.id))
        .map(|job| (job.id, job.lease_owner.clone()))
        .collect();
    assert!(wrong_owner.is_empty(), "jobs leased to a daemon that did not receive them: {wrong_owner:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// finish
// ---------------------------------------------------------------------------

async fn finish_success_writes_output_and_history(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;
    let claimed = claim_expecting(store, OWNER, LEASE, id).await?;

    let before = Timestamp::now();
    let report = store.finish(OWNER, &[result_of(&claimed, success(r#"{"ok":true}"#))]).await?;
    let after = Timestamp::now();

    assert_eq!(report.written, vec![(id, Status::Succeeded)]);
    assert!(report.discarded.is_empty(), "discarded {:?}", report.discarded);
    assert!(report.released.is_empty(), "released {:?}", report.released);
    assert!(report.cancelled.is_empty(), "cancelled {:?}", report.cancelled);

    let stored = record(store, id).await?;
    assert_eq!(stored.status, Status::Succeeded);
    assert_eq!(stored.output.as_deref(), Some(r#"{"ok":true}"#));
    assert_eq!(stored.last_error, None);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.started_at, Some(claimed.started_at));
    let finished_at = stored.finished_at.expect("a succeeded job has finished_at");
    assert_within("finished_at", finished_at, before, after);
    assert_eq!(stored.lease_owner, None);
    assert_eq!(stored.lease_expires_at, None);

    let attempts = store.attempts(id).await?;
    assert_eq!(
        attempts,
        vec![AttemptRecord {
            attempt: 1,
            started_at: claimed.started_at,
            finished_at,
            duration: Some(RUN_TIME),
            error: None,
            owner: Some(OWNER.to_owned()),
        }]
    );
    assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running, Status::Succeeded]);
    assert!(store.claim(OWNER, 10, LEASE).await?.is_empty(), "a succeeded job was claimed again");
    Ok(())
}

async fn finish_retry_requeues_after_delay(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;
    let claimed = claim_expecting(store, OWNER, LEASE, id).await?;

    let before = Timestamp::now();
    let report = store.finish(OWNER, &[result_of(&claimed, retry_after("connection reset", HOUR))]).await?;
    let after = Timestamp::now();

    assert_eq!(report.written, vec![(id, Status::Pending)]);
    assert!(report.discarded.is_empty(), "discarded {:?}", report.discarded);

    let stored = record(store, id).await?;
    assert_eq!(stored.status, Status::Pending);
    assert_within("run_at after a retry", stored.run_at, before.plus(HOUR), after.plus(HOUR));
    assert_eq!(stored.last_error.as_deref(), Some("connection reset"));
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.finished_at, None);
    assert_eq!(stored.output, None);
    assert_eq!(stored.lease_owner, None);
    assert_eq!(stored.lease_expires_at, None);

    let attempts = store.attempts(id).await?;
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}");
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].error.as_deref(), Some("connection reset"));
    assert_eq!(attempts[0].owner.as_deref(), Some(OWNER));
    assert_within("finished_at of attempt 1", attempts[0].finished_at, before, after);

    assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running, Status::Pending]);
    assert!(store.claim(OWNER, 10, LEASE).await?.is_empty(), "a job retrying in an hour was claimed now");
    assert_eq!(store.next_due().await?, Some(stored.run_at));
    Ok(())
}

async fn finish_failure_sets_last_error(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;
    let claimed = claim_expecting(store, OWNER, LEASE, id).await?;

    let before = Timestamp::now();
    let report = store.finish(OWNER, &[result_of(&claimed, failure("invalid params: missing field `path`"))]).await?;
    let after = Timestamp::now();

    assert_eq!(report.written, vec![(id, Status::Failed)]);
    assert!(report.discarded.is_empty(), "discarded {:?}", report.discarded);
    assert!(report.cancelled.is_empty(), "cancelled {:?}", report.cancelled);

    let stored = record(store, id).await?;
    assert_eq!(stored.status, Status::Failed);
    assert_eq!(stored.last_error.as_deref(), Some("invalid params: missing field `path`"));
    assert_eq!(stored.output, None);
    assert_eq!(stored.attempts, 1);
    assert_within("finished_at", stored.finished_at.expect("a failed job has finished_at"), before, after);
    assert_eq!(stored.lease_owner, None);

    let attempts = store.attempts(id).await?;
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}");
    assert_eq!(attempts[0].error.as_deref(), Some("invalid params: missing field `path`"));
    assert_eq!(attempts[0].duration, Some(RUN_TIME));
    assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running, Status::Failed]);
    assert!(store.claim(OWNER, 10, LEASE).await?.is_empty(), "a failed job was claimed again");
    Ok(())
}

async fn finish_discards_result_of_other_owner(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo())]).await?;
    let own = claim_expecting(store, OWNER, LEASE, heads[0]).await?;
    let foreign = claim_expecting(store, OTHER_OWNER, LEASE, heads[1]).await?;
    let foreign_before = record(store, foreign.id).await?;

    let report = store
        .finish(OWNER, &[result_of(&own, success("1")), result_of(&foreign, success("2"))])
        .await?;

    assert_eq!(report.written, vec![(own.id, Status::Succeeded)]);
    assert_eq!(report.discarded, vec![foreign.id]);
    assert_eq!(record(store, foreign.id).await?, foreign_before, "a result from another owner changed the job");
    assert!(store.attempts(foreign.id).await?.is_empty(), "a result from another owner wrote an attempt");
    assert_eq!(event_statuses(store, foreign.id).await?, vec![Status::Pending, Status::Running]);

    // The owner's own result still goes through.
    let report = store.finish(OTHER_OWNER, &[result_of(&foreign, success("2"))]).await?;
    assert_eq!(report.written, vec![(foreign.id, Status::Succeeded)]);
    assert_eq!(record(store, foreign.id).await?.output.as_deref(), Some("2"));
    Ok(())
}

async fn finish_discards_stale_attempt(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;
    let first = claim_expecting(store, OWNER, LEASE, id).await?;
    store.finish(OWNER, &[result_of(&first, retry_after("timed out", Duration::ZERO))]).await?;
    let second = claim_expecting(store, OWNER, LEASE, id).await?;
    assert_eq!(second.attempt, 2);
    let before = record(store, id).await?;
    let events_before = store.events(id).await?;

    // A late copy of attempt 1's result, and one for an attempt not yet made.
    let stale = result_of(&first, success("stale"));
    let future = Finished { attempt: 3, ..result_of(&second, success("future")) };
    let report = store.finish(OWNER, &[stale, future]).await?;

    assert!(report.written.is_empty(), "written {:?}", report.written);
    assert_eq!(report.discarded, vec![id, id]);
    assert_eq!(record(store, id).await?, before, "a result for another attempt changed the job");
    assert_eq!(store.events(id).await?, events_before, "a result for another attempt added events");
    let attempts = store.attempts(id).await?;
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}");
    assert_eq!(attempts[0].error.as_deref(), Some("timed out"), "the stale result replaced attempt 1's record");

    // With the stale result and the current one in one batch, only the current one is written.
    let stale = result_of(&first, failure("stale"));
    let current = result_of(&second, success("current"));
    let report = store.finish(OWNER, &[stale, current]).await?;

    assert_eq!(report.written, vec![(id, Status::Succeeded)]);
    assert_eq!(report.discarded, vec![id]);
    assert_eq!(record(store, id).await?.output.as_deref(), Some("current"));
    let attempts = store.attempts(id).await?;
    let errors: Vec<Option<&str>> = attempts.iter().map(|attempt| attempt.error.as_deref()).collect();
    assert_eq!(errors, vec![Some("timed out"), None], "errors of attempts 1 and 2");
    assert_eq!(
        event_statuses(store, id).await?,
        vec![Status::Pending, Status::Running, Status::Pending, Status::Running, Status::Succeeded]
    );
    Ok(())
}

async fn finish_discards_result_after_cancel(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;
    let claimed = claim_expecting(store, OWNER, LEASE, id).await?;
    store.cancel(id, "cancelled by the test").await?;
    let before = record(store, id).await?;

    let report = store.finish(OWNER, &[result_of(&claimed, success("too late"))]).await?;

    assert!(report.written.is_empty(), "written {:?}", report.written);
    assert_eq!(report.discarded, vec![id]);
    assert_eq!(record(store, id).await?, before, "a result after cancel changed the job");
    assert_eq!(before.status, Status::Cancelled);
    assert_eq!(before.output, None);
    let attempts = store.attempts(id).await?;
    assert_eq!(attempts.len(), 1, "the cancelled run is recorded once: {attempts:?}");
    assert_eq!(attempts[0].error.as_deref(), Some("cancelled while running: cancelled by the test"), "the late result did not overwrite it");
    assert_eq!(attempts[0].owner.as_deref(), Some(OWNER));
    assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running, Status::Cancelled]);
    Ok(())
}

async fn finish_discards_repeated_result(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo())]).await?;
    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), heads);

    // The same result written twice, in two calls.
    let report = store.finish(OWNER, &[result_of(&claimed[0], success("first"))]).await?;
    assert_eq!(report.written, vec![(heads[0], Status::Succeeded)]);
    let report = store.finish(OWNER, &[result_of(&claimed[0], failure("second"))]).await?;
    assert!(report.written.is_empty(), "written {:?}", report.written);
    assert_eq!(report.discarded, vec![heads[0]]);
    let stored = record(store, heads[0]).await?;
    assert_eq!(stored.status, Status::Succeeded);
    assert_eq!(stored.output.as_deref(), Some("first"));
    assert_eq!(stored.last_error, None);

    // With two results for one run in a single call, the first is written
    // and the second is already out of date.
    let report = store
        .finish(OWNER, &[result_of(&claimed[1], success("first")), result_of(&claimed[1], failure("second"))])
        .await?;
    assert_eq!(report.written, vec![(heads[1], Status::Succeeded)]);
    assert_eq!(report.discarded, vec![heads[1]]);
    let stored = record(store, heads[1]).await?;
    assert_eq!(stored.status, Status::Succeeded);
    assert_eq!(stored.output.as_deref(), Some("first"));
    let attempts = store.attempts(heads[1]).await?;
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}");
    assert_eq!(attempts[0].error, None, "the attempt record does not match the written result");
    assert_eq!(event_statuses(store, heads[1]).await?, vec![Status::Pending, Status::Running, Status::Succeeded]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------

async fn chain_success_releases_child_after_its_delay(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let ids = dispatch_chain(store, echo(), vec![echo(), NewJob { delay: HOUR, ..echo() }]).await?;
    let [head, child, grandchild] = ids[..] else { unreachable!("dispatch_chain checks the length") };

    let claimed = claim_expecting(store, OWNER, LEASE, head).await?;
    let before = Timestamp::now();
    let report = store.finish(OWNER, &[result_of(&claimed, success("{}"))]).await?;
    let after = Timestamp::now();

    assert_eq!(report.written, vec![(head, Status::Succeeded)]);
    assert_eq!(report.released, vec![child]);
    let child_record = record(store, child).await?;
    assert_eq!(child_record.status, Status::Pending);
    assert_within("run_at of the released child", child_record.run_at, before, after);
    assert_eq!(status_of(store, grandchild).await?, Status::Waiting, "the grandchild before its parent ran");
    assert_eq!(event_statuses(store, child).await?, vec![Status::Waiting, Status::Pending]);

    let claimed = claim_expecting(store, OWNER, LEASE, child).await?;
    let before = Timestamp::now();
    let report = store.finish(OWNER, &[result_of(&claimed, success("{}"))]).await?;
    let after = Timestamp::now();

    assert_eq!(report.released, vec![grandchild]);
    let grandchild_record = record(store, grandchild).await?;
    assert_eq!(grandchild_record.status, Status::Pending);
    assert_within("run_at of the released grandchild", grandchild_record.run_at, before.plus(HOUR), after.plus(HOUR));
    assert!(
        grandchild_record.run_at > grandchild_record.created_at.plus(HOUR),
        "the grandchild's delay counted from dispatch, not from its release"
    );
    assert!(store.claim(OWNER, 10, LEASE).await?.is_empty(), "a child was claimed before its delay passed");
    Ok(())
}

async fn chain_failure_cancels_all_descendants(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let ids = dispatch_chain(store, NewJob { max_attempts: 2, ..echo() }, vec![echo(), echo(), echo()]).await?;
    let head = ids[0];
    let descendants = ids[1..].to_vec();

    // A retry is not the end of the head, so its chain keeps waiting.
    let first = claim_expecting(store, OWNER, LEASE, head).await?;
    let report = store.finish(OWNER, &[result_of(&first, retry_after("busy", Duration::ZERO))]).await?;
    assert!(report.cancelled.is_empty(), "a retry cancelled {:?}", report.cancelled);
    for &id in &descendants {
        assert_eq!(status_of(store, id).await?, Status::Waiting, "job {id} after its ancestor's retry");
    }

    let second = claim_expecting(store, OWNER, LEASE, head).await?;
    let report = store.finish(OWNER, &[result_of(&second, failure("disk full"))]).await?;
    assert_eq!(report.written, vec![(head, Status::Failed)]);
    assert!(report.released.is_empty(), "a failure released {:?}", report.released);
    assert_eq!(sorted(report.cancelled), descendants);

    for &id in &descendants {
        let stored = record(store, id).await?;
        assert_eq!(stored.status, Status::Cancelled, "job {id}");
        let reason = stored.last_error.unwrap_or_else(|| panic!("cancelled job {id} has no last_error"));
        assert!(names_job(&reason, head), "the reason {reason:?} for job {id} does not name the failed job {head}");
        assert!(stored.finished_at.is_some(), "cancelled job {id} has no finished_at");
        let events = store.events(id).await?;
        let last = events.last().unwrap_or_else(|| panic!("job {id} has no events"));
        assert_eq!(last.status, Status::Cancelled, "last event of job {id}");
        assert_eq!(last.message.as_deref(), Some(reason.as_str()), "message of the last event of job {id}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Leases: renew, rescue, hand_back
// ---------------------------------------------------------------------------

async fn renew_extends_lease_and_reports_lost_jobs(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo()), single(echo()), single(echo())]).await?;
    let [first, second, third, foreign] = heads[..] else { panic!("dispatching four chains returned {heads:?}") };
    let claimed = store.claim(OWNER, 3, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![first, second, third]);
    claim_expecting(store, OTHER_OWNER, LEASE, foreign).await?;
    let foreign_before = record(store, foreign).await?;

    let before = Timestamp::now();
    let lost = store.renew(OWNER, HOUR, &[(first, Some(0.5)), (second, None), (third, None)]).await?;
    let after = Timestamp::now();

    assert!(lost.is_empty(), "renew reported owned jobs as lost: {lost:?}");
    for id in [first, second, third] {
        let expires = record(store, id).await?.lease_expires_at.unwrap_or_else(|| panic!("job {id} has no lease"));
        assert_within(&format!("renewed lease of job {id}"), expires, before.plus(HOUR), after.plus(HOUR));
    }
    assert_eq!(record(store, first).await?.progress, Some(0.5));
    assert_eq!(record(store, second).await?.progress, None);

    store.cancel(second, "cancelled by the test").await?;
    let unknown = foreign + 1000;
    let lost = store
        .renew(OWNER, HOUR, &[(first, None), (second, None), (third, None), (foreign, Some(0.9)), (unknown, None)])
        .await?;

    assert_eq!(sorted(lost), vec![second, foreign, unknown]);
    assert_eq!(record(store, foreign).await?, foreign_before, "renew changed another owner's job");
    let second_record = record(store, second).await?;
    assert_eq!(second_record.status, Status::Cancelled, "renew revived a cancelled job");
    assert_eq!(second_record.lease_expires_at, None, "renew gave a cancelled job a lease");
    Ok(())
}

async fn rescue_requeues_job_with_expired_lease(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(NewJob { max_attempts: 3, ..job("files", "copy") }), single(echo())]).await?;
    let [expiring, healthy] = heads[..] else { panic!("dispatching two chains returned {heads:?}") };
    let lost_run = claim_expecting(store, OWNER, SHORT_LEASE, expiring).await?;
    claim_expecting(store, OWNER, LEASE, healthy).await?;

    let rescued = rescue_expired(store).await?;

    assert_eq!(rescued.len(), 1, "rescued: {rescued:?}");
    assert_eq!(rescued[0].id, expiring);
    assert_eq!(rescued[0].plugin, "files");
    assert_eq!(rescued[0].method, "copy");
    assert_eq!(rescued[0].owner, OWNER);
    assert_eq!(rescued[0].attempt, 1);
    assert_eq!(rescued[0].status, Status::Pending);

    let stored = record(store, expiring).await?;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.attempts, 1, "the interrupted run counts as an attempt");
    let error = stored.last_error.expect("a rescued job has last_error");
    assert!(error.contains("lease"), "last_error {error:?} does not mention the lease");
    assert_eq!(stored.lease_owner, None);
    assert_eq!(stored.lease_expires_at, None);
    assert_eq!(stored.finished_at, None);

    let attempts = store.attempts(expiring).await?;
    assert_eq!(attempts.len(), 1, "attempts: {attempts:?}");
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].started_at, lost_run.started_at);
    assert_eq!(attempts[0].owner.as_deref(), Some(OWNER));
    assert_eq!(attempts[0].error.as_deref(), Some(error.as_str()));
    assert_eq!(event_statuses(store, expiring).await?, vec![Status::Pending, Status::Running, Status::Pending]);

    assert_eq!(status_of(store, healthy).await?, Status::Running, "a job with a live lease was rescued");
    assert!(store.rescue().await?.is_empty(), "a second rescue found more expired leases");

    // The daemon that lost the lease reports late, and another daemon runs the job again.
    let report = store.finish(OWNER, &[result_of(&lost_run, success("late"))]).await?;
    assert_eq!(report.discarded, vec![expiring]);
    let rerun = claim_expecting(store, OTHER_OWNER, LEASE, expiring).await?;
    assert_eq!(rerun.attempt, 2);
    Ok(())
}

async fn rescue_fails_last_attempt_and_cancels_chain(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let ids = dispatch_chain(store, NewJob { max_attempts: 1, ..echo() }, vec![echo(), echo()]).await?;
    let head = ids[0];
    claim_expecting(store, OWNER, SHORT_LEASE, head).await?;

    let before = Timestamp::now();
    let rescued = rescue_expired(store).await?;
    let after = Timestamp::now();

    assert_eq!(rescued.len(), 1, "rescued: {rescued:?}");
    assert_eq!(rescued[0].id, head);
    assert_eq!(rescued[0].attempt, 1);
    assert_eq!(rescued[0].status, Status::Failed);

    let stored = record(store, head).await?;
    assert_eq!(stored.status, Status::Failed);
    let error = stored.last_error.expect("a failed job has last_error");
    assert!(error.contains("lease"), "last_error {error:?} does not mention the lease");
    assert_within("finished_at", stored.finished_at.expect("a failed job has finished_at"), before, after);
    assert_eq!(store.attempts(head).await?.len(), 1);

    for &id in &ids[1..] {
        let child = record(store, id).await?;
        assert_eq!(child.status, Status::Cancelled, "job {id} behind the failed job");
        let reason = child.last_error.unwrap_or_else(|| panic!("cancelled job {id} has no last_error"));
        assert!(names_job(&reason, head), "the reason {reason:?} for job {id} does not name the failed job {head}");
    }
    Ok(())
}

async fn hand_back_requeues_without_charging_attempt(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store
        .dispatch(&[single(echo()), single(echo()), single(echo()), single(NewJob { delay: HOUR, ..echo() })])
        .await?;
    let [first, second, foreign, not_due] = heads[..] else { panic!("dispatching four chains returned {heads:?}") };
    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![first, second]);
    claim_expecting(store, OTHER_OWNER, LEASE, foreign).await?;
    let foreign_before = record(store, foreign).await?;
    let not_due_before = record(store, not_due).await?;
    assert_eq!(store.hand_back(OWNER, &[]).await?, 0, "handing back no ids");
    store.renew(OWNER, LEASE, &[(first, Some(0.5))]).await?;
    assert_eq!(record(store, first).await?.progress, Some(0.5), "renew stores progress");

    let unknown = not_due + 1000;
    let handed = store.hand_back(OWNER, &[first, second, foreign, not_due, unknown]).await?;
    let after = Timestamp::now();

    assert_eq!(handed, 2, "only the owner's running jobs are handed back");
    for id in [first, second] {
        let stored = record(store, id).await?;
        assert_eq!(stored.status, Status::Pending, "job {id}");
        assert_eq!(stored.attempts, 0, "attempts of handed-back job {id}");
        assert_eq!(stored.lease_owner, None, "lease_owner of job {id}");
        assert_eq!(stored.lease_expires_at, None, "lease_expires_at of job {id}");
        assert_eq!(stored.progress, None, "the handed-back run's progress is gone from job {id}");
        assert!(stored.run_at <= after, "handed-back job {id} is not due: run_at {}", stored.run_at);
        assert!(store.attempts(id).await?.is_empty(), "handing back job {id} recorded an attempt");
        assert_eq!(event_statuses(store, id).await?, vec![Status::Pending, Status::Running, Status::Pending]);
    }
    assert_eq!(record(store, foreign).await?, foreign_before, "hand_back changed another owner's job");
    assert_eq!(record(store, not_due).await?, not_due_before, "hand_back changed a pending job");

    let reclaimed = store.claim(OWNER, 10, LEASE).await?;
    assert_eq!(ids_of(&reclaimed), vec![first, second]);
    assert!(reclaimed.iter().all(|job| job.attempt == 1), "the next run is attempt 1 again: {reclaimed:?}");
    Ok(())
}

async fn owned_lists_running_jobs_of_owner(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo()), single(echo()), single(echo())]).await?;
    let [first, second, foreign, finished] = heads[..] else { panic!("dispatching four chains returned {heads:?}") };
    assert!(store.owned(OWNER).await?.is_empty(), "nothing is claimed yet");

    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![first, second]);
    claim_expecting(store, OTHER_OWNER, LEASE, foreign).await?;
    let last = claim_expecting(store, OWNER, LEASE, finished).await?;
    store.finish(OWNER, &[result_of(&last, success("null"))]).await?;

    assert_eq!(store.owned(OWNER).await?, vec![first, second], "running jobs of the owner, by id");
    assert_eq!(store.owned(OTHER_OWNER).await?, vec![foreign]);
    Ok(())
}

async fn prune_deletes_old_finished_jobs(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[NewChain { head: echo(), then: vec![echo()] }, single(echo()), single(echo()), single(echo())]).await?;
    let [parent, failed, succeeded, pending] = heads[..] else { panic!("dispatching four chains returned {heads:?}") };

    // The chain's parent succeeds; its child is released but stays pending.
    let claimed = store.claim(OWNER, 3, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![parent, failed, succeeded]);
    let outcomes = [success("null"), failure("broken"), success("null")];
    let results: Vec<Finished> = claimed.iter().zip(outcomes).map(|(job, outcome)| result_of(job, outcome)).collect();
    store.finish(OWNER, &results).await?;
    let child = store.children(parent).await?[0];
    tokio::time::sleep(Duration::from_millis(20)).await;

    assert_eq!(store.prune(HOUR).await?, 0, "nothing ended an hour ago");
    assert_eq!(store.prune(Duration::ZERO).await?, 2, "the failed and the succeeded job go");
    for id in [failed, succeeded] {
        assert!(store.get(id).await?.is_none(), "job {id} was pruned");
        assert!(store.attempts(id).await?.is_empty(), "attempts of job {id}");
        assert!(store.events(id).await?.is_empty(), "events of job {id}");
    }
    for id in [parent, child, pending] {
        assert!(store.get(id).await?.is_some(), "job {id} must stay");
    }

    // Once the child has ended too, both go, the child first.
    let claimed = store.claim(OWNER, 10, LEASE).await?;
    let child_run = claimed.iter().find(|job| job.id == child).expect("the child is claimed");
    store.finish(OWNER, &[result_of(child_run, success("null"))]).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.prune(Duration::ZERO).await?, 2, "the chain goes, leaf first");
    assert!(store.get(parent).await?.is_none());
    assert!(store.get(child).await?.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------
// cancel
// ---------------------------------------------------------------------------

async fn cancel_stops_unfinished_jobs_and_descendants(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let running = dispatch_one(store, echo()).await?;
    claim_expecting(store, OWNER, LEASE, running).await?;
    let pending_chain = dispatch_chain(store, echo(), vec![echo(), echo()]).await?;
    let waiting_chain = dispatch_chain(store, echo(), vec![echo(), echo()]).await?;

    let before = Timestamp::now();
    let outcome = store.cancel(pending_chain[0], "stopped by the operator").await?;
    let after = Timestamp::now();
    assert_eq!(
        sort_cancel(outcome),
        CancelOutcome::Cancelled { previous: Status::Pending, descendants: pending_chain[1..].to_vec() }
    );
    let head = record(store, pending_chain[0]).await?;
    assert_eq!(head.status, Status::Cancelled);
    assert_eq!(head.last_error.as_deref(), Some("stopped by the operator"));
    assert_within("finished_at of the cancelled job", head.finished_at.expect("a cancelled job has finished_at"), before, after);
    let events = store.events(pending_chain[0]).await?;
    assert_eq!(events.last().map(|event| event.status), Some(Status::Cancelled));
    assert_eq!(events.last().and_then(|event| event.message.as_deref()), Some("stopped by the operator"));
    for &id in &pending_chain[1..] {
        let stored = record(store, id).await?;
        assert_eq!(stored.status, Status::Cancelled, "descendant {id}");
        let reason = stored.last_error.unwrap_or_else(|| panic!("cancelled job {id} has no last_error"));
        assert!(names_job(&reason, pending_chain[0]), "the reason {reason:?} does not name job {}", pending_chain[0]);
    }

    let outcome = store.cancel(waiting_chain[1], "stopped by the operator").await?;
    assert_eq!(
        sort_cancel(outcome),
        CancelOutcome::Cancelled { previous: Status::Waiting, descendants: vec![waiting_chain[2]] }
    );
    assert_eq!(status_of(store, waiting_chain[0]).await?, Status::Pending, "the parent of a cancelled job");
    assert_eq!(status_of(store, waiting_chain[1]).await?, Status::Cancelled);
    assert_eq!(status_of(store, waiting_chain[2]).await?, Status::Cancelled);

    let outcome = store.cancel(running, "stopped by the operator").await?;
    assert_eq!(outcome, CancelOutcome::Cancelled { previous: Status::Running, descendants: Vec::new() });
    let stored = record(store, running).await?;
    assert_eq!(stored.status, Status::Cancelled);
    assert_eq!(stored.lease_owner, None);
    assert_eq!(stored.lease_expires_at, None);
    assert!(stored.finished_at.is_some(), "a cancelled running job has no finished_at");
    let attempts = store.attempts(running).await?;
    assert_eq!(attempts.len(), 1, "the interrupted run is an attempt: {attempts:?}");
    assert!(attempts[0].duration.is_some(), "the interrupted run has the time it ran until the cancel: {attempts:?}");
    Ok(())
}

async fn cancel_leaves_finished_job_unchanged(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo()), single(echo())]).await?;
    let [succeeded, failed, cancelled] = heads[..] else { panic!("dispatching three chains returned {heads:?}") };
    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![succeeded, failed]);
    store
        .finish(OWNER, &[result_of(&claimed[0], success("{}")), result_of(&claimed[1], failure("broken"))])
        .await?;
    store.cancel(cancelled, "first cancel").await?;

    for (id, status) in [(succeeded, Status::Succeeded), (failed, Status::Failed), (cancelled, Status::Cancelled)] {
        let before = record(store, id).await?;
        let events_before = store.events(id).await?;

        let outcome = store.cancel(id, "second cancel").await?;

        assert_eq!(outcome, CancelOutcome::AlreadyFinal(status), "cancelling a {status} job");
        assert_eq!(record(store, id).await?, before, "cancel changed a {status} job");
        assert_eq!(store.events(id).await?, events_before, "cancel added events to a {status} job");
    }
    Ok(())
}

async fn cancel_unknown_job_returns_not_found(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;

    assert_eq!(store.cancel(id + 1000, "no such job").await?, CancelOutcome::NotFound);
    assert_eq!(status_of(store, id).await?, Status::Pending, "cancelling an unknown id changed another job");
    Ok(())
}

// ---------------------------------------------------------------------------
// retry
// ---------------------------------------------------------------------------

async fn retry_requeues_failed_job_and_chain(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let ids = dispatch_chain(store, NewJob { max_attempts: 1, ..echo() }, vec![echo(), echo()]).await?;
    let head = ids[0];
    let descendants = ids[1..].to_vec();
    let first = claim_expecting(store, OWNER, LEASE, head).await?;
    let report = store.finish(OWNER, &[result_of(&first, failure("disk full"))]).await?;
    assert_eq!(sorted(report.cancelled), descendants);

    let outcome = store.retry(head, 2).await?;
    let after = Timestamp::now();

    assert_eq!(sort_retry(outcome), RetryOutcome::Requeued { previous: Status::Failed, status: Status::Pending, descendants: descendants.clone() });
    let stored = record(store, head).await?;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.max_attempts, 3, "max_attempts is attempts plus the extra attempts");
    assert_eq!(stored.finished_at, None);
    assert!(stored.run_at <= after, "a retried job is not due: run_at {}", stored.run_at);
    assert_eq!(event_statuses(store, head).await?.last(), Some(&Status::Pending));
    for &id in &descendants {
        let child = record(store, id).await?;
        assert_eq!(child.status, Status::Waiting, "descendant {id} after the retry");
        assert_eq!(child.finished_at, None, "finished_at of descendant {id}");
        assert_eq!(event_statuses(store, id).await?.last(), Some(&Status::Waiting), "last event of descendant {id}");
    }

    // The chain runs on once the head succeeds.
    let second = claim_expecting(store, OWNER, LEASE, head).await?;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.max_attempts, 3);
    let report = store.finish(OWNER, &[result_of(&second, success("{}"))]).await?;
    assert_eq!(report.released, vec![descendants[0]]);
    assert_eq!(status_of(store, descendants[1]).await?, Status::Waiting);
    Ok(())
}

async fn retry_requeues_cancelled_job(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, NewJob { max_attempts: 5, ..echo() }).await?;
    store.cancel(id, "cancelled by the test").await?;

    let outcome = store.retry(id, 1).await?;

    assert_eq!(outcome, RetryOutcome::Requeued { previous: Status::Cancelled, status: Status::Pending, descendants: Vec::new() });
    let stored = record(store, id).await?;
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.max_attempts, 1, "max_attempts is attempts plus the extra attempts");
    assert_eq!(stored.finished_at, None);
    let claimed = claim_expecting(store, OWNER, LEASE, id).await?;
    assert_eq!(claimed.attempt, 1);
    Ok(())
}

/// A chained job retried on its own must not run before its parent has
/// succeeded: it waits while the parent has not ended, and is rejected, with
/// the parent named, when the parent failed.
async fn retry_of_chained_job_follows_its_parent(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    // The parent is still running, so the child, cancelled by hand, waits again.
    let running_chain = dispatch_chain(store, echo(), vec![echo()]).await?;
    let (parent, child) = (running_chain[0], running_chain[1]);
    let claimed = claim_expecting(store, OWNER, LEASE, parent).await?;
    store.cancel(child, "cancelled by the test").await?;

    let outcome = store.retry(child, 2).await?;

    assert_eq!(outcome, RetryOutcome::Requeued { previous: Status::Cancelled, status: Status::Waiting, descendants: Vec::new() });
    assert_eq!(status_of(store, child).await?, Status::Waiting);
    assert_eq!(event_statuses(store, child).await?.last(), Some(&Status::Waiting));
    assert!(store.claim(OWNER, 10, LEASE).await?.is_empty(), "the retried child was claimed before its parent ended");
    let report = store.finish(OWNER, &[result_of(&claimed, success("{}"))]).await?;
    assert_eq!(report.released, vec![child], "jobs released by the parent's success");
    claim_expecting(store, OWNER, LEASE, child).await?;

    // The parent failed, so the parent is the job to retry.
    let failed_chain = dispatch_chain(store, NewJob { max_attempts: 1, ..echo() }, vec![echo()]).await?;
    let (parent, child) = (failed_chain[0], failed_chain[1]);
    let claimed = claim_expecting(store, OWNER, LEASE, parent).await?;
    store.finish(OWNER, &[result_of(&claimed, failure("disk full"))]).await?;
    assert_eq!(status_of(store, child).await?, Status::Cancelled);

    let outcome = store.retry(child, 2).await?;

    assert_eq!(outcome, RetryOutcome::ParentEnded { parent, status: Status::Failed });
    assert_eq!(status_of(store, child).await?, Status::Cancelled, "a rejected retry changed the child");
    let message = outcome.rejection(child).unwrap_or_default();
    assert!(message.contains(&format!("retry job {parent} instead")), "the rejection {message:?} does not name the parent");

    // The parent succeeded, so the child is due at once.
    let done_chain = dispatch_chain(store, echo(), vec![NewJob { max_attempts: 1, ..echo() }]).await?;
    let (parent, child) = (done_chain[0], done_chain[1]);
    let claimed = claim_expecting(store, OWNER, LEASE, parent).await?;
    store.finish(OWNER, &[result_of(&claimed, success("{}"))]).await?;
    let claimed = claim_expecting(store, OWNER, LEASE, child).await?;
    store.finish(OWNER, &[result_of(&claimed, failure("bad input"))]).await?;

    let outcome = store.retry(child, 1).await?;

    assert_eq!(outcome, RetryOutcome::Requeued { previous: Status::Failed, status: Status::Pending, descendants: Vec::new() });
    claim_expecting(store, OWNER, LEASE, child).await?;
    Ok(())
}

async fn retry_rejects_jobs_not_failed_or_cancelled(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store.dispatch(&[single(echo()), single(echo())]).await?;
    let [succeeded, running] = heads[..] else { panic!("dispatching two chains returned {heads:?}") };
    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![succeeded, running]);
    store.finish(OWNER, &[result_of(&claimed[0], success("{}"))]).await?;
    let chain = dispatch_chain(store, NewJob { delay: HOUR, ..echo() }, vec![echo()]).await?;
    let [pending, waiting] = chain[..] else { unreachable!("dispatch_chain checks the length") };

    let cases = [
        (waiting, Status::Waiting),
        (pending, Status::Pending),
        (running, Status::Running),
        (succeeded, Status::Succeeded),
    ];
    for (id, status) in cases {
        let before = record(store, id).await?;

        let outcome = store.retry(id, 3).await?;

        assert_eq!(outcome, RetryOutcome::NotRetryable(status), "retrying a {status} job");
        assert_eq!(record(store, id).await?, before, "retry changed a {status} job");
    }
    Ok(())
}

async fn retry_unknown_job_returns_not_found(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, echo()).await?;

    assert_eq!(store.retry(id + 1000, 1).await?, RetryOutcome::NotFound);
    Ok(())
}

// ---------------------------------------------------------------------------
// Reads: list, next_due, counts, get, attempts, events, children
// ---------------------------------------------------------------------------

async fn list_returns_newest_first_with_filters(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let heads = store
        .dispatch(&[
            single(job("alpha", "one")),
            single(job("beta", "one")),
            single(job("alpha", "two")),
            single(job("beta", "two")),
            single(job("alpha", "one")),
            single(job("alpha", "two")),
        ])
        .await?;
    let [a1, b1, a2, b2, a1_again, a2_again] = heads[..] else { panic!("dispatching six chains returned {heads:?}") };
    let claimed = store.claim(OWNER, 2, LEASE).await?;
    assert_eq!(ids_of(&claimed), vec![a1, b1]);

    let listed = store.list(&all_jobs()).await?;
    let listed_ids: Vec<JobId> = listed.iter().map(|job| job.id).collect();
    assert_eq!(listed_ids, vec![a2_again, a1_again, b2, a2, b1, a1], "every job, newest first");
    for job in &listed {
        assert_eq!(Some(job), store.get(job.id).await?.as_ref(), "list and get disagree on job {}", job.id);
    }

    let cases = [
        ("status pending", ListFilter { status: Some(Status::Pending), ..all_jobs() }, vec![a2_again, a1_again, b2, a2]),
        ("plugin alpha", ListFilter { plugin: Some("alpha".into()), ..all_jobs() }, vec![a2_again, a1_again, a2, a1]),
        ("method one", ListFilter { method: Some("one".into()), ..all_jobs() }, vec![a1_again, b1, a1]),
        (
            "plugin alpha, method two",
            ListFilter { plugin: Some("alpha".into()), method: Some("two".into()), ..all_jobs() },
            vec![a2_again, a2],
        ),
        (
            "status running, plugin beta",
            ListFilter { status: Some(Status::Running), plugin: Some("beta".into()), ..all_jobs() },
            vec![b1],
        ),
        (
            "plugin alpha, before a1_again",
            ListFilter { plugin: Some("alpha".into()), before_id: Some(a1_again), ..all_jobs() },
            vec![a2, a1],
        ),
        ("plugin gamma", ListFilter { plugin: Some("gamma".into()), ..all_jobs() }, vec![]),
        ("status failed", ListFilter { status: Some(Status::Failed), ..all_jobs() }, vec![]),
        ("limit 2", ListFilter { limit: 2, ..all_jobs() }, vec![a2_again, a1_again]),
        ("limit 0", ListFilter { limit: 0, ..all_jobs() }, vec![]),
    ];
    for (name, filter, expected) in cases {
        let ids: Vec<JobId> = store.list(&filter).await?.iter().map(|job| job.id).collect();
        assert_eq!(ids, expected, "list filtered by {name}");
    }
    Ok(())
}

async fn list_pages_with_before_id(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let chains: Vec<NewChain> = (0..10).map(|_| single(echo())).collect();
    let mut expected = store.dispatch(&chains).await?;
    expected.reverse();

    let mut pages: Vec<Vec<JobId>> = Vec::new();
    let mut before_id = None;
    loop {
        let page = store.list(&ListFilter { before_id, limit: 3, ..ListFilter::default() }).await?;
        assert!(pages.len() <= expected.len(), "paging does not end: {pages:?}");
        let Some(last) = page.last() else { break };
        before_id = Some(last.id);
        pages.push(page.iter().map(|job| job.id).collect());
    }

    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1], "page sizes");
    assert_eq!(pages.concat(), expected, "the pages together list every job once, newest first");
    Ok(())
}

async fn next_due_returns_earliest_pending_run_at(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    assert_eq!(store.next_due().await?, None, "next_due of an empty database");

    // A running job and a waiting job are due now, but neither is pending.
    let running = dispatch_one(store, echo()).await?;
    claim_expecting(store, OWNER, LEASE, running).await?;
    let heads = store
        .dispatch(&[
            single(NewJob { priority: 9, delay: HOUR, ..echo() }),
            single(NewJob { priority: 1, delay: 2 * HOUR, ..echo() }),
            single(NewJob { priority: 5, delay: HOUR / 2, ..echo() }),
            NewChain { head: NewJob { priority: 3, delay: 3 * HOUR, ..echo() }, then: vec![NewJob { priority: 1, ..echo() }] },
        ])
        .await?;
    let [in_1h, in_2h, in_30m, in_3h] = heads[..] else { panic!("dispatching four chains returned {heads:?}") };

    assert_eq!(store.next_due().await?, Some(record(store, in_30m).await?.run_at), "the 30 min job at priority 5");
    store.cancel(in_30m, "cancelled by the test").await?;
    assert_eq!(store.next_due().await?, Some(record(store, in_1h).await?.run_at), "the 1 h job at priority 9");
    store.cancel(in_1h, "cancelled by the test").await?;
    store.cancel(in_2h, "cancelled by the test").await?;
    assert_eq!(store.next_due().await?, Some(record(store, in_3h).await?.run_at), "the 3 h head, not its waiting child");
    store.cancel(in_3h, "cancelled by the test").await?;
    assert_eq!(store.next_due().await?, None, "next_due with only a running job");

    let due_now = dispatch_one(store, NewJob { priority: 10, ..echo() }).await?;
    assert_eq!(store.next_due().await?, Some(record(store, due_now).await?.run_at), "a job that is already due");
    Ok(())
}

async fn ping_answers_on_open_database(store: Arc<dyn Store>) -> CaseResult {
    store.ping().await?;
    dispatch_one(&*store, echo()).await?;
    store.ping().await
}

/// Walks every page of a filtered list with `before_id`, as the dashboard
/// and `GET /api/jobs` do, and checks that the pages hold each matching job
/// once, newest first, and nothing else.
async fn list_pages_cover_filtered_jobs_exactly_once(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let other = NewJob { method: "other".to_owned(), ..echo() };
    let mut chains = Vec::new();
    for index in 0..23 {
        chains.push(single(if index % 3 == 0 { other.clone() } else { echo() }));
    }
    let heads = store.dispatch(&chains).await?;
    let expected: Vec<JobId> =
        heads.iter().zip(&chains).filter(|(_, chain)| chain.head.method == echo().method).map(|(&id, _)| id).rev().collect();

    let mut seen = Vec::new();
    let mut before_id = None;
    loop {
        let filter = ListFilter { method: Some(echo().method), before_id, limit: 4, ..ListFilter::default() };
        let page = store.list(&filter).await?;
        assert!(page.len() <= 4, "a page holds at most the limit: {}", page.len());
        if page.is_empty() {
            break;
        }
        assert!(page.iter().all(|job| job.method == echo().method), "a page holds a job of another method");
        before_id = page.last().map(|job| job.id);
        seen.extend(page.iter().map(|job| job.id));
    }
    assert_eq!(seen, expected);
    Ok(())
}

async fn counts_reports_every_status(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let all_statuses: HashSet<Status> = Status::ALL.into_iter().collect();

    let empty = store.counts().await?;
    assert_eq!(empty.len(), Status::ALL.len(), "counts of an empty database: {empty:?}");
    assert_eq!(empty.iter().map(|&(status, _)| status).collect::<HashSet<_>>(), all_statuses);
    assert!(empty.iter().all(|&(_, count)| count == 0), "counts of an empty database: {empty:?}");

    let heads = store.dispatch(&[single(echo()), single(echo()), single(echo())]).await?;
    let claimed = store.claim(OWNER, 3, LEASE).await?;
    assert_eq!(ids_of(&claimed), heads);
    store
        .finish(OWNER, &[result_of(&claimed[0], success("{}")), result_of(&claimed[1], failure("broken"))])
        .await?;
    dispatch_chain(store, NewJob { delay: HOUR, ..echo() }, vec![echo(), echo()]).await?;
    let cancelled = dispatch_one(store, echo()).await?;
    store.cancel(cancelled, "cancelled by the test").await?;

    let counts = store.counts().await?;
    assert_eq!(counts.len(), Status::ALL.len(), "counts: {counts:?}");
    let counts: BTreeMap<Status, u64> = counts.into_iter().collect();
    let expected: BTreeMap<Status, u64> = [
        (Status::Waiting, 2),
        (Status::Pending, 1),
        (Status::Running, 1),
        (Status::Succeeded, 1),
        (Status::Failed, 1),
        (Status::Cancelled, 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, expected);
    Ok(())
}

/// Runs one job through a retry, a lost lease and a success, and checks that
/// every run gets an attempt record and every change of status an event.
async fn history_records_every_attempt_and_event(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let id = dispatch_one(store, NewJob { max_attempts: 3, ..echo() }).await?;
    let created_at = record(store, id).await?.created_at;

    let first = claim_expecting(store, OWNER, LEASE, id).await?;
    store.finish(OWNER, &[result_of(&first, retry_after("first error", Duration::ZERO))]).await?;
    let second = claim_expecting(store, OTHER_OWNER, SHORT_LEASE, id).await?;
    rescue_expired(store).await?;
    let third = claim_expecting(store, OWNER, LEASE, id).await?;
    store.finish(OWNER, &[result_of(&third, success("done"))]).await?;

    let stored = record(store, id).await?;
    assert_eq!(stored.status, Status::Succeeded);
    assert_eq!(stored.attempts, 3);
    assert_eq!(stored.output.as_deref(), Some("done"));

    let attempts = store.attempts(id).await?;
    assert_eq!(attempts.iter().map(|attempt| attempt.attempt).collect::<Vec<_>>(), vec![1, 2, 3]);
    let starts: Vec<Timestamp> = attempts.iter().map(|attempt| attempt.started_at).collect();
    assert_eq!(starts, vec![first.started_at, second.started_at, third.started_at], "started_at of each attempt");
    let owners: Vec<Option<&str>> = attempts.iter().map(|attempt| attempt.owner.as_deref()).collect();
    assert_eq!(owners, vec![Some(OWNER), Some(OTHER_OWNER), Some(OWNER)], "owner of each attempt");
    assert_eq!(attempts[0].error.as_deref(), Some("first error"));
    let lost = attempts[1].error.as_deref().unwrap_or_default();
    assert!(lost.contains("lease"), "the error {lost:?} of the rescued attempt does not mention the lease");
    assert_eq!(attempts[2].error, None);
    assert_eq!(attempts[0].duration, Some(RUN_TIME));
    assert_eq!(attempts[2].duration, Some(RUN_TIME));
    for attempt in &attempts {
        assert!(attempt.finished_at >= attempt.started_at, "attempt {} finished before it started", attempt.attempt);
    }
    assert_eq!(Some(attempts[2].finished_at), stored.finished_at);

    let events = store.events(id).await?;
    let statuses: Vec<Status> = events.iter().map(|event| event.status).collect();
    assert_eq!(
        statuses,
        vec![
            Status::Pending,
            Status::Running,
            Status::Pending,
            Status::Running,
            Status::Pending,
            Status::Running,
            Status::Succeeded,
        ]
    );
    assert_eq!(events[0].at, created_at, "the first event is the dispatch");
    assert!(events.windows(2).all(|pair| pair[0].at <= pair[1].at), "events are out of time order: {events:?}");
    assert!(store.children(id).await?.is_empty(), "a job dispatched alone has children");
    Ok(())
}

async fn lookups_of_unknown_job_return_nothing(store: Arc<dyn Store>) -> CaseResult {
    let store = &*store;
    let known = dispatch_one(store, echo()).await?;
    let unknown = known + 1000;

    assert_eq!(store.get(unknown).await?, None);
    assert!(store.attempts(unknown).await?.is_empty(), "attempts of an unknown job");
    assert!(store.events(unknown).await?.is_empty(), "events of an unknown job");
    assert!(store.children(unknown).await?.is_empty(), "children of an unknown job");
    Ok(())
}
