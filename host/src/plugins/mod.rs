//! The plugin host: loads the output pipeline's WASM components (result
//! adapters, output formatters, promotion policies; `wit/` describes them)
//! and calls them in isolation. The only module that knows wasmtime.
//!
//! - One `Engine` per process (component model, epoch interruption, pooling
//!   allocator with on-demand fallback) and one ticker thread (10 ms).
//! - A component is compiled once; the native code is cached under
//!   `<cache>/plugins/<sha256>-<engine hash>.cwasm` and reused.
//! - At load a component is checked against its world (an `InstancePre`
//!   from the `bindgen!` types) and refused if it imports anything but
//!   `crownest:plugin/*` and WASI 0.2. WASI is linked deny-by-default
//!   ([`wasi`]): clocks, random and captured stdout/stderr work; there is
//!   no file, socket, environment variable or argument to reach.
//! - Each call gets a fresh `Store` with a deadline (epochs, and timers cut
//!   at it) and a memory cap; whatever the plugin does, the caller gets a
//!   [`PluginError`].
//!
//! Calls are synchronous and CPU-bound: async callers run them (or
//! [`pipeline`]) on the blocking pool. Loaded plugins are cheap to clone.

pub mod bench;
mod bindings;
mod engine;
mod pipeline;
mod types;
mod wasi;

#[cfg(test)]
mod tests;

pub use pipeline::{PipelineLimits, PipelineOutput, PipelineResult, pipeline};
pub use types::{
    Adapted, ArtifactPolicy, Decision, DecodeError, Format, FormatLimits, MimeData, MimeItem,
    Output, OutputKind, PolicyLimits, RawEvent, RejectReason, RichOutput, RunError, RunnerEvent,
    StreamName,
};

use bindings::adapter::{ResultAdapter, ResultAdapterPre};
use bindings::formatter::{OutputFormatter, OutputFormatterPre};
use bindings::policy::{PromotionPolicy, PromotionPolicyPre};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

/// What the Python runner emits for a matplotlib figure (docs/plugins.md).
pub const FIGURE_MIME: &str = "application/vnd.crownest.figure+json";
/// What the Python runner emits for a pandas DataFrame (docs/plugins.md).
pub const DATAFRAME_MIME: &str = "application/vnd.crownest.dataframe+json";

/// Environment variable naming the directory of built plugins.
pub const PLUGINS_DIR_ENV: &str = "CROWNEST_PLUGINS_DIR";

/// Why a plugin could not be loaded or a call failed. Every variant names
/// the plugin; messages are lower-case and fit a run's `notes`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The plugin host itself could not start (engine, cache dir).
    #[error("plugin host unavailable: {0}")]
    Setup(String),
    /// Wrong world, forbidden import, unreadable or invalid component.
    #[error("plugin `{plugin}` cannot be loaded: {message}")]
    Load { plugin: String, message: String },
    /// The call ran past its deadline and was interrupted.
    #[error("plugin `{plugin}` timed out after {} ms", after.as_millis())]
    Timeout { plugin: String, after: Duration },
    /// The plugin tried to grow its memory past the cap.
    #[error("plugin `{plugin}` exceeded its memory limit of {} MiB", limit_bytes >> 20)]
    MemoryLimit { plugin: String, limit_bytes: u64 },
    /// The plugin trapped (a panic is a trap).
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
    /// The plugin returned `err(message)`.
    #[error("plugin `{plugin}` failed: {message}")]
    Returned { plugin: String, message: String },
    /// The plugin returned something that breaks the output invariants.
    #[error("plugin `{plugin}` returned an invalid output: {message}")]
    BadOutput { plugin: String, message: String },
}

impl PluginError {
    /// One word for notes and metrics: `timeout`, `memory_limit`, `trap`, …
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Setup(_) => "setup",
            PluginError::Load { .. } => "load",
            PluginError::Timeout { .. } => "timeout",
            PluginError::MemoryLimit { .. } => "memory_limit",
            PluginError::Trap { .. } => "trap",
            PluginError::Returned { .. } => "error",
            PluginError::BadOutput { .. } => "bad_output",
        }
    }
}

