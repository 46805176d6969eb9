//! `/v1/sandboxes/{id}/commands`: run (blocking or background), read, list,
//! stream logs over SSE with resume, stdin, signals, cancel.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller, KnownQuota};
use crate::clock::rfc3339;
use crate::core::commands::parse_signal;
use crate::core::{LogEvent, RunCommand};
use crate::model::{AuditAction, CollectItem, Collected, CommandExit, CommandStatus, OutputStream};
use crate::store::{CommandRow, Cursor, LogBody};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_commands))
        .routes(mutation(
            AuditAction::CommandRun,
            Some("commands:run"),
            routes!(run_command),
        ))
        .routes(routes!(get_command))
        .routes(routes!(command_logs))
        .routes(mutation(
            AuditAction::CommandStdin,
            Some("commands:run"),
            routes!(command_stdin),
        ))
        .routes(mutation(
            AuditAction::CommandSignal,
            Some("commands:kill"),
            routes!(command_signal),
        ))
        .routes(mutation(
            AuditAction::CommandCancel,
            Some("commands:kill"),
            routes!(cancel_command),
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommandBody {
    /// Shell command line, run with `/bin/sh -c`.
    pub command: String,
    /// Working directory; relative paths are under /workspace (the default).
    pub cwd: Option<String>,
    /// Extra environment variables.
    pub env: Option<std::collections::BTreeMap<String, String>>,
    /// Kill the command after this many milliseconds (status `timed_out`).
    pub timeout_ms: Option<i64>,
    /// Return as soon as the command started instead of when it ended.
    #[serde(default)]
    pub background: bool,
    /// Keep stdin open for `POST …/stdin` (otherwise it reads /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Files to promote to artifacts when the command ends; the result's
    /// `artifacts` says what became of each (a missing path is reported
    /// there, not as a failed command).
    #[serde(default)]
    pub collect: Vec<CollectBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectBody {
    /// Path of the file, relative to /workspace or absolute under it.
    pub path: String,
    /// Artifact name (default: the file name).
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectedView {
    pub path: String,
    pub name: String,
    /// `art_…` when the file was promoted.
    pub artifact_id: Option<String>,
    /// Why it was not, otherwise.
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandView {
    /// `cmd_…`
    pub id: String,
    pub sandbox_id: String,
    pub command: String,
    pub cwd: String,
    pub background: bool,
    /// `completed` is any exit code; `failed`: it could not run or its
    /// sandbox went away.
    pub status: CommandStatus,
    /// Exit code when the process exited; null while running or when a
    /// signal ended it.
    pub exit_code: Option<i64>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i64>,
    /// Output (the tail when it exceeded the per-command limit).
    pub stdout: String,
    pub stderr: String,
    /// True when the front of stdout was dropped to stay within the limit.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_dropped_bytes: i64,
    pub stderr_dropped_bytes: i64,
    pub timeout_ms: Option<i64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub cancel_requested_at: Option<String>,
    /// Why the command failed, timed out or could not start.
    pub error: Option<String>,
    /// Results of `collect`, once the command ended (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<CollectedView>>,
}

fn render(row: CommandRow) -> CommandView {
    CommandView {
        id: row.id,
        sandbox_id: row.sandbox_id,
        command: row.command,
        cwd: row.cwd,
        background: row.background,
        status: row.status,
        exit_code: row.exit_code,
        signal: row.signal,
        stdout: String::from_utf8_lossy(&row.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&row.stderr).into_owned(),
        stdout_truncated: row.stdout_dropped > 0,
        stderr_truncated: row.stderr_dropped > 0,
        stdout_dropped_bytes: row.stdout_dropped,
        stderr_dropped_bytes: row.stderr_dropped,
        timeout_ms: row.timeout_ms,
        created_at: rfc3339(row.created_at),
        started_at: row.started_at.map(rfc3339),
        ended_at: row.ended_at.map(rfc3339),
        cancel_requested_at: row.cancel_requested_at.map(rfc3339),
        error: row.error,
        artifacts: match row.collected {
            Some(collected) => Some(collected.into_iter().map(collected_view).collect()),
            None if !row.collect.is_empty() => Some(Vec::new()),
            None => None,
        },
    }
}

fn collected_view(c: Collected) -> CollectedView {
    CollectedView {
        path: c.path,
        name: c.name,
        artifact_id: c.artifact_id,
        error: c.error,
    }
}

/// Runs a command. Blocks until it ends unless `background` is true. A
/// non-zero exit is a result (200), not an error. Scope `commands:run`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = RunCommandBody,
    responses(
        (status = 200, description = "ended (or started, for background)", body = CommandView),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn run_command(
    State(state): State<AppState>,
    caller: Caller,
    quota: Option<axum::Extension<KnownQuota>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RunCommandBody>,
) -> Result<Audited<CommandView>, ApiError> {
    let principal = caller.require("commands:run")?;
    let request = RunCommand {
        command: body.command,
        cwd: body.cwd,
        env: body.env.unwrap_or_default().into_iter().collect(),
        timeout_ms: body.timeout_ms,
        background: body.background,
        stdin: body.stdin,
        collect: body
            .collect
            .into_iter()
            .map(|c| CollectItem {
                path: c.path,
                name: c.name,
            })
            .collect(),
    };
    let row = state
        .host
        .run_command(principal, &id, request, quota.map(|q| q.0.0))
        .await?;
    Ok(Audited::ok(row.id.clone(), render(row)))
}

/// Commands of a sandbox, newest first. Scope `commands:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), PageQuery),
    responses((status = 200, body = Page<CommandView>), (status = 404, body = ErrorEnvelope)))]
async fn list_commands(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<CommandView>>, ApiError> {
    let principal = caller.require("commands:read")?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_commands(principal, &id, query.cursor()?, limit + 1)
        .await?;
    Ok(ApiJson(Page::from_rows_within(
        rows,
        limit,
        |r| r.stdout.len() + r.stderr.len() + r.command.len() + 512,
        |r| Cursor {
            created_at: r.created_at,
            id: r.id.clone(),
        },
        render,
    )))
}

/// One command record. Scope `commands:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{command_id}", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), ("command_id" = String, Path, description = "command id")),
    responses((status = 200, body = CommandView), (status = 404, body = ErrorEnvelope)))]
async fn get_command(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<CommandView>, ApiError> {
    let principal = caller.require("commands:read")?;
    let row = state.host.get_command(principal, &id, &command_id).await?;
    Ok(ApiJson(render(row)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Resume after this event id (same as the `Last-Event-ID` header).
    pub after: Option<i64>,
}

/// Streams a command's log as server-sent events: `stdout` and `stderr`
/// events carry `{"data": text}`, the final `exit` event carries
/// `{"status","exitCode","signal","error"}`. Every event has an id; send
/// `Last-Event-ID` (or `?after=`) to resume without loss or repeats. A
/// finished command's recorded log is replayed. Scope `commands:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/commands/{command_id}/logs", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), ("command_id" = String, Path, description = "command id"), LogQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", description = "SSE stream"), (status = 404, body = ErrorEnvelope)))]
async fn command_logs(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let principal = caller.require("commands:read")?;
    let header = super::last_event_id(&headers)?;
    let after = match (header, query.after) {
        (_, Some(n)) if n < 0 => return Err(ApiError::invalid("after", "after must be >= 0")),
        (Some(h), Some(q)) => h.max(q),
        (h, q) => h.or(q).unwrap_or(0),
    };
    let place = state.host.log_stream_place(&principal.org_id)?;
    let log = state
        .host
        .command_log(principal, &id, &command_id, after)
        .await?;
    let stream = tokio_stream::wrappers::ReceiverStream::new(log);
    // The org's place is held for as long as the client reads the stream.
    let events = futures::StreamExt::map(stream, move |item| {
        let _held = &place;
        Ok::<_, Infallible>(match item {
            Ok(event) => sse_event(event),
            Err(e) => ApiError::from(e).sse_event(),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(super::SSE_KEEPALIVE)))
}

/// The data of a log's `stdout` or `stderr` event.
#[derive(Serialize, ToSchema)]
pub struct OutputEvent<'a> {
    /// The text (invalid UTF-8 replaced).
    pub data: std::borrow::Cow<'a, str>,
}

/// The data of a log's last event, `exit`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExitEvent {
    pub status: CommandStatus,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub error: Option<String>,
}

fn sse_event(event: LogEvent) -> Event {
    let base = Event::default().id(event.seq.to_string());
    match &event.body {
        LogBody::Output { stream, data } => base
            .event(match stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            })
            .json_data(OutputEvent {
                data: String::from_utf8_lossy(data),
            }),
        LogBody::Exit(CommandExit {
            status,
            exit_code,
            signal,
            error,
        }) => base.event("exit").json_data(ExitEvent {
            status: *status,
            exit_code: *exit_code,
            signal: *signal,
            error: error.clone(),
        }),
    }
    .unwrap_or_default()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StdinBody {
    /// Text to write to stdin.
    pub data: Option<String>,
    /// Bytes to write, base64-encoded (instead of `data`).
    pub data_base64: Option<String>,
    /// Close stdin after writing.
    #[serde(default)]
    pub close: bool,
}

/// Writes to a running command's stdin (started with `"stdin": true`).
/// Scope `commands:run`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{command_id}/stdin", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), ("command_id" = String, Path, description = "command id")),
    request_body = StdinBody,
    responses((status = 200, body = CommandView), (status = 409, description = "command_not_running, stdin_not_open", body = ErrorEnvelope)))]
async fn command_stdin(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<StdinBody>,
) -> Result<ApiJson<CommandView>, ApiError> {
    let principal = caller.require("commands:run")?;
    let data = match (body.data, body.data_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "data",
                "send either data or dataBase64, not both",
            ));
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => BASE64
            .decode(encoded.as_bytes())
            .map_err(|_| ApiError::invalid("dataBase64", "dataBase64 is not valid base64"))?,
        (None, None) => Vec::new(),
    };
    let row = state
        .host
        .command_stdin(principal, &id, &command_id, data, body.close)
        .await?;
    Ok(ApiJson(render(row)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// Signal name (`SIGTERM`, `TERM`) or number. Allowed: SIGHUP, SIGINT,
    /// SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2, SIGTERM, SIGCONT, SIGSTOP,
    /// SIGTSTP, SIGWINCH.
    #[schema(value_type = String)]
    pub signal: serde_json::Value,
}

/// Sends a signal to a running command's process group. Scope `commands:kill`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{command_id}/signal", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), ("command_id" = String, Path, description = "command id")),
    request_body = SignalBody,
    responses((status = 200, body = CommandView), (status = 409, description = "command_not_running", body = ErrorEnvelope)))]
async fn command_signal(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SignalBody>,
) -> Result<ApiJson<CommandView>, ApiError> {
    let principal = caller.require("commands:kill")?;
    let text = match &body.signal {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let signal = parse_signal(&text).ok_or_else(|| {
        ApiError::invalid(
            "signal",
            "unknown or disallowed signal; use one of SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGUSR1, SIGUSR2, SIGTERM, SIGCONT, SIGSTOP, SIGTSTP, SIGWINCH",
        )
    })?;
    let row = state
        .host
        .command_signal(principal, &id, &command_id, signal)
        .await?;
    Ok(ApiJson(render(row)))
}

/// Cancels a running command: the request is recorded, its process group
/// is killed, and it ends as `canceled`. Scope `commands:kill`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands/{command_id}/cancel", tag = "commands",
    params(("id" = String, Path, description = "sandbox id"), ("command_id" = String, Path, description = "command id")),
    responses((status = 200, body = CommandView), (status = 409, description = "command_not_running", body = ErrorEnvelope)))]
async fn cancel_command(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<CommandView>, ApiError> {
    let principal = caller.require("commands:kill")?;
    let row = state
        .host
        .cancel_command(principal, &id, &command_id)
        .await?;
    Ok(ApiJson(render(row)))
}
