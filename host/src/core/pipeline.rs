//! The output pipeline of Code Runs: each rich output goes through the
//! template's WASM components for its language (result adapter, output
//! formatter, promotion policy), then is inlined, promoted to an Artifact,
//! or rejected with a reason. Plugin failures never fail the run: they
//! fall back as the plugin host decides and are noted in the result.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use crownest_proto::code::Language;

use super::code::{ArtifactPolicy, RunOutputView};
use super::{CoreError, Host, lock};
use crate::auth::Principal;
use crate::ids;
use crate::plugins::{
    self, Adapter, Decision, Format, Formatter, Output, OutputKind, PipelineLimits, PluginHost,
    Policy, RawEvent, bundle_from_json,
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
    host: OnceLock<Result<Arc<PluginHost>, String>>,
    loaded: std::sync::Mutex<HashMap<(String, String), Arc<LanguagePipeline>>>,
}

impl Pipelines {
    fn plugin_host(&self, cache_dir: &std::path::Path) -> Result<Arc<PluginHost>, String> {
        self.host
            .get_or_init(|| {
                PluginHost::new(cache_dir)
                    .map(Arc::new)
                    .map_err(|e| format!("the plugin host could not start: {e}"))
            })
            .clone()
    }
}

/// The directory plugin names resolve against.
pub fn plugins_dir() -> PathBuf {
    PluginHost::default_plugins_dir()
}

impl Host {
    /// Loads (once) and returns the pipeline of a template language. A
    /// component for the wrong world or with forbidden imports fails here
    /// with the plugin host's message.
    /// The template's pipeline for `language`, if it is loaded already.
    fn loaded_pipeline(
        &self,
        template: &Template,
        language: Language,
    ) -> Option<Arc<LanguagePipeline>> {
        let key = (template.name.clone(), language.as_str().to_string());
        lock(&self.pipelines.loaded).get(&key).cloned()
    }

    fn language_pipeline(
        &self,
        template: &Template,
        language: Language,
    ) -> Result<Arc<LanguagePipeline>, String> {
        if let Some(loaded) = self.loaded_pipeline(template, language) {
            return Ok(loaded);
        }
        let key = (template.name.clone(), language.as_str().to_string());
        let plugins = template.languages.get(language.as_str()).ok_or_else(|| {
            format!(
                "template `{}` has no {} pipeline",
                template.name,
                language.as_str()
            )
        })?;
        let host = self.pipelines.plugin_host(&self.config.cache_dir)?;
        let dir = plugins_dir();
        let path = |name: &str| PluginHost::resolve(name, &dir);
        let pipeline = LanguagePipeline {
            adapter: host
                .load_adapter(&path(&plugins.adapter))
                .map_err(|e| format!("result adapter `{}`: {e}", plugins.adapter))?,
            formatter: host
                .load_formatter(&path(&plugins.formatter))
                .map_err(|e| format!("output formatter `{}`: {e}", plugins.formatter))?,
            policy: host
                .load_policy(&path(&plugins.policy))
                .map_err(|e| format!("promotion policy `{}`: {e}", plugins.policy))?,
        };
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
        bundles: &[(bool, serde_json::Map<String, serde_json::Value>)],
        policy: ArtifactPolicy,
        notes: &mut Vec<String>,
    ) -> Vec<RunOutputView> {
        if bundles.is_empty() {
            return Vec::new();
        }
        let events: Vec<RawEvent> = bundles
            .iter()
            .map(|(result, data)| {
                let bundle = bundle_from_json(data);
                if *result {
                    RawEvent::ExecuteResult {
                        bundle,
                        execution_count: None,
                    }
                } else {
                    RawEvent::DisplayData {
                        bundle,
                        execution_count: None,
                    }
                }
            })
            .collect();
        let choice = match policy {
            ArtifactPolicy::Inline => plugins::ArtifactPolicy::Inline,
            ArtifactPolicy::Promote => plugins::ArtifactPolicy::Promote,
        };
        // Loading reads the cached precompiled components (compiling them
        // once), so only a first load leaves the async worker; calling them
        // is CPU-bound and runs on the blocking pool.
        let loaded = match self.loaded_pipeline(template, language).map_or_else(
            || tokio::task::block_in_place(|| self.language_pipeline(template, language)),
            Ok,
        ) {
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
            let format = item.output.format.as_str().to_string();
            let view = match item.decision {
                Decision::Inline => inline_view(item.output),
                Decision::Reject(reason) => RunOutputView::Rejected {
                    format,
                    reason: reason.as_str().to_string(),
                },
                Decision::Promote => match self
                    .promote_output(principal, sandbox, index, item.output)
                    .await
                {
                    Ok(view) => view,
                    Err(e) => {
                        notes.push(format!("output {index} could not be promoted: {e}"));
                        RunOutputView::Rejected {
                            format,
                            reason: match e {
                                CoreError::QuotaExceeded { .. } => String::from("quota_exceeded"),
                                _ => String::from("promotion_failed"),
                            },
                        }
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
    ) -> Result<RunOutputView, CoreError> {
        let bytes = match (output.bytes, output.text) {
            (Some(bytes), _) => bytes,
            (None, Some(text)) => text.into_bytes(),
            (None, None) => Vec::new(),
        };
        let quota = self.quota(&sandbox.org_id).await?;
        let limit = match quota.max_artifact_bytes {
            Some(max) => {
                let org = sandbox.org_id.clone();
                let used = self.store.call(move |s| s.artifact_bytes(&org)).await?;
                if used + bytes.len() as i64 > max {
                    return Err(CoreError::QuotaExceeded {
                        limit: "maxArtifactBytes",
                        max,
                        current: used + bytes.len() as i64,
                    });
                }
                (max - used).max(0) as u64
            }
            None => super::artifacts::MAX_ARTIFACT_BYTES,
        };
        let size = bytes.len() as u64;
        let content = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(bytes))]);
        let blob = self.blobs.put(content, limit).await?;
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
        self.store.call(move |s| s.insert_artifact(&stored)).await?;
        Ok(RunOutputView::Artifact {
            format: output.format.as_str().to_string(),
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

/// An inlined output: JSON formats as their JSON value, text as text, bytes
/// as base64.
fn inline_view(output: Output) -> RunOutputView {
    let format = output.format;
    let content = match (output.text, output.bytes) {
        (Some(text), _) if format.is_json() => {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        }
        (Some(text), _) => serde_json::Value::String(text),
        (None, Some(bytes)) => {
            use base64::Engine;
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        (None, None) => serde_json::Value::Null,
    };
    RunOutputView::Inline {
        format: format.as_str().to_string(),
        content,
        mime: Some(output.mime),
    }
}
