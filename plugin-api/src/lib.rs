//! The stable ABI between the jobhost daemon and its plugin libraries.
//!
//! A plugin is a `cdylib` that exports one root module, [`PluginModule`]: its
//! name, its version, the names of the methods it exports, and one `invoke`
//! entry point. Parameters and results cross the boundary as JSON text, so the
//! only types whose layout both sides must agree on are the few `#[repr(C)]`
//! types in this crate, and `abi_stable` checks those when the host loads the
//! library.
//!
//! Plugin authors never touch the ABI types. They write plain functions and
//! export them with [`export_jobs!`]:
//!
//! ```ignore
//! use jobhost_plugin_api::{export_jobs, JobContext, JobError};
//!
//! fn greet(ctx: &JobContext, name: String) -> Result<String, JobError> {
//!     ctx.log(format!("greeting {name}"));
//!     Ok(format!("hello, {name}"))
//! }
//!
//! export_jobs! {
//!     name: "greeter",
//!     methods: [greet],
//! }
//! ```
//!
//! The root module and the host's callback table are `abi_stable` prefix
//! types: fields may only ever be appended, so that a host can load plugins
//! built against an older version of this crate.

use std::ffi::c_void;
use std::fmt;
use std::time::Duration;

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{ROption, RSlice, RStr, RString};
use abi_stable::{StableAbi, declare_root_module_statics, package_version_strings};

#[doc(hidden)]
pub use abi_stable;
#[doc(hidden)]
pub use serde_json;

// ---------------------------------------------------------------------------
// The ABI
// ---------------------------------------------------------------------------

/// Root module of a plugin library.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// Name the plugin gives itself, for logs and the plugins page.
    pub name: RStr<'static>,

    /// The plugin crate's version (`CARGO_PKG_VERSION`).
    pub version: RStr<'static>,

    /// Names of the methods the library exports.
    pub methods: RSlice<'static, RStr<'static>>,

    /// Runs `method` with `params` (JSON text) and returns its outcome.
    ///
    /// Never unwinds: a panic inside the method is returned as
    /// [`Outcome::Failed`] with the panic message.
    #[sabi(last_prefix_field)]
    pub invoke: extern "C" fn(context: &HostContext, method: RStr<'_>, params: RStr<'_>) -> Outcome,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}

    const BASE_NAME: &'static str = "jobhost_plugin";
    const NAME: &'static str = "jobhost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The result of one run of a method, as it crosses the boundary.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The method returned `Ok`; `output` is its result as JSON text.
    Succeeded { output: RString },

    /// The method asked to run again later, after `delay_ms` if it set one.
    Retry { message: RString, delay_ms: ROption<u64> },

    /// The method failed for good, or panicked.
    Failed { message: RString },
}

/// Severity of a log line a plugin sends to the host.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// Context the host passes to every `invoke` call.
///
/// `host_data` is opaque to the plugin: it only hands it back to the
/// callbacks in `callbacks`, and only during the call.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostContext {
    pub job_id: i64,
    /// 1 for the first run of a job, 2 for its first retry, and so on.
    pub attempt: u32,
    pub host_data: *const c_void,
    pub callbacks: HostCallbacksRef,
}

/// Functions the host offers to a running method.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostCallbacksRef)))]
#[sabi(missing_field(panic))]
pub struct HostCallbacks {
    /// Writes one line to the host's log, tagged with the job id.
    pub log: extern "C" fn(host_data: *const c_void, level: LogLevel, message: RStr<'_>),

    /// Records how far the job has got, from 0.0 to 1.0.
    pub progress: extern "C" fn(host_data: *const c_void, fraction: f64),

    /// Returns true once the job has been cancelled or has timed out.
    #[sabi(last_prefix_field)]
    pub is_cancelled: extern "C" fn(host_data: *const c_void) -> bool,
}

// ---------------------------------------------------------------------------
// What plugin authors use
// ---------------------------------------------------------------------------

/// The running job, as a method observes it.
pub struct JobContext<'a> {
    raw: &'a HostContext,
}

