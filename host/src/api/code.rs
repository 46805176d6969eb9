//! `/v1/sandboxes/{id}/code`: Code Contexts and Code Runs (blocking JSON,
//! or SSE with `Accept: text/event-stream`).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::{IdempotencyTicket, mutation};
use super::{ApiError, ApiJson, ApiPath, AppState, Audited, Caller};
use crate::clock::rfc3339;
use crate::core::code::{
    ArtifactPolicy, CodeContext, InlineContent, RunCode, RunCodeResult, RunError, RunOutput,
    RunStreamEvent, parse_language,
};
use crate::model::AuditAction;
use crate::store::StoredResponse;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_contexts))
        .routes(mutation(
            AuditAction::CodeContextCreate,
            Some("code:run"),
            routes!(create_context),
        ))
        .routes(routes!(get_context))
        .routes(mutation(
            AuditAction::CodeContextDelete,
            Some("code:run"),
            routes!(delete_context),
        ))
        .routes(mutation(
            AuditAction::CodeContextRestart,
            Some("code:run"),
            routes!(restart_context),
        ))
        .routes(mutation(
            AuditAction::CodeRun,
            Some("code:run"),
            routes!(run_code),
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateContextBody {
    /// `python`, `javascript` or `typescript`.
    pub language: String,
    /// Working directory (default /workspace).
    pub cwd: Option<String>,
    /// Extra environment variables of the interpreter.
    pub env: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextView {
    /// `cctx_…`
    pub id: String,
    pub sandbox_id: String,
    pub language: String,
    pub cwd: String,
    /// The interpreter, e.g. `ipython 8.5.0`.
    pub implementation: String,
    /// Whether runs without a `contextId` use it.
    pub is_default: bool,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContextList {
    pub data: Vec<ContextView>,
}

fn render(context: CodeContext) -> ContextView {
    ContextView {
        id: context.id,
        sandbox_id: context.sandbox_id,
        language: context.language.as_str().to_string(),
        cwd: context.cwd,
        implementation: context.implementation,
        is_default: context.is_default,
        created_at: rfc3339(context.created_at),
    }
}

fn language(text: &str) -> Result<crownest_proto::code::Language, ApiError> {
    parse_language(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_code_language",
            format!("`{text}` is not a supported language; use python, javascript or typescript"),
        )
        .with_details(serde_json::json!({ "language": text }))
    })
}

/// Creates a Code Context: an interpreter whose state (variables, imports)
/// persists across runs while the sandbox lives. Scope `code:run`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/code/contexts", tag = "code",
    params(("id" = String, Path, description = "sandbox id")), request_body = CreateContextBody,
    responses((status = 201, body = ContextView),
        (status = 400, description = "unsupported_code_language", body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn create_context(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateContextBody>,
) -> Result<Audited<ContextView>, ApiError> {
    let principal = caller.require("code:run")?;
    let language = language(&body.language)?;
    let context = state
        .host
        .create_context(
            principal,
            &id,
            language,
            body.cwd,
            body.env.unwrap_or_default().into_iter().collect(),
        )
        .await?;
    Ok(Audited::created(context.id.clone(), render(context)))
}

/// The sandbox's Code Contexts. Scope `code:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/code/contexts", tag = "code",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = ContextList), (status = 410, body = ErrorEnvelope)))]
async fn list_contexts(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<ContextList>, ApiError> {
    let principal = caller.require("code:read")?;
    let data = state.host.list_contexts(principal, &id).await?;
    Ok(ApiJson(ContextList {
        data: data.into_iter().map(render).collect(),
    }))
}

/// One Code Context. Scope `code:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/code/contexts/{context_id}", tag = "code",
    params(("id" = String, Path, description = "sandbox id"), ("context_id" = String, Path, description = "context id")),
    responses((status = 200, body = ContextView), (status = 404, body = ErrorEnvelope)))]
async fn get_context(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, context_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<ContextView>, ApiError> {
    let principal = caller.require("code:read")?;
    Ok(ApiJson(render(
        state.host.get_context(principal, &id, &context_id).await?,
    )))
}

/// Deletes a Code Context and stops its interpreter. Scope `code:run`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/code/contexts/{context_id}", tag = "code",
    params(("id" = String, Path, description = "sandbox id"), ("context_id" = String, Path, description = "context id")),
    responses((status = 200, body = ContextView), (status = 404, body = ErrorEnvelope)))]
async fn delete_context(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, context_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<ContextView>, ApiError> {
    let principal = caller.require("code:run")?;
    Ok(ApiJson(render(
        state
            .host
            .delete_context(principal, &id, &context_id)
            .await?,
    )))
}

/// Restarts a Code Context's interpreter: same id, cwd and environment,
/// but a fresh process (variables and imports are gone). A run in it ends
/// with `interpreterDied`. Scope `code:run`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/code/contexts/{context_id}/restart", tag = "code",
    params(("id" = String, Path, description = "sandbox id"), ("context_id" = String, Path, description = "context id")),
    responses((status = 200, body = ContextView), (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope),
        (status = 503, description = "code_context_failed: the interpreter did not start", body = ErrorEnvelope)))]
async fn restart_context(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, context_id)): ApiPath<(String, String)>,
) -> Result<ApiJson<ContextView>, ApiError> {
    let principal = caller.require("code:run")?;
    Ok(ApiJson(render(
        state
            .host
            .restart_context(principal, &id, &context_id)
            .await?,
    )))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCodeBody {
    /// `python`, `javascript` or `typescript` (required).
    pub language: String,
    pub code: String,
    /// Run in this context; without it, the sandbox's default context for
    /// the language is created or reused (the result names it).
    pub context_id: Option<String>,
    /// `inline` (default) or `promote`: promote eligible rich outputs to
    /// Artifacts.
    pub artifact_policy: Option<String>,
    /// Interrupt the run after this long (default 60000).
    pub timeout_ms: Option<u64>,
}

/// The result of a Code Run (also the `complete` event of a streamed run).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCodeResultBody {
    pub context_id: String,
    /// Ordered stdout chunks.
    pub stdout: Vec<String>,
    /// Ordered stderr chunks.
    pub stderr: Vec<String>,
    /// Rich outputs, inline, promoted to Artifacts, or rejected.
    pub outputs: Vec<RunOutputBody>,
    pub execution_count: Option<u64>,
    /// The interpreter's error, or null: a result, not an API error.
    pub error: Option<RunErrorBody>,
    pub duration_ms: u64,
    /// The interpreter died during this run; its state is gone.
    pub interpreter_restarted: bool,
    /// This run started on a fresh interpreter: earlier state is gone.
    pub state_lost: bool,
    /// Plugin failures and fallbacks, one sentence each.
    pub notes: Vec<String>,
}

