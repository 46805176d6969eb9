//! The output pipeline of Code Runs: each rich output goes through the
//! template's WASM components for its language (result adapter, output
//! formatter, promotion policy), then is inlined, promoted to an Artifact,
//! or rejected with a reason. Plugin failures never fail the run: they
//! fall back as the plugin host decides and are noted in the result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use crownest_proto::code::Language;

use super::code::{ArtifactPolicy, InlineContent, RunOutput};
use super::{CoreError, Host, lock};
use crate::auth::Principal;
use crate::ids;
use crate::plugins::{
    self, Adapter, Decision, Format, Formatter, Output, OutputKind, PipelineLimits, PluginHost,
    Policy, RawEvent, RejectReason,
};
use crate::store::{ArtifactRow, SandboxRow};
use crate::templates::Template;

/// The three loaded components of one template language.
pub struct LanguagePipeline {
    adapter: Adapter,
    formatter: Formatter,
    policy: Policy,
}

/// The plugin host, started on the first Code Run, and the pipelines it
/// loaded, by template and language.
#[derive(Default)]
pub struct Pipelines {
    host: tokio::sync::OnceCell<Result<Arc<PluginHost>, String>>,
    loaded: std::sync::Mutex<HashMap<(String, String), Arc<LanguagePipeline>>>,
    /// The WASI imports of component files, by path, while the file's size
    /// and modification time stay what they were.
    imports: Arc<std::sync::Mutex<HashMap<PathBuf, (FileStamp, WasiImports)>>>,
}

/// A file's size and modification time.
type FileStamp = (u64, Option<std::time::SystemTime>);
/// The WASI interfaces a component imports, or why it cannot be read.
type WasiImports = Result<Vec<String>, String>;

/// One plugin of a template language, as a template listing shows it.
#[derive(Debug, Clone)]
pub struct PluginSummary {
    /// As the template names it.
    pub name: String,
    /// The WASI interfaces it imports, or why the file cannot be read.
    pub wasi_imports: WasiImports,
}

/// The three plugins of one template language.
#[derive(Debug, Clone)]
pub struct LanguageSummary {
    pub language: String,
    pub adapter: PluginSummary,
    pub formatter: PluginSummary,
    pub policy: PluginSummary,
}

impl Pipelines {
    /// The plugin host, started (on the blocking pool) on first use.
    async fn plugin_host(&self, cache_dir: PathBuf) -> Result<Arc<PluginHost>, String> {
        self.host
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    PluginHost::new(&cache_dir)
                        .map(Arc::new)
                        .map_err(|e| format!("the plugin host could not start: {e}"))
                })
                .await
                .map_err(|e| format!("the plugin host could not start: {e}"))?
            })
            .await
            .clone()
    }
}

/// The directory plugin names resolve against.
pub fn plugins_dir() -> PathBuf {
    PluginHost::default_plugins_dir()
}

/// Loads the three components of one template language (compiling them
/// on first use; blocking).
fn load_pipeline(
    host: &PluginHost,
    template: &Template,
    language: Language,
) -> Result<LanguagePipeline, String> {
    let plugins = template.languages.get(language.as_str()).ok_or_else(|| {
        format!(
            "template `{}` has no {} pipeline",
            template.name,
            language.as_str()
        )
    })?;
    let dir = plugins_dir();
    let path = |name: &str| PluginHost::resolve(name, &dir);
    Ok(LanguagePipeline {
        adapter: host
            .load_adapter(&path(&plugins.adapter))
            .map_err(|e| format!("result adapter `{}`: {e}", plugins.adapter))?
            .with_config(&plugins.adapter_config),
        formatter: host
            .load_formatter(&path(&plugins.formatter))
            .map_err(|e| format!("output formatter `{}`: {e}", plugins.formatter))?
            .with_config(&plugins.formatter_config),
        policy: host
            .load_policy(&path(&plugins.policy))
            .map_err(|e| format!("promotion policy `{}`: {e}", plugins.policy))?
            .with_config(&plugins.policy_config),
    })
}