impl<'a> JobContext<'a> {
    #[doc(hidden)]
    pub fn from_raw(raw: &'a HostContext) -> Self {
        Self { raw }
    }

    /// Returns the id of the job in the jobs table.
    pub fn job_id(&self) -> i64 {
        self.raw.job_id
    }

    /// 1 for the first run, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.raw.attempt
    }

    /// Writes an info line to the host's log, tagged with the job id.
    pub fn log(&self, message: impl AsRef<str>) {
        self.log_at(LogLevel::Info, message.as_ref());
    }

    /// Writes a warning to the host's log, tagged with the job id.
    pub fn warn(&self, message: impl AsRef<str>) {
        self.log_at(LogLevel::Warn, message.as_ref());
    }

    /// Writes a line at `level` to the host's log, tagged with the job id.
    pub fn log_at(&self, level: LogLevel, message: &str) {
        (self.raw.callbacks.log())(self.raw.host_data, level, RStr::from_str(message));
    }

    /// Records progress, from 0.0 (nothing done) to 1.0 (all done).
    pub fn progress(&self, fraction: f64) {
        (self.raw.callbacks.progress())(self.raw.host_data, fraction.clamp(0.0, 1.0));
    }

    /// Returns true once the job has been cancelled or has timed out.
    ///
    /// Long-running methods should check this between steps and return early.
    pub fn is_cancelled(&self) -> bool {
        (self.raw.callbacks.is_cancelled())(self.raw.host_data)
    }
}

/// Error a method returns, with what the host should do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobError {
    /// Run the job again, after `delay` or else after the method's configured
    /// retry delay, unless it has used up its attempts.
    Retry { message: String, delay: Option<Duration> },

    /// Fail the job now, without another attempt.
    Fatal { message: String },
}

impl JobError {
    /// Creates a failure worth another attempt after the configured retry delay.
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Retry { message: message.into(), delay: None }
    }

    /// Creates a failure worth another attempt after `delay`.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        Self::Retry { message: message.into(), delay: Some(delay) }
    }

    /// Creates a failure that another attempt would not fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal { message: message.into() }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry { message, .. } | Self::Fatal { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for JobError {}

