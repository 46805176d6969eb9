//! `/v1/workspace-runs…` and `/v1/evidence-keys`: Workspace Runs (seed
//! 003) and their signed Evidence Bundles. `docs/workspace-runs.md` is
//! the client's guide to these routes.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::files::{DIRECT_MAX_BYTES, TransferView, body_stream, declared_length, transfer_view};
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller};
use crate::clock::rfc3339;
use crate::core::workspace_runs::{CreateRun, EventPage};
use crate::evidence;
use crate::model::{AuditAction, CollectItem, RunEventBody, RunReason, RunStatus};
use crate::store::{Cursor, RunEventRow, RunFilter, WorkspaceRunRow};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(mutation(
            AuditAction::WorkspaceRunCreate,
            Some("workspace_runs:create"),
            routes!(create_run),
        ))
        .routes(routes!(list_runs))
        .routes(routes!(get_run))
        .routes(mutation(
            AuditAction::WorkspaceRunUpload,
            Some("workspace_runs:create"),
            routes!(upload_archive),
        ))
        .routes(mutation(
            AuditAction::WorkspaceRunUploadUrl,
            Some("workspace_runs:create"),
            routes!(create_archive_upload),
        ))
        .routes(mutation(
            AuditAction::WorkspaceRunStart,
            Some("workspace_runs:create"),
            routes!(start_run),
        ))
        .routes(mutation(
            AuditAction::WorkspaceRunCancel,
            Some("workspace_runs:cancel"),
            routes!(cancel_run),
        ))
        .routes(routes!(run_events))
        .routes(routes!(run_evidence))
        .routes(routes!(evidence_keys))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArchiveBody {
    /// The archive's exact size in bytes (1 … 1 GiB).
    pub size_bytes: i64,
    /// Its SHA-256, 64 hex characters.
    pub sha256: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactBody {
    /// Relative to /workspace; no `..`.
    pub path: String,
    /// Artifact name (default: the path's last component).
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRunBody {
    /// Template name (default `python-node`).
    pub template: Option<String>,
    /// Run with `/bin/sh -c` in /workspace.
    pub command: String,
    pub archive: ArchiveBody,
    /// At most 32.
    #[serde(default)]
    pub artifacts: Vec<ArtifactBody>,
    /// 1 000 … 86 400 000 (default 600 000).
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Keep the sandbox after the run ends (default false).
    #[serde(default)]
    pub keep_sandbox: bool,
    /// A JSON object of at most 16 KiB, kept verbatim and filterable.
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveView {
    pub size_bytes: i64,
    pub sha256: String,
    pub uploaded: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactPathView {
    pub path: String,
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectedView {
    pub path: String,
    pub name: String,
    pub artifact_id: Option<String>,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceRunView {
    /// `wsr_…`
    pub id: String,
    pub status: RunStatus,
    pub reason: Option<RunReason>,
    pub template: String,
    pub command: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub archive: ArchiveView,
    pub artifacts: Vec<ArtifactPathView>,
    pub collected: Vec<CollectedView>,
    pub timeout_ms: i64,
    pub keep_sandbox: bool,
    pub metadata: serde_json::Value,
    pub sandbox_id: Option<String>,
    pub exit_code: Option<i64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Whether `GET …/evidence` has the bundle.
    pub evidence_ready: bool,
}

fn render(row: WorkspaceRunRow) -> WorkspaceRunView {
    WorkspaceRunView {
        id: row.id,
        status: row.status,
        reason: row.reason,
        template: row.template,
        command: row.command,
        env: row.env.into_iter().collect(),
        archive: ArchiveView {
            size_bytes: row.archive_size,
            sha256: row.archive_sha256,
            uploaded: row.archive_uploaded,
        },
        artifacts: row
            .artifacts
            .into_iter()
            .map(|a| ArtifactPathView {
                path: a.path,
                name: a.name,
            })
            .collect(),
        collected: row
            .collected
            .into_iter()
            .map(|c| CollectedView {
                path: c.path,
                name: c.name,
                artifact_id: c.artifact_id,
                size_bytes: c.size_bytes,
                sha256: c.sha256,
                error: c.error,
            })
            .collect(),
        timeout_ms: row.timeout_ms,
        keep_sandbox: row.keep_sandbox,
        metadata: serde_json::Value::Object(row.metadata),
        sandbox_id: row.sandbox_id,
        exit_code: row.exit_code,
        created_at: rfc3339(row.created_at),
        started_at: row.started_at.map(rfc3339),
        ended_at: row.ended_at.map(rfc3339),
        evidence_ready: row.evidence_ready,
    }
}

/// The run view of an archive upload through a staged URL.
pub(super) fn render_run(row: WorkspaceRunRow) -> WorkspaceRunView {
    render(row)
}

fn cursor_of(row: &WorkspaceRunRow) -> Cursor {
    Cursor {
        created_at: row.created_at,
        id: row.id.clone(),
    }
}

/// Creates a Workspace Run awaiting its archive. Scope
/// `workspace_runs:create`.
#[utoipa::path(post, path = "/v1/workspace-runs", tag = "workspace-runs",
    request_body = CreateRunBody,
    responses((status = 201, body = WorkspaceRunView),
        (status = 400, description = "invalid_request, archive_too_large, template_not_found", body = ErrorEnvelope),
        (status = 409, description = "runtime_unavailable", body = ErrorEnvelope)))]
async fn create_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateRunBody>,
) -> Result<Audited<WorkspaceRunView>, ApiError> {
    let principal = caller.require("workspace_runs:create")?;
    let metadata = match body.metadata {
        None | Some(serde_json::Value::Null) => Default::default(),
        Some(serde_json::Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be a JSON object",
            ));
        }
    };
    let created = state
        .host
        .create_run(
            principal,
            CreateRun {
                template: body.template,
                command: body.command,
                archive_size: body.archive.size_bytes,
                archive_sha256: body.archive.sha256,
                artifacts: body
                    .artifacts
                    .into_iter()
                    .map(|a| CollectItem {
                        path: a.path,
                        name: a.name,
                    })
                    .collect(),
                timeout_ms: body.timeout_ms,
                env: body.env.into_iter().collect(),
                keep_sandbox: body.keep_sandbox,
                metadata,
            },
        )
        .await;
    let row = match created {
        Ok(row) => row,
        // A run names its template in its body: an unknown one is a bad
        // request here (a sandbox create answers 404 for it).
        Err(e @ crate::core::CoreError::UnknownTemplate { .. }) => {
            let mut error = ApiError::from(e);
            error.status = StatusCode::BAD_REQUEST;
            return Err(error);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Audited::created(row.id.clone(), render(row)))
}

/// Filters of `GET /v1/workspace-runs` (with `limit` and `cursor`).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Documents the query for the OpenAPI document; `list_runs` parses it.
pub struct RunListQuery {
    /// Only runs in this status. Also `metadata.<key>=<value>`,
    /// repeatable: every one must match the run's metadata.
    pub status: Option<RunStatus>,
}

/// The caller's runs, newest first, filtered by `status` and by
/// `metadata.<key>=<value>`. Scope `workspace_runs:read`.
#[utoipa::path(get, path = "/v1/workspace-runs", tag = "workspace-runs",
    params(PageQuery, RunListQuery),
    responses((status = 200, body = Page<WorkspaceRunView>), (status = 400, body = ErrorEnvelope)))]