/// One rich output of a Code Run.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RunOutputBody {
    /// Small enough to travel in the result.
    Inline {
        /// `text`, `markdown`, `html`, `json`, `png`, `jpeg`, `svg`,
        /// `latex`, `chart`, `data` or `unknown`.
        format: &'static str,
        /// Text; for `json`, `data` and `chart` the JSON value; for binary
        /// formats base64.
        #[schema(value_type = serde_json::Value)]
        content: Box<serde_json::value::RawValue>,
        mime: String,
    },
    /// Promoted to an Artifact (`artifactPolicy: "promote"`).
    #[serde(rename_all = "camelCase")]
    Artifact {
        format: &'static str,
        artifact_id: String,
        mime: String,
        size: u64,
    },
    /// Neither inlined nor promoted.
    Rejected {
        format: &'static str,
        /// `output_too_large`, `requires_artifact_promotion`,
        /// `unsupported_format`, `policy_failed`, `quota_exceeded` or
        /// `promotion_failed`.
        reason: &'static str,
    },
}

/// An interpreter error (the seed's `error`: name, message, traceback).
#[derive(Debug, Serialize, ToSchema)]
pub struct RunErrorBody {
    pub name: String,
    pub message: String,
    pub traceback: Option<String>,
}

/// The data of a streamed run's `stdout` and `stderr` events.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunTextEvent {
    pub text: String,
}

/// Valid JSON text as a raw value (`null` if it is not, which the core's
/// `InlineContent::Json` rules out).
fn raw_json(text: String) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text).unwrap_or_default()
}

fn output_body(output: RunOutput) -> RunOutputBody {
    match output {
        RunOutput::Inline {
            format,
            content,
            mime,
        } => RunOutputBody::Inline {
            format: format.as_str(),
            content: match content {
                InlineContent::Json(text) => raw_json(text),
                InlineContent::Text(text) | InlineContent::Base64(text) => {
                    raw_json(serde_json::to_string(&text).unwrap_or_default())
                }
            },
            mime,
        },
        RunOutput::Artifact {
            format,
            artifact_id,
            mime,
            size,
        } => RunOutputBody::Artifact {
            format: format.as_str(),
            artifact_id,
            mime,
            size,
        },
        RunOutput::Rejected { format, reason } => RunOutputBody::Rejected {
            format: format.as_str(),
            reason: reason.as_str(),
        },
    }
}

fn error_body(error: RunError) -> RunErrorBody {
    RunErrorBody {
        name: error.name,
        message: error.message,
        traceback: error.traceback,
    }
}