/// Exports plain Rust functions as the methods of a plugin library.
///
/// Each function takes `&JobContext` and its params (any
/// `serde::de::DeserializeOwned` type) and returns `Result<T, JobError>` where
/// `T: serde::Serialize`. A method is exported under its function's name, or
/// under another name with `name => function`:
///
/// ```ignore
/// export_jobs! {
///     name: "demo",
///     methods: [handle, sleep, panic => panic_now],
/// }
/// ```
///
/// The generated entry point catches panics, so a panicking method fails its
/// job with the panic message and never unwinds into the host.
#[macro_export]
macro_rules! export_jobs {
    (
        name: $plugin:expr,
        methods: [ $( $method:ident $( => $function:path )? ),+ $(,)? ] $(,)?
    ) => {
        const _: () = {
            static METHODS: &[$crate::abi_stable::std_types::RStr<'static>] = &[
                $( $crate::abi_stable::std_types::RStr::from_str(stringify!($method)) ),+
            ];

            extern "C" fn invoke(
                context: &$crate::HostContext,
                method: $crate::abi_stable::std_types::RStr<'_>,
                params: $crate::abi_stable::std_types::RStr<'_>,
            ) -> $crate::Outcome {
                $crate::__private::invoke_guarded(context, method.as_str(), params.as_str(), |context, method, params| {
                    match method {
                        $( stringify!($method) => ::core::option::Option::Some(
                            $crate::__private::run_method(context, params, $crate::export_jobs!(@function $method $( $function )?))
                        ), )+
                        _ => ::core::option::Option::None,
                    }
                })
            }

            fn root_module() -> $crate::PluginModuleRef {
                $crate::__private::build_module($plugin, env!("CARGO_PKG_VERSION"), METHODS, invoke)
            }

            extern "C" fn load_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(root_module)
            }

            // The symbol and header that `abi_stable`'s `#[export_root_module]`
            // would emit, written out so that plugin crates need no direct
            // dependency on `abi_stable`. A unit test in this crate checks
            // the symbol name against `abi_stable::library::ROOT_MODULE_LOADER_NAME`.
            #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
            static LIBRARY_HEADER: $crate::abi_stable::library::LibHeader = unsafe {
                // SAFETY: `load_root_module` returns the erased form of a
                // `PluginModuleRef`, which is the module type named here.
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModuleRef>(
                    load_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
    (@function $method:ident) => { $method };
    (@function $method:ident $function:path) => { $function };
}

#[doc(hidden)]
pub mod __private {
    use super::*;
    use abi_stable::prefix_type::PrefixTypeTrait;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    pub fn build_module(
        name: &'static str,
        version: &'static str,
        methods: &'static [RStr<'static>],
        invoke: extern "C" fn(&HostContext, RStr<'_>, RStr<'_>) -> Outcome,
    ) -> PluginModuleRef {
        PluginModule {
            name: RStr::from_str(name),
            version: RStr::from_str(version),
            methods: RSlice::from_slice(methods),
            invoke,
        }
        .leak_into_prefix()
    }

    /// Runs `dispatch` with panics caught, so nothing unwinds across `extern "C"`.
    pub fn invoke_guarded(
        context: &HostContext,
        method: &str,
        params: &str,
        dispatch: impl FnOnce(&JobContext<'_>, &str, &str) -> Option<Outcome>,
    ) -> Outcome {
        let context = JobContext::from_raw(context);
        let result = catch_unwind(AssertUnwindSafe(|| dispatch(&context, method, params)));
        match result {
            Ok(Some(outcome)) => outcome,
            Ok(None) => Outcome::Failed {
                message: format!("method {method:?} is not exported by this plugin").into(),
            },
            Err(payload) => Outcome::Failed { message: format!("panicked: {}", panic_message(&*payload)).into() },
        }
    }

    /// Parses `params`, calls the method, and turns its result into an [`Outcome`].
    pub fn run_method<P, R>(
        context: &JobContext<'_>,
        params: &str,
        method: fn(&JobContext<'_>, P) -> Result<R, JobError>,
    ) -> Outcome
    where
        P: serde::de::DeserializeOwned,
        R: serde::Serialize,
    {
        let params: P = match serde_json::from_str(params) {
            Ok(params) => params,
            Err(error) => {
                return Outcome::Failed { message: format!("invalid params {params}: {error}").into() };
            }
        };
        match method(context, params) {
            Ok(output) => match serde_json::to_string(&output) {
                Ok(output) => Outcome::Succeeded { output: output.into() },
                Err(error) => Outcome::Failed { message: format!("cannot serialize the output: {error}").into() },
            },
            Err(JobError::Retry { message, delay }) => Outcome::Retry {
                message: message.into(),
                delay_ms: delay.map(|delay| delay.as_millis().min(u64::MAX as u128) as u64).into(),
            },
            Err(JobError::Fatal { message }) => Outcome::Failed { message: message.into() },
        }
    }

    pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        if let Some(message) = payload.downcast_ref::<&str>() {
            (*message).to_owned()
        } else if let Some(message) = payload.downcast_ref::<String>() {
            message.clone()
        } else {
            "a panic with a non-string payload".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_symbol_matches_abi_stable() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }

    #[test]
    fn panic_message_reads_str_and_string() {
        let from_str: Box<dyn std::any::Any + Send> = Box::new("boom");
        let from_string: Box<dyn std::any::Any + Send> = Box::new(String::from("bang"));
        assert_eq!(__private::panic_message(&*from_str), "boom");
        assert_eq!(__private::panic_message(&*from_string), "bang");
    }
}
