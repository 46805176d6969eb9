//! Durable state: orgs, projects, API keys, sandboxes, commands and their
//! logs.
//!
//! **Architecture Invariant:** this module is the only one that knows SQL.
//! The rest of the host sees the [`Store`] trait and plain row structs. The
//! trait is synchronous (SQLite is); async code goes through
//! [`StoreHandle::call`], which runs the closure on the blocking pool so the
//! executor never waits on disk.

pub mod artifacts;
mod codec;
pub mod ledger;
mod migrations;
pub mod previews;
mod sqlite;
pub mod transfers;
pub mod workspace_runs;

use std::sync::Arc;

use crate::clock::Millis;
use crate::model::{
    CollectItem, Collected, CommandExit, CommandStatus, EndReason, Metadata, OutputStream,
    SandboxStatus,
};

pub use artifacts::{ArtifactRow, ArtifactStore};
pub use ledger::{
    AuditFilter, AuditRow, EgressUsageRow, IdempotencyBegin, IdempotencyRecord, IdempotentRequest,
    LedgerStore, MeterRow, PRICING_VERSION, Quota, StoredResponse,
};
pub use previews::{InsertPreview, PreviewRow, PreviewStore};
pub use sqlite::SqliteStore;
pub use transfers::{TransferRow, TransferTarget};
pub use workspace_runs::{RunEnd, RunEventRow, RunFilter, WorkspaceRunRow, WorkspaceRunStore};

/// Errors of the store. Callers map `Conflict`/`NotFound` to API errors;
/// everything else is an internal error whose detail is logged, not shown.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
    #[error("database schema version {found} is newer than this build knows ({known})")]
    SchemaTooNew { found: usize, known: usize },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgRow {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub org_id: String,
    /// A key restricted to one project sees and creates only that project's
    /// resources.
    pub project_id: Option<String>,
    pub name: Option<String>,
    /// The first characters of the secret, shown in listings so operators can
    /// tell keys apart; never enough to authenticate.
    pub prefix: String,
    /// SHA-256 of the whole secret. The secret itself is never stored.
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// A key joined with the names an operator listing wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyListing {
    pub key: KeyRow,
    pub org_name: String,
    pub project_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub org_id: String,
    pub project_id: Option<String>,
    pub template: String,
    /// Recipe hash of the template at create time: which rootfs it ran on.
    pub template_hash: String,
    pub status: SandboxStatus,
    /// The object supplied by the client, kept verbatim.
    pub metadata: Metadata,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub ended_at: Option<Millis>,
    /// Why it ended, once destroyed.
    pub end_reason: Option<EndReason>,
    /// Index of the host uid range; unique among sandboxes not destroyed.
    pub uid_slot: i64,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub created_by_key: String,
    /// The runtime driver that runs it (`oci`, `gvisor`, `microvm`): the
    /// one that takes it over after a host restart.
    pub runtime: String,
    /// The VMM of a `microvm` sandbox (`qemu`, `crosvm`).
    pub vmm: Option<String>,
    /// Its egress policy (the template's, or narrower).
    pub network: crate::egress::Policy,
    /// Egress bytes received and sent, as of the last connection that
    /// ended (a live sandbox's meters run ahead of this).
    pub egress_bytes_in: i64,
    pub egress_bytes_out: i64,
    /// The environment the client gave at create, sealed by the core (the
    /// store never sees its values in the clear); `None` when it gave none.
    pub env_sealed: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandRow {
    pub id: String,
    pub sandbox_id: String,
    pub org_id: String,
    pub command: String,
    pub cwd: String,
    /// The extra environment the client passed.
    pub env: Vec<(String, String)>,
    pub background: bool,
    pub status: CommandStatus,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    /// Tail of stdout (at most the output limit), with `stdout_dropped`
    /// bytes dropped from its front.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_dropped: i64,
    pub stderr_dropped: i64,
    pub timeout_ms: Option<i64>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub cancel_requested_at: Option<Millis>,
    pub error: Option<String>,
    pub created_by_key: String,
    /// Files to promote to artifacts when it ends (empty: none).
    pub collect: Vec<CollectItem>,
    /// The promotion results, once it ended (only when `collect` is not empty).
    pub collected: Option<Vec<Collected>>,
    /// Whether it was started with stdin open.
    pub stdin: bool,
    /// Bytes of stdout and stderr whose text is in the recorded log: where
    /// a restarted host resumes the agent's replay.
    pub stdout_offset: i64,
    pub stderr_offset: i64,
}

/// A live code context (its interpreter runs in the sandbox's agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextRow {
    pub id: String,
    pub sandbox_id: String,
    /// `python`, `javascript`, `typescript`.
    pub language: String,
    pub cwd: String,
    pub implementation: String,
    pub is_default: bool,
    pub created_at: Millis,
}

