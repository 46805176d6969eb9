//! `/v1/sandboxes`: create, list, get, kill.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller};
use crate::clock::rfc3339;
use crate::core::CreateSandbox;
use crate::model::{AuditAction, EndReason, SandboxStatus};
use crate::store::{Cursor, SandboxRow};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sandboxes))
        .routes(mutation(
            AuditAction::SandboxCreate,
            Some("sandboxes:create"),
            routes!(create_sandbox),
        ))
        .routes(routes!(get_sandbox))
        .routes(mutation(
            AuditAction::SandboxKill,
            Some("sandboxes:kill"),
            routes!(kill_sandbox),
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSandboxBody {
    /// Template name, e.g. `python`; see `GET /v1/templates`.
    pub template: String,
    /// Lifetime in milliseconds (default 600000); the sandbox is destroyed
    /// when it runs out.
    pub ttl_ms: Option<i64>,
    /// Free-form JSON object kept with the sandbox.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxView {
    /// `sbx_…`
    pub id: String,
    pub status: SandboxStatus,
    pub template: String,
    pub created_at: String,
    pub expires_at: String,
    /// When it was destroyed; null while alive.
    pub ended_at: Option<String>,
    /// Why it ended; null while alive.
    pub end_reason: Option<EndReason>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub vcpus: i64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: i64,
    /// The runtime that isolates it: `oci` (runc, the host kernel behind
    /// namespaces and seccomp) or `gvisor` (runsc, gVisor's kernel).
    pub runtime: String,
}

pub fn render(row: SandboxRow) -> SandboxView {
    SandboxView {
        metadata: serde_json::Value::Object(row.metadata),
        id: row.id,
        status: row.status,
        template: row.template,
        created_at: rfc3339(row.created_at),
        expires_at: rfc3339(row.expires_at),
        ended_at: row.ended_at.map(rfc3339),
        end_reason: row.end_reason,
        vcpus: row.vcpus,
        memory_mib: row.memory_mib,
        runtime: row.runtime,
    }
}

/// Creates a sandbox from a template and starts it. Scope `sandboxes:create`.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandboxBody,
    responses(
        (status = 201, body = SandboxView),
        (status = 400, description = "invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 404, description = "template_not_found", body = ErrorEnvelope),
        (status = 409, description = "runtime_unavailable: the template's runtime cannot run on this host (details say what to install)", body = ErrorEnvelope),
        (status = 503, description = "sandbox_start_failed, template_unavailable, capacity_exhausted", body = ErrorEnvelope)))]
async fn create_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateSandboxBody>,
) -> Result<Audited<SandboxView>, ApiError> {
    let principal = caller.require("sandboxes:create")?;
    let metadata = match body.metadata {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be a JSON object",
            ));
        }
    };
    let row = state
        .host
        .create_sandbox(
            principal,
            CreateSandbox {
                template: body.template,
                ttl_ms: body.ttl_ms,
                metadata,
            },
        )
        .await?;
    Ok(Audited::created(row.id.clone(), render(row)))
}

/// Lists the caller's sandboxes, newest first, destroyed ones included.
/// Scope `sandboxes:read`.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", params(PageQuery),
    responses((status = 200, body = Page<SandboxView>)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<ApiJson<Page<SandboxView>>, ApiError> {
    let principal = caller.require("sandboxes:read")?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_sandboxes(principal, query.cursor()?, limit + 1)
        .await?;
    Ok(ApiJson(Page::from_rows(
        rows,
        limit,
        |r| Cursor {
            created_at: r.created_at,
            id: r.id.clone(),
        },
        render,
    )))
}

/// A sandbox, alive or its tombstone. Scope `sandboxes:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorEnvelope)))]
async fn get_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<SandboxView>, ApiError> {
    let principal = caller.require("sandboxes:read")?;
    Ok(ApiJson(render(
        state.host.get_sandbox(principal, &id).await?,
    )))
}

/// Kills a sandbox; it stays readable as a `destroyed` tombstone.
/// Scope `sandboxes:kill`.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    responses((status = 200, body = SandboxView), (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn kill_sandbox(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<SandboxView>, ApiError> {
    let principal = caller.require("sandboxes:kill")?;
    Ok(ApiJson(render(
        state.host.kill_sandbox(principal, &id).await?,
    )))
}
