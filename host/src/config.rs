//! Host configuration: where things live and the product limits. Built from
//! the command line and environment in `main`, from code in tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default listen address: loopback only, so a fresh install exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// SQLite database, per-sandbox state, runc state.
    pub data_dir: PathBuf,
    /// Built template rootfs trees, keyed by recipe hash; shared between data
    /// dirs because a rootfs build takes minutes.
    pub cache_dir: PathBuf,
    /// Operator template directory; files there replace or add to the
    /// built-in templates.
    pub templates_dir: Option<PathBuf>,
    /// The OCI runtime binary (`runc`, or a path).
    pub runtime_binary: PathBuf,
    /// The static `crownest-agent` injected into every sandbox.
    pub agent_binary: PathBuf,
    /// `host[:port]` under which each preview gets its own origin
    /// (`prv-….{domain}`); `None`: `localhost` with the API's port.
    pub preview_domain: Option<String>,
    /// The runsc binary of the `gvisor` runtime (`runsc`, or a path).
    pub runsc_binary: PathBuf,
    /// Destroy every sandbox when the server stops, instead of leaving
    /// them for the next server process to take over.
    pub destroy_on_shutdown: bool,
    pub limits: Limits,
    /// Egress: non-public ranges the operator allows, per-sandbox caps.
    pub egress: crate::egress::Settings,
}

/// Product limits enforced by API validation.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    pub default_ttl_ms: i64,
    pub min_ttl_ms: i64,
    pub max_ttl_ms: i64,
    /// Largest `metadata` object, serialized.
    pub max_metadata_bytes: usize,
    /// Largest command line.
    pub max_command_bytes: usize,
    pub max_command_timeout_ms: i64,
    /// Tail of each output stream kept in a command record.
    pub output_tail_bytes: usize,
    /// Log bytes kept per command for replay; older events are dropped.
    pub log_retention_bytes: usize,
    /// Log events kept per command for replay (output is coalesced, so
    /// this bounds rows and reader work, not bytes).
    pub log_retention_events: usize,
    /// Longest interpreter event line a Code Run keeps (a display bundle
    /// with its images); longer ones are rejected as `output_too_large`
    /// without being held whole.
    pub max_run_event_bytes: usize,
    /// Rich-output bytes one Code Run keeps in memory for its pipeline.
    pub max_run_output_bytes: usize,
    /// How long to wait for a new sandbox's agent to answer.
    pub agent_connect_timeout_ms: u64,
    /// Commands running at once in one sandbox; more are `sandbox_busy`.
    pub max_running_commands_per_sandbox: usize,
    /// Operations (logical agent streams: commands, file transfers, code
    /// runs, preview connections) open at once in one sandbox; past it a
    /// request waits up to 5 s, then is `sandbox_busy`.
    pub max_agent_streams: usize,
    /// How long a request waits for a free agent stream.
    pub agent_stream_wait_ms: u64,
    /// Open client connections at once; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// Requests per second one API key may make on average (token
    /// bucket); 0 turns rate limiting off.
    pub rate_limit_per_key: u32,
    /// Requests one API key may make in a burst above the average.
    pub rate_burst_per_key: u32,
    /// Command log streams (SSE) an org may hold open at once.
    pub max_log_streams_per_org: usize,
    /// Active previews one sandbox may have.
    pub max_previews_per_sandbox: usize,
    /// How long a preview request waits for the app's response headers.
    pub preview_response_timeout_ms: u64,
    /// How long audit events are kept.
    pub audit_retention_ms: i64,
    /// How long the logs of a destroyed sandbox's commands are kept (the
    /// command records, with their output tails, stay).
    pub destroyed_log_retention_ms: i64,
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// Default of `--audit-retention-days`.
pub const DEFAULT_AUDIT_RETENTION_DAYS: i64 = 400;
/// Default of `--log-retention-days`.
pub const DEFAULT_LOG_RETENTION_DAYS: i64 = 30;

impl Limits {
    /// Days as milliseconds, for the retention settings.
    pub fn days(days: i64) -> i64 {
        days.saturating_mul(DAY_MS)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Above the 1 MiB code source limit, so that an oversized run
            // is answered `code_source_too_large`.
            max_body_bytes: 2 * 1024 * 1024,
            default_ttl_ms: 10 * 60 * 1000,
            min_ttl_ms: 1000,
            max_ttl_ms: 24 * 60 * 60 * 1000,
            max_metadata_bytes: 16 * 1024,
            max_command_bytes: 64 * 1024,
            max_command_timeout_ms: 24 * 60 * 60 * 1000,
            output_tail_bytes: 1024 * 1024,
            log_retention_bytes: 16 * 1024 * 1024,
            log_retention_events: 100_000,
            max_run_event_bytes: 8 * 1024 * 1024,
            max_run_output_bytes: 16 * 1024 * 1024,
            agent_connect_timeout_ms: 10_000,
            max_running_commands_per_sandbox: 64,
            max_agent_streams: crate::agent::DEFAULT_MAX_STREAMS,
            agent_stream_wait_ms: 5_000,
            max_connections: 4096,
            header_read_timeout_ms: 10_000,
            rate_limit_per_key: 1000,
            rate_burst_per_key: 2000,
            max_log_streams_per_org: 256,
            max_previews_per_sandbox: 32,
            preview_response_timeout_ms: 60_000,
            audit_retention_ms: DEFAULT_AUDIT_RETENTION_DAYS * DAY_MS,
            destroyed_log_retention_ms: DEFAULT_LOG_RETENTION_DAYS * DAY_MS,
        }
    }
}

/// `CROWNEST_CACHE_DIR`, else `~/.cache/crownest` — except for root, whose
/// home (`/root`, mode 0700) a sandbox's user namespace cannot traverse to
/// reach its rootfs: root's default is `/var/cache/crownest`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CROWNEST_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/crownest");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("crownest")
}

/// Finds `crownest-agent`: `CROWNEST_AGENT_BIN`, else beside this
/// executable, else in the musl target dir of the cargo build this
/// executable came from (`target/<profile>/crownest` ->
/// `target/x86_64-unknown-linux-musl/<profile>/crownest-agent`).
pub fn default_agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CROWNEST_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let Ok(exe) = std::env::current_exe() else {
        return PathBuf::from("crownest-agent");
    };
    let Some(dir) = exe.parent() else {
        return PathBuf::from("crownest-agent");
    };
    let beside = dir.join("crownest-agent");
    if is_static_agent(&beside) {
        return beside;
    }
    // target/debug/deps/<test> or target/debug/crownest.
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    if let (Some(profile), Some(target)) = (profile_dir.file_name(), profile_dir.parent()) {
        for p in [
            profile,
            std::ffi::OsStr::new("release"),
            std::ffi::OsStr::new("debug"),
        ] {
            let candidate = target
                .join("x86_64-unknown-linux-musl")
                .join(p)
                .join("crownest-agent");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    beside
}

/// The agent beside the host binary in a cargo target dir is the glibc build,
/// which will not run inside an arbitrary rootfs; only use it when it is the
/// installed (static) one, i.e. not inside a cargo target dir.
fn is_static_agent(path: &Path) -> bool {
    path.is_file()
        && !path
            .ancestors()
            .any(|a| a.file_name().is_some_and(|n| n == "target"))
}