/// How far a running command's output is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputProgress {
    pub stdout_offset: i64,
    pub stderr_offset: i64,
}

/// The final state of a command, written once when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandEnd {
    pub status: CommandStatus,
    /// When it started, if it did (kept if the store has it already).
    pub started_at: Option<Millis>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_dropped: i64,
    pub stderr_dropped: i64,
    pub ended_at: Millis,
    pub error: Option<String>,
    pub collected: Option<Vec<Collected>>,
}

/// What one log event holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogBody {
    /// A chunk of output, split only on UTF-8 character boundaries.
    Output { stream: OutputStream, data: Vec<u8> },
    /// The end of the command; always the last event.
    Exit(CommandExit),
}

impl LogBody {
    /// Bytes this event counts against log retention.
    pub fn len(&self) -> usize {
        match self {
            LogBody::Output { data, .. } => data.len(),
            LogBody::Exit(_) => 64,
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, LogBody::Output { data, .. } if data.is_empty())
    }
}

/// One entry of a command's log: a chunk of output or the exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEventRow {
    pub command_id: String,
    /// 1-based, dense per command; the SSE event id.
    pub seq: i64,
    pub body: LogBody,
    pub at: Millis,
}

/// A position in a list ordered by `(created_at DESC, id DESC)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: Millis,
    pub id: String,
}

/// Which sandboxes a list returns (every part optional, all must hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxFilter {
    pub status: Option<SandboxStatus>,
    pub template: Option<String>,
    /// Metadata keys and the values they must have (a string, or the JSON
    /// text of a number, boolean or null).
    pub metadata: Vec<(String, String)>,
    /// Created strictly after / before, in milliseconds.
    pub created_after: Option<Millis>,
    pub created_before: Option<Millis>,
}

/// Which sandboxes a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub org_id: String,
    /// `Some` for a project-restricted key.
    pub project_id: Option<String>,
}

