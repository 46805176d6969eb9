//! The core: what the host does, independent of how it is asked. The API
//! layer turns HTTP into calls on [`Host`]; `Host` keeps live sandboxes and
//! running commands in memory and everything durable in the store.
//!
//! **Architecture Invariant:** nothing here knows HTTP or JSON bodies, SQL,
//! or runc. Sandboxes are started through the [`Runtime`] trait and reached
//! through [`AgentClient`] over the runtime's channel; state goes through
//! [`StoreHandle`], which no other layer reaches through `Host`. `core`
//! returns typed values and rows; `api` renders every body (ARCHITECTURE.md
//! has the command that checks it).

mod admission;
pub mod artifacts;
pub mod code;
pub mod commands;
pub(crate) mod egress;
pub mod files;
pub mod ledger;
pub mod metrics;
mod pipeline;
pub use pipeline::{LanguageSummary, PluginSummary};
pub mod previews;
mod restart;
pub mod sandboxes;
mod secrets;
mod slots;
#[cfg(test)]
pub(crate) mod tests;
pub mod workspace_runs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentClient, AgentError};
use crate::blobs::BlobStore;
use crate::clock::Clock;
use crate::config::Config;
use crate::rootfs::RootfsCache;
use crate::runtime::{Runtime, RuntimeError, Runtimes};
use crate::store::{StoreError, StoreHandle};
use crate::templates::TemplateSet;

pub use admission::StreamPlace;
pub use commands::{CommandLog, LogEvent, RunCommand};
pub use restart::{ADOPT_TIMEOUT, Reconciled};
pub use sandboxes::{CreateSandbox, MAX_METADATA_FILTERS, NetworkRequest};

use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome, EndReason, SandboxStatus};

