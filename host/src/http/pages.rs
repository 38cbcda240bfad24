//! The HTML pages: dashboard, job detail, plugins, test panel and sign-in.
//!
//! Templates are written with `maud`: they are Rust code, checked by the
//! compiler and built into the binary, and every `(value)` they splice in is
//! HTML-escaped. Job values (params, output, errors, names) are only ever
//! spliced that way, never through `PreEscaped`. (askama escapes too, but
//! keeps templates in separate files whose mistakes surface later.)
//!
//! Pages that change while jobs run mark a region `#live` with
//! `data-refresh`; `/assets/app.js` fetches the page again and swaps in the
//! new region.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::actions::{self, ActionError};
use super::api::url_with;
use super::security;
use super::AppState;
use crate::client::Job;
use crate::store::{JobId, JobRecord, ListFilter, Status};
use crate::time::Timestamp;

const STYLESHEET: &str = include_str!("assets/app.css");
const SCRIPT: &str = include_str!("assets/app.js");

/// How often live regions refresh, in milliseconds.
const REFRESH_MS: u32 = 2000;
/// Characters of the last error shown in the job list.
const ERROR_PREVIEW_CHARS: usize = 120;
/// Chained jobs shown with their status on a job's page.
const CHILDREN_SHOWN: usize = 20;

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Dashboard,
    Plugins,
    TestPanel,
    None,
}

fn layout(title: &str, section: Section, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · jobhost" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "jobhost" }
                    nav {
                        a class=[(section == Section::Dashboard).then_some("active")] href="/" { "Dashboard" }
                        a class=[(section == Section::Plugins).then_some("active")] href="/plugins" { "Plugins" }
                        a class=[(section == Section::TestPanel).then_some("active")] href="/test-jobs" { "Test panel" }
                        a href="/metrics" { "Metrics" }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn page(status: StatusCode, title: &str, section: Section, body: Markup) -> Response {
    (status, layout(title, section, body)).into_response()
}

/// Renders an error page with `status` and `message`.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    page(
        status,
        title,
        Section::None,
        html! {
            h1 { (status.as_u16()) " " (title) }
            p.error-message { (message) }
            p { a href="/" { "Back to the dashboard" } }
        },
    )
}

fn action_error_page(error: &ActionError) -> Response {
    if let ActionError::Store(store_error) = error {
        tracing::error!(target: "jobhost::http", error = %store_error, "a page request failed on the database");
    }
    error_page(error.status(), &error.to_string())
}

/// Renders the hidden field with the form secret that the POST handlers check.
fn csrf_field(state: &AppState) -> Markup {
    html! { input type="hidden" name="csrf" value=(state.csrf.as_str()); }
}

/// Rejects a form post without the right `csrf` field.
fn check_csrf(state: &AppState, form: &HashMap<String, String>) -> Result<(), Box<Response>> {
    match form.get("csrf") {
        Some(submitted) if state.csrf.matches(submitted) => Ok(()),
        _ => Err(Box::new(error_page(
            StatusCode::FORBIDDEN,
            "the form is missing its security token, or it is from an earlier run of the daemon; reload the page and try again",
        ))),
    }
}

fn status_badge(status: Status) -> Markup {
    html! { span class={ "status status-" (status.as_str()) } data-status=(status.as_str()) { (status.as_str()) } }
}

/// Formats a time as `2026-12-04 20:15:00 UTC`, to the second.
fn short_time(time: Timestamp) -> String {
    let full = time.to_rfc3339();
    match full.get(..19) {
        Some(prefix) if full.len() >= 20 => format!("{} UTC", prefix.replace('T', " ")),
        _ => full,
    }
}

fn time_cell(time: Option<Timestamp>) -> Markup {
    match time {
        Some(time) => html! { time datetime=(time.to_rfc3339()) title=(time.to_rfc3339()) { (short_time(time)) } },
        None => html! { span.muted { "–" } },
    }
}

fn format_duration(duration: Duration) -> String {
    let millis = duration.as_secs_f64() * 1000.0;
    if millis < 1.0 {
        format!("{millis:.3} ms")
    } else if millis < 1000.0 {
        format!("{millis:.1} ms")
    } else {
        format!("{:.2} s", millis / 1000.0)
    }
}

/// Pretty-prints stored JSON text, or returns it unchanged if it is not JSON.
fn pretty_json(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| text.to_owned())
}

