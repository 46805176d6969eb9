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
        .routes(mutation(
            AuditAction::SandboxNetwork,
            Some("sandboxes:network"),
            routes!(set_network),
        ))
}

/// A sandbox's egress policy as a client asks for it (on create, or in a
/// PATCH): each part omitted keeps the template's; it may only narrow the
/// template's (`400 network_policy_too_wide` otherwise).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkBody {
    /// `none`, `allow` or `open` (only if the template is `open`).
    pub mode: Option<String>,
    /// Rules that may be reached, each within the template's allow list:
    /// `pypi.org`, `*.pythonhosted.org`, `github.com:443`,
    /// `203.0.113.0/24:*` (no port: 80 and 443).
    pub allow: Option<Vec<String>>,
    /// Rules added to the template's deny list (deny wins).
    #[serde(default)]
    pub deny: Vec<String>,
}

impl NetworkBody {
    fn into_request(self) -> crate::core::NetworkRequest {
        crate::core::NetworkRequest {
            mode: self.mode,
            allow: self.allow,
            deny: self.deny,
        }
    }
}

/// A sandbox's egress policy and meters.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetworkView {
    /// `none`, `allow` or `open`.
    pub mode: &'static str,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// Bytes received through the egress proxy.
    pub bytes_in: u64,
    /// Bytes sent through it.
    pub bytes_out: u64,
}

impl SandboxNetworkView {
    fn of(policy: &crate::egress::Policy, bytes_in: u64, bytes_out: u64) -> Self {
        Self {
            mode: policy.mode.as_str(),
            allow: policy.allow_texts(),
            deny: policy.deny_texts(),
            bytes_in,
            bytes_out,
        }
    }
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
    /// A narrower egress policy than the template's.
    pub network: Option<NetworkBody>,
    /// Environment variables of every command and code context of the
    /// sandbox, over the template's `env` (a command's own `env` wins).
    /// Values may be secrets: they are stored encrypted and never returned,
    /// audited or logged.
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub env: Option<SecretEnv>,
}

/// Environment variables whose values are kept out of `Debug` output.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct SecretEnv(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
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
    /// namespaces and seccomp), `gvisor` (runsc, gVisor's kernel) or
    /// `microvm` (a virtual machine with its own guest kernel).
    pub runtime: String,
    /// The VMM of a `microvm` sandbox: `qemu` or `crosvm`; null otherwise.
    pub vmm: Option<String>,
    /// Its egress policy and meters (docs/network.md).
    pub network: SandboxNetworkView,
}

pub fn render(row: SandboxRow) -> SandboxView {
    SandboxView {
        network: SandboxNetworkView::of(
            &row.network,
            u64::try_from(row.egress_bytes_in).unwrap_or(0),
            u64::try_from(row.egress_bytes_out).unwrap_or(0),
        ),
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
        vmm: row.vmm,
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
                network: body.network.map(NetworkBody::into_request),
                env: body
                    .env
                    .map(|e| e.0.into_iter().collect())
                    .unwrap_or_default(),
            },
        )
        .await?;
    Ok(Audited::created(row.id.clone(), render_live(&state, row)))
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
    let row = state.host.get_sandbox(principal, &id).await?;
    Ok(ApiJson(render_live(&state, row)))
}

/// [`render`] with a live sandbox's current policy and running meters.
fn render_live(state: &AppState, row: SandboxRow) -> SandboxView {
    let policy = state.host.egress_policy(&row);
    let (bytes_in, bytes_out) = state.host.egress_bytes(&row);
    let mut view = render(row);
    view.network = SandboxNetworkView::of(&policy, bytes_in, bytes_out);
    view
}

/// Replaces a live sandbox's egress policy with one within its
/// template's; new connections follow it at once (open ones keep going).
/// Scope `sandboxes:network`.
#[utoipa::path(patch, path = "/v1/sandboxes/{id}/network", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = NetworkBody,
    responses((status = 200, body = SandboxView),
        (status = 400, description = "network_policy_too_wide, invalid_request", body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn set_network(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<NetworkBody>,
) -> Result<ApiJson<SandboxView>, ApiError> {
    let principal = caller.require("sandboxes:network")?;
    let row = state
        .host
        .set_sandbox_network(principal, &id, body.into_request())
        .await?;
    Ok(ApiJson(render_live(&state, row)))
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