/// Time and memory bounds of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    pub deadline: Duration,
    /// Linear memory cap in bytes (at most 256 MiB).
    pub memory_bytes: usize,
}

/// Bounds per plugin kind. The adapter sees a whole run's events at once,
/// so it gets more time than a per-output formatter or policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    pub adapter: CallLimits,
    pub formatter: CallLimits,
    pub policy: CallLimits,
}

impl Default for HostLimits {
    fn default() -> Self {
        let memory_bytes = 64 << 20;
        HostLimits {
            adapter: CallLimits {
                deadline: Duration::from_millis(500),
                memory_bytes,
            },
            formatter: CallLimits {
                deadline: Duration::from_millis(100),
                memory_bytes,
            },
            policy: CallLimits {
                deadline: Duration::from_millis(100),
                memory_bytes,
            },
        }
    }
}

/// Where a loaded plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// File stem (`default-formatter` for `default_formatter.wasm`).
    pub name: String,
    pub path: PathBuf,
    /// The compiled code came from the cache (no compilation at this load).
    pub from_cache: bool,
    /// The WASI interfaces it imports (`wasi:cli/stdout@0.2.0`, …), sorted.
    pub wasi_imports: Vec<String>,
    /// The `crownest:plugin` version it implements (`0.1.0`, `0.2.0`).
    pub version: String,
}

/// Loads plugins. Cheap to clone; all clones share the process's engine.
#[derive(Clone)]
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<engine::StoreState>>,
    cache_dir: PathBuf,
    limits: HostLimits,
    pooling: bool,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("cache_dir", &self.cache_dir)
            .field("limits", &self.limits)
            .field("pooling", &self.pooling)
            .finish()
    }
}

/// The versions of the `crownest:plugin` package this host links.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["0.1.0", "0.2.0"];

/// The three worlds, for load-time checks and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum World {
    ResultAdapter,
    OutputFormatter,
    PromotionPolicy,
}

impl World {
    const ALL: [World; 3] = [
        World::ResultAdapter,
        World::OutputFormatter,
        World::PromotionPolicy,
    ];

    fn short(self) -> &'static str {
        match self {
            World::ResultAdapter => "result-adapter",
            World::OutputFormatter => "output-formatter",
            World::PromotionPolicy => "promotion-policy",
        }
    }

    /// `crownest:plugin/output-formatter@0.2.0`
    fn name(self, version: &str) -> String {
        format!("crownest:plugin/{}@{version}", self.short())
    }

    /// The world at every supported version, for messages.
    fn any_version(self) -> String {
        format!(
            "crownest:plugin/{}@{{{}}}",
            self.short(),
            SUPPORTED_VERSIONS.join(",")
        )
    }

    fn export(self) -> &'static str {
        match self {
            World::ResultAdapter => "adapt",
            World::OutputFormatter => "format",
            World::PromotionPolicy => "decide",
        }
    }
}