fn preview(text: &str) -> String {
    let mut preview: String = text.chars().take(ERROR_PREVIEW_CHARS).collect();
    if text.chars().count() > ERROR_PREVIEW_CHARS {
        preview.push('…');
    }
    preview.replace('\n', " ")
}

// ---------------------------------------------------------------------------
// Dashboard
// ---------------------------------------------------------------------------

/// `GET /`: counts per status, a filter form, one page of jobs and links to
/// the newest and the next older page.
pub async fn dashboard(State(state): State<Arc<AppState>>, Query(query): Query<HashMap<String, String>>) -> Response {
    let filter = match actions::list_filter(&query) {
        Ok(filter) => filter,
        Err(error) => return action_error_page(&error),
    };
    let counts = match state.counts.get(&state).await {
        Ok(counts) => counts,
        Err(error) => return action_error_page(&ActionError::Store(error)),
    };
    let page_of_jobs = match actions::list_page(&state, &filter).await {
        Ok(page_of_jobs) => page_of_jobs,
        Err(error) => return action_error_page(&error),
    };
    let total: u64 = counts.iter().map(|(_, count)| count).sum();

    let body = html! {
        h1 { "Jobs" }
        @if let Some(notice) = bulk_notice(&query) { p.notice #bulk-notice { (notice) } }
        (filter_form(&state, &filter, &query))
        form #bulk.bulk method="post" action="/jobs/bulk" {
            (csrf_field(&state))
            span.muted { "Selected jobs: " }
            button type="submit" name="action" value="retry" #bulk-retry { "Retry" }
            " "
            button.danger type="submit" name="action" value="cancel" #bulk-cancel { "Cancel" }
        }
        div #live data-refresh=(REFRESH_MS) {
            ul.counts {
                li { a.count.active[filter.status.is_none()] href=(status_link(&query, None)) { span.number { (total) } " all" } }
                @for (status, count) in &counts {
                    li {
                        a class={ "count count-" (status.as_str()) @if filter.status == Some(*status) { " active" } }
                            href=(status_link(&query, Some(*status))) data-count=(status.as_str()) {
                            span.number { (count) } " " (status.as_str())
                        }
                    }
                }
            }
            (job_table(&page_of_jobs.jobs))
            nav.pages {
                @if filter.before_id.is_some() {
                    a href={ "/?" (url_with(&query, "before", "")) } { "« Newest" }
                }
                @if let Some(before) = page_of_jobs.next_before {
                    a rel="next" href={ "/?" (url_with(&query, "before", &before.to_string())) } { "Older »" }
                }
            }
        }
    };
    page(StatusCode::OK, "Jobs", Section::Dashboard, body)
}

/// Describes the result of the last bulk action from the numbers in the
/// query string. Only numbers and fixed words reach the page.
fn bulk_notice(query: &HashMap<String, String>) -> Option<String> {
    let verb = match query.get("bulk").map(String::as_str) {
        Some("cancel") => "Cancelled",
        Some("retry") => "Queued again",
        _ => return None,
    };
    let number = |key: &str| query.get(key).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
    let (changed, skipped) = (number("changed"), number("skipped"));
    let jobs = |count: u64| if count == 1 { "job" } else { "jobs" };
    let mut notice = format!("{verb} {changed} {}.", jobs(changed));
    if skipped > 0 {
        notice.push_str(&format!(" {skipped} {} could not be changed in their state; their pages say why.", jobs(skipped)));
    }
    Some(notice)
}

