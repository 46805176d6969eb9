//! The host's typed vocabulary: the states, reasons and kinds that `core`
//! decides, `store` persists and `api` renders, plus the small records that
//! travel between them (collect items, audit details).
//!
//! **Architecture Invariant:** a state is an enum, never a string. The SQL
//! text of each value is spelled only in `store` (`store/codec.rs`); its
//! wire spelling is the `serde` derive here (snake_case), which only `api`
//! serialises. Check: `git grep -n '"running"\|"destroyed"\|"completed"' host/src/core`
//! prints nothing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A sandbox's metadata: the JSON object its creator gave, kept verbatim.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    /// Its container is being started.
    Starting,
    /// Its container runs and its agent answers.
    Running,
    /// Gone; the record is a tombstone.
    Destroyed,
}

/// Why a sandbox was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// A client killed it.
    Killed,
    /// Its TTL ran out.
    Expired,
    /// It failed to start, or its agent went away.
    Failed,
    /// The host restarted and could not take it over.
    HostRestart,
    /// The host shut down with `--destroy-on-shutdown`.
    HostShutdown,
}

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Running,
    /// The process exited (any exit code) or a signal ended it.
    Completed,
    /// It could not run, or its sandbox went away.
    Failed,
    /// Killed for exceeding its timeout.
    TimedOut,
    /// Canceled by a client.
    Canceled,
}

impl CommandStatus {
    pub fn is_running(self) -> bool {
        self == CommandStatus::Running
    }
}

/// An output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Whether a preview's URL works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreviewStatus {
    Active,
    Closed,
}

/// Why a preview was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreviewCloseReason {
    /// A client deleted it.
    Deleted,
    /// Its sandbox was destroyed.
    SandboxDestroyed,
}

/// Direction of a staged transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Upload,
    Download,
    /// The archive of a Workspace Run (the row names the run, not a sandbox).
    ArchiveUpload,
}

/// Who did what an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditActor {
    /// A request with an API key.
    Key,
    /// The operator CLI.
    Operator,
    /// The host itself (the reaper, a restart).
    System,
    /// A request authenticated by a transfer token rather than a key.
    Token,
}

/// How the audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    Success,
    /// Refused for lack of a scope.
    Denied,
    Failed,
}

/// The kinds of resource audit events name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Sandbox,
    Command,
    Artifact,
    Preview,
    CodeContext,
    Transfer,
    Key,
    Org,
    WorkspaceRun,
}