impl PluginHost {
    /// A host whose compiled-plugin cache lives under `cache_dir/plugins/`.
    pub fn new(cache_dir: &Path) -> Result<PluginHost, PluginError> {
        let (engine, pooling) = engine::engine()?;
        std::fs::create_dir_all(cache_dir.join("plugins")).map_err(|e| {
            PluginError::Setup(format!(
                "cannot create {}: {e}",
                cache_dir.join("plugins").display()
            ))
        })?;
        let mut linker = Linker::new(&engine);
        bindings::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| PluginError::Setup(format!("cannot link the host interface: {e:#}")))?;
        bindings::v2::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(
            |e| PluginError::Setup(format!("cannot link the 0.2.0 host interface: {e:#}")),
        )?;
        wasi::add_to_linker(&mut linker)
            .map_err(|e| PluginError::Setup(format!("cannot link WASI: {e:#}")))?;
        Ok(PluginHost {
            engine,
            linker: Arc::new(linker),
            cache_dir: cache_dir.to_owned(),
            limits: HostLimits::default(),
            pooling,
        })
    }

    /// The same host with other call limits (for plugins loaded after).
    pub fn with_limits(mut self, limits: HostLimits) -> PluginHost {
        let cap = |l: CallLimits| CallLimits {
            memory_bytes: l.memory_bytes.min(engine::MAX_MEMORY_CAP),
            ..l
        };
        self.limits = HostLimits {
            adapter: cap(limits.adapter),
            formatter: cap(limits.formatter),
            policy: cap(limits.policy),
        };
        self
    }

    /// Whether the engine got the pooling allocator (else on-demand).
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// A plugin reference from a template -> the component file: an
    /// absolute path as is; a name is `<plugins_dir>/<name>.wasm`, where
    /// cargo's `default_formatter.wasm` also answers to `default-formatter`.
    pub fn resolve(name_or_path: &str, plugins_dir: &Path) -> PathBuf {
        let path = Path::new(name_or_path);
        if path.is_absolute() {
            return path.to_owned();
        }
        let exact = plugins_dir.join(format!("{name_or_path}.wasm"));
        let cargo_name = plugins_dir.join(format!("{}.wasm", name_or_path.replace('-', "_")));
        let exists = |path: &Path| crate::contained::metadata(path).is_ok();
        if !exists(&exact) && exists(&cargo_name) {
            cargo_name
        } else {
            exact
        }
    }

    /// `$CROWNEST_PLUGINS_DIR`, else where `cargo build --release --target
    /// wasm32-wasip2 --manifest-path plugins/Cargo.toml` puts them in this
    /// source tree.
    pub fn default_plugins_dir() -> PathBuf {
        match std::env::var_os(PLUGINS_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../plugins/target/wasm32-wasip2/release"),
        }
    }

    pub fn load_adapter(&self, path: &Path) -> Result<Adapter, PluginError> {
        let (mut info, component) = self.load(path, World::ResultAdapter)?;
        let pre = self.versioned_pre(
            &mut info,
            &component,
            World::ResultAdapter,
            |pre| ResultAdapterPre::new(pre).map(AdapterPre::V1),
            |pre| bindings::v2::adapter::ResultAdapterPre::new(pre).map(AdapterPre::V2),
        )?;
        Ok(Adapter {
            plugin: self.plugin(info, self.limits.adapter),
            pre,
        })
    }

    pub fn load_formatter(&self, path: &Path) -> Result<Formatter, PluginError> {
        let (mut info, component) = self.load(path, World::OutputFormatter)?;
        let pre = self.versioned_pre(
            &mut info,
            &component,
            World::OutputFormatter,
            |pre| OutputFormatterPre::new(pre).map(FormatterPre::V1),
            |pre| bindings::v2::formatter::OutputFormatterPre::new(pre).map(FormatterPre::V2),
        )?;
        Ok(Formatter {
            plugin: self.plugin(info, self.limits.formatter),
            pre,
        })
    }

    pub fn load_policy(&self, path: &Path) -> Result<Policy, PluginError> {
        let (mut info, component) = self.load(path, World::PromotionPolicy)?;
        let pre = self.versioned_pre(
            &mut info,
            &component,
            World::PromotionPolicy,
            |pre| PromotionPolicyPre::new(pre).map(PolicyPre::V1),
            |pre| bindings::v2::policy::PromotionPolicyPre::new(pre).map(PolicyPre::V2),
        )?;
        Ok(Policy {
            plugin: self.plugin(info, self.limits.policy),
            pre,
        })
    }

    /// The typed instance of a component at its version: the one its
    /// `crownest:plugin` imports name, else (it imports none) whichever
    /// version its exports match. Records the version in `info`.
    fn versioned_pre<P>(
        &self,
        info: &mut PluginInfo,
        component: &Component,
        world: World,
        v1: impl FnOnce(wasmtime::component::InstancePre<engine::StoreState>) -> wasmtime::Result<P>,
        v2: impl FnOnce(wasmtime::component::InstancePre<engine::StoreState>) -> wasmtime::Result<P>,
    ) -> Result<P, PluginError> {
        match info.version.as_str() {
            "0.2.0" => self.instance_pre(info, component, world, v2),
            "0.1.0" => self.instance_pre(info, component, world, v1),
            _ => match self.instance_pre(info, component, world, v1) {
                Ok(pre) => {
                    info.version = String::from("0.1.0");
                    Ok(pre)
                }
                Err(v1_error) => {
                    let pre = self
                        .instance_pre(info, component, world, v2)
                        .map_err(|_| v1_error)?;
                    info.version = String::from("0.2.0");
                    Ok(pre)
                }
            },
        }
    }

    /// Whether the compiled code of this component file is in the cache
    /// (a load then takes milliseconds).
    pub fn is_compiled(&self, path: &Path) -> bool {
        read_component(path)
            .map(|bytes| engine::cache_path(&self.engine, &self.cache_dir, &bytes).is_file())
            .unwrap_or(false)
    }

    /// Loads a component for whichever world it implements.
    pub fn load_any(&self, path: &Path) -> Result<AnyPlugin, PluginError> {
        match self.world_of(path)? {
            World::ResultAdapter => self.load_adapter(path).map(AnyPlugin::Adapter),
            World::OutputFormatter => self.load_formatter(path).map(AnyPlugin::Formatter),
            World::PromotionPolicy => self.load_policy(path).map(AnyPlugin::Policy),
        }
    }

    /// The world a component's exports say it implements.
    fn world_of(&self, path: &Path) -> Result<World, PluginError> {
        let name = plugin_name(path);
        let bytes = read_component(path).map_err(|e| PluginError::Load {
            plugin: name.clone(),
            message: format!("cannot read it: {e}"),
        })?;
        let (component, _) = engine::load_component(&self.engine, &self.cache_dir, &name, &bytes)?;
        let exports: Vec<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(e, _)| e.to_owned())
            .collect();
        World::ALL
            .into_iter()
            .find(|w| exports.iter().any(|e| e == w.export()))
            .ok_or_else(|| PluginError::Load {
                plugin: name,
                message: format!(
                    "it implements none of the worlds {}: it exports {}",
                    World::ALL.map(World::any_version).join(", "),
                    if exports.is_empty() {
                        String::from("nothing")
                    } else {
                        exports.join(", ")
                    }
                ),
            })
    }

    fn plugin(&self, info: PluginInfo, limits: CallLimits) -> Plugin {
        Plugin {
            engine: self.engine.clone(),
            name: Arc::from(info.name.as_str()),
            info: Arc::new(info),
            limits,
            config: Arc::from(""),
        }
    }

    /// Reads, compiles (or takes from the cache) and vets a component.
    fn load(&self, path: &Path, world: World) -> Result<(PluginInfo, Component), PluginError> {
        let name = plugin_name(path);
        let load_error = |message: String| PluginError::Load {
            plugin: name.clone(),
            message,
        };
        let bytes = read_component(path).map_err(|e| load_error(format!("cannot read it: {e}")))?;
        let (component, from_cache) =
            engine::load_component(&self.engine, &self.cache_dir, &name, &bytes)?;
        let ty = component.component_type();

        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(import, _)| import.to_owned())
            .collect();
        let forbidden: Vec<String> = imports
            .iter()
            .filter(|import| !import.starts_with("crownest:plugin/") && !wasi::is_granted(import))
            .cloned()
            .collect();
        if !forbidden.is_empty() {
            return Err(load_error(forbidden_imports_message(&forbidden)));
        }
        if let Some(version) = unsupported_version(&imports) {
            return Err(load_error(format!(
                "it is built for crownest:plugin@{version}; this host supports {} (rebuild it \
                 against one of them, see docs/plugins.md)",
                SUPPORTED_VERSIONS
                    .iter()
                    .map(|v| format!("crownest:plugin@{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let version = imported_version(&imports).unwrap_or_default();
        let mut wasi_imports: Vec<String> = imports
            .into_iter()
            .filter(|import| wasi::is_granted(import))
            .collect();
        wasi_imports.sort();

        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(e, _)| e.to_owned())
            .collect();
        if !exports.iter().any(|e| e == world.export()) {
            let looks_like = World::ALL
                .into_iter()
                .find(|w| exports.iter().any(|e| e == w.export()))
                .map(|w| format!(" (it looks like a {} component)", w.short()))
                .unwrap_or_default();
            return Err(load_error(format!(
                "it does not implement world {}: no `{}` export{looks_like}",
                if version.is_empty() {
                    world.any_version()
                } else {
                    world.name(&version)
                },
                world.export()
            )));
        }
        let info = PluginInfo {
            name,
            path: path.to_owned(),
            from_cache,
            wasi_imports,
            // Settled by `versioned_pre` when no import names it.
            version,
        };
        Ok((info, component))
    }

    fn instance_pre<P>(
        &self,
        info: &PluginInfo,
        component: &Component,
        world: World,
        typed: impl FnOnce(wasmtime::component::InstancePre<engine::StoreState>) -> wasmtime::Result<P>,
    ) -> Result<P, PluginError> {
        let expected = if info.version.is_empty() {
            world.any_version()
        } else {
            world.name(&info.version)
        };
        let load_error = |e: wasmtime::Error| PluginError::Load {
            plugin: info.name.clone(),
            message: format!("it does not implement world {expected}: {e:#}"),
        };
        let pre = self.linker.instantiate_pre(component).map_err(load_error)?;
        typed(pre).map_err(load_error)
    }
}

/// A plugin's name: its file stem, with cargo's `_` as `-`.
fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().replace('_', "-"))
        .unwrap_or_else(|| path.display().to_string())
}

/// A loaded plugin of any world.
#[derive(Debug, Clone)]
pub enum AnyPlugin {
    Adapter(Adapter),
    Formatter(Formatter),
    Policy(Policy),
}

impl AnyPlugin {
    /// The world it implements, with its version.
    pub fn world(&self) -> String {
        let world = match self {
            AnyPlugin::Adapter(_) => World::ResultAdapter,
            AnyPlugin::Formatter(_) => World::OutputFormatter,
            AnyPlugin::Policy(_) => World::PromotionPolicy,
        };
        world.name(&self.info().version)
    }

    pub fn info(&self) -> &PluginInfo {
        match self {
            AnyPlugin::Adapter(p) => p.info(),
            AnyPlugin::Formatter(p) => p.info(),
            AnyPlugin::Policy(p) => p.info(),
        }
    }
}

/// The supported `crownest:plugin` version `imports` name, if any.
fn imported_version(imports: &[String]) -> Option<String> {
    crownest_versions(imports)
        .find_map(supported)
        .map(str::to_owned)
}

/// The first `crownest:plugin` version among `imports` the host does not
/// link (a 0.1.x import is served by 0.1.0).
fn unsupported_version(imports: &[String]) -> Option<String> {
    crownest_versions(imports)
        .find(|version| supported(version).is_none())
        .map(str::to_owned)
}

/// The versions of the `crownest:plugin/*` interfaces among `imports`.
fn crownest_versions(imports: &[String]) -> impl Iterator<Item = &str> {
    imports
        .iter()
        .filter_map(|i| i.strip_prefix("crownest:plugin/"))
        .filter_map(|i| i.split_once('@').map(|(_, v)| v))
}

/// The linked version that serves `version`: the same one, or the same
/// minor version (0.x semver: `0.1.3` is served by `0.1.0`).
fn supported(version: &str) -> Option<&'static str> {
    let minor = |v: &str| v.rsplit_once('.').map(|(m, _)| m.to_owned());
    SUPPORTED_VERSIONS
        .iter()
        .find(|s| version == **s || (minor(version).is_some() && minor(version) == minor(s)))
        .copied()
}