impl Host {
    /// Per language of `template`, its plugins and the WASI each imports
    /// (read from the component files, not compiled; cached per file).
    pub async fn template_plugins(&self, template: &Template) -> Vec<LanguageSummary> {
        let cache = self.pipelines.imports.clone();
        let languages = template.languages.clone();
        let summarize = move || {
            let dir = plugins_dir();
            let summary = |name: &str| {
                let path = PluginHost::resolve(name, &dir);
                let stamp = crate::contained::metadata(&path)
                    .map(|m| (m.len(), m.modified().map(|t| t.into_std()).ok()))
                    .ok();
                let cached = stamp.and_then(|stamp| {
                    lock(&cache)
                        .get(&path)
                        .filter(|(at, _)| *at == stamp)
                        .map(|(_, imports)| imports.clone())
                });
                let wasi_imports = cached.unwrap_or_else(|| {
                    let imports = plugins::wasi_imports_of(&path);
                    if let Some(stamp) = stamp {
                        lock(&cache).insert(path.clone(), (stamp, imports.clone()));
                    }
                    imports
                });
                PluginSummary {
                    name: name.to_owned(),
                    wasi_imports,
                }
            };
            languages
                .iter()
                .map(|(language, plugins)| LanguageSummary {
                    language: language.clone(),
                    adapter: summary(&plugins.adapter),
                    formatter: summary(&plugins.formatter),
                    policy: summary(&plugins.policy),
                })
                .collect()
        };
        tokio::task::spawn_blocking(summarize)
            .await
            .unwrap_or_default()
    }

