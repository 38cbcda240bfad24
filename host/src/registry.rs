//! Loading the plugin libraries that jobs.toml lists, and deciding which
//! methods may run.
//!
//! Each library is opened through its `abi_stable` header
//! (`lib_header_from_path`, then `init_root_module`), never through
//! `RootModule::load_from_file`, which caches one library per root-module
//! type and would hand every plugin the first plugin's module. Loading checks
//! the plugin-api version and the type layouts; every failure of every plugin
//! is collected, so that start-up reports them all at once.
//!
//! The daemon never loads a library from its configured path. It copies the
//! file into the library cache under a name made of the plugin name and the
//! file's SHA-256, and loads the copy. A rebuilt library is then a new file
//! with a new name, which the OS loader loads beside the old one, so jobs
//! already running keep the old code. A library overwritten in place cannot
//! corrupt the mapped copy either. A file whose hash is already loaded is not
//! loaded again.
//!
//! Libraries are never unloaded: each version stays mapped until the daemon
//! exits.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::library::{LibraryError, lib_header_from_path};
use jobhost_plugin_api::PluginModuleRef;
use sha2::{Digest, Sha256};

use crate::config::{Config, MethodSettings, NotWhitelisted, PluginConfig};

/// A loaded plugin library and the whitelisted part of what it exports.
pub struct LoadedPlugin {
    /// The name jobs.toml gives the plugin, which jobs refer to.
    pub name: String,
    /// The name the library gives itself.
    pub library_name: String,
    pub version: String,
    /// The library file jobs.toml names.
    pub path: PathBuf,
    /// The content-addressed copy that was loaded.
    pub loaded_from: PathBuf,
    /// SHA-256 of the library file, in lowercase hex.
    pub sha256: String,
    /// Every method the library exports, whitelisted or not.
    pub exported: Vec<String>,
    /// Whitelisted methods with their settings; all of them are exported.
    pub whitelist: BTreeMap<String, MethodSettings>,
    pub(crate) module: PluginModuleRef,
}

impl LoadedPlugin {
    /// Returns the whitelisted methods that run in the daemon's own process.
    pub fn in_process_methods(&self) -> Vec<&str> {
        self.whitelist
            .iter()
            .filter(|(_, settings)| settings.isolation == crate::config::Isolation::InProcess)
            .map(|(method, _)| method.as_str())
            .collect()
    }

    /// Returns each whitelisted method that has a memory limit, with the limit as jobs.toml spells it.
    pub fn memory_limits(&self) -> BTreeMap<&str, String> {
        self.whitelist
            .iter()
            .filter_map(|(method, settings)| Some((method.as_str(), crate::config::format_size(settings.memory_limit?))))
            .collect()
    }

    /// Returns true if this entry runs the same code with the same whitelist as `other`.
    pub fn same_as(&self, other: &LoadedPlugin) -> bool {
        self.sha256 == other.sha256 && self.whitelist == other.whitelist
    }
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .field("exported", &self.exported)
            .finish_non_exhaustive()
    }
}

/// Every loaded plugin, by name.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
}