/// The largest component file read (a componentize-py component, CPython
/// inside, is about 18 MiB).
pub const MAX_COMPONENT_BYTES: u64 = 128 << 20;

/// A component file's bytes, read inside its own directory: a plugin name
/// resolves to `<plugins_dir>/<name>.wasm`, and a symlink planted there
/// that leads out of the directory is refused (see `crate::contained`).
fn read_component(path: &Path) -> Result<Vec<u8>, crate::contained::ContainedError> {
    crate::contained::read_file(path, MAX_COMPONENT_BYTES)
}

/// The WASI interfaces a component file imports, sorted, read from its
/// import section without compiling it (for listings).
pub fn wasi_imports_of(path: &Path) -> Result<Vec<String>, String> {
    let bytes = read_component(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut depth = 0usize;
    let mut imports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(&bytes) {
        match payload.map_err(|e| format!("not a valid component: {e}"))? {
            wasmparser::Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != wasmparser::Encoding::Component {
                    return Err(String::from("a core module, not a component"));
                }
                depth += 1;
            }
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    let import = import.map_err(|e| format!("not a valid component: {e}"))?;
                    if wasi::is_granted(import.name.name) {
                        imports.push(import.name.name.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    imports.sort();
    Ok(imports)
}

/// Names the refused imports and what a plugin may import instead.
fn forbidden_imports_message(imports: &[String]) -> String {
    let quoted = imports
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "it imports {quoted}, which the host does not provide; a plugin may import \
         crownest:plugin/host and WASI 0.2 (wasi:cli, wasi:clocks, wasi:filesystem, wasi:io, \
         wasi:random, wasi:sockets; see docs/plugins.md for what each grants)"
    )
}

/// What every loaded plugin carries.
#[derive(Clone)]
struct Plugin {
    engine: Engine,
    name: Arc<str>,
    info: Arc<PluginInfo>,
    limits: CallLimits,
    /// The template's config string for this plugin (0.2.0 calls get it).
    config: Arc<str>,
}

impl Plugin {
    fn call<T>(
        &self,
        call: impl FnOnce(
            &mut wasmtime::Store<engine::StoreState>,
        ) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, PluginError> {
        engine::with_store(
            &self.engine,
            &self.name,
            self.limits.deadline,
            self.limits.memory_bytes,
            call,
        )?
        .map_err(|message| PluginError::Returned {
            plugin: self.name.to_string(),
            message,
        })
    }
}

/// A loaded result adapter.
#[derive(Clone)]
pub struct Adapter {
    plugin: Plugin,
    pre: AdapterPre,
}

#[derive(Clone)]
enum AdapterPre {
    V1(ResultAdapterPre<engine::StoreState>),
    V2(bindings::v2::adapter::ResultAdapterPre<engine::StoreState>),
}

/// A loaded output formatter.
#[derive(Clone)]
pub struct Formatter {
    plugin: Plugin,
    pre: FormatterPre,
}

#[derive(Clone)]
enum FormatterPre {
    V1(OutputFormatterPre<engine::StoreState>),
    V2(bindings::v2::formatter::OutputFormatterPre<engine::StoreState>),
}

/// A loaded promotion policy.
#[derive(Clone)]
pub struct Policy {
    plugin: Plugin,
    pre: PolicyPre,
}

#[derive(Clone)]
enum PolicyPre {
    V1(PromotionPolicyPre<engine::StoreState>),
    V2(bindings::v2::policy::PromotionPolicyPre<engine::StoreState>),
}

macro_rules! plugin_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn name(&self) -> &str {
                &self.plugin.name
            }

            pub fn info(&self) -> &PluginInfo {
                &self.plugin.info
            }

            /// The same plugin, called with this template config (a 0.2.0
            /// component gets it; 0.1.0 has no way to take it).
            pub fn with_config(mut self, config: &str) -> Self {
                self.plugin.config = Arc::from(config);
                self
            }
        }

        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).field("info", &self.plugin.info).finish()
            }
        }
    )*};
}