async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<ApiJson<Page<WorkspaceRunView>>, ApiError> {
    let principal = caller.require("workspace_runs:read")?;
    let mut page = PageQuery {
        limit: None,
        cursor: None,
    };
    let mut filter = RunFilter::default();
    for (key, value) in query {
        match key.as_str() {
            "limit" => {
                page.limit = Some(value.parse().map_err(|_| {
                    ApiError::invalid("limit", format!("limit must be a number, got `{value}`"))
                })?);
            }
            "cursor" => page.cursor = Some(value),
            "status" => {
                filter.status = Some(
                    serde_json::from_value(serde_json::Value::String(value.clone())).map_err(
                        |_| {
                            ApiError::invalid(
                                "status",
                                format!(
                                    "unknown status `{value}`; one of awaiting_archive, queued, extracting, running, succeeded, failed, canceled"
                                ),
                            )
                        },
                    )?,
                );
            }
            other => match other.strip_prefix("metadata.") {
                Some(name) if !name.is_empty() && name.len() <= 256 && value.len() <= 1024 => {
                    filter.metadata.push((name.to_string(), value));
                }
                _ => {
                    return Err(ApiError::invalid(
                        "query",
                        format!(
                            "unknown query parameter `{other}`; use limit, cursor, status or metadata.<key>=<value>"
                        ),
                    ));
                }
            },
        }
    }
    let limit = page.limit()?;
    let rows = state
        .host
        .list_runs(principal, filter, page.cursor()?, limit + 1)
        .await?;
    Ok(ApiJson(Page::from_rows(rows, limit, cursor_of, render)))
}