/// Failures of core operations. The API layer maps each to a status and a
/// stable error code; internal ones are logged in full and shown generically.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{kind} `{id}` not found")]
    NotFound { kind: &'static str, id: String },
    #[error("sandbox `{0}` has been destroyed")]
    SandboxDestroyed(String),
    #[error("sandbox `{0}` is not running yet")]
    SandboxNotReady(String),
    #[error("unknown template `{name}`; available: {available}")]
    UnknownTemplate { name: String, available: String },
    /// A sandbox's network policy asks for more than its template allows.
    #[error("{0}")]
    NetworkPolicyTooWide(String),
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The caller's key lacks a scope an option of the request needs
    /// (e.g. `collect` needs `artifacts:create`).
    #[error("this API key lacks the `{0}` scope")]
    MissingScope(&'static str),
    #[error("command `{0}` is not running")]
    CommandNotRunning(String),
    #[error("command `{0}` was not started with stdin open (pass \"stdin\": true)")]
    StdinNotOpen(String),
    #[error("no free sandbox slot: {0} sandboxes are live")]
    Capacity(usize),
    /// The key made more requests than its rate allows.
    #[error("too many requests; retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    /// The org holds as many long-lived streams as it may.
    #[error("too many open streams (at most {max})")]
    TooManyStreams { max: usize },
    #[error("sandbox `{sandbox_id}` has {max} file watches open, as many as it may")]
    TooManyWatches { sandbox_id: String, max: usize },
    /// A per-sandbox limit (streams, commands, contexts, previews).
    #[error("sandbox `{sandbox_id}` is at its limit of {max} {what}")]
    SandboxBusy {
        sandbox_id: String,
        what: &'static str,
        max: usize,
    },
    /// The template's runtime cannot run on this host.
    #[error(
        "template `{template}` needs the `{runtime}` runtime, which this host cannot run: {reason}"
    )]
    RuntimeUnavailable {
        template: String,
        runtime: &'static str,
        reason: String,
    },
    #[error("template `{template}` could not be built: {message}")]
    TemplateBuild { template: String, message: String },
    #[error("sandbox failed to start: {0}")]
    StartFailed(String),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(
        "unsupported code language `{language}`; this sandbox's template supports: {supported}"
    )]
    UnsupportedLanguage { language: String, supported: String },
    #[error(
        "code context `{context_id}` is a {context_language} context and cannot run {language}"
    )]
    ContextLanguageMismatch {
        context_id: String,
        context_language: String,
        language: String,
    },
    #[error("the code is {size} bytes; the limit is {max}")]
    CodeTooLarge { size: usize, max: usize },
    /// The interpreter of a context did not start (the cause is logged).
    #[error("the {} interpreter could not be started", .0.as_str())]
    ContextFailed(crownest_proto::code::Language),
    #[error("blob storage: {0}")]
    Blob(#[from] crate::blobs::BlobError),
    #[error("idempotency key `{0}` was used for a different request")]
    IdempotencyKeyReused(String),
    #[error("the first request with idempotency key `{0}` is still running")]
    IdempotencyInFlight(String),
    #[error("{path}: {message}")]
    File {
        kind: crownest_proto::FileErrorKind,
        /// Absolute path inside the sandbox (or as the client gave it).
        path: String,
        message: String,
    },
    #[error("no such transfer")]
    TransferNotFound,
    #[error("the transfer URL has expired")]
    TransferExpired,
    #[error("the transfer URL was already used")]
    TransferUsed,
    #[error("server key: {0}")]
    ServerKey(String),
    #[error("sandbox `{sandbox_id}` already has preview `{existing_id}` of port {port}")]
    PreviewPortTaken {
        sandbox_id: String,
        port: u16,
        existing_id: String,
    },
    #[error("preview `{0}` is closed")]
    PreviewClosed(String),
    #[error("nothing in the sandbox accepts connections on port {port}: {message}")]
    PreviewUnreachable { port: u16, message: String },
    #[error("the archive is declared as {declared} bytes; the limit is {max}")]
    ArchiveTooLarge { declared: u64, max: u64 },
    #[error("the archive was declared as {expected} bytes but {received} arrived")]
    ArchiveSizeMismatch { expected: u64, received: u64 },
    #[error("the archive's SHA-256 is {received}, not the declared {expected}")]
    ArchiveDigestMismatch { expected: String, received: String },
    #[error("archive storage: {0}")]
    ArchiveStorage(String),
    #[error("workspace run `{0}` is no longer awaiting its archive")]
    RunNotAwaitingArchive(String),
    #[error("workspace run `{0}` has no archive yet")]
    ArchiveNotUploaded(String),
    #[error("workspace run `{0}` was already started")]
    RunAlreadyStarted(String),
    #[error("workspace run `{0}` has already ended")]
    RunFinished(String),
    #[error("the evidence of workspace run `{0}` is not ready")]
    EvidenceNotReady(String),
    #[error("quota {limit} exceeded: {current} of {max}")]
    QuotaExceeded {
        limit: &'static str,
        max: i64,
        current: i64,
    },
}

impl CoreError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        CoreError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Host uid ranges available to sandboxes: slot `n` maps the sandbox's uids
/// onto its own range, so two sandboxes never share a host uid.
pub const MAX_SLOTS: i64 = 2048;

/// How long an expired staged-transfer row is kept before the reaper drops it.
const TRANSFER_ROW_KEEP_MS: i64 = 60 * 60 * 1000;

/// How often the reaper applies the retention settings (audit events, logs
/// of destroyed sandboxes).
const RETENTION_EVERY_MS: i64 = 60 * 1000;

