//! Health and templates: the routes that describe the host itself.

use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiJson, AppState, Caller};
use axum::extract::State;

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
    /// Hash of the rootfs recipe (every input, file contents and image
    /// digests included); changes when what the rootfs is built from does.
    pub recipe_hash: String,
    /// Changes with any edit of the template file; a sandbox keeps the
    /// version it was created with across a reload (SIGHUP).
    pub version: String,
    /// What the rootfs starts from: `debian`, `oci` or `dir`.
    pub source: &'static str,
    /// The build layers on top of the source, in order (`pip`, `npm`,
    /// `files`, `run`).
    pub layers: Vec<&'static str>,
    /// Default cwd of commands and code contexts.
    pub workdir: String,
    /// Names of the variables the template's `env` sets (values are not
    /// shown: they can be operator secrets).
    pub env_keys: Vec<String>,
    /// Whether the rootfs is built; the first create of an unbuilt template
    /// builds it and takes minutes.
    pub built: bool,
    /// The runtime that isolates its sandboxes: `oci`, `gvisor` or
    /// `microvm`.
    pub runtime: &'static str,
    /// For `gvisor`: `ptrace`, `kvm` or `systrap`.
    pub platform: Option<&'static str>,
    /// For `microvm`: `qemu` or `crosvm`.
    pub vmm: Option<&'static str>,
    /// For `microvm`: `auto`, `kvm` or `tcg` as the template asks (a
    /// server's `--microvm-accel` overrides it).
    pub accel: Option<&'static str>,
    /// Whether this host can run it; creating from an unavailable template
    /// is `409 runtime_unavailable`.
    pub available: bool,
    /// Why it is unavailable and what to install; null when available.
    pub reason: Option<String>,
    pub resources: ResourcesView,
    /// `none` (loopback only), `allow` or `open`: the mode of
    /// `networkPolicy`.
    pub network: &'static str,
    /// The egress ceiling a sandbox of this template may narrow.
    pub network_policy: NetworkPolicyView,
    /// Code Run languages, each with the WASM plugins of its output
    /// pipeline.
    pub languages: Vec<TemplateLanguageView>,
}

/// An egress policy (docs/network.md).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyView {
    /// `none`, `allow` or `open`.
    pub mode: &'static str,
    /// Rules that may be reached (`pypi.org`, `*.pythonhosted.org:443`,
    /// `203.0.113.0/24:*`); without a port, 80 and 443.
    pub allow: Vec<String>,
    /// Rules that may not, whatever `allow` says.
    pub deny: Vec<String>,
}

impl NetworkPolicyView {
    pub fn of(policy: &crate::egress::Policy) -> Self {
        Self {
            mode: policy.mode.as_str(),
            allow: policy.allow_texts(),
            deny: policy.deny_texts(),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateLanguageView {
    /// `python`, `javascript` or `typescript`.
    pub language: String,
    pub adapter: TemplatePluginView,
    pub formatter: TemplatePluginView,
    pub policy: TemplatePluginView,
}

/// One plugin: the name the template gives it and what WASI it imports.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplatePluginView {
    pub name: String,
    /// The WASI 0.2 interfaces the component imports (empty: none); null
    /// when the component cannot be read (see `error`).
    pub wasi_imports: Option<Vec<String>>,
    /// Why the component cannot be read; null when it can.
    pub error: Option<String>,
    /// `ok` (the component reads as one), `missing` (no such file: build
    /// the plugin) or `invalid` (see `error`).
    pub status: &'static str,
}

impl From<crate::core::PluginSummary> for TemplatePluginView {
    fn from(summary: crate::core::PluginSummary) -> Self {
        let (wasi_imports, error, status) = match summary.wasi_imports {
            Ok(imports) => (Some(imports), None, "ok"),
            Err(error) => {
                let status = if error.contains("os error 2") {
                    "missing"
                } else {
                    "invalid"
                };
                (None, Some(error), status)
            }
        };
        TemplatePluginView {
            name: summary.name,
            wasi_imports,
            error,
            status,
        }
    }
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
    let mut data = Vec::new();
    for t in host.templates().iter() {
        let languages = host
            .template_plugins(t)
            .await
            .into_iter()
            .map(|l| TemplateLanguageView {
                language: l.language,
                adapter: l.adapter.into(),
                formatter: l.formatter.into(),
                policy: l.policy.into(),
            })
            .collect();
        data.push(TemplateView {
            name: t.name.clone(),
            description: t.description.clone(),
            recipe_hash: t.recipe_hash(),
            version: t.version().to_string(),
            source: t.rootfs.source.kind(),
            layers: t.rootfs.layers.iter().map(|l| l.kind()).collect(),
            workdir: t.workdir.clone(),
            env_keys: t.env.iter().map(|(k, _)| k.clone()).collect(),
            built: host.rootfs().is_built(t),
            runtime: t.runtime.kind(),
            platform: t.runtime.platform().map(|p| p.as_str()),
            vmm: t.runtime.vmm().map(|v| v.as_str()),
            accel: t.runtime.accel().map(|a| a.as_str()),
            available: host.runtimes().unavailable(t.runtime).is_none(),
            reason: host.runtimes().unavailable(t.runtime).map(str::to_string),
            resources: ResourcesView {
                vcpus: t.resources.vcpus,
                memory_mib: t.resources.memory_mib,
                pids: t.resources.pids,
                disk_mib: t.resources.disk_mib,
            },
            network: t.network.mode.as_str(),
            network_policy: NetworkPolicyView::of(&t.network),
            languages,
        });
    }
    Ok(ApiJson(TemplateList { data }))
}