macro_rules! audit_actions {
    ($($variant:ident => $name:literal, $kind:ident;)*) => {
        /// Every action an audit event can record. Its name (`sandbox.create`)
        /// is the same in the store, on the wire and in `?action=` filters.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum AuditAction {
            $($variant,)*
        }

        impl AuditAction {
            /// Every action, in declaration order.
            pub const ALL: &'static [AuditAction] = &[$(AuditAction::$variant,)*];

            /// The dotted name, e.g. `command.run`.
            pub fn name(self) -> &'static str {
                match self {
                    $(AuditAction::$variant => $name,)*
                }
            }

            /// The kind of resource the action is about.
            pub fn resource(self) -> ResourceKind {
                match self {
                    $(AuditAction::$variant => ResourceKind::$kind,)*
                }
            }

            pub fn from_name(name: &str) -> Option<AuditAction> {
                match name {
                    $($name => Some(AuditAction::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

audit_actions! {
    SandboxCreate => "sandbox.create", Sandbox;
    SandboxKill => "sandbox.kill", Sandbox;
    SandboxDestroy => "sandbox.destroy", Sandbox;
    SandboxAdopt => "sandbox.adopt", Sandbox;
    CommandRun => "command.run", Command;
    CommandStdin => "command.stdin", Command;
    CommandSignal => "command.signal", Command;
    CommandCancel => "command.cancel", Command;
    FileWrite => "file.write", Sandbox;
    FileDelete => "file.delete", Sandbox;
    FileMove => "file.move", Sandbox;
    FileMkdir => "file.mkdir", Sandbox;
    FileUploadUrl => "file.upload_url", Sandbox;
    FileDownloadUrl => "file.download_url", Sandbox;
    FileTransfer => "file.transfer", Transfer;
    ArtifactCreate => "artifact.create", Artifact;
    PreviewCreate => "preview.create", Preview;
    PreviewDelete => "preview.delete", Preview;
    CodeContextCreate => "code_context.create", CodeContext;
    CodeContextDelete => "code_context.delete", CodeContext;
    CodeRun => "code.run", CodeContext;
    KeyCreate => "key.create", Key;
    KeyRevoke => "key.revoke", Key;
    QuotaSet => "org.set_quota", Org;
    WorkspaceRunCreate => "workspace_run.create", WorkspaceRun;
    WorkspaceRunUpload => "workspace_run.upload", WorkspaceRun;
    WorkspaceRunUploadUrl => "workspace_run.upload_url", WorkspaceRun;
    WorkspaceRunStart => "workspace_run.start", WorkspaceRun;
    WorkspaceRunCancel => "workspace_run.cancel", WorkspaceRun;
    SandboxNetwork => "sandbox.network", Sandbox;
    EgressDenied => "egress_denied", Sandbox;
    SandboxTimeout => "sandbox.timeout", Sandbox;
    CodeContextRestart => "code_context.restart", CodeContext;
}

impl Serialize for AuditAction {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl utoipa::PartialSchema for AuditAction {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(AuditAction::ALL.iter().map(|a| a.name())))
            .description(Some("The audited action, e.g. `sandbox.create`."))
            .into()
    }
}

impl ToSchema for AuditAction {}

/// Context of an audit event. Every field is optional and bounded by the
/// code that fills it (ids, codes, normalized paths).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditDetails {
    /// The sandbox a request addressed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sandbox_id: Option<String>,
    /// The file path a request named (decoded, inside /workspace).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// The API error code of a failed request.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<String>,
    /// Why the host destroyed a sandbox on its own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<EndReason>,
    /// The `host:port` an egress connection asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// Why the host refused it, in words.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// A file to promote to an artifact when a command ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectItem {
    /// As the client gave it (relative to /workspace or absolute under it).
    pub path: String,
    /// Artifact name; default: the file name.
    pub name: Option<String>,
}

/// What became of one [`CollectItem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub path: String,
    pub name: String,
    /// The artifact, when promotion worked.
    pub artifact_id: Option<String>,
    /// Why it did not (a missing path, a quota), when it did not.
    pub error: Option<String>,
}

/// How a command ended, as its log's last event and its record say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandExit {
    pub status: CommandStatus,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub error: Option<String>,
}

/// Where a Workspace Run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Created; waits for its archive (and then for `start`).
    AwaitingArchive,
    /// Started; waits for its sandbox.
    Queued,
    /// Its archive is being unpacked into /workspace.
    Extracting,
    /// Its command runs.
    Running,
    /// The command exited 0.
    Succeeded,
    /// It did not succeed; the reason says why.
    Failed,
    /// A client canceled it.
    Canceled,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Canceled
        )
    }
}

/// Why a Workspace Run ended as it did (`None` for a success).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunReason {
    /// The command exited non-zero (or a signal ended it).
    ExitCode,
    /// The run passed its `timeoutMs`.
    Timeout,
    /// The archive passed an entry, byte or ratio limit.
    ArchiveTooLarge,
    /// The archive held an entry that would leave /workspace or is a
    /// device node, fifo or hard link to outside.
    ArchiveUnsafe,
    /// The archive is not a readable .tar.gz.
    ArchiveCorrupt,
    /// The sandbox could not be created or went away.
    SandboxFailed,
    /// The host restarted while the run was in progress.
    HostRestart,
    /// A client canceled it.
    Canceled,
}

