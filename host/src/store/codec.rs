//! How typed values become SQL column values and back: the SQL text of
//! every state enum, and the JSON encoding of the structured columns
//! (metadata, env, collect lists, audit details, a log's exit event).
//!
//! This is the only place that spells a state as SQL text. A value the
//! store cannot decode is [`StoreError::Corrupt`], never a panic.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::{
    AuditAction, AuditActor, AuditDetails, AuditOutcome, CollectItem, Collected, CommandExit,
    CommandStatus, EndReason, OutputStream, PreviewCloseReason, PreviewStatus, ResourceKind,
    RunArtifact, RunEventBody, RunReason, RunStatus, SandboxStatus, TransferKind,
};

/// A value stored as one fixed SQL text.
pub(super) trait SqlText: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn sql(self) -> &'static str;

    fn from_sql_text(text: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.sql() == text)
    }
}

macro_rules! sql_text {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl SqlText for $ty {
            const ALL: &'static [Self] = &[$(<$ty>::$variant),*];
            fn sql(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $text,)*
                }
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.sql()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                <$ty as SqlText>::from_sql_text(text).ok_or_else(|| {
                    FromSqlError::Other(format!("unknown {} `{text}`", stringify!($ty)).into())
                })
            }
        }
    };
}

sql_text!(SandboxStatus {
    Starting => "starting",
    Running => "running",
    Destroyed => "destroyed",
});

sql_text!(EndReason {
    Killed => "killed",
    Expired => "expired",
    Failed => "failed",
    HostRestart => "host_restart",
    HostShutdown => "host_shutdown",
});

sql_text!(CommandStatus {
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    TimedOut => "timed_out",
    Canceled => "canceled",
});

sql_text!(OutputStream {
    Stdout => "stdout",
    Stderr => "stderr",
});

sql_text!(PreviewStatus {
    Active => "active",
    Closed => "closed",
});

sql_text!(PreviewCloseReason {
    Deleted => "deleted",
    SandboxDestroyed => "sandbox_destroyed",
});

sql_text!(TransferKind {
    Upload => "upload",
    Download => "download",
    ArchiveUpload => "archive_upload",
});

sql_text!(RunStatus {
    AwaitingArchive => "awaiting_archive",
    Queued => "queued",
    Extracting => "extracting",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Canceled => "canceled",
});

sql_text!(RunReason {
    ExitCode => "exit_code",
    Timeout => "timeout",
    ArchiveTooLarge => "archive_too_large",
    ArchiveUnsafe => "archive_unsafe",
    ArchiveCorrupt => "archive_corrupt",
    SandboxFailed => "sandbox_failed",
    HostRestart => "host_restart",
    Canceled => "canceled",
});

sql_text!(AuditActor {
    Key => "key",
    Operator => "operator",
    System => "system",
    Token => "token",
});

sql_text!(AuditOutcome {
    Success => "success",
    Denied => "denied",
    Failed => "failed",
});

sql_text!(ResourceKind {
    Sandbox => "sandbox",
    Command => "command",
    Artifact => "artifact",
    Preview => "preview",
    CodeContext => "code_context",
    Transfer => "transfer",
    Key => "key",
    Org => "org",
    WorkspaceRun => "workspace_run",
});

impl ToSql for AuditAction {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.name()))
    }
}

impl FromSql for AuditAction {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        AuditAction::from_name(text)
            .ok_or_else(|| FromSqlError::Other(format!("unknown audit action `{text}`").into()))
    }
}

/// The `kind` column of a command's log event.
pub(super) const LOG_EXIT: &str = "exit";

/// A sandbox's egress policy: `{"mode","allow","deny"}` with the rules as
/// written (parsed again on read).
pub(super) fn network_to_sql(policy: &crate::egress::Policy) -> String {
    serde_json::json!({
        "mode": policy.mode.as_str(),
        "allow": policy.allow_texts(),
        "deny": policy.deny_texts(),
    })
    .to_string()
}

pub(super) fn network_from_sql(text: &str) -> Result<crate::egress::Policy, StoreError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        mode: String,
        #[serde(default)]
        allow: Vec<String>,
        #[serde(default)]
        deny: Vec<String>,
    }
    let stored: Stored = serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("sandbox network policy: {e}")))?;
    crate::egress::Policy::parse(&stored.mode, &stored.allow, &stored.deny)
        .map_err(|e| StoreError::Corrupt(format!("sandbox network policy: {e}")))
}

/// A sandbox's metadata: a JSON object.
pub(super) fn metadata_to_sql(metadata: &crate::model::Metadata) -> String {
    serde_json::Value::Object(metadata.clone()).to_string()
}

pub(super) fn metadata_from_sql(text: &str) -> Result<crate::model::Metadata, StoreError> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(StoreError::Corrupt(String::from(
            "sandbox metadata is not a JSON object",
        ))),
    }
}

pub(super) fn env_to_sql(env: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

pub(super) fn env_from_sql(text: &str) -> Result<Vec<(String, String)>, StoreError> {
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("command env: {e}")))?;
    Ok(map.into_iter().collect())
}