/// A sandbox whose container is up, with the connection to its agent.
pub struct LiveSandbox {
    pub id: String,
    /// Its row as it started (`running`). The fields requests use do not
    /// change while it lives, so they are served from here, not the store.
    pub row: crate::store::SandboxRow,
    /// Holds its uid slot machine-wide while it lives.
    pub(crate) slot: Mutex<Option<slots::SlotLock>>,
    pub agent: AgentClient,
    /// How its agent was reached (and can be reached again).
    pub channel: Arc<dyn crate::runtime::AgentChannel>,
    pub state_dir: PathBuf,
    /// Cancelled when the sandbox is being destroyed, so running commands
    /// stop waiting on an agent that is going away.
    pub stopping: CancellationToken,
    /// Its egress state, when its policy lets anything out.
    pub egress: Option<Arc<crate::egress::SandboxEgress>>,
    /// The template version it started with (a reload does not change it).
    pub template: Arc<crate::templates::Template>,
    /// The environment the client gave at create (values may be secrets:
    /// never logged, audited or returned).
    pub env: Vec<(String, String)>,
}

/// What a template reload changed, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TemplateReload {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
}

/// The host's core service. One per process, shared behind an `Arc`.
pub struct Host {
    pub(crate) store: StoreHandle,
    pub(crate) clock: Clock,
    pub(crate) config: Config,
    /// The current templates; a reload swaps the whole set. Live sandboxes
    /// keep the template they started with (`LiveSandbox::template`).
    templates: std::sync::RwLock<Arc<TemplateSet>>,
    pub(crate) rootfs: RootfsCache,
    pub(crate) runtimes: Runtimes,
    pub(crate) blobs: BlobStore,
    /// Code contexts of live sandboxes, by id.
    code_contexts: Mutex<code::ContextMap>,
    /// Serialises the creation of default contexts.
    default_contexts: AsyncMutex<()>,
    /// The WASM output pipelines of Code Runs, loaded on first use.
    pipelines: pipeline::Pipelines,
    /// Sandboxes with a running container, by id.
    live: Mutex<HashMap<String, Arc<LiveSandbox>>>,
    /// Commands whose process has not ended, by id.
    running: Mutex<HashMap<String, Arc<commands::LiveCommand>>>,
    /// Uid slots handed out but maybe not yet in the store.
    reserved_slots: Mutex<Vec<i64>>,
    /// Where uid slots are held machine-wide (`slots`).
    slot_dir: PathBuf,
    /// One build at a time per template; a second create waits for the first.
    builds: AsyncMutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Cancelled on shutdown: stops the reaper.
    shutdown: CancellationToken,
    /// Serialises the quota check and insert of sandbox creates, so two
    /// creates cannot both take an org's last place.
    admission: AsyncMutex<()>,
    /// When this process started: idempotency records still in flight from
    /// before it belong to a dead process.
    started_at: crate::clock::Millis,
    /// Keys that sign transfer URLs and seal idempotent responses; loaded
    /// (or created) on first use.
    keys: secrets::ServerKeys,
    /// Requests waiting for the first attempt of their idempotency key.
    idempotency_waits: Mutex<HashMap<ledger::IdempotencySlot, ledger::Waiters>>,
    /// Artifact bytes promised to promotions in flight, by org: quota is
    /// taken before a blob is written.
    artifact_reservations: Arc<AsyncMutex<HashMap<String, i64>>>,
    /// When the reaper last applied retention.
    last_retention: std::sync::atomic::AtomicI64,
    /// Request rates by API key.
    rate_limiter: admission::RateLimiter,
    /// Open command log streams, by org.
    log_streams: Arc<Mutex<HashMap<String, usize>>>,
    /// Workspace Runs driven by this process, and their followers' signals.
    runs: workspace_runs::RunRegistry,
    /// The last CPU reading of each live sandbox (its metrics' interval).
    cpu_readings: Mutex<HashMap<String, metrics::CpuReading>>,
    /// Open file watches, by sandbox.
    watches: Arc<Mutex<HashMap<String, usize>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent across a panic (single inserts/removes), so a
    // poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Host {
    pub fn new(
        config: Config,
        store: StoreHandle,
        clock: Clock,
        templates: TemplateSet,
        runtimes: Runtimes,
        blobs: BlobStore,
    ) -> Arc<Self> {
        let rootfs = RootfsCache::new(config.cache_dir.clone());
        let slot_dir = slots::lock_dir(&config.data_dir);
        let started_at = clock.now_ms();
        Arc::new(Self {
            store,
            clock,
            config,
            templates: std::sync::RwLock::new(Arc::new(templates)),
            rootfs,
            runtimes,
            blobs,
            code_contexts: Mutex::new(HashMap::new()),
            default_contexts: AsyncMutex::new(()),
            pipelines: pipeline::Pipelines::default(),
            live: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            reserved_slots: Mutex::new(Vec::new()),
            slot_dir,
            builds: AsyncMutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            admission: AsyncMutex::new(()),
            started_at,
            keys: secrets::ServerKeys::default(),
            idempotency_waits: Mutex::new(HashMap::new()),
            artifact_reservations: Arc::new(AsyncMutex::new(HashMap::new())),
            last_retention: std::sync::atomic::AtomicI64::new(0),
            rate_limiter: admission::RateLimiter::default(),
            log_streams: Arc::new(Mutex::new(HashMap::new())),
            runs: workspace_runs::RunRegistry::default(),
            cpu_readings: Mutex::new(HashMap::new()),
            watches: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current template set (a reload replaces it; this one stays
    /// valid for as long as it is held).
    pub fn templates(&self) -> Arc<TemplateSet> {
        self.templates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the template directory and swaps in the new set, or keeps
    /// the old one and returns why the new one is invalid. Sandboxes
    /// already running keep their template's version.
    pub async fn reload_templates(
        &self,
    ) -> Result<TemplateReload, crate::templates::TemplateError> {
        let dir = self.config.templates_dir.clone();
        let loaded = tokio::task::spawn_blocking(move || TemplateSet::load(dir.as_deref()))
            .await
            .unwrap_or_else(|e| {
                Err(crate::templates::TemplateError::Invalid {
                    origin: String::from("template reload"),
                    at: None,
                    field: None,
                    message: e.to_string(),
                })
            })?;
        let old = self.templates();
        let mut report = TemplateReload::default();
        for t in loaded.iter() {
            match old.get(&t.name) {
                None => report.added.push(t.name.clone()),
                Some(previous) if previous.version() != t.version() => {
                    report.changed.push(t.name.clone())
                }
                Some(_) => report.unchanged += 1,
            }
        }
        report.removed = old
            .names()
            .filter(|n| loaded.get(n).is_none())
            .map(str::to_string)
            .collect();
        *self.templates.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(report)
    }

    pub fn rootfs(&self) -> &RootfsCache {
        &self.rootfs
    }

    /// The runtime drivers and which isolations they can run.
    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    /// The driver of a sandbox's runtime kind.
    pub(crate) fn driver(&self, kind: &str) -> Result<&Arc<dyn Runtime>, CoreError> {
        self.runtimes.driver(kind).ok_or_else(|| {
            CoreError::Runtime(RuntimeError::Unavailable(format!(
                "this host has no `{kind}` runtime driver"
            )))
        })
    }

    /// Forgets everything in memory as a crash of the process would (its
    /// uid slot locks and agent connections go with it); the store and the
    /// sandboxes stay.
    #[cfg(test)]
    pub(crate) fn crash_for_test(&self) {
        self.shutdown.cancel();
        // The process's flocks go with it, whoever still holds a sandbox.
        for sandbox in lock(&self.live).values() {
            lock(&sandbox.slot).take();
        }
        lock(&self.live).clear();
        lock(&self.running).clear();
        lock(&self.code_contexts).clear();
        self.runs.abort_all();
    }

    fn live_sandbox(&self, id: &str) -> Option<Arc<LiveSandbox>> {
        lock(&self.live).get(id).cloned()
    }

    /// Per-sandbox directory under the data dir.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("sandboxes").join(id)
    }

    /// Starts the TTL reaper: destroys expired sandboxes and sandboxes whose
    /// agent went away, once a second.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let host = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = host.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = host.reap_once().await {
                    tracing::warn!(error = %e, "reaper pass failed");
                }
            }
        })
    }

    async fn reap_once(&self) -> Result<(), CoreError> {
        let now = self.clock.now_ms();
        // Metering: every live sandbox was alive now. After a crash, usage
        // runs to the last heartbeat, at most one pass (0.5 s) short.
        let live = self
            .store
            .call(move |s| {
                s.heartbeat_meters(now)?;
                s.purge_idempotent(now - ledger::IDEMPOTENCY_TTL_MS, None)?;
                // An expired URL answers `transfer_expired` for an hour,
                // then `transfer_not_found`; its row is gone.
                s.purge_transfers(now - TRANSFER_ROW_KEEP_MS)?;
                s.live_sandboxes()
            })
            .await?;
        self.apply_retention(now).await?;
        for sandbox in live {
            let reason = if sandbox.expires_at <= now {
                Some(EndReason::Expired)
            } else if sandbox.status == SandboxStatus::Running
                && self
                    .live_sandbox(&sandbox.id)
                    .is_some_and(|l| l.agent.is_closed())
            {
                Some(EndReason::Failed)
            } else {
                None
            };
            if let Some(reason) = reason {
                tracing::info!(sandbox = %sandbox.id, ?reason, "reaping sandbox");
                self.destroy_sandbox(&sandbox.id, reason).await?;
                self.audit_system_destroy(&sandbox.id, &sandbox.org_id, reason)
                    .await;
            }
        }
        Ok(())
    }

    /// Deletes audit events and logs of destroyed sandboxes past their
    /// retention, at most once a minute.
    async fn apply_retention(&self, now: crate::clock::Millis) -> Result<(), CoreError> {
        use std::sync::atomic::Ordering;
        let last = self.last_retention.load(Ordering::Relaxed);
        if now - last < RETENTION_EVERY_MS {
            return Ok(());
        }
        self.last_retention.store(now, Ordering::Relaxed);
        let limits = self.config.limits.clone();
        let (audits, logs) = self
            .store
            .call(move |s| {
                Ok((
                    s.purge_audit(now - limits.audit_retention_ms)?,
                    s.purge_logs_of_destroyed(now - limits.destroyed_log_retention_ms)?,
                ))
            })
            .await?;
        if audits + logs > 0 {
            tracing::info!(audit_events = audits, log_events = logs, "retention purge");
        }
        Ok(())
    }

    /// Stops background work. By default the sandboxes stay up for the
    /// next host process to take over (their commands' logs are written
    /// out first, so it replays little); with `--destroy-on-shutdown`
    /// every live sandbox is destroyed and no container is left behind.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        if !self.config.destroy_on_shutdown {
            let commands: Vec<Arc<commands::LiveCommand>> =
                lock(&self.running).values().cloned().collect();
            for command in commands {
                self.flush_command_log(&command).await;
            }
            return;
        }
        let ids: Vec<String> = lock(&self.live).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.destroy_sandbox(&id, EndReason::HostShutdown).await {
                tracing::warn!(sandbox = %id, error = %e, "could not destroy sandbox on shutdown");
            }
            let key = id.clone();
            if let Ok(Some(org)) = self.store.call(move |s| s.sandbox_org(&key)).await {
                self.audit_system_destroy(&id, &org, EndReason::HostShutdown)
                    .await;
            }
        }
    }

    /// Audits a destroy the host did on its own (expiry, failure, restart).
    async fn audit_system_destroy(&self, id: &str, org_id: &str, reason: EndReason) {
        self.audit(ledger::AuditEvent {
            actor: AuditActor::System,
            action: AuditAction::SandboxDestroy,
            resource_id: Some(id.to_string()),
            outcome: AuditOutcome::Success,
            org_id: Some(org_id.to_string()),
            details: AuditDetails {
                reason: Some(reason),
                ..AuditDetails::default()
            },
            principal: None,
            status: None,
            request_id: None,
        })
        .await;
    }
}
