//! Rendering of jobs outside the daemon: the JSON job object of `show --json`
//! and `list --json`, and the text of `show` and `list`.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::store::{AttemptRecord, EventRecord, JobId, JobRecord};
use crate::time::Timestamp;

/// Returns the JSON object for `job`. Params and output are embedded as
/// JSON values; times are RFC 3339 in UTC.
pub fn job_json(job: &JobRecord) -> Value {
    json!({
        "id": job.id,
        "plugin": job.plugin,
        "method": job.method,
        "params": embedded_json(&job.params),
        "status": job.status,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_at": job.run_at.to_rfc3339(),
        "created_at": job.created_at.to_rfc3339(),
        "started_at": job.started_at.map(Timestamp::to_rfc3339),
        "finished_at": job.finished_at.map(Timestamp::to_rfc3339),
        "output": job.output.as_deref().map(embedded_json),
        "last_error": job.last_error,
        "progress": job.progress,
        "parent_id": job.parent_id,
        "lease_owner": job.lease_owner,
        "lease_expires_at": job.lease_expires_at.map(Timestamp::to_rfc3339),
    })
}

/// Returns `job_json` plus the job's chain and history, for `show --json`.
pub fn job_detail_json(job: &JobRecord, children: &[JobId], attempts: &[AttemptRecord], events: &[EventRecord]) -> Value {
    let mut value = job_json(job);
    let object = value.as_object_mut().expect("job_json returns an object");
    object.insert("children".into(), json!(children));
    object.insert(
        "attempt_history".into(),
        attempts
            .iter()
            .map(|attempt| {
                json!({
                    "attempt": attempt.attempt,
                    "started_at": attempt.started_at.to_rfc3339(),
                    "finished_at": attempt.finished_at.to_rfc3339(),
                    "duration_ms": attempt.duration.map(|duration| duration.as_secs_f64() * 1000.0),
                    "error": attempt.error,
                    "owner": attempt.owner,
                })
            })
            .collect(),
    );
    object.insert(
        "status_history".into(),
        events
            .iter()
            .map(|event| json!({"status": event.status, "at": event.at.to_rfc3339(), "message": event.message}))
            .collect(),
    );
    value
}

/// Parses stored JSON text, falling back to the text itself if it is not JSON.
fn embedded_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Returns the text of `jobhost show`.
pub fn job_detail_text(job: &JobRecord, children: &[JobId], attempts: &[AttemptRecord], events: &[EventRecord]) -> String {
    let mut text = String::new();
    let optional_time = |time: Option<Timestamp>| time.map_or_else(|| "-".to_owned(), |time| time.to_rfc3339());
    let _ = writeln!(text, "job {}: {}.{}", job.id, job.plugin, job.method);
    let _ = writeln!(text, "  status:       {}", job.status);
    let _ = writeln!(text, "  params:       {}", job.params);
    let _ = writeln!(text, "  priority:     {}", job.priority);
    let _ = writeln!(text, "  attempts:     {} of {}", job.attempts, job.max_attempts);
    let _ = writeln!(text, "  run at:       {}", job.run_at);
    let _ = writeln!(text, "  created at:   {}", job.created_at);
    let _ = writeln!(text, "  started at:   {}", optional_time(job.started_at));
    let _ = writeln!(text, "  finished at:  {}", optional_time(job.finished_at));
    if let Some(progress) = job.progress {
        let _ = writeln!(text, "  progress:     {:.0}%", progress * 100.0);
    }
    if let Some(output) = &job.output {
        let _ = writeln!(text, "  output:       {output}");
    }
    if let Some(error) = &job.last_error {
        let _ = writeln!(text, "  last error:   {error}");
    }
    if let Some(parent) = job.parent_id {
        let _ = writeln!(text, "  parent job:   {parent}");
    }
    if !children.is_empty() {
        let children: Vec<String> = children.iter().map(ToString::to_string).collect();
        let _ = writeln!(text, "  chained jobs: {}", children.join(", "));
    }
    if let Some(owner) = &job.lease_owner {
        let _ = writeln!(text, "  lease owner:  {owner} (until {})", optional_time(job.lease_expires_at));
    }
    if !attempts.is_empty() {
        let _ = writeln!(text, "attempts:");
        for attempt in attempts {
            let duration = attempt.duration.map_or_else(|| "-".to_owned(), |duration| format!("{:.1} ms", duration.as_secs_f64() * 1000.0));
            let outcome = attempt.error.as_deref().unwrap_or("succeeded");
            let _ = writeln!(text, "  #{} at {} ({duration}): {outcome}", attempt.attempt, attempt.started_at);
        }
    }
    if !events.is_empty() {
        let _ = writeln!(text, "status history:");
        for event in events {
            match &event.message {
                Some(message) => {
                    let _ = writeln!(text, "  {}  {}: {message}", event.at, event.status);
                }
                None => {
                    let _ = writeln!(text, "  {}  {}", event.at, event.status);
                }
            }
        }
    }
    text
}

/// Returns the table of `jobhost list`.
pub fn job_table(jobs: &[JobRecord]) -> String {
    let mut text = format!("{:>8}  {:<9}  {:>3}  {:>8}  {:<24}  {:<27}  {}\n", "ID", "STATUS", "PRI", "ATTEMPTS", "JOB", "RUN AT", "LAST ERROR");
    for job in jobs {
        let name = format!("{}.{}", job.plugin, job.method);
        let attempts = format!("{}/{}", job.attempts, job.max_attempts);
        let error: String = job.last_error.as_deref().unwrap_or("").chars().take(60).collect();
        let _ = writeln!(
            text,
            "{:>8}  {:<9}  {:>3}  {:>8}  {:<24}  {:<27}  {}",
            job.id,
            job.status.as_str(),
            job.priority,
            attempts,
            name,
            job.run_at.to_rfc3339(),
            error.replace('\n', " ")
        );
    }
    text
}