#[derive(Serialize, Deserialize)]
struct CollectJson {
    path: String,
    name: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectedJson {
    path: String,
    name: String,
    artifact_id: Option<String>,
    error: Option<String>,
}

/// `None` for a command that collects nothing.
pub(super) fn collect_to_sql(items: &[CollectItem]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let json: Vec<CollectJson> = items
        .iter()
        .map(|c| CollectJson {
            path: c.path.clone(),
            name: c.name.clone(),
        })
        .collect();
    serde_json::to_string(&json).ok()
}

pub(super) fn collect_from_sql(text: Option<String>) -> Result<Vec<CollectItem>, StoreError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let json: Vec<CollectJson> = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("command collect: {e}")))?;
    Ok(json
        .into_iter()
        .map(|c| CollectItem {
            path: c.path,
            name: c.name,
        })
        .collect())
}

pub(super) fn collected_to_sql(items: Option<&[Collected]>) -> Option<String> {
    let items = items?;
    let json: Vec<CollectedJson> = items
        .iter()
        .map(|c| CollectedJson {
            path: c.path.clone(),
            name: c.name.clone(),
            artifact_id: c.artifact_id.clone(),
            error: c.error.clone(),
        })
        .collect();
    serde_json::to_string(&json).ok()
}

pub(super) fn collected_from_sql(
    text: Option<String>,
) -> Result<Option<Vec<Collected>>, StoreError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let json: Vec<CollectedJson> = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("command collected: {e}")))?;
    Ok(Some(
        json.into_iter()
            .map(|c| Collected {
                path: c.path,
                name: c.name,
                artifact_id: c.artifact_id,
                error: c.error,
            })
            .collect(),
    ))
}

pub(super) fn details_to_sql(details: &AuditDetails) -> String {
    serde_json::to_string(details).unwrap_or_else(|_| String::from("{}"))
}

pub(super) fn details_from_sql(text: &str) -> AuditDetails {
    // Rows written before the details were typed may hold other keys:
    // keep what is known.
    serde_json::from_str(text).unwrap_or_default()
}

/// The data of a log's exit event. The SQL of
/// `fail_running_commands` writes the same shape with `json_object`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExitJson {
    status: String,
    exit_code: Option<i64>,
    signal: Option<i64>,
    error: Option<String>,
}

pub(super) fn exit_to_sql(exit: &CommandExit) -> Vec<u8> {
    let json = ExitJson {
        status: exit.status.sql().to_string(),
        exit_code: exit.exit_code,
        signal: exit.signal,
        error: exit.error.clone(),
    };
    serde_json::to_vec(&json).unwrap_or_default()
}

pub(super) fn exit_from_sql(data: &[u8]) -> Result<CommandExit, StoreError> {
    let json: ExitJson = serde_json::from_slice(data)
        .map_err(|e| StoreError::Corrupt(format!("command exit event: {e}")))?;
    Ok(CommandExit {
        status: CommandStatus::from_sql_text(&json.status)
            .ok_or_else(|| StoreError::Corrupt(format!("command exit status `{}`", json.status)))?,
        exit_code: json.exit_code,
        signal: json.signal,
        error: json.error,
    })
}

/// What a Workspace Run collected: a JSON array.
pub(super) fn run_artifacts_to_sql(items: &[RunArtifact]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| String::from("[]"))
}

pub(super) fn run_artifacts_from_sql(text: &str) -> Result<Vec<RunArtifact>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("run artifacts: {e}")))
}

/// A Workspace Run event's type and data, as one JSON object.
pub(super) fn run_event_to_sql(body: &RunEventBody) -> String {
    serde_json::to_string(body).unwrap_or_else(|_| String::from("{}"))
}

pub(super) fn run_event_from_sql(text: &str) -> Result<RunEventBody, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("run event: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_sql_text() {
        fn check<T: SqlText + PartialEq + std::fmt::Debug>() {
            let mut texts: Vec<&str> = T::ALL.iter().map(|v| v.sql()).collect();
            for v in T::ALL {
                assert_eq!(T::from_sql_text(v.sql()), Some(*v));
            }
            let n = texts.len();
            texts.sort_unstable();
            texts.dedup();
            assert_eq!(n, texts.len());
        }
        check::<SandboxStatus>();
        check::<EndReason>();
        check::<CommandStatus>();
        check::<OutputStream>();
        check::<PreviewStatus>();
        check::<PreviewCloseReason>();
        check::<TransferKind>();
        check::<AuditActor>();
        check::<AuditOutcome>();
        check::<ResourceKind>();
        check::<RunStatus>();
        check::<RunReason>();
    }

    #[test]
    fn an_exit_event_round_trips() {
        let exit = CommandExit {
            status: CommandStatus::TimedOut,
            exit_code: None,
            signal: Some(9),
            error: Some(String::from("too slow")),
        };
        assert_eq!(exit_from_sql(&exit_to_sql(&exit)).expect("decode"), exit);
        assert!(exit_from_sql(b"{\"status\":\"weird\"}").is_err());
    }
}