/// Errors from loading a plugin library.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{config}:{line}: plugin {plugin:?}: library {} does not exist; build the plugin (cargo build --release puts it in target/release) or fix path", path.display())]
    Missing { config: PathBuf, line: usize, plugin: String, path: PathBuf },

    #[error("{config}:{line}: plugin {plugin:?}: {} cannot be loaded as a shared library ({detail}); point path at the plugin's .so file", path.display())]
    NotALibrary { config: PathBuf, line: usize, plugin: String, path: PathBuf, detail: String },

    #[error("{config}:{line}: plugin {plugin:?}: {} is not a jobhost plugin (it exports no jobhost root module); build it with jobhost_plugin_api::export_jobs!", path.display())]
    NotAPlugin { config: PathBuf, line: usize, plugin: String, path: PathBuf },

    #[error("{config}:{line}: plugin {plugin:?}: {} was built against jobhost-plugin-api {found}, which this host ({expected}) cannot load; rebuild the plugin against jobhost-plugin-api {expected}", path.display())]
    IncompatibleVersion { config: PathBuf, line: usize, plugin: String, path: PathBuf, expected: String, found: String },

    #[error("{config}:{line}: plugin {plugin:?}: {} has an incompatible plugin ABI (its types differ from this host's jobhost-plugin-api {expected}); rebuild the plugin against the same jobhost-plugin-api as the host", path.display())]
    IncompatibleAbi { config: PathBuf, line: usize, plugin: String, path: PathBuf, expected: String },

    #[error("{config}:{line}: plugin {plugin:?}: {} failed to start: {detail}", path.display())]
    Init { config: PathBuf, line: usize, plugin: String, path: PathBuf, detail: String },

    #[error("{config}:{line}: plugin {plugin:?}: {} is writable by {who} (mode {mode:o}), so they could replace its code; run `chmod go-w` on it, or set allow_insecure_permissions = true for the plugin", path.display())]
    Writable { config: PathBuf, line: usize, plugin: String, path: PathBuf, mode: u32, who: &'static str },

    #[error("{config}:{line}: plugin {plugin:?}: {} is owned by user id {owner}, not by the daemon's user id {daemon}; chown it, or set allow_insecure_permissions = true for the plugin", path.display())]
    Owner { config: PathBuf, line: usize, plugin: String, path: PathBuf, owner: u32, daemon: u32 },

    #[error("{config}:{line}: plugin {plugin:?}: {} has SHA-256 {found}, but jobs.toml pins {expected}; deploy the pinned build or update sha256", path.display())]
    HashMismatch { config: PathBuf, line: usize, plugin: String, path: PathBuf, expected: String, found: String },

    #[error("{config}:{line}: plugin {plugin:?}: cannot read {} or copy it into the library cache {}: {detail}", path.display(), cache.display())]
    Copy { config: PathBuf, line: usize, plugin: String, path: PathBuf, cache: PathBuf, detail: String },

    #[error("{config}:{line}: plugin {plugin:?}: method {method:?} is whitelisted but {} does not export it (it exports: {}); remove it from methods or rebuild the plugin", path.display(), exported.join(", "))]
    NotExported { config: PathBuf, line: usize, plugin: String, path: PathBuf, method: String, exported: Vec<String> },
}

/// Reasons a job's method cannot run now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotRunnable {
    #[error(transparent)]
    NotWhitelisted(#[from] NotWhitelisted),
}

impl Registry {
    /// Loads every plugin in `config`, or returns every problem found.
    pub fn load(config: &Config) -> Result<Self, Vec<LoadError>> {
        Self::reload(config, None)
    }

    /// Loads every plugin in `config`, reusing the libraries of `previous`
    /// whose files have not changed, or returns every problem found.
    pub fn reload(config: &Config, previous: Option<&Registry>) -> Result<Self, Vec<LoadError>> {
        let mut registry = Registry::default();
        let mut errors = Vec::new();
        let mut loaded: HashMap<String, (PluginModuleRef, PathBuf)> = previous
            .into_iter()
            .flat_map(|previous| previous.plugins.values())
            .map(|plugin| (plugin.sha256.clone(), (plugin.module, plugin.loaded_from.clone())))
            .collect();
        for plugin in &config.plugins {
            match load_plugin(config, plugin, &mut loaded) {
                Ok(loaded) => {
                    registry.plugins.insert(loaded.name.clone(), Arc::new(loaded));
                }
                Err(mut plugin_errors) => errors.append(&mut plugin_errors),
            }
        }
        if errors.is_empty() { Ok(registry) } else { Err(errors) }
    }

    /// Returns every loaded plugin, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &LoadedPlugin> {
        self.plugins.values().map(|plugin| &**plugin)
    }

    /// Returns the plugin and settings for `method`, if it may run.
    pub fn method(&self, plugin: &str, method: &str) -> Result<(&Arc<LoadedPlugin>, &MethodSettings), NotRunnable> {
        let Some(loaded) = self.plugins.get(plugin) else {
            return Err(NotWhitelisted::UnknownPlugin { plugin: plugin.to_owned(), known: self.plugins.keys().cloned().collect() }.into());
        };
        // Registry::load has checked that every whitelisted method is exported.
        let settings = loaded
            .whitelist
            .get(method)
            .ok_or_else(|| NotWhitelisted::Method { plugin: plugin.to_owned(), method: method.to_owned() })?;
        Ok((loaded, settings))
    }
}