/// `POST /jobs/bulk`: cancels or retries the jobs selected on the dashboard.
pub async fn bulk_action(State(state): State<Arc<AppState>>, Form(form): Form<Vec<(String, String)>>) -> Response {
    let fields: HashMap<String, String> = form.iter().filter(|(key, _)| key != "id").cloned().collect();
    if let Err(response) = check_csrf(&state, &fields) {
        return *response;
    }
    let action = fields.get("action").map(String::as_str).unwrap_or("");
    if action != "cancel" && action != "retry" {
        return error_page(StatusCode::BAD_REQUEST, &format!("invalid action {action:?}: use cancel or retry"));
    }
    let mut ids = Vec::new();
    for (key, value) in &form {
        if key != "id" {
            continue;
        }
        match value.parse::<JobId>() {
            Ok(id) if id > 0 => ids.push(id),
            _ => return error_page(StatusCode::BAD_REQUEST, &format!("invalid job id {value:?}: use a whole number above 0")),
        }
    }
    if ids.is_empty() {
        return error_page(StatusCode::BAD_REQUEST, "no job selected; tick the jobs to change first");
    }
    if ids.len() > actions::MAX_PAGE_SIZE as usize {
        return error_page(StatusCode::BAD_REQUEST, &format!("{} jobs selected; select at most {} at once", ids.len(), actions::MAX_PAGE_SIZE));
    }

    let (mut changed, mut skipped) = (0, 0);
    for id in ids {
        let result = match action {
            "cancel" => actions::cancel(&state, id, "cancelled from the dashboard").await.map(|_| ()),
            _ => actions::retry(&state, id).await.map(|_| ()),
        };
        match result {
            Ok(()) => changed += 1,
            Err(ActionError::Store(error)) => return action_error_page(&ActionError::Store(error)),
            Err(_) => skipped += 1,
        }
    }
    Redirect::to(&format!("/?bulk={action}&changed={changed}&skipped={skipped}")).into_response()
}

fn status_link(query: &HashMap<String, String>, status: Option<Status>) -> String {
    let mut query = query.clone();
    query.remove("before");
    format!("/?{}", url_with(&query, "status", status.map_or("", Status::as_str)))
}

fn filter_form(state: &AppState, filter: &ListFilter, query: &HashMap<String, String>) -> Markup {
    let live_config = state.live.config();
    let mut methods: Vec<&str> =
        live_config.plugins.iter().flat_map(|plugin| plugin.methods.keys().map(String::as_str)).collect();
    methods.sort_unstable();
    methods.dedup();
    html! {
        form.filters method="get" action="/" {
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for status in Status::ALL {
                        option value=(status.as_str()) selected[filter.status == Some(status)] { (status.as_str()) }
                    }
                }
            }
            label { "Plugin "
                select name="plugin" {
                    option value="" { "any" }
                    @for plugin in &live_config.plugins {
                        option value=(plugin.name) selected[filter.plugin.as_deref() == Some(plugin.name.as_str())] { (plugin.name) }
                    }
                }
            }
            label { "Method "
                select name="method" {
                    option value="" { "any" }
                    @for method in &methods {
                        option value=(method) selected[filter.method.as_deref() == Some(*method)] { (method) }
                    }
                }
            }
            @if let Some(limit) = query.get("limit") {
                input type="hidden" name="limit" value=(limit);
            }
            button type="submit" { "Filter" }
            label.live-toggle { input #live-toggle type="checkbox" checked; " Live" }
        }
    }
}