impl RunReason {
    /// The error code an `error` event of this reason carries.
    pub fn code(self) -> &'static str {
        match self {
            RunReason::ExitCode => "exit_code",
            RunReason::Timeout => "timeout",
            RunReason::ArchiveTooLarge => "archive_too_large",
            RunReason::ArchiveUnsafe => "archive_unsafe",
            RunReason::ArchiveCorrupt => "archive_corrupt",
            RunReason::SandboxFailed => "sandbox_failed",
            RunReason::HostRestart => "host_restart",
            RunReason::Canceled => "canceled",
        }
    }
}

/// One event of a Workspace Run's log: its `type` and `data` as clients
/// and the Evidence Bundle's event digest see them (the log's `seq` and
/// `at` are kept beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum RunEventBody {
    Status {
        status: RunStatus,
        reason: Option<RunReason>,
    },
    #[serde(rename_all = "camelCase")]
    ArchiveProgress {
        entries: u64,
        bytes: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        done: bool,
        /// Entries left out (at the end only), e.g. a symlink pointing
        /// outside /workspace.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<SkippedEntry>,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    #[serde(rename_all = "camelCase")]
    ArtifactCollected {
        path: String,
        name: String,
        artifact_id: String,
        size_bytes: i64,
        sha256: String,
    },
    ArtifactError {
        path: String,
        name: String,
        message: String,
    },
    #[serde(rename_all = "camelCase")]
    Heartbeat {
        status: RunStatus,
        elapsed_ms: i64,
    },
    #[serde(rename_all = "camelCase")]
    Terminal {
        status: RunStatus,
        reason: Option<RunReason>,
        exit_code: Option<i64>,
        /// RFC 3339.
        ended_at: String,
    },
    Error {
        code: String,
        message: String,
    },
}

impl RunEventBody {
    /// The event's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            RunEventBody::Status { .. } => "status",
            RunEventBody::ArchiveProgress { .. } => "archive_progress",
            RunEventBody::Stdout { .. } => "stdout",
            RunEventBody::Stderr { .. } => "stderr",
            RunEventBody::ArtifactCollected { .. } => "artifact_collected",
            RunEventBody::ArtifactError { .. } => "artifact_error",
            RunEventBody::Heartbeat { .. } => "heartbeat",
            RunEventBody::Terminal { .. } => "terminal",
            RunEventBody::Error { .. } => "error",
        }
    }
}

/// An archive entry that was not unpacked, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SkippedEntry {
    pub path: String,
    pub reason: String,
}

/// What became of one artifact path of a Workspace Run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunArtifact {
    pub path: String,
    pub name: String,
    pub artifact_id: Option<String>,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_events_serialise_as_type_and_data() {
        let json = serde_json::to_value(RunEventBody::ArchiveProgress {
            entries: 3,
            bytes: 10,
            done: false,
            skipped: Vec::new(),
        })
        .expect("json");
        assert_eq!(
            json,
            serde_json::json!({"type": "archive_progress", "data": {"entries": 3, "bytes": 10}})
        );
        let json = serde_json::to_value(RunEventBody::Terminal {
            status: RunStatus::Failed,
            reason: Some(RunReason::Timeout),
            exit_code: None,
            ended_at: String::from("t"),
        })
        .expect("json");
        assert_eq!(json["data"]["reason"], "timeout");
        assert_eq!(json["data"]["exitCode"], serde_json::Value::Null);
    }

    #[test]
    fn audit_action_names_round_trip_and_are_unique() {
        let mut names: Vec<&str> = AuditAction::ALL.iter().map(|a| a.name()).collect();
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::from_name(action.name()), Some(*action));
        }
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(AuditAction::from_name("nope"), None);
    }

    #[test]
    fn states_serialise_as_snake_case() {
        let json = serde_json::to_string(&CommandStatus::TimedOut).expect("json");
        assert_eq!(json, "\"timed_out\"");
        let json = serde_json::to_string(&EndReason::HostRestart).expect("json");
        assert_eq!(json, "\"host_restart\"");
    }
}
