//! `/v1/sandboxes`: create, list (filtered), get, kill, timeout, network.

use axum::extract::{RawQuery, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorEnvelope;
use super::ledger::mutation;
use super::pagination::{Page, PageQuery};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Audited, Caller};
use crate::clock::rfc3339;
use crate::core::{CreateSandbox, MAX_METADATA_FILTERS};
use crate::model::{AuditAction, EndReason, SandboxStatus};
use crate::store::{Cursor, SandboxFilter, SandboxRow};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sandboxes))
        .routes(mutation(
            AuditAction::SandboxCreate,
            Some("sandboxes:create"),
            routes!(create_sandbox),
        ))
        .routes(routes!(get_sandbox))
        .routes(routes!(sandbox_metrics))
        .routes(mutation(
            AuditAction::SandboxKill,
            Some("sandboxes:kill"),
            routes!(kill_sandbox),
        ))
        .routes(mutation(
            AuditAction::SandboxTimeout,
            Some("sandboxes:create"),
            routes!(set_timeout),
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

/// The filters of `GET /v1/sandboxes`, besides the page (documentation:
/// the query is parsed by [`SandboxListQuery::parse`], for the
/// `metadata[KEY]` keys).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SandboxListQuery {
    /// Only sandboxes in this status: `starting`, `running` or `destroyed`.
    #[param(value_type = Option<SandboxStatus>)]
    status: Option<String>,
    /// Only sandboxes of this template.
    template: Option<String>,
    /// `metadata[KEY]=VALUE`, repeatable (at most 16): only sandboxes whose
    /// metadata has KEY with this value (a string, or the JSON text of a
    /// number, boolean or null).
    #[param(style = DeepObject, explode, value_type = Option<std::collections::BTreeMap<String, String>>)]
    metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Only sandboxes created after this RFC 3339 time (exclusive).
    created_after: Option<String>,
    /// Only sandboxes created before this RFC 3339 time (exclusive).
    created_before: Option<String>,
    /// Page size, 1..=200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<usize>,
    /// `nextCursor` of the previous page (with the same filters).
    cursor: Option<String>,
}

impl SandboxListQuery {
    /// The filter and the page of a raw query string.
    fn parse(raw: Option<&str>) -> Result<(SandboxFilter, PageQuery), ApiError> {
        let mut filter = SandboxFilter::default();
        let mut page = PageQuery {
            limit: None,
            cursor: None,
        };
        let mut seen = std::collections::BTreeSet::new();
        for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if let Some(name) = key
                .strip_prefix("metadata[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                if name.is_empty() {
                    return Err(ApiError::invalid(
                        "metadata",
                        "a metadata filter is `metadata[KEY]=VALUE` with a non-empty KEY",
                    ));
                }
                if filter.metadata.len() == MAX_METADATA_FILTERS {
                    return Err(ApiError::invalid(
                        "metadata",
                        format!("at most {MAX_METADATA_FILTERS} metadata filters"),
                    ));
                }
                filter.metadata.push((name.to_string(), value.into_owned()));
                continue;
            }
            if !seen.insert(key.to_string()) {
                return Err(ApiError::invalid_query(
                    &key,
                    format!("`{}` is given more than once", key.escape_debug()),
                ));
            }
            match key.as_ref() {
                "status" => {
                    filter.status = Some(match value.as_ref() {
                        "starting" => SandboxStatus::Starting,
                        "running" => SandboxStatus::Running,
                        "destroyed" => SandboxStatus::Destroyed,
                        other => {
                            return Err(ApiError::invalid(
                                "status",
                                format!(
                                    "`{}` is not a sandbox status; use starting, running or destroyed",
                                    other.escape_debug()
                                ),
                            ));
                        }
                    });
                }
                "template" => filter.template = Some(value.into_owned()),
                "createdAfter" => {
                    filter.created_after = super::audit::time_param("createdAfter", Some(&value))?;
                }
                "createdBefore" => {
                    filter.created_before =
                        super::audit::time_param("createdBefore", Some(&value))?;
                }
                "limit" => {
                    page.limit = Some(value.parse().map_err(|_| {
                        ApiError::invalid(
                            "limit",
                            format!(
                                "limit must be a whole number, got `{}`",
                                value.escape_debug()
                            ),
                        )
                    })?);
                }
                "cursor" => page.cursor = Some(value.into_owned()),
                other => {
                    return Err(ApiError::invalid_query(
                        other,
                        format!(
                            "unknown query parameter `{}`; allowed: status, template, metadata[KEY], \
                             createdAfter, createdBefore, limit, cursor",
                            other.escape_debug()
                        ),
                    ));
                }
            }
        }
        Ok((filter, page))
    }
}