fn job_table(jobs: &[JobRecord]) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.empty { "No jobs match." }
        } @else {
            table.jobs {
                thead { tr { th { span.muted { "✓" } } th { "ID" } th { "Job" } th { "Status" } th { "Priority" } th { "Attempts" } th { "Created" } th { "Run at" } th { "Last error" } } }
                tbody {
                    @for job in jobs {
                        tr data-job-id=(job.id) {
                            td.select { input type="checkbox" name="id" value=(job.id) form="bulk" aria-label={ "select job " (job.id) }; }
                            td { a href={ "/jobs/" (job.id) } { "#" (job.id) } }
                            td.name { (job.plugin) "." (job.method) }
                            td { (status_badge(job.status)) }
                            td.number { (job.priority) }
                            td.number { (job.attempts) "/" (job.max_attempts) }
                            td { (time_cell(Some(job.created_at))) }
                            td { (time_cell(Some(job.run_at))) }
                            td.error title=[job.last_error.as_deref()] { (job.last_error.as_deref().map(preview).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Job detail
// ---------------------------------------------------------------------------

/// `GET /jobs/{id}`.
pub async fn job(State(state): State<Arc<AppState>>, Path(id): Path<String>, Query(query): Query<HashMap<String, String>>) -> Response {
    let Some(id) = id.parse::<JobId>().ok().filter(|id| *id > 0) else {
        return error_page(StatusCode::BAD_REQUEST, &format!("invalid job id {id:?}: use a whole number above 0"));
    };
    match job_page(&state, id, query.get("done").map(String::as_str)).await {
        Ok(response) => response,
        Err(error) => action_error_page(&error),
    }
}

async fn job_page(state: &AppState, id: JobId, done: Option<&str>) -> Result<Response, ActionError> {
    let store = state.client.store();
    let job = store.get(id).await?.ok_or(ActionError::NotFound(id))?;
    let attempts = store.attempts(id).await?;
    let events = store.events(id).await?;
    let child_ids = store.children(id).await?;
    let mut children = Vec::new();
    for &child in child_ids.iter().take(CHILDREN_SHOWN) {
        if let Some(record) = store.get(child).await? {
            children.push(record);
        }
    }
    let parent = match job.parent_id {
        Some(parent) => store.get(parent).await?,
        None => None,
    };
    // Only these fixed notices are shown; the query string never reaches the page as text.
    let notice = match done {
        Some("cancelled") => Some("Cancelled."),
        Some("retried") => Some("Queued again with fresh attempts."),
        _ => None,
    };

    let title = format!("Job {id}");
    let body = html! {
        div #live data-refresh=[(!job.status.is_final()).then_some(REFRESH_MS)] {
            h1 { "Job " (id) ": " span.name { (job.plugin) "." (job.method) } " " (status_badge(job.status)) }
            @if let Some(notice) = notice { p.notice { (notice) } }
            div.actions {
                @if !job.status.is_final() {
                    form method="post" action={ "/jobs/" (id) "/cancel" } {
                        (csrf_field(state))
                        button #cancel.danger type="submit" { "Cancel job" }
                    }
                }
                @if matches!(job.status, Status::Failed | Status::Cancelled) {
                    form method="post" action={ "/jobs/" (id) "/retry" } {
                        (csrf_field(state))
                        button #retry type="submit" { "Retry job" }
                    }
                }
            }
            dl.fields {
                dt { "Status" } dd #job-status { (job.status.as_str()) }
                dt { "Priority" } dd { (job.priority) }
                dt { "Attempts" } dd { (job.attempts) " of " (job.max_attempts) }
                dt { "Run at" } dd { (time_cell(Some(job.run_at))) }
                dt { "Created" } dd { (time_cell(Some(job.created_at))) }
                dt { "Started" } dd { (time_cell(job.started_at)) }
                dt { "Finished" } dd { (time_cell(job.finished_at)) }
                @if let Some(progress) = job.progress {
                    dt { "Progress" } dd { progress max="1" value=(progress) {} " " (format!("{:.0}%", progress * 100.0)) }
                }
                @if let Some(owner) = &job.lease_owner {
                    dt { "Lease" } dd { (owner) " until " (time_cell(job.lease_expires_at)) }
                }
                dt { "Chain" }
                dd.chain {
                    @match &parent {
                        Some(parent) => { "after " a href={ "/jobs/" (parent.id) } { "#" (parent.id) " " (parent.plugin) "." (parent.method) } " " (status_badge(parent.status)) }
                        None => { span.muted { "no parent" } }
                    }
                    @if !children.is_empty() {
                        ul {
                            @for child in &children {
                                li { "then " a href={ "/jobs/" (child.id) } { "#" (child.id) " " (child.plugin) "." (child.method) } " " (status_badge(child.status)) }
                            }
                        }
                        @if child_ids.len() > children.len() { p.muted { "and " (child_ids.len() - children.len()) " more" } }
                    }
                }
            }
            h2 { "Params" }
            pre #params { (pretty_json(&job.params)) }
            @if let Some(output) = &job.output {
                h2 { "Output" }
                pre #output { (pretty_json(output)) }
            }
            @if let Some(error) = &job.last_error {
                h2 { "Last error" }
                pre #last-error.error { (error) }
            }
            h2 { "Attempts" }
            @if attempts.is_empty() {
                p.muted { "No attempt has finished yet." }
            } @else {
                table.attempts {
                    thead { tr { th { "#" } th { "Started" } th { "Finished" } th { "Duration" } th { "Outcome" } th { "Daemon" } } }
                    tbody {
                        @for attempt in &attempts {
                            tr {
                                td.number { (attempt.attempt) }
                                td { (time_cell(Some(attempt.started_at))) }
                                td { (time_cell(Some(attempt.finished_at))) }
                                td.number { (attempt.duration.map(format_duration).unwrap_or_else(|| "–".to_owned())) }
                                td {
                                    @match &attempt.error {
                                        Some(error) => { span.error { (error) } }
                                        None => { span.status.status-succeeded { "succeeded" } }
                                    }
                                }
                                td.muted { (attempt.owner.as_deref().unwrap_or("–")) }
                            }
                        }
                    }
                }
            }
            h2 { "Status history" }
            table.events {
                thead { tr { th { "At" } th { "Status" } th { "Message" } } }
                tbody {
                    @for event in &events {
                        tr {
                            td { (time_cell(Some(event.at))) }
                            td { (status_badge(event.status)) }
                            td { (event.message.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    };
    Ok(page(StatusCode::OK, &title, Section::Dashboard, body))
}

/// `POST /jobs/{id}/cancel` from the job page.
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>, Form(form): Form<HashMap<String, String>>) -> Response {
    job_action(&state, &id, &form, "cancelled").await
}

/// `POST /jobs/{id}/retry` from the job page.
pub async fn retry(State(state): State<Arc<AppState>>, Path(id): Path<String>, Form(form): Form<HashMap<String, String>>) -> Response {
    job_action(&state, &id, &form, "retried").await
}

async fn job_action(state: &AppState, id: &str, form: &HashMap<String, String>, done: &str) -> Response {
    if let Err(response) = check_csrf(state, form) {
        return *response;
    }
    let Some(id) = id.parse::<JobId>().ok().filter(|id| *id > 0) else {
        return error_page(StatusCode::BAD_REQUEST, &format!("invalid job id {id:?}: use a whole number above 0"));
    };
    let result = match done {
        "cancelled" => actions::cancel(state, id, "cancelled from the dashboard").await.map(|_| ()),
        _ => actions::retry(state, id).await.map(|_| ()),
    };
    match result {
        Ok(()) => Redirect::to(&format!("/jobs/{id}?done={done}")).into_response(),
        Err(error) => action_error_page(&error),
    }
}

// ---------------------------------------------------------------------------
// Plugins
// ---------------------------------------------------------------------------

/// `GET /plugins`: every loaded plugin, its library, and its methods.
pub async fn plugins(State(state): State<Arc<AppState>>) -> Response {
    // The daemon refuses to start on any load error, so the problems this
    // page can show are those that appeared since: a rejected reload, or a
    // library file that changed and has not been reloaded yet.
    let registry = state.live.registry();
    let live_config = state.live.config();
    let reload_problems = state.live.last_problems();
    let mut disk_checks = Vec::new();
    for plugin in registry.plugins() {
        let path = plugin.path.clone();
        let on_disk = tokio::task::spawn_blocking(move || crate::registry::file_sha256(&path)).await;
        let check = match on_disk {
            Ok(Ok(hash)) if hash == plugin.sha256 => Ok(()),
            Ok(Ok(_)) => Err("the file changed since the daemon loaded it; the daemon reloads it shortly, or run `jobhost reload`".to_owned()),
            Ok(Err(error)) => Err(format!("cannot read the file ({error}); the daemon runs the copy it loaded, but a reload or restart will fail")),
            Err(error) => Err(format!("cannot check the file: {error}")),
        };
        disk_checks.push(check);
    }

    let body = html! {
        h1 { "Plugins" }
        p.muted { "Loaded from " (state.config.path.display().to_string()) ". A method runs only if the library exports it and jobs.toml lists it." }
        @if !reload_problems.is_empty() {
            section.reload-problems {
                h2 { "Last reload rejected" }
                p { "The daemon still runs the plugins below. Fix these problems; it reloads when the files change." }
                ul { @for problem in &reload_problems { li.error.load-error { (problem) } } }
            }
        }
        @for (plugin, check) in registry.plugins().zip(&disk_checks) {
            section.plugin data-plugin=(plugin.name) {
                h2 { (plugin.name) " " span.muted { (plugin.version) } }
                dl.fields {
                    dt { "Library" } dd { (plugin.library_name) }
                    dt { "File" } dd { code { (plugin.path.display().to_string()) } }
                    dt { "Loaded from" } dd { code { (plugin.loaded_from.display().to_string()) } }
                    dt { "SHA-256" } dd { code { (plugin.sha256) } }
                    dt { "Load status" }
                    dd {
                        @match check {
                            Ok(()) => { span.status.status-succeeded { "loaded" } }
                            Err(problem) => { span.status.status-failed { "problem" } " " span.error.load-error { (problem) } }
                        }
                    }
                }
                table.methods {
                    thead { tr { th { "Method" } th { "Whitelisted" } th { "Max attempts" } th { "Retry delay" } th { "Backoff" } th { "Timeout" } th { "Isolation" } th { "Memory limit" } } }
                    tbody {
                        @for method in &plugin.exported {
                            @let settings = plugin.whitelist.get(method);
                            tr data-method=(method) data-whitelisted=(settings.is_some()) {
                                td.name { (method) }
                                @match settings {
                                    Some(settings) => {
                                        td { span.status.status-succeeded { "yes" } }
                                        td.number { (settings.max_attempts) }
                                        td { (humantime::format_duration(settings.retry_delay).to_string()) }
                                        td { (format!("{:?}", settings.backoff).to_lowercase()) }
                                        td { (settings.timeout.map(|timeout| humantime::format_duration(timeout).to_string()).unwrap_or_else(|| "none".to_owned())) }
                                        td.isolation { (settings.isolation.as_str()) }
                                        td.memory-limit { (settings.memory_limit.map(crate::config::format_size).unwrap_or_else(|| "none".to_owned())) }
                                    }
                                    None => {
                                        td { span.status.status-cancelled { "no" } }
                                        td colspan="6" .muted { "exported, but not in methods in jobs.toml, so it is rejected" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if live_config.plugins.is_empty() {
            p.empty { "jobs.toml lists no plugins." }
        }
    };
    page(StatusCode::OK, "Plugins", Section::Plugins, body)
}

// ---------------------------------------------------------------------------
// Test panel
// ---------------------------------------------------------------------------

/// The five jobs of the test panel, all on the demo plugin.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TestJob {
    Basic,
    Delayed,
    Chained,
    Flaky,
    Disallowed,
}

impl TestJob {
    const ALL: [TestJob; 5] = [Self::Basic, Self::Delayed, Self::Chained, Self::Flaky, Self::Disallowed];

    fn slug(self) -> &'static str {
        match self {
            Self::Basic => "basic",
            Self::Delayed => "delayed",
            Self::Chained => "chained",
            Self::Flaky => "flaky",
            Self::Disallowed => "disallowed",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Basic => "Basic job",
            Self::Delayed => "Delayed job (5 s)",
            Self::Chained => "Chained job",
            Self::Flaky => "Flaky job that retries",
            Self::Disallowed => "Disallowed job",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::Basic => "demo.handle with a text: succeeds at once.",
            Self::Delayed => "demo.handle, due 5 seconds after dispatch.",
            Self::Chained => "demo.handle, then two more demo.handle jobs, each after the one before succeeds.",
            Self::Flaky => "demo.flaky: fails with a retryable error on its first 2 attempts, then succeeds.",
            Self::Disallowed => "demo.update: exported by the library but not in the whitelist, so dispatch rejects it.",
        }
    }

    fn job(self) -> Job {
        match self {
            Self::Basic => Job::new("demo", "handle").params(&"basic job from the test panel"),
            Self::Delayed => Job::new("demo", "handle").params(&"delayed job from the test panel").delay(Duration::from_secs(5)),
            Self::Chained => Job::new("demo", "handle")
                .params(&"chain step 1 from the test panel")
                .then(Job::new("demo", "handle").params(&"chain step 2"))
                .then(Job::new("demo", "handle").params(&"chain step 3")),
            Self::Flaky => Job::new("demo", "flaky").params(&2),
            Self::Disallowed => Job::new("demo", "update"),
        }
    }
}

/// Outcome of the last test-panel button.
enum TestOutcome {
    Dispatched { id: JobId, chained: Vec<JobId> },
    Rejected(String),
}

/// `GET /test-jobs`.
pub async fn test_panel(State(state): State<Arc<AppState>>) -> Response {
    page(StatusCode::OK, "Test panel", Section::TestPanel, test_panel_body(&state, None))
}

/// `POST /test-jobs/{kind}`: dispatches one test job and shows what happened.
pub async fn run_test_job(State(state): State<Arc<AppState>>, Path(kind): Path<String>, Form(form): Form<HashMap<String, String>>) -> Response {
    if let Err(response) = check_csrf(&state, &form) {
        return *response;
    }
    let Some(test_job) = TestJob::ALL.into_iter().find(|job| job.slug() == kind) else {
        return error_page(StatusCode::NOT_FOUND, &format!("no test job {kind:?}; the test panel has basic, delayed, chained, flaky and disallowed"));
    };
    let (status, outcome) = match state.client.dispatch_with(&state.live.config(), test_job.job()).await {
        Ok(id) => {
            state.counts.invalidate().await;
            let chained = state.client.store().children(id).await.unwrap_or_default();
            let mut all_chained = chained.clone();
            for child in chained {
                all_chained.extend(state.client.store().children(child).await.unwrap_or_default());
            }
            (StatusCode::OK, TestOutcome::Dispatched { id, chained: all_chained })
        }
        Err(crate::client::DispatchError::Store(error)) => return action_error_page(&ActionError::Store(error)),
        Err(error) => (StatusCode::FORBIDDEN, TestOutcome::Rejected(error.to_string())),
    };
    page(status, "Test panel", Section::TestPanel, test_panel_body(&state, Some((test_job, outcome))))
}

fn test_panel_body(state: &AppState, last: Option<(TestJob, TestOutcome)>) -> Markup {
    html! {
        h1 { "Test panel" }
        p.muted { "Each button dispatches a job on the demo plugin through the same checks as the API and the CLI." }
        @if let Some((job, outcome)) = &last {
            @match outcome {
                TestOutcome::Dispatched { id, chained } => {
                    div #test-result.result.ok data-kind=(job.slug()) data-job-id=(id) {
                        strong { (job.label()) } ": dispatched job "
                        a #test-job-link href={ "/jobs/" (id) } { "#" (id) }
                        @if !chained.is_empty() {
                            ", followed by "
                            @for (index, child) in chained.iter().enumerate() {
                                @if index > 0 { ", " }
                                a href={ "/jobs/" (child) } { "#" (child) }
                            }
                        }
                        "."
                    }
                }
                TestOutcome::Rejected(reason) => {
                    div #test-result.result.rejected data-kind=(job.slug()) {
                        strong { (job.label()) } ": rejected, nothing was dispatched."
                        p #rejection-reason { (reason) }
                    }
                }
            }
        }
        div.test-buttons {
            @for job in TestJob::ALL {
                form method="post" action={ "/test-jobs/" (job.slug()) } {
                    (csrf_field(state))
                    button type="submit" id={ "test-" (job.slug()) } { (job.label()) }
                    p.muted { (job.description()) }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Sign-in, assets and fallbacks
// ---------------------------------------------------------------------------

/// Renders the sign-in page, shown when a token is set and the request has none.
pub fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    page(
        status,
        "Sign in",
        Section::None,
        html! {
            h1 { "Sign in" }
            @if let Some(message) = message { p.error-message { (message) } }
            form.login method="post" action="/login" {
                label { "Token " input #token type="password" name="token" autocomplete="current-password" required; }
                button type="submit" { "Sign in" }
            }
            p.muted { "The token is the one set in [http] in jobs.toml." }
        },
    )
}

/// `GET /login`.
pub async fn login(State(state): State<Arc<AppState>>) -> Response {
    if state.config.http.token.is_none() {
        return Redirect::to("/").into_response();
    }
    login_page(StatusCode::OK, None)
}

/// `POST /login`: stores the token in a cookie when it is right.
pub async fn submit_login(State(state): State<Arc<AppState>>, Form(form): Form<HashMap<String, String>>) -> Response {
    let Some(token) = &state.config.http.token else {
        return Redirect::to("/").into_response();
    };
    let given = form.get("token").map(String::as_str).unwrap_or("");
    if !security::constant_time_eq(token.expose().as_bytes(), given.as_bytes()) {
        tracing::warn!(target: "jobhost::http", "sign-in with a wrong token");
        return login_page(StatusCode::UNAUTHORIZED, Some("the token is wrong; use the token from [http] in jobs.toml"));
    }
    ([(header::SET_COOKIE, security::token_cookie(token.expose()))], Redirect::to("/")).into_response()
}

pub async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], STYLESHEET).into_response()
}

pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], SCRIPT).into_response()
}

/// Any path no route matches.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    error_page(StatusCode::NOT_FOUND, &format!("no page at {}", uri.path()))
}