plugin_accessors!(Adapter, Formatter, Policy);

impl Adapter {
    /// Raw interpreter events -> stdout/stderr, rich outputs, error.
    pub fn adapt(&self, events: &[RawEvent]) -> Result<Adapted, PluginError> {
        let events: Vec<bindings::types::RawEvent> = events.iter().map(Into::into).collect();
        let config = &*self.plugin.config;
        let adapted = self.plugin.call(|store| match &self.pre {
            AdapterPre::V1(pre) => {
                let instance: ResultAdapter = pre.instantiate(&mut *store)?;
                instance.call_adapt(&mut *store, &events)
            }
            AdapterPre::V2(pre) => {
                let instance = pre.instantiate(&mut *store)?;
                instance.call_adapt(&mut *store, &events, config)
            }
        })?;
        Ok(adapted.into())
    }
}

impl Formatter {
    /// One rich output -> one normalised output, checked against the
    /// output invariants.
    pub fn format(&self, output: RichOutput, limits: &FormatLimits) -> Result<Output, PluginError> {
        let output: bindings::types::RichOutput = output.into();
        let limits = limits.into();
        let config = &*self.plugin.config;
        let formatted = self.plugin.call(|store| match &self.pre {
            FormatterPre::V1(pre) => {
                let instance: OutputFormatter = pre.instantiate(&mut *store)?;
                instance.call_format(&mut *store, &output, limits)
            }
            FormatterPre::V2(pre) => {
                let instance = pre.instantiate(&mut *store)?;
                instance.call_format(&mut *store, &output, limits, config)
            }
        })?;
        let formatted: Output = formatted.into();
        check_output(&formatted).map_err(|message| PluginError::BadOutput {
            plugin: self.plugin.name.to_string(),
            message,
        })?;
        Ok(formatted)
    }
}

