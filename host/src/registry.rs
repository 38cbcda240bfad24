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
//! Libraries are never unloaded.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
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
    pub path: PathBuf,
    /// SHA-256 of the library file, in lowercase hex.
    pub sha256: String,
    /// Every method the library exports, whitelisted or not.
    pub exported: Vec<String>,
    /// Whitelisted methods with their settings; all of them are exported.
    pub whitelist: BTreeMap<String, MethodSettings>,
    pub(crate) module: PluginModuleRef,
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
    #[error("{config}:{line}: plugin {plugin:?}: library {} does not exist; build it (cargo build) or fix path", path.display())]
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
        let mut registry = Registry::default();
        let mut errors = Vec::new();
        for plugin in &config.plugins {
            match load_plugin(config, plugin) {
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

fn load_plugin(config: &Config, plugin: &PluginConfig) -> Result<LoadedPlugin, Vec<LoadError>> {
    let config_path = config.path.clone();
    let line = plugin.line;
    let name = plugin.name.clone();
    let path = plugin.path.clone();

    if !path.is_file() {
        return Err(vec![LoadError::Missing { config: config_path, line, plugin: name, path }]);
    }
    let expected = jobhost_plugin_api_version();

    let header = match lib_header_from_path(&path) {
        Ok(header) => header,
        Err(LibraryError::OpenError { err, .. }) => {
            return Err(vec![LoadError::NotALibrary { config: config_path, line, plugin: name, path, detail: err.to_string() }]);
        }
        Err(LibraryError::GetSymbolError { .. }) => {
            return Err(vec![LoadError::NotAPlugin { config: config_path, line, plugin: name, path }]);
        }
        Err(error) => return Err(vec![classify(error, config_path, line, name, path, expected)]),
    };
    let module: PluginModuleRef = match header.init_root_module::<PluginModuleRef>() {
        Ok(module) => module,
        Err(error) => return Err(vec![classify(error, config_path, line, name, path, expected)]),
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
        sha256: file_sha256(&path).unwrap_or_default(),
        path,
        exported,
        whitelist: plugin.methods.clone(),
        module,
    })
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

/// Returns the SHA-256 of the file at `path`, in lowercase hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
}