    /// The pipeline of a template language, loaded once (on the blocking
    /// pool: a first load may compile). A component for the wrong world or
    /// with forbidden imports fails here with the plugin host's message.
    async fn language_pipeline(
        &self,
        template: &Template,
        language: Language,
    ) -> Result<Arc<LanguagePipeline>, String> {
        let key = (template.name.clone(), language.as_str().to_string());
        if let Some(loaded) = lock(&self.pipelines.loaded).get(&key).cloned() {
            return Ok(loaded);
        }
        let host = self
            .pipelines
            .plugin_host(self.config.cache_dir.clone())
            .await?;
        let template = template.clone();
        let pipeline =
            tokio::task::spawn_blocking(move || load_pipeline(&host, &template, language))
                .await
                .map_err(|e| format!("loading the pipeline failed: {e}"))??;
        let pipeline = Arc::new(pipeline);
        lock(&self.pipelines.loaded).insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Runs a run's rich outputs through the template's pipeline and acts
    /// on each decision.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn process_outputs(
        &self,
        principal: &Principal,
        sandbox: &SandboxRow,
        template: &Template,
        language: Language,
        events: Vec<RawEvent>,
        policy: ArtifactPolicy,
        notes: &mut Vec<String>,
    ) -> Vec<RunOutput> {
        if events.is_empty() {
            return Vec::new();
        }
        let choice = match policy {
            ArtifactPolicy::Inline => plugins::ArtifactPolicy::Inline,
            ArtifactPolicy::Promote => plugins::ArtifactPolicy::Promote,
        };
        // Loading and calling components is CPU-bound: both run on the
        // blocking pool.
        let loaded = match self.language_pipeline(template, language).await {
            Ok(pipeline) => pipeline,
            Err(message) => {
                notes.push(format!(
                    "the output pipeline is unavailable ({message}); rich outputs were dropped"
                ));
                return Vec::new();
            }
        };
        let result = tokio::task::spawn_blocking(move || {
            plugins::pipeline(
                &loaded.adapter,
                &loaded.formatter,
                &loaded.policy,
                &events,
                choice,
                &PipelineLimits::default(),
            )
        })
        .await;
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                notes.push(format!(
                    "the output pipeline failed: {e}; rich outputs were dropped"
                ));
                return Vec::new();
            }
        };
        notes.extend(result.notes);
        let mut views = Vec::with_capacity(result.outputs.len());
        for (index, item) in result.outputs.into_iter().enumerate() {
            let format = item.output.format;
            let view = match item.decision {
                Decision::Inline => inline_output(item.output),
                Decision::Reject(reason) => RunOutput::Rejected { format, reason },
                Decision::Promote => match self
                    .promote_output(principal, sandbox, index, item.output)
                    .await
                {
                    Ok(view) => view,
                    Err(e) => {
                        let reason = match e {
                            CoreError::QuotaExceeded { .. } => {
                                notes.push(format!(
                                    "output {index} was not promoted: the org's artifact quota is used up"
                                ));
                                RejectReason::QuotaExceeded
                            }
                            other => {
                                tracing::warn!(error = %other, "could not promote an output");
                                notes.push(format!("output {index} could not be promoted"));
                                RejectReason::PromotionFailed
                            }
                        };
                        RunOutput::Rejected { format, reason }
                    }
                },
            };
            views.push(view);
        }
        views
    }

    /// Stores one output as an Artifact of the run's sandbox.
    async fn promote_output(
        &self,
        principal: &Principal,
        sandbox: &SandboxRow,
        index: usize,
        output: Output,
    ) -> Result<RunOutput, CoreError> {
        let bytes = match (output.bytes, output.text) {
            (Some(bytes), _) => bytes,
            (None, Some(text)) => text.into_bytes(),
            (None, None) => Vec::new(),
        };
        let size = bytes.len() as u64;
        let reservation = self.reserve_artifact_bytes(&sandbox.org_id, size).await?;
        let content = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(bytes))]);
        let blob = match self.blobs.put(content, size).await {
            Ok(blob) => blob,
            Err(e) => {
                reservation.release().await;
                return Err(e.into());
            }
        };
        let extension = extension_of(output.format);
        let kind = match output.kind {
            OutputKind::ExecuteResult => "result",
            OutputKind::DisplayData => "display",
        };
        let row = ArtifactRow {
            id: ids::new(ids::Kind::Artifact),
            org_id: sandbox.org_id.clone(),
            project_id: sandbox.project_id.clone(),
            sandbox_id: sandbox.id.clone(),
            source_path: format!("code-run:{kind}:{index}"),
            name: format!("output-{index}.{extension}"),
            sha256: blob.sha256,
            size: size as i64,
            mime: output.mime.clone(),
            created_at: self.clock.now_ms(),
            created_by_key: principal.key_id.clone(),
        };
        let stored = row.clone();
        let inserted = self.store.call(move |s| s.insert_artifact(&stored)).await;
        reservation.release().await;
        inserted?;
        Ok(RunOutput::Artifact {
            format: output.format,
            artifact_id: row.id,
            mime: output.mime,
            size,
        })
    }
}

fn extension_of(format: Format) -> &'static str {
    match format {
        Format::Png => "png",
        Format::Jpeg => "jpg",
        Format::Svg => "svg",
        Format::Html => "html",
        Format::Json | Format::Chart | Format::Data => "json",
        Format::Markdown => "md",
        Format::Latex => "tex",
        Format::Text | Format::Unknown => "txt",
    }
}

/// An inlined output: JSON formats as JSON text (when it parses), text as
/// text, bytes as base64.
fn inline_output(output: Output) -> RunOutput {
    let format = output.format;
    let content = match (output.text, output.bytes) {
        (Some(text), _)
            if format.is_json() && serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() =>
        {
            InlineContent::Json(text)
        }
        (Some(text), _) => InlineContent::Text(text),
        (None, Some(bytes)) => {
            use base64::Engine;
            InlineContent::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        (None, None) => InlineContent::Json(String::from("null")),
    };
    RunOutput::Inline {
        format,
        content,
        mime: output.mime,
    }
}
