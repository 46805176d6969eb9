//! Health and templates: the routes that describe the host itself.

use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, AppState, Caller};
use axum::extract::State;

use crate::runtime::NetworkMode;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(list_templates))
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: &'static str,
    pub version: &'static str,
    /// The default sandbox runtime, `oci`.
    pub runtime: &'static str,
    /// Its version (runc's), checked at start: a runc vulnerable to
    /// CVE-2024-21626 is refused (its templates are unavailable).
    pub runtime_version: Option<String>,
    /// Every runtime driver of this host and its version, when installed.
    pub runtimes: Vec<RuntimeView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeView {
    /// `oci` or `gvisor`.
    pub kind: &'static str,
    pub version: Option<String>,
}

/// Liveness of the server. Needs no API key.
#[utoipa::path(get, path = "/v1/health", tag = "system", security(()),
    responses((status = 200, body = Health)))]
async fn health(State(state): State<AppState>) -> ApiJson<Health> {
    ApiJson(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        runtime: "oci",
        runtime_version: state
            .host
            .runtimes()
            .driver("oci")
            .and_then(|d| d.version()),
        runtimes: state
            .host
            .runtimes()
            .drivers()
            .map(|d| RuntimeView {
                kind: d.name(),
                version: d.version(),
            })
            .collect(),
    })
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView {
    pub name: String,
    pub description: String,
    /// Hash of the rootfs recipe; changes when the operator edits it.
    pub recipe_hash: String,
    /// Whether the rootfs is built; the first create of an unbuilt template
    /// builds it and takes minutes.
    pub built: bool,
    /// The runtime that isolates its sandboxes: `oci` or `gvisor`.
    pub runtime: &'static str,
    /// For `gvisor`: `ptrace`, `kvm` or `systrap`.
    pub platform: Option<&'static str>,
    /// Whether this host can run it; creating from an unavailable template
    /// is `409 runtime_unavailable`.
    pub available: bool,
    /// Why it is unavailable and what to install; null when available.
    pub reason: Option<String>,
    pub resources: ResourcesView,
    /// `none`: loopback only.
    pub network: &'static str,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesView {
    pub vcpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub pids: i64,
    #[serde(rename = "diskMiB")]
    pub disk_mib: u64,
}

#[derive(Serialize, ToSchema)]
pub struct TemplateList {
    pub data: Vec<TemplateView>,
}

/// Templates sandboxes can be created from. Scope `templates:read`.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = TemplateList), (status = 401, body = super::error::ErrorEnvelope), (status = 403, body = super::error::ErrorEnvelope)))]
async fn list_templates(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<ApiJson<TemplateList>, ApiError> {
    caller.require("templates:read")?;
    let host = &state.host;
    let data = host
        .templates()
        .iter()
        .map(|t| TemplateView {
            name: t.name.clone(),
            description: t.description.clone(),
            recipe_hash: t.recipe_hash(),
            built: host.rootfs().is_built(t),
            runtime: t.runtime.kind(),
            platform: t.runtime.platform().map(|p| p.as_str()),
            available: host.runtimes().unavailable(t.runtime).is_none(),
            reason: host.runtimes().unavailable(t.runtime).map(str::to_string),
            resources: ResourcesView {
                vcpus: t.resources.vcpus,
                memory_mib: t.resources.memory_mib,
                pids: t.resources.pids,
                disk_mib: t.resources.disk_mib,
            },
            network: match t.network {
                NetworkMode::None => "none",
            },
        })
        .collect();
    Ok(ApiJson(TemplateList { data }))
}