fn load_plugin(
    config: &Config,
    plugin: &PluginConfig,
    loaded: &mut HashMap<String, (PluginModuleRef, PathBuf)>,
) -> Result<LoadedPlugin, Vec<LoadError>> {
    let config_path = config.path.clone();
    let line = plugin.line;
    let name = plugin.name.clone();
    let path = plugin.path.clone();

    if !path.is_file() {
        return Err(vec![LoadError::Missing { config: config_path, line, plugin: name, path }]);
    }
    if !plugin.allow_insecure_permissions {
        check_permissions(&path).map_err(|problem| {
            vec![match problem {
                Permission::Writable { mode, who } => LoadError::Writable { config: config_path.clone(), line, plugin: name.clone(), path: path.clone(), mode, who },
                Permission::Owner { owner, daemon } => LoadError::Owner { config: config_path.clone(), line, plugin: name.clone(), path: path.clone(), owner, daemon },
            }]
        })?;
    }
    let cache = &config.host.library_cache;
    let copy_error = |detail: String| {
        vec![LoadError::Copy { config: config_path.clone(), line, plugin: name.clone(), path: path.clone(), cache: cache.clone(), detail }]
    };
    // Hash a private snapshot, so that the bytes checked are the bytes loaded.
    let snapshot = Snapshot::take(&path, cache, &name).map_err(|error| copy_error(error.to_string()))?;
    let sha256 = snapshot.sha256.clone();
    if let Some(expected) = &plugin.sha256
        && *expected != sha256
    {
        return Err(vec![LoadError::HashMismatch { config: config_path, line, plugin: name, path, expected: expected.clone(), found: sha256 }]);
    }

    let (module, loaded_from) = match loaded.get(&sha256) {
        Some((module, loaded_from)) => (*module, loaded_from.clone()),
        None => {
            let copy = snapshot.keep().map_err(|error| copy_error(error.to_string()))?;
            let module = open_library(&copy).map_err(|problem| vec![problem.into_error(config_path.clone(), line, name.clone(), path.clone())])?;
            loaded.insert(sha256.clone(), (module, copy.clone()));
            (module, copy)
        }
    };

    let exported: Vec<String> = module.methods().iter().map(|method| method.as_str().to_owned()).collect();
    let mut errors = Vec::new();
    for method in plugin.methods.keys() {
        if !exported.contains(method) {
            errors.push(LoadError::NotExported {
                config: config_path.clone(),
                line,
                plugin: name.clone(),
                path: path.clone(),
                method: method.clone(),
                exported: exported.clone(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    Ok(LoadedPlugin {
        name,
        library_name: module.name().as_str().to_owned(),
        version: module.version().as_str().to_owned(),
        sha256,
        path,
        loaded_from,
        exported,
        whitelist: plugin.methods.clone(),
        module,
    })
}

/// Permission problem that keeps a library file from being loaded.
enum Permission {
    Writable { mode: u32, who: &'static str },
    Owner { owner: u32, daemon: u32 },
}

/// Checks that only the daemon's user can change the library at `path`.
fn check_permissions(path: &Path) -> Result<(), Permission> {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::metadata(path) else { return Ok(()) };
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and all users",
            (true, false) => "its group",
            _ => "all users",
        };
        return Err(Permission::Writable { mode, who });
    }
    // SAFETY: geteuid has no preconditions; POSIX defines no error for it.
    let daemon = unsafe { libc::geteuid() };
    if metadata.uid() != daemon {
        return Err(Permission::Owner { owner: metadata.uid(), daemon });
    }
    Ok(())
}

/// A copy of a library file in the library cache, with its SHA-256, made
/// before anything is checked or loaded. Dropped unless kept.
struct Snapshot {
    partial: PathBuf,
    copy: PathBuf,
    sha256: String,
}

impl Snapshot {
    /// Copies the file at `path` into `cache` while hashing it, in 64 KiB steps.
    fn take(path: &Path, cache: &Path, name: &str) -> std::io::Result<Self> {
        use std::io::{Read, Write};
        let safe_name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        std::fs::create_dir_all(cache)?;
        let partial = cache.join(format!(".{safe_name}.{}.{:08x}.partial", std::process::id(), rand::random::<u32>()));
        let mut source = std::fs::File::open(path)?;
        let mut target = std::fs::File::create(&partial)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let copied = (|| -> std::io::Result<()> {
            loop {
                let read = source.read(&mut buffer)?;
                if read == 0 {
                    return target.flush();
                }
                hasher.update(&buffer[..read]);
                target.write_all(&buffer[..read])?;
            }
        })();
        if let Err(error) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
        let sha256: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        let copy = cache.join(format!("{safe_name}-{}.so", &sha256[..16]));
        Ok(Self { partial, copy, sha256 })
    }

    /// Moves the snapshot to its content-addressed name, unless a copy with
    /// that content is there already, and returns that name.
    fn keep(&self) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        // Copies only ever appear by rename, complete, and their name carries
        // 64 bits of the hash, so an existing copy has this content.
        if self.copy.exists() {
            return Ok(self.copy.clone());
        }
        std::fs::set_permissions(&self.partial, std::fs::Permissions::from_mode(0o555))?;
        // Rename, so that no process ever opens half a file under the final name.
        std::fs::rename(&self.partial, &self.copy)?;
        Ok(self.copy.clone())
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// Failure to open a library file as a plugin.
pub(crate) enum OpenProblem {
    NotALibrary(String),
    NotAPlugin,
    Other(LibraryError),
}

impl std::fmt::Display for OpenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotALibrary(detail) => write!(f, "not a loadable library: {detail}"),
            Self::NotAPlugin => f.write_str("not a jobhost plugin: it exports no jobhost module"),
            Self::Other(error) => write!(f, "{error}"),
        }
    }
}

impl OpenProblem {
    fn into_error(self, config: PathBuf, line: usize, plugin: String, path: PathBuf) -> LoadError {
        match self {
            Self::NotALibrary(detail) => LoadError::NotALibrary { config, line, plugin, path, detail },
            Self::NotAPlugin => LoadError::NotAPlugin { config, line, plugin, path },
            Self::Other(error) => classify(error, config, line, plugin, path, jobhost_plugin_api_version()),
        }
    }
}

/// Loads the library at `path` through its `abi_stable` header.
pub(crate) fn open_library(path: &Path) -> Result<PluginModuleRef, OpenProblem> {
    let header = match lib_header_from_path(path) {
        Ok(header) => header,
        Err(LibraryError::OpenError { err, .. }) => {
            // The message of dlopen repeats the path of the cached copy; keep its reason.
            let detail = err.to_string();
            let detail = detail.rsplit(": ").next().unwrap_or(&detail).to_owned();
            return Err(OpenProblem::NotALibrary(detail));
        }
        Err(LibraryError::GetSymbolError { .. }) => return Err(OpenProblem::NotAPlugin),
        Err(error) => return Err(OpenProblem::Other(error)),
    };
    header.init_root_module::<PluginModuleRef>().map_err(OpenProblem::Other)
}

/// Turns an `abi_stable` load failure into a short message; the full layout
/// report, which runs to hundreds of lines, goes to the debug log.
fn classify(error: LibraryError, config: PathBuf, line: usize, plugin: String, path: PathBuf, expected: String) -> LoadError {
    tracing::debug!(target: "jobhost::registry", plugin = %plugin, path = %path.display(), "full load error: {error}");
    match error {
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => {
            LoadError::IncompatibleVersion { config, line, plugin, path, expected, found: actual_version.to_string() }
        }
        LibraryError::AbiInstability(_) | LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            LoadError::IncompatibleAbi { config, line, plugin, path, expected }
        }
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin { config, line, plugin, path },
        LibraryError::Many(errors) => match errors.into_iter().next() {
            Some(first) => classify(first, config, line, plugin, path, expected),
            None => LoadError::Init { config, line, plugin, path, detail: "unknown load error".to_owned() },
        },
        other => {
            let detail = other.to_string().lines().next().unwrap_or_default().to_owned();
            LoadError::Init { config, line, plugin, path, detail }
        }
    }
}

fn jobhost_plugin_api_version() -> String {
    use abi_stable::library::RootModule;
    let strings = PluginModuleRef::VERSION_STRINGS;
    strings.version.as_str().to_owned()
}

/// Returns the SHA-256 of the file at `path`, in lowercase hex, reading it in 64 KiB steps.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect());
        }
        hasher.update(&buffer[..read]);
    }
}

/// Returns the SHA-256 of `bytes`, in lowercase hex.
pub fn bytes_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}
