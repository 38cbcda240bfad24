//! The demo plugin: small methods that show, and let the tests exercise,
//! every way a job can go: success, retry, fatal failure, panic and delay,
//! and the ways a plugin can take its process down: a segfault, an abort, an
//! exit, an endless loop and unbounded allocation. Run those last ones only
//! in isolated workers (`isolation = "process"`), and `hog` only under a
//! `memory_limit`.

use std::fs::OpenOptions;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jobhost_plugin_api::{JobContext, JobError, export_jobs};
use serde::Deserialize;

/// Logs its params, a JSON string, and returns them.
fn handle(ctx: &JobContext, message: String) -> Result<String, JobError> {
    ctx.log(format!("handling {message:?}"));
    Ok(message)
}

/// Does nothing. The benchmark drains jobs of this method.
fn noop(_ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    Ok(())
}

/// Fails with a retryable error on its first `N` attempts, then succeeds.
/// With params `null` it fails at random, half of the time.
fn flaky(ctx: &JobContext, failures: Option<u32>) -> Result<String, JobError> {
    let fails = match failures {
        Some(failures) => ctx.attempt() <= failures,
        None => RandomState::new().hash_one(ctx.job_id()) % 2 == 0,
    };
    if fails {
        ctx.warn(format!("attempt {} fails on purpose", ctx.attempt()));
        return Err(JobError::retry(format!("flaky failure on attempt {}", ctx.attempt())));
    }
    Ok(format!("succeeded on attempt {}", ctx.attempt()))
}

/// Sleeps for the given number of milliseconds, or until the job is
/// cancelled, and reports its progress as it goes.
fn sleep(ctx: &JobContext, milliseconds: u64) -> Result<u64, JobError> {
    let total = Duration::from_millis(milliseconds);
    let started = Instant::now();
    let deadline = started + total;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if ctx.is_cancelled() {
            return Err(JobError::fatal("cancelled while sleeping"));
        }
        if !total.is_zero() {
            ctx.progress(started.elapsed().as_secs_f64() / total.as_secs_f64());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
    Ok(milliseconds)
}

/// Panics with the message given as params, or a default one.
fn panic_now(_ctx: &JobContext, message: Option<String>) -> Result<(), JobError> {
    panic!("{}", message.as_deref().unwrap_or("the demo plugin panicked on purpose"));
}

/// Fails for good with the message given as params.
fn fail(_ctx: &JobContext, message: String) -> Result<(), JobError> {
    Err(JobError::fatal(message))
}

/// Exported by the library but left out of the repository's whitelist, to
/// show that a method runs only when jobs.toml lists it.
fn update(ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    ctx.warn("update ran, which only happens when jobs.toml whitelists it");
    Ok(())
}

#[derive(Deserialize)]
struct Record {
    /// File that gets one line per run.
    file: PathBuf,
    /// Text of the line; the job id and attempt are added in front.
    #[serde(default)]
    tag: String,
    /// After recording, fail with a `"retry"` or a `"fatal"` error.
    #[serde(default)]
    fail: Option<String>,
    /// After recording, sleep this many milliseconds (ignoring cancellation).
    #[serde(default)]
    sleep_ms: u64,
}

/// Appends one line per run to a file, then succeeds or fails as asked:
/// how the tests count runs.
fn record(ctx: &JobContext, params: Record) -> Result<(), JobError> {
    let line = format!("{} {} {}\n", ctx.job_id(), ctx.attempt(), params.tag);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&params.file)
        .map_err(|error| JobError::fatal(format!("cannot open {}: {error}", params.file.display())))?;
    // One write of a short line with O_APPEND, so lines from parallel jobs never interleave.
    file.write_all(line.as_bytes())
        .map_err(|error| JobError::retry(format!("cannot write {}: {error}", params.file.display())))?;
    std::thread::sleep(Duration::from_millis(params.sleep_ms));
    match params.fail.as_deref() {
        None => Ok(()),
        Some("retry") => Err(JobError::retry(format!("{} asked for a retry", params.tag))),
        Some(_) => Err(JobError::fatal(format!("{} failed on purpose", params.tag))),
    }
}

/// Returns the file this library was loaded from, as the OS loader reports
/// it: how the tests tell two builds of the plugin apart.
fn whoami(_ctx: &JobContext, _params: serde_json::Value) -> Result<String, JobError> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address, and fills `info` with pointers
    // into the loader's own tables, which stay valid while the library is loaded.
    let found = unsafe { libc::dladdr(whoami as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return Err(JobError::fatal("dladdr found no library for this code"));
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
    let path = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    Ok(path.to_string_lossy().into_owned())
}

/// Returns the id of the process it runs in: how the tests tell the daemon
/// from its worker processes, and one worker from the next.
fn pid(_ctx: &JobContext, _params: serde_json::Value) -> Result<u32, JobError> {
    Ok(std::process::id())
}

/// Writes through a null pointer, which kills the process with SIGSEGV.
fn segfault(_ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    let null = std::hint::black_box(std::ptr::null_mut::<u8>());
    // SAFETY: none; crashing is the point of this method.
    unsafe { null.write_volatile(1) };
    Err(JobError::fatal("the write through a null pointer did not crash"))
}

/// Aborts the process, which kills it with SIGABRT.
fn abort(_ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    std::process::abort();
}

/// Ends the process with the exit code given as params (default 3).
fn exit(_ctx: &JobContext, code: Option<i32>) -> Result<(), JobError> {
    std::process::exit(code.unwrap_or(3));
}

/// Loops forever and never checks for cancellation: only killing its
/// process stops it.
fn spin(ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    ctx.log("spinning forever");
    let mut turns = 0u64;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
        std::hint::spin_loop();
    }
}

/// Allocates and touches memory in 16 MiB chunks without end, so that it
/// really occupies the memory, until allocation fails.
fn hog(ctx: &JobContext, _params: serde_json::Value) -> Result<(), JobError> {
    const CHUNK: usize = 16 << 20;
    ctx.log("allocating without limit");
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        chunks.push(std::hint::black_box(vec![1u8; CHUNK]));
    }
}

export_jobs! {
    name: "demo",
    methods: [
        handle, noop, flaky, sleep, panic => panic_now, fail, update, record, whoami,
        pid, segfault, abort, exit, spin, hog,
    ],
}