/// Durable state. Implemented by [`SqliteStore`]; a trait so that a fleet
/// can later put PostgreSQL behind the same calls.
pub trait Store:
    LedgerStore + ArtifactStore + PreviewStore + WorkspaceRunStore + Send + Sync + 'static
{
    // Tenancy.
    fn ensure_org(&self, name: &str, now: Millis) -> Result<OrgRow, StoreError>;
    fn find_org(&self, name: &str) -> Result<Option<OrgRow>, StoreError>;
    fn ensure_project(
        &self,
        org_id: &str,
        name: &str,
        now: Millis,
    ) -> Result<ProjectRow, StoreError>;
    fn get_project(&self, id: &str) -> Result<Option<ProjectRow>, StoreError>;

    // Keys.
    fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError>;
    fn find_key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>, StoreError>;
    fn get_key(&self, id: &str) -> Result<Option<KeyRow>, StoreError>;
    fn list_keys(&self) -> Result<Vec<KeyListing>, StoreError>;
    /// Returns false when no such key exists; revoking twice keeps the
    /// first time.
    fn revoke_key(&self, id: &str, now: Millis) -> Result<bool, StoreError>;

    // Sandboxes.
    fn insert_sandbox(&self, sandbox: &SandboxRow) -> Result<(), StoreError>;
    fn get_sandbox(&self, scope: &Scope, id: &str) -> Result<Option<SandboxRow>, StoreError>;
    /// The scope's sandboxes that pass `filter`, newest first.
    fn list_sandboxes(
        &self,
        scope: &Scope,
        filter: &SandboxFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<SandboxRow>, StoreError>;
    /// Moves a live sandbox's expiry; false when it is already destroyed.
    fn set_sandbox_expiry(&self, id: &str, expires_at: Millis) -> Result<bool, StoreError>;
    fn set_sandbox_status(&self, id: &str, status: SandboxStatus) -> Result<(), StoreError>;
    /// Replaces a sandbox's egress policy (a narrowing PATCH).
    fn set_sandbox_network(
        &self,
        id: &str,
        policy: &crate::egress::Policy,
    ) -> Result<(), StoreError>;
    /// Adds the bytes of an ended egress connection to a sandbox's meters
    /// and to its usage in the hour of `now`.
    fn add_egress_bytes(
        &self,
        id: &str,
        bytes_in: u64,
        bytes_out: u64,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Marks a sandbox destroyed (its tombstone) and frees its uid slot.
    fn end_sandbox(&self, id: &str, reason: EndReason, now: Millis) -> Result<(), StoreError>;
    /// Every sandbox whose status is not `destroyed`.
    fn live_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError>;
    /// The runtime kind a sandbox ran on.
    fn sandbox_runtime(&self, id: &str) -> Result<Option<String>, StoreError>;
    fn used_uid_slots(&self) -> Result<Vec<i64>, StoreError>;
    /// Recipe hashes of the templates sandboxes not destroyed run on
    /// (what `template gc` must keep).
    fn live_template_hashes(&self) -> Result<Vec<String>, StoreError>;

    // Commands.
    fn insert_command(&self, command: &CommandRow) -> Result<(), StoreError>;
    fn get_command(&self, sandbox_id: &str, id: &str) -> Result<Option<CommandRow>, StoreError>;
    fn list_commands(
        &self,
        sandbox_id: &str,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<CommandRow>, StoreError>;
    fn mark_command_started(&self, id: &str, now: Millis) -> Result<(), StoreError>;
    fn request_command_cancel(&self, id: &str, now: Millis) -> Result<(), StoreError>;
    /// Writes the end state and the last log events in one transaction.
    fn finish_command(
        &self,
        id: &str,
        end: &CommandEnd,
        events: &[CommandEventRow],
    ) -> Result<(), StoreError>;
    fn append_command_events(&self, events: &[CommandEventRow]) -> Result<(), StoreError>;
    /// Appends log events, records how far the output is now recorded and
    /// applies a retention trim, in one transaction: the progress never
    /// runs ahead of the events.
    fn record_command_output(
        &self,
        command_id: &str,
        events: &[CommandEventRow],
        progress: OutputProgress,
        keep_from: Option<i64>,
    ) -> Result<(), StoreError>;
    /// The seq of a command's newest log event (0 when it has none).
    fn last_command_event_seq(&self, command_id: &str) -> Result<i64, StoreError>;
    /// Commands of a sandbox still `running`, oldest first.
    fn running_commands(&self, sandbox_id: &str) -> Result<Vec<CommandRow>, StoreError>;
    /// Events with `seq > after`, in order, at most `limit`.
    fn command_events(
        &self,
        command_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<CommandEventRow>, StoreError>;
    /// Drops the oldest log events of a command, keeping `seq >= keep_from`.
    fn trim_command_events(&self, command_id: &str, keep_from: i64) -> Result<(), StoreError>;
    /// Deletes the log events of commands whose sandbox was destroyed
    /// before `before`; the command records stay.
    fn purge_logs_of_destroyed(&self, before: Millis) -> Result<usize, StoreError>;
    /// Marks every running command of a sandbox failed (its sandbox died).
    fn fail_running_commands(
        &self,
        sandbox_id: &str,
        error: &str,
        now: Millis,
    ) -> Result<usize, StoreError>;

    // Code contexts.
    fn insert_context(&self, context: &ContextRow) -> Result<(), StoreError>;
    fn delete_context(&self, id: &str) -> Result<(), StoreError>;
    fn contexts_of(&self, sandbox_id: &str) -> Result<Vec<ContextRow>, StoreError>;

    // Transfers.
    fn insert_transfer(&self, transfer: &TransferRow) -> Result<(), StoreError>;
    fn get_transfer(&self, id: &str) -> Result<Option<TransferRow>, StoreError>;
    /// Marks an unused, unexpired transfer used and returns it; `None` when
    /// it is unknown, used or expired. Atomic: one claim wins.
    fn claim_transfer(&self, id: &str, now: Millis) -> Result<Option<TransferRow>, StoreError>;
    /// Drops transfers that expired before `before`.
    fn purge_transfers(&self, before: Millis) -> Result<usize, StoreError>;
}

/// Shared, cloneable access to the store from async code.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<dyn Store>,
}

impl StoreHandle {
    pub fn new(store: impl Store) -> Self {
        Self {
            inner: Arc::new(store),
        }
    }

    /// Runs `f` against the store on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(inner.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Direct synchronous access, for the operator CLI (no runtime needed).
    pub fn blocking(&self) -> &dyn Store {
        self.inner.as_ref()
    }
}
