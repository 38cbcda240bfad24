//! The daemon's instruments: counters and histograms of finished runs,
//! recorded where results are written and served by `/metrics`.
//!
//! This uses the `prometheus` crate (without its protobuf feature) because
//! its text encoder follows the exposition format exactly, including label
//! escaping and histogram buckets, which a hand-written encoder would have to
//! get right again. Counters start at zero when the daemon starts, as
//! Prometheus counters do. The number of jobs in each status comes from the
//! jobs table at scrape time, so it covers every daemon sharing the table.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::store::Status;

/// Buckets of the run-time histogram, in seconds: from no-op jobs to long
/// batch work. NOTE: guessed boundaries; jobs longer than 10 minutes all
/// fall in the last bucket.
const RUN_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];

/// Buckets of the dispatch-to-start histogram, in seconds. An idle daemon
/// starts a job within milliseconds of a wake-up, and the poll interval
/// (1 s by default) bounds the wait when no wake-up arrives.
const START_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The metrics of one daemon process.
pub struct Metrics {
    registry: Registry,
    jobs: IntGaugeVec,
    succeeded: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    run_seconds: HistogramVec,
    start_delay_seconds: HistogramVec,
    worker_processes: IntGauge,
    worker_deaths: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let by_job = &["plugin", "method"];

        let jobs = IntGaugeVec::new(Opts::new("jobhost_jobs", "Jobs in the jobs table, by status"), &["status"])
            .expect("valid metric");
        let succeeded = IntCounterVec::new(
            Opts::new("jobhost_jobs_succeeded_total", "Jobs that succeeded, by plugin and method"),
            by_job,
        )
        .expect("valid metric");
        let failed = IntCounterVec::new(
            Opts::new("jobhost_jobs_failed_total", "Jobs that failed for good, by plugin and method"),
            by_job,
        )
        .expect("valid metric");
        let retried = IntCounterVec::new(
            Opts::new("jobhost_job_retries_total", "Runs that failed with attempts left and were scheduled again"),
            by_job,
        )
        .expect("valid metric");

        let run_seconds = HistogramVec::new(
            HistogramOpts::new("jobhost_job_run_seconds", "Run time of each finished run, in seconds").buckets(RUN_BUCKETS.to_vec()),
            by_job,
        )
        .expect("valid metric");
        let start_delay_seconds = HistogramVec::new(
            HistogramOpts::new(
                "jobhost_job_start_delay_seconds",
                "Time from when a job became due (dispatch, or the end of its delay or backoff) to the start of its run, in seconds",
            )
            .buckets(START_BUCKETS.to_vec()),
            by_job,
        )
        .expect("valid metric");

        let worker_processes =
            IntGauge::new("jobhost_worker_processes", "Worker processes of this daemon, idle or running a job").expect("valid metric");
        let worker_deaths = IntCounterVec::new(
            Opts::new(
                "jobhost_worker_deaths_total",
                "Worker processes that ended while running a job: crashed (signal, exit, out of memory) or killed by jobhost (timeout, cancel, shutdown)",
            ),
            &["cause"],
        )
        .expect("valid metric");

        for collector in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(succeeded.clone()),
            Box::new(failed.clone()),
            Box::new(retried.clone()),
            Box::new(run_seconds.clone()),
            Box::new(start_delay_seconds.clone()),
            Box::new(worker_processes.clone()),
            Box::new(worker_deaths.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        Self { registry, jobs, succeeded, failed, retried, run_seconds, start_delay_seconds, worker_processes, worker_deaths }
    }

    /// Records that the number of worker processes changed by `change`.
    pub fn count_workers(&self, change: i64) {
        self.worker_processes.add(change);
    }

    /// Records a worker process that ended while running a job.
    pub fn record_worker_death(&self, killed_by_jobhost: bool) {
        let cause = if killed_by_jobhost { "killed" } else { "crashed" };
        self.worker_deaths.with_label_values(&[cause]).inc();
    }

    /// Records a run whose result was written, with how it ended.
    pub fn record_run(&self, plugin: &str, method: &str, outcome: RunOutcome, run_time: Duration, start_delay: Duration) {
        let labels = &[plugin, method];
        match outcome {
            RunOutcome::Succeeded => self.succeeded.with_label_values(labels).inc(),
            RunOutcome::Retried => self.retried.with_label_values(labels).inc(),
            RunOutcome::Failed => self.failed.with_label_values(labels).inc(),
        }
        self.run_seconds.with_label_values(labels).observe(run_time.as_secs_f64());
        self.start_delay_seconds.with_label_values(labels).observe(start_delay.as_secs_f64());
    }

    /// Returns every metric in the Prometheus text format, with `counts` as
    /// the number of jobs in each status.
    pub fn encode(&self, counts: &[(Status, u64)]) -> String {
        for &(status, count) in counts {
            self.jobs.with_label_values(&[status.as_str()]).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        TextEncoder::new().encode_to_string(&self.registry.gather()).expect("the text encoder writes to a string")
    }
}

/// Outcome of a run whose result was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    /// Failed with attempts left; runs again after the backoff.
    Retried,
    /// Failed for good.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_lists_counters_histograms_and_status_gauges() {
        let metrics = Metrics::new();
        metrics.record_run("demo", "handle", RunOutcome::Succeeded, Duration::from_millis(3), Duration::from_millis(2));
        metrics.record_run("demo", "flaky", RunOutcome::Retried, Duration::from_millis(1), Duration::ZERO);
        metrics.record_run("demo", "flaky", RunOutcome::Failed, Duration::from_millis(1), Duration::ZERO);

        let text = metrics.encode(&[(Status::Pending, 4), (Status::Succeeded, 1)]);

        assert!(text.contains("jobhost_jobs{status=\"pending\"} 4"), "{text}");
        assert!(text.contains("jobhost_jobs_succeeded_total{method=\"handle\",plugin=\"demo\"} 1"), "{text}");
        assert!(text.contains("jobhost_job_retries_total{method=\"flaky\",plugin=\"demo\"} 1"), "{text}");
        assert!(text.contains("jobhost_jobs_failed_total{method=\"flaky\",plugin=\"demo\"} 1"), "{text}");
        assert!(text.contains("jobhost_job_run_seconds_bucket{method=\"handle\",plugin=\"demo\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("jobhost_job_start_delay_seconds_count{method=\"flaky\",plugin=\"demo\"} 2"), "{text}");

        metrics.count_workers(2);
        metrics.count_workers(-1);
        metrics.record_worker_death(false);
        let text = metrics.encode(&[]);
        assert!(text.contains("jobhost_worker_processes 1"), "{text}");
        assert!(text.contains("jobhost_worker_deaths_total{cause=\"crashed\"} 1"), "{text}");
    }
}
