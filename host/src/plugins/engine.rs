//! The one wasmtime `Engine` of the process, its epoch ticker, the
//! compile-once cache of components, and the per-call `Store` harness that
//! bounds a call in time and memory and classifies its failures.

use super::PluginError;
use super::bindings::host::{self, LogLevel};
use super::wasi;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};

/// How often the ticker advances the engine's epoch: the granularity of
/// every plugin deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most memory any one plugin instance may ever get (the pooling
/// allocator's slot size); the per-call cap ([`super::CallLimits`]) is at
/// most this.
pub const MAX_MEMORY_CAP: usize = 256 << 20;

/// Concurrent plugin instances the pooling allocator has slots for; past
/// that a call waits for nothing and fails to instantiate (a `Trap`).
const POOL_INSTANCES: u32 = 256;

/// Log lines one call may emit, and the bytes kept of each.
const MAX_LOG_LINES: u32 = 32;
const MAX_LOG_LINE_BYTES: usize = 1024;

struct Shared {
    engine: Engine,
    pooling: bool,
}

static ENGINE: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The process's engine (created on first use, with its ticker thread), and
/// whether it got the pooling allocator.
pub fn engine() -> Result<(Engine, bool), PluginError> {
    let shared = ENGINE.get_or_init(|| {
        let (engine, pooling) = new_engine()?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("crownest-plugin-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the plugin epoch ticker: {e}"))?;
        Ok(Shared { engine, pooling })
    });
    match shared {
        Ok(shared) => Ok((shared.engine.clone(), shared.pooling)),
        Err(message) => Err(PluginError::Setup(message.clone())),
    }
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config
}

/// Pooling allocator first (instantiation in microseconds); on-demand if
/// this machine refuses the pool's address-space reservation.
fn new_engine() -> Result<(Engine, bool), String> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 2)
        .total_memories(POOL_INSTANCES)
        .total_tables(POOL_INSTANCES * 2)
        .max_memory_size(MAX_MEMORY_CAP);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&config) {
        Ok(engine) => Ok((engine, true)),
        Err(pool_error) => {
            tracing::warn!(error = %pool_error, "plugin pooling allocator unavailable; using on-demand allocation");
            let engine = Engine::new(&base_config())
                .map_err(|e| format!("cannot create the wasm engine: {e}"))?;
            Ok((engine, false))
        }
    }
}

/// Compiles `bytes` once per engine configuration: the native code is cached
/// as `<cache>/plugins/<sha256>-<engine hash>.cwasm`. Returns the component
/// and whether it came from the cache.
pub fn load_component(
    engine: &Engine,
    cache_dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(Component, bool), PluginError> {
    let path = cache_path(engine, cache_dir, bytes);
    if path.is_file() {
        // SAFETY: the file is ours: written by `write_atomically` below from
        // `Component::serialize` of this same engine configuration (the
        // compatibility hash is in its name), and never modified in place.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok((component, true)),
            Err(e) => {
                tracing::warn!(plugin = name, path = %path.display(), error = %e, "discarding unusable plugin cache entry");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| PluginError::Load {
        plugin: name.to_owned(),
        message: format!("not a valid component: {e:#}"),
    })?;
    match component.serialize() {
        Ok(serialized) => {
            if let Err(e) = write_atomically(&path, &serialized) {
                tracing::warn!(plugin = name, path = %path.display(), error = %e, "cannot cache the compiled plugin");
            }
        }
        Err(e) => tracing::warn!(plugin = name, error = %e, "cannot serialize the compiled plugin"),
    }
    Ok((component, false))
}

pub fn cache_path(engine: &Engine, cache_dir: &Path, bytes: &[u8]) -> PathBuf {
    let digest = hex::encode(Sha256::digest(bytes));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    cache_dir
        .join("plugins")
        .join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp.1, bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)
}

/// A uniquely named new file beside the target (no `tempfile` dependency
/// in the library).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let unique = format!(".tmp-{}-{}", std::process::id(), rand::random::<u64>());
    let path = dir.join(unique);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

/// What a `Store` holds for one call.
pub struct StoreState {
    plugin: Arc<str>,
    limiter: MemoryLimiter,
    logs_left: u32,
    /// The call's WASI (see [`super::wasi`]), made on its first use: a
    /// component that imports none pays nothing for it.
    pub(super) wasi: Option<wasi::CallWasi>,
    pub(super) table: wasmtime::component::ResourceTable,
    /// When the call's deadline passes: no timer of the plugin outlasts it.
    deadline_at: tokio::time::Instant,
    /// A timer was cut at the deadline: the call timed out, even if the
    /// plugin got to return before the epoch interrupt.
    timer_cut: bool,
}

impl StoreState {
    pub fn new(plugin: Arc<str>, memory_cap: usize, deadline: Duration) -> Self {
        StoreState {
            plugin,
            limiter: MemoryLimiter {
                cap: memory_cap,
                hit: false,
            },
            logs_left: MAX_LOG_LINES,
            wasi: None,
            table: {
                // Every WASI handle a plugin holds is host memory outside
                // its linear-memory cap: bound how many it may hold.
                let mut table = wasmtime::component::ResourceTable::new();
                table.set_max_capacity(wasi::MAX_RESOURCES);
                table
            },
            deadline_at: tokio::time::Instant::now() + deadline,
            timer_cut: false,
        }
    }

    /// When a timer of `after` set now fires: at the latest at the call's
    /// deadline (the epoch interrupt then ends the call).
    pub(super) fn timer_at(&mut self, after: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        match now.checked_add(after) {
            Some(at) if at <= self.deadline_at => at,
            _ => {
                self.timer_cut = true;
                self.deadline_at
            }
        }
    }

    /// The call's stdout and stderr, as log lines under the plugin's name
    /// (stdout at info, stderr at warn), within the call's log budget.
    fn log_stdio(&mut self) {
        let Some(call) = &self.wasi else {
            return;
        };
        for (captured, level) in [
            (call.stdout.clone(), LogLevel::Info),
            (call.stderr.clone(), LogLevel::Warn),
        ] {
            let (bytes, dropped) = captured.take();
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                host::Host::log(self, level, line.to_owned());
            }
            if dropped > 0 {
                host::Host::log(
                    self,
                    LogLevel::Warn,
                    format!("{dropped} more bytes of output were dropped"),
                );
            }
        }
    }
}