/// Lists the caller's sandboxes, newest first, destroyed ones included,
/// optionally filtered (`?status=running&metadata[job]=demo`). Scope
/// `sandboxes:read`.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", params(SandboxListQuery),
    responses((status = 200, body = Page<SandboxView>),
        (status = 400, description = "invalid_request", body = ErrorEnvelope)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<Page<SandboxView>>, ApiError> {
    let principal = caller.require("sandboxes:read")?;
    let (filter, query) = SandboxListQuery::parse(raw.as_deref())?;
    let limit = query.limit()?;
    let rows = state
        .host
        .list_sandboxes(principal, filter, query.cursor()?, limit + 1)
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutBody {
    /// The sandbox's new lifetime from now, in milliseconds (longer or
    /// shorter than what is left), within the server's TTL bounds.
    pub ttl_ms: i64,
}

/// Sets a live sandbox to expire `ttlMs` from now: extends or shortens
/// its life (E2B's `set_timeout`, in milliseconds). Scope
/// `sandboxes:create`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id")),
    request_body = TimeoutBody,
    responses((status = 200, body = SandboxView),
        (status = 400, description = "invalid_request: ttlMs outside the server's bounds", body = ErrorEnvelope),
        (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn set_timeout(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<TimeoutBody>,
) -> Result<ApiJson<SandboxView>, ApiError> {
    let principal = caller.require("sandboxes:create")?;
    let row = state
        .host
        .set_sandbox_timeout(principal, &id, body.ttl_ms)
        .await?;
    Ok(ApiJson(render_live(&state, row)))
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// `true`: an SSE stream of `metrics` events, one a second, ending
    /// with `end` when the sandbox does.
    #[serde(default)]
    pub stream: bool,
}

/// A sandbox's resource use now.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetricsView {
    pub sandbox_id: String,
    /// When it was measured (RFC 3339).
    pub timestamp: String,
    /// CPU time used since the sandbox started, in seconds.
    pub cpu_usage_seconds: f64,
    /// CPU use over the last interval (since the previous reading, or a
    /// fresh 250 ms one); 100 is one CPU busy, at most `vcpus` × 100.
    pub cpu_percent: f64,
    pub vcpus: i64,
    pub memory_used_bytes: u64,
    pub memory_limit_bytes: u64,
    /// Tasks (processes and threads) now, and the most it may have.
    pub pids: u64,
    pub pids_limit: u64,
    /// /workspace's filesystem.
    pub workspace_used_bytes: u64,
    pub workspace_limit_bytes: u64,
    /// Bytes through the egress proxy since the sandbox started.
    pub network_bytes_in: u64,
    pub network_bytes_out: u64,
}

fn render_metrics(m: crate::core::metrics::SandboxMetrics) -> SandboxMetricsView {
    SandboxMetricsView {
        sandbox_id: m.sandbox_id,
        timestamp: rfc3339(m.at),
        cpu_usage_seconds: m.cpu_usec as f64 / 1e6,
        cpu_percent: m.cpu_percent,
        vcpus: m.vcpus,
        memory_used_bytes: m.memory_bytes,
        memory_limit_bytes: m.memory_limit_bytes,
        pids: m.tasks,
        pids_limit: m.tasks_limit,
        workspace_used_bytes: m.workspace_used_bytes,
        workspace_limit_bytes: m.workspace_limit_bytes,
        network_bytes_in: m.network_bytes_in,
        network_bytes_out: m.network_bytes_out,
    }
}

/// The data of a stream's last event, `end`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEnd {
    /// The sandbox's status: `destroyed`.
    pub status: SandboxStatus,
}

/// Live resource use of a sandbox: CPU (seconds, and percent over the last
/// interval), memory, tasks (from its cgroup, or a microVM guest's own
/// accounting), /workspace, egress bytes. `?stream=true`: an SSE stream of
/// `metrics` events every second, then `end` when the sandbox ends. Scope
/// `sandboxes:read`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/metrics", tag = "sandboxes",
    params(("id" = String, Path, description = "sandbox id"), MetricsQuery),
    responses((status = 200, body = SandboxMetricsView,
            description = "the metrics; with `stream=true` a text/event-stream of `metrics` events"),
        (status = 404, body = ErrorEnvelope),
        (status = 410, description = "sandbox_destroyed", body = ErrorEnvelope)))]
async fn sandbox_metrics(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let principal = caller.require("sandboxes:read")?.clone();
    let first = state.host.sandbox_metrics(&principal, &id).await?;
    if !query.stream {
        return Ok(ApiJson(render_metrics(first)).into_response());
    }
    let place = state.host.log_stream_place(&principal.org_id)?;
    let host = state.host.clone();
    let events = super::task_stream(move |tx| async move {
        let _held = place;
        let event = |m| {
            Event::default()
                .event("metrics")
                .json_data(render_metrics(m))
                .unwrap_or_default()
        };
        if tx.send(event(first)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {}
            }
            let next = match host.sandbox_metrics(&principal, &id).await {
                Ok(metrics) => event(metrics),
                Err(
                    crate::core::CoreError::SandboxDestroyed(_)
                    | crate::core::CoreError::SandboxNotReady(_),
                ) => {
                    let end = Event::default()
                        .event("end")
                        .json_data(StreamEnd {
                            status: SandboxStatus::Destroyed,
                        })
                        .unwrap_or_default();
                    let _ = tx.send(end).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(ApiError::from(e).sse_event()).await;
                    return;
                }
            };
            if tx.send(next).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(super::SSE_KEEPALIVE))
        .into_response())
}