/// One run. Scope `workspace_runs:read`.
#[utoipa::path(get, path = "/v1/workspace-runs/{id}", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    responses((status = 200, body = WorkspaceRunView), (status = 404, body = ErrorEnvelope)))]
async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<WorkspaceRunView>, ApiError> {
    let principal = caller.require("workspace_runs:read")?;
    Ok(ApiJson(render(state.host.get_run(principal, &id).await?)))
}

/// Uploads the run's archive as the raw body (a `.tar.gz`, at most 32 MiB;
/// larger: `POST …/archive/uploads`). The bytes are checked against the
/// declared size and SHA-256 before they are kept; on a mismatch the run
/// still awaits its archive. Scope `workspace_runs:create`.
#[utoipa::path(put, path = "/v1/workspace-runs/{id}/archive", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    request_body(content = String, content_type = "application/octet-stream", description = "the .tar.gz bytes"),
    responses((status = 200, body = WorkspaceRunView), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "workspace_run_not_awaiting_archive", body = ErrorEnvelope),
        (status = 413, description = "payload_too_large", body = ErrorEnvelope),
        (status = 422, description = "archive_size_mismatch, archive_digest_mismatch", body = ErrorEnvelope)))]
async fn upload_archive(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<ApiJson<WorkspaceRunView>, ApiError> {
    let principal = caller.require("workspace_runs:create")?;
    if declared_length(&headers).is_some_and(|len| len > DIRECT_MAX_BYTES) {
        return Err(direct_too_large());
    }
    let run = state.host.get_run(principal, &id).await?;
    if run.archive_size as u64 > DIRECT_MAX_BYTES {
        return Err(direct_too_large());
    }
    let row = state
        .host
        .upload_archive(principal, &id, body_stream(body))
        .await?;
    Ok(ApiJson(render(row)))
}

fn direct_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "direct archive uploads are limited to {DIRECT_MAX_BYTES} bytes; use POST /v1/workspace-runs/{{id}}/archive/uploads for a staged upload URL"
        ),
    )
    .with_details(serde_json::json!({ "maxBytes": DIRECT_MAX_BYTES }))
}

/// Stages the archive upload: a signed URL, valid 5 minutes for one `PUT`
/// of the declared bytes without an API key. Scope
/// `workspace_runs:create`.
#[utoipa::path(post, path = "/v1/workspace-runs/{id}/archive/uploads", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    responses((status = 201, body = TransferView), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "workspace_run_not_awaiting_archive", body = ErrorEnvelope)))]
async fn create_archive_upload(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Audited<TransferView>, ApiError> {
    let principal = caller.require("workspace_runs:create")?;
    let ticket = state.host.create_archive_upload(principal, &id).await?;
    Ok(Audited::created(
        id,
        transfer_view(&headers, &state, ticket, "PUT"),
    ))
}

/// Starts a run whose archive is uploaded: `queued` → `extracting` →
/// `running` → `succeeded` | `failed` | `canceled`. Scope
/// `workspace_runs:create`.
#[utoipa::path(post, path = "/v1/workspace-runs/{id}/start", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    responses((status = 202, body = WorkspaceRunView), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "archive_not_uploaded, workspace_run_already_started", body = ErrorEnvelope)))]
async fn start_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, ApiJson<WorkspaceRunView>), ApiError> {
    let principal = caller.require("workspace_runs:create")?;
    let row = state.host.start_run(principal, &id).await?;
    Ok((StatusCode::ACCEPTED, ApiJson(render(row))))
}

/// Cancels a run: stops its command, destroys its sandbox (unless kept)
/// and ends it `canceled`, with evidence. Scope `workspace_runs:cancel`.
#[utoipa::path(post, path = "/v1/workspace-runs/{id}/cancel", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    responses((status = 200, body = WorkspaceRunView), (status = 404, body = ErrorEnvelope),
        (status = 409, description = "workspace_run_finished", body = ErrorEnvelope)))]
async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<WorkspaceRunView>, ApiError> {
    let principal = caller.require("workspace_runs:cancel")?;
    Ok(ApiJson(render(
        state.host.cancel_run(principal, &id).await?,
    )))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this seq (default 0: from the first).
    pub after_seq: Option<i64>,
    /// JSON window size, 1 … 1000 (default 100).
    pub limit: Option<usize>,
}