/// Refuses growth past the cap and remembers that it did, so the failure
/// that follows (a trap, usually) is reported as `MemoryLimit`.
struct MemoryLimiter {
    cap: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl host::Host for StoreState {
    fn log(&mut self, level: LogLevel, message: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let mut message = message;
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut end = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        if self.logs_left == 0 {
            tracing::warn!(
                plugin,
                "plugin log limit reached; further lines of this call are dropped"
            );
        }
    }
}

impl super::bindings::v2::host::Host for StoreState {
    fn log(&mut self, level: super::bindings::v2::host::LogLevel, message: String) {
        use super::bindings::v2::host::LogLevel as V2;
        let level = match level {
            V2::Trace => LogLevel::Trace,
            V2::Debug => LogLevel::Debug,
            V2::Info => LogLevel::Info,
            V2::Warn => LogLevel::Warn,
            V2::Error => LogLevel::Error,
        };
        host::Host::log(self, level, message);
    }
}

/// Runs `call` in a fresh store bounded by `deadline` and `memory_cap`,
/// classifying a failure as Timeout, MemoryLimit or Trap.
pub fn with_store<T>(
    engine: &Engine,
    plugin: &Arc<str>,
    deadline: Duration,
    memory_cap: usize,
    call: impl FnOnce(&mut Store<StoreState>) -> wasmtime::Result<T>,
) -> Result<T, PluginError> {
    let mut store = Store::new(
        engine,
        StoreState::new(plugin.clone(), memory_cap, deadline),
    );
    store.limiter(|state| &mut state.limiter);
    // The current tick is partly over already: one more tick than the
    // deadline so a call always gets at least `deadline`.
    let ticks = deadline.as_millis().div_ceil(EPOCH_TICK.as_millis()).max(1) as u64 + 1;
    store.set_epoch_deadline(ticks);
    store.epoch_deadline_trap();
    let result = call(&mut store);
    store.data_mut().log_stdio();
    if store.data().timer_cut {
        return Err(PluginError::Timeout {
            plugin: plugin.to_string(),
            after: deadline,
        });
    }
    result.map_err(|error| {
        let plugin = plugin.to_string();
        if store.data().limiter.hit {
            PluginError::MemoryLimit {
                plugin,
                limit_bytes: memory_cap as u64,
            }
        } else if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            PluginError::Timeout {
                plugin,
                after: deadline,
            }
        } else {
            let mut message = format!("{error:#}");
            message.truncate(2048);
            PluginError::Trap { plugin, message }
        }
    })
}