pub fn result_body(result: RunCodeResult) -> RunCodeResultBody {
    RunCodeResultBody {
        context_id: result.context_id,
        stdout: result.stdout,
        stderr: result.stderr,
        outputs: result.outputs.into_iter().map(output_body).collect(),
        execution_count: result.execution_count,
        error: result.error.map(error_body),
        duration_ms: result.duration_ms,
        interpreter_restarted: result.interpreter_restarted,
        state_lost: result.state_lost,
        notes: result.notes,
    }
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Runs code in a Code Context. An interpreter exception is a result (200
/// with `error` set), not an API error. With `Accept: text/event-stream`
/// the run streams `stdout` and `stderr` (`{"text"}`), `output` (one rich
/// output), `error` and a final `complete` event carrying the same result
/// (no event ids, no resume). An `error` event is either the interpreter's
/// exception (`{"name","message","traceback"}`, the run goes on to
/// `complete`) or an API failure (the error envelope, `{"error":{"code",
/// "message","details"}}`, and the stream ends): `"error" in data` tells
/// them apart. Scope `code:run`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/code/runs", tag = "code",
    params(("id" = String, Path, description = "sandbox id")), request_body = RunCodeBody,
    responses((status = 200, body = RunCodeResultBody),
        (status = 400, description = "unsupported_code_language, context_language_mismatch", body = ErrorEnvelope),
        (status = 413, description = "code_source_too_large", body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn run_code(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ticket: Option<axum::Extension<IdempotencyTicket>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<RunCodeBody>,
) -> Result<Response, ApiError> {
    let principal = caller.require("code:run")?.clone();
    let artifact_policy = match body.artifact_policy.as_deref() {
        None | Some("inline") => ArtifactPolicy::Inline,
        Some("promote") => ArtifactPolicy::Promote,
        Some(other) => {
            return Err(ApiError::invalid(
                "artifactPolicy",
                format!("artifactPolicy must be inline or promote, got `{other}`"),
            ));
        }
    };
    let request = RunCode {
        language: language(&body.language)?,
        code: body.code,
        context_id: body.context_id,
        artifact_policy,
        timeout_ms: body.timeout_ms,
    };
    let host = state.host.clone();
    let request = request.validate()?;
    let target = host.context_for_run(&principal, &id, &request).await?;
    let context_id = target.context.id.clone();
    if !accepts_event_stream(&headers) {
        let result = host.run_code(&principal, &target, request, None).await?;
        return Ok(Audited::ok(context_id, result_body(result)).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let ticket = ticket.map(|t| t.0);
    tokio::spawn(async move {
        let result = host
            .run_code(&principal, &target, request, Some(tx))
            .await
            .map(result_body);
        if let (Some(ticket), Ok(result)) = (&ticket, &result) {
            // The stream cannot be stored; its result can, for replays.
            let body = serde_json::to_vec(result).unwrap_or_default();
            host.idempotency_complete(
                &ticket.owner,
                &ticket.key,
                StoredResponse {
                    status: 200,
                    content_type: Some(String::from("application/json")),
                    body,
                },
            )
            .await;
        } else if let Some(ticket) = &ticket {
            host.idempotency_abandon(&ticket.owner, &ticket.key).await;
        }
        let _ = done_tx.send(result);
    });
    let live = tokio_stream::wrappers::ReceiverStream::new(rx).map(|event| {
        Ok::<_, Infallible>(match event {
            RunStreamEvent::Stdout(text) => json_event("stdout", &RunTextEvent { text }),
            RunStreamEvent::Stderr(text) => json_event("stderr", &RunTextEvent { text }),
            RunStreamEvent::Output(output) => json_event("output", &output_body(output)),
            RunStreamEvent::Error(error) => json_event("error", &error_body(error)),
        })
    });
    let end = futures::stream::once(async move {
        Ok::<_, Infallible>(match done_rx.await {
            Ok(Ok(result)) => json_event("complete", &result),
            Ok(Err(e)) => ApiError::from(e).sse_event(),
            Err(_) => ApiError::internal().sse_event(),
        })
    });
    let mut response = Sse::new(live.chain(end))
        .keep_alive(KeepAlive::new().interval(super::SSE_KEEPALIVE))
        .into_response();
    let extensions = response.extensions_mut();
    extensions.insert(super::ledger::StreamCompletesIdempotency);
    extensions.insert(super::ledger::AuditResource(context_id));
    Ok(response)
}

fn json_event<T: Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_is_detected_in_accept_lists() {
        let mut headers = HeaderMap::new();
        assert!(!accepts_event_stream(&headers));
        headers.insert(
            header::ACCEPT,
            "application/json, text/event-stream"
                .parse()
                .expect("header"),
        );
        assert!(accepts_event_stream(&headers));
    }
}