/// One event of a run's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunEventView {
    pub seq: i64,
    /// RFC 3339.
    pub at: String,
    #[serde(flatten)]
    pub body: RunEventBody,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPageView {
    pub data: Vec<RunEventView>,
    /// Pass as `afterSeq` for the next window.
    pub next_after_seq: i64,
    /// Whether the log's last event (`terminal`) has been returned.
    pub terminal: bool,
}

fn event_view(event: RunEventRow) -> RunEventView {
    RunEventView {
        seq: event.seq,
        at: rfc3339(event.at),
        body: event.body,
    }
}

/// A run's events in `seq` order (1, 2, 3, … without gaps): a bounded
/// JSON window, or with `Accept: text/event-stream` a stream (`id` is the
/// seq) that resumes after `afterSeq` or `Last-Event-ID` and ends after
/// `terminal`. Events are durable: a finished run replays them all. Scope
/// `workspace_runs:read`.
#[utoipa::path(get, path = "/v1/workspace-runs/{id}/events", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id"), EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "SSE: resume after this seq")),
    responses((status = 200, body = EventPageView, description = "JSON window, or an SSE stream with Accept: text/event-stream"),
        (status = 400, body = ErrorEnvelope), (status = 404, body = ErrorEnvelope)))]
async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let principal = caller.require("workspace_runs:read")?;
    if query.after_seq.is_some_and(|n| n < 0) {
        return Err(ApiError::invalid("afterSeq", "afterSeq must be >= 0"));
    }
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let limit = query.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and 1000, got {limit}"),
            ));
        }
        let EventPage {
            events,
            next_after_seq,
            terminal,
        } = state
            .host
            .run_event_page(principal, &id, query.after_seq.unwrap_or(0), limit)
            .await?;
        return Ok(ApiJson(EventPageView {
            data: events.into_iter().map(event_view).collect(),
            next_after_seq,
            terminal,
        })
        .into_response());
    }
    let header_seq = super::last_event_id(&headers)?;
    let after = match (header_seq, query.after_seq) {
        (Some(h), Some(q)) => h.max(q),
        (h, q) => h.or(q).unwrap_or(0),
    };
    let place = state.host.log_stream_place(&principal.org_id)?;
    let events = state.host.follow_run_events(principal, &id, after).await?;
    Ok(sse(events, place).into_response())
}

fn sse(
    events: crate::core::workspace_runs::RunEvents,
    place: crate::core::StreamPlace,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(events);
    let events = futures::StreamExt::map(stream, move |item| {
        // The org's stream place is held while the client reads.
        let _held = &place;
        Ok::<_, Infallible>(match item {
            Ok(event) => {
                let base = Event::default()
                    .id(event.seq.to_string())
                    .event(event.body.kind());
                base.json_data(event_view(event)).unwrap_or_default()
            }
            Err(e) => ApiError::from(e).sse_event(),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(super::SSE_KEEPALIVE))
}

/// The run's signed Evidence Bundle, `{bundle, signature}`, once the run
/// is terminal (409 `evidence_not_ready` before). Verify it offline with
/// `crownest evidence verify`. Scope `workspace_runs:read`.
#[utoipa::path(get, path = "/v1/workspace-runs/{id}/evidence", tag = "workspace-runs",
    params(("id" = String, Path, description = "workspace run id")),
    responses((status = 200, description = "the Evidence Bundle", content_type = "application/json", body = Object),
        (status = 404, body = ErrorEnvelope),
        (status = 409, description = "evidence_not_ready", body = ErrorEnvelope)))]
async fn run_evidence(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let principal = caller.require("workspace_runs:read")?;
    let document = state.host.run_evidence(principal, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(document),
    )
        .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EvidenceKeyView {
    #[serde(rename = "keyId")]
    pub key_id: String,
    /// `ed25519`.
    pub algorithm: String,
    /// Base64 of the 32-byte public key.
    #[serde(rename = "publicKey")]
    pub public_key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EvidenceKeysView {
    pub data: Vec<EvidenceKeyView>,
}

/// The public keys Evidence Bundles are signed with. Any valid key.
#[utoipa::path(get, path = "/v1/evidence-keys", tag = "workspace-runs",
    responses((status = 200, body = EvidenceKeysView)))]
async fn evidence_keys(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<ApiJson<EvidenceKeysView>, ApiError> {
    let keys = state.host.evidence_keys().await?;
    Ok(ApiJson(EvidenceKeysView {
        data: keys
            .into_iter()
            .map(|k: evidence::PublicKey| EvidenceKeyView {
                key_id: k.key_id,
                algorithm: k.algorithm,
                public_key: k.public_key,
            })
            .collect(),
    }))
}