impl Policy {
    /// One output + the run's artifact policy -> inline | promote | reject.
    pub fn decide(
        &self,
        output: &Output,
        policy: ArtifactPolicy,
        limits: &PolicyLimits,
    ) -> Result<Decision, PluginError> {
        let output: bindings::types::Output = output.into();
        let limits = limits.into();
        let config = &*self.plugin.config;
        let decision = self.plugin.call(|store| match &self.pre {
            PolicyPre::V1(pre) => {
                let instance: PromotionPolicy = pre.instantiate(&mut *store)?;
                instance.call_decide(&mut *store, &output, policy.into(), limits)
            }
            PolicyPre::V2(pre) => {
                let instance = pre.instantiate(&mut *store)?;
                instance.call_decide(&mut *store, &output, policy.into(), limits, config)
            }
        })?;
        Ok(decision.into())
    }
}

/// The invariants of a formatted output: exactly one of text and bytes, of
/// the kind its format implies, `size` its length, JSON formats valid JSON.
pub fn check_output(output: &Output) -> Result<(), String> {
    let len = match (&output.text, &output.bytes) {
        (Some(text), None) => text.len(),
        (None, Some(bytes)) => bytes.len(),
        (None, None) => return Err("neither text nor bytes".into()),
        (Some(_), Some(_)) => return Err("both text and bytes".into()),
    };
    if output.size != len as u64 {
        return Err(format!(
            "size {} but the content is {len} bytes",
            output.size
        ));
    }
    if output.format.is_binary() && output.bytes.is_none() {
        return Err(format!("format {} needs bytes", output.format.as_str()));
    }
    if !output.format.is_binary() && output.format != Format::Unknown && output.text.is_none() {
        return Err(format!("format {} needs text", output.format.as_str()));
    }
    if output.format.is_json()
        && let Some(text) = &output.text
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_err()
    {
        return Err(format!(
            "format {} but the text is not JSON",
            output.format.as_str()
        ));
    }
    if output.mime.is_empty() || output.mime.len() > 255 {
        return Err("missing or absurd mime type".into());
    }
    Ok(())
}
