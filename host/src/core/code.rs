//! Code Contexts and Code Runs (seed 000): language-specific interpreter
//! state inside a sandbox (`cctx_…`), and non-persisted runs of snippets in
//! it, whose rich outputs go through the template's WASM output pipeline.
//!
//! Contexts live in memory: they belong to a live sandbox and die with it.
//! Interpreter events come from code the sandbox controls and are parsed
//! here as untrusted JSON.

use std::collections::HashMap;
use std::time::Instant;

use crownest_proto::ExecUser;
use crownest_proto::code::{ContextCreate, ContextReply, Language, RunEnd, RunRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{CoreError, Host, lock};
use crate::agent::RunOutput;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::ids;
use crate::store::SandboxRow;

/// Largest accepted source of one run.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_RUN_TIMEOUT_MS: u64 = 60_000;
pub const MAX_RUN_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Contexts one sandbox may hold.
pub const MAX_CONTEXTS_PER_SANDBOX: usize = 16;
/// Stdout/stderr kept per run (the tail).
pub const MAX_RUN_STREAM_BYTES: usize = 1024 * 1024;

/// A live code context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeContext {
    /// `cctx_…`
    pub id: String,
    pub sandbox_id: String,
    pub language: Language,
    pub cwd: String,
    /// The interpreter, e.g. `ipython 8.5.0`.
    pub implementation: String,
    /// Whether it is the sandbox's default context for its language.
    pub is_default: bool,
    pub created_at: Millis,
}

pub fn parse_language(text: &str) -> Option<Language> {
    match text {
        "python" => Some(Language::Python),
        "javascript" => Some(Language::JavaScript),
        "typescript" => Some(Language::TypeScript),
        _ => None,
    }
}

/// Whether eligible rich outputs become artifacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactPolicy {
    #[default]
    Inline,
    Promote,
}

/// A validated run request.
#[derive(Debug, Clone)]
pub struct RunCode {
    pub language: Language,
    pub code: String,
    pub context_id: Option<String>,
    pub artifact_policy: ArtifactPolicy,
    pub timeout_ms: Option<u64>,
}

/// An interpreter error (a result, not an API error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunError {
    pub name: String,
    pub message: String,
    pub traceback: Option<String>,
}

/// Where a run goes: the sandbox (as read when the run was checked) and
/// the context.
#[derive(Debug, Clone)]
pub struct RunTarget {
    pub sandbox: SandboxRow,
    pub context: CodeContext,
}

/// One rich output of a run, after the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RunOutputView {
    Inline {
        format: String,
        /// Text, or for `json`, `data` and `chart` the JSON value.
        content: serde_json::Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        mime: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Artifact {
        format: String,
        artifact_id: String,
        mime: String,
        size: u64,
    },
    Rejected {
        format: String,
        reason: String,
    },
}

/// The result of a run: the same shape blocking and streamed (`complete`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCodeResult {
    pub context_id: String,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub outputs: Vec<RunOutputView>,
    pub execution_count: Option<u64>,
    pub error: Option<RunError>,
    pub duration_ms: u64,
    /// The interpreter died during this run (its state is gone; the next
    /// run starts a fresh one).
    pub interpreter_restarted: bool,
    /// This run started on a fresh interpreter because the previous one
    /// died: variables from earlier runs are gone.
    pub state_lost: bool,
    /// Plugin failures and fallbacks, one sentence each.
    pub notes: Vec<String>,
}

/// What a streaming caller receives as the run goes.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStreamEvent {
    Stdout(String),
    Stderr(String),
    Output(RunOutputView),
    Error(RunError),
}

/// An interpreter event as the runners write it (Jupyter-shaped).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RawEvent {
    Stream {
        name: String,
        text: String,
    },
    DisplayData {
        data: serde_json::Map<String, serde_json::Value>,
    },
    ExecuteResult {
        execution_count: Option<u64>,
        data: serde_json::Map<String, serde_json::Value>,
    },
    Error {
        ename: String,
        evalue: String,
        #[serde(default)]
        traceback: Vec<String>,
    },
    Done {
        execution_count: Option<u64>,
    },
    #[serde(other)]
    Other,
}

/// Everything a run produced before the pipeline.
#[derive(Debug, Default)]
pub struct RawRun {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// `(execute_result?, MIME bundle)` in order.
    pub bundles: Vec<(bool, serde_json::Map<String, serde_json::Value>)>,
    pub error: Option<RunError>,
    pub execution_count: Option<u64>,
    pub end: Option<RunEnd>,
    pub stream_bytes: usize,
    pub notes: Vec<String>,
}

impl RawRun {
    fn push_stream(&mut self, stdout: bool, text: String) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        self.stream_bytes += text.len();
        if self.stream_bytes > MAX_RUN_STREAM_BYTES {
            if !self.notes.iter().any(|n| n.starts_with("output beyond")) {
                self.notes.push(format!(
                    "output beyond {MAX_RUN_STREAM_BYTES} bytes of stdout and stderr was dropped"
                ));
            }
            return None;
        }
        if stdout {
            self.stdout.push(text.clone());
        } else {
            self.stderr.push(text.clone());
        }
        Some(text)
    }
}

impl Host {
    fn context_of(&self, sandbox_id: &str, context_id: &str) -> Option<CodeContext> {
        lock(&self.code_contexts)
            .get(context_id)
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
    }

    fn default_context(&self, sandbox_id: &str, language: Language) -> Option<CodeContext> {
        lock(&self.code_contexts)
            .values()
            .find(|c| c.sandbox_id == sandbox_id && c.is_default && c.language == language)
            .cloned()
    }

    /// Forgets the contexts of a sandbox that is gone.
    pub(crate) fn drop_contexts_of(&self, sandbox_id: &str) {
        lock(&self.code_contexts).retain(|_, c| c.sandbox_id != sandbox_id);
    }

    fn check_language(&self, template: &str, language: Language) -> Result<(), CoreError> {
        let template = self.template(template)?;
        if template.languages.contains_key(language.as_str()) {
            Ok(())
        } else {
            Err(CoreError::UnsupportedLanguage {
                language: language.as_str().to_string(),
                supported: template
                    .languages
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }

    pub async fn create_context(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        language: Language,
        cwd: Option<String>,
        env: Vec<(String, String)>,
    ) -> Result<CodeContext, CoreError> {
        self.create_context_inner(principal, sandbox_id, language, cwd, env, false)
            .await
    }

    async fn create_context_inner(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        language: Language,
        cwd: Option<String>,
        env: Vec<(String, String)>,
        is_default: bool,
    ) -> Result<CodeContext, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        self.check_language(&sandbox.template, language)?;
        for (key, value) in &env {
            if !super::commands::valid_env_name(key) || value.contains('\0') {
                return Err(CoreError::invalid(
                    "env",
                    format!(
                        "`{key}` is not a valid environment variable name or its value has a NUL"
                    ),
                ));
            }
        }
        let cwd = super::commands::resolve_cwd(cwd.as_deref())?;
        let count = lock(&self.code_contexts)
            .values()
            .filter(|c| c.sandbox_id == sandbox.id)
            .count();
        if count >= MAX_CONTEXTS_PER_SANDBOX {
            return Err(CoreError::invalid(
                "language",
                format!(
                    "a sandbox may hold at most {MAX_CONTEXTS_PER_SANDBOX} code contexts; delete one first"
                ),
            ));
        }
        let template = self.template(&sandbox.template)?;
        let id = ids::new(ids::Kind::CodeContext);
        let reply = live
            .agent
            .context_create(ContextCreate {
                context_id: id.clone(),
                language,
                cwd: cwd.clone(),
                env,
                user: Some(ExecUser {
                    uid: template.user.uid,
                    gid: template.user.gid,
                }),
            })
            .await?;
        let implementation = match reply {
            ContextReply::Ready { implementation, .. } => implementation,
            ContextReply::Failed { message } => {
                return Err(CoreError::ContextFailed(message));
            }
            ContextReply::Deleted => {
                return Err(CoreError::ContextFailed(String::from(
                    "unexpected reply from the agent",
                )));
            }
        };
        let context = CodeContext {
            id,
            sandbox_id: sandbox.id,
            language,
            cwd,
            implementation,
            is_default,
            created_at: self.clock.now_ms(),
        };
        lock(&self.code_contexts).insert(context.id.clone(), context.clone());
        Ok(context)
    }

    pub async fn list_contexts(
        &self,
        principal: &Principal,
        sandbox_id: &str,
    ) -> Result<Vec<CodeContext>, CoreError> {
        let (sandbox, _) = self.usable_sandbox(principal, sandbox_id).await?;
        let mut contexts: Vec<CodeContext> = lock(&self.code_contexts)
            .values()
            .filter(|c| c.sandbox_id == sandbox.id)
            .cloned()
            .collect();
        contexts.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(contexts)
    }

    pub async fn get_context(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        context_id: &str,
    ) -> Result<CodeContext, CoreError> {
        let (sandbox, _) = self.usable_sandbox(principal, sandbox_id).await?;
        self.context_of(&sandbox.id, context_id)
            .ok_or_else(|| CoreError::NotFound {
                kind: "code context",
                id: context_id.to_string(),
            })
    }

    pub async fn delete_context(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        context_id: &str,
    ) -> Result<CodeContext, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let context =
            self.context_of(&sandbox.id, context_id)
                .ok_or_else(|| CoreError::NotFound {
                    kind: "code context",
                    id: context_id.to_string(),
                })?;
        lock(&self.code_contexts).remove(&context.id);
        if let Err(e) = live.agent.context_delete(&context.id).await {
            tracing::warn!(context = %context.id, error = %e, "could not stop a context's interpreter");
        }
        Ok(context)
    }

    /// Checks a run before anything starts (so that streaming callers can
    /// answer errors with a status, not a stream).
    pub fn validate_run(&self, request: &RunCode) -> Result<(), CoreError> {
        if request.code.len() > MAX_CODE_BYTES {
            return Err(CoreError::CodeTooLarge {
                size: request.code.len(),
                max: MAX_CODE_BYTES,
            });
        }
        if let Some(t) = request.timeout_ms
            && (t == 0 || t > MAX_RUN_TIMEOUT_MS)
        {
            return Err(CoreError::invalid(
                "timeoutMs",
                format!("timeoutMs must be between 1 and {MAX_RUN_TIMEOUT_MS}"),
            ));
        }
        Ok(())
    }

    /// The context a run uses: the given one (same sandbox and language), or
    /// the sandbox's default context for the language, created on first use.
    pub async fn context_for_run(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        request: &RunCode,
    ) -> Result<RunTarget, CoreError> {
        let (sandbox, _) = self.usable_sandbox(principal, sandbox_id).await?;
        self.check_language(&sandbox.template, request.language)?;
        if let Some(id) = &request.context_id {
            let context = self
                .context_of(&sandbox.id, id)
                .ok_or_else(|| CoreError::NotFound {
                    kind: "code context",
                    id: id.clone(),
                })?;
            if context.language != request.language {
                return Err(CoreError::ContextLanguageMismatch {
                    context_id: context.id,
                    context_language: context.language.as_str().to_string(),
                    language: request.language.as_str().to_string(),
                });
            }
            return Ok(RunTarget { sandbox, context });
        }
        if let Some(context) = self.default_context(&sandbox.id, request.language) {
            return Ok(RunTarget { sandbox, context });
        }
        // One default per sandbox and language, even under concurrent runs.
        let _guard = self.default_contexts.lock().await;
        if let Some(context) = self.default_context(&sandbox.id, request.language) {
            return Ok(RunTarget { sandbox, context });
        }
        let context = self
            .create_context_inner(
                principal,
                sandbox_id,
                request.language,
                None,
                Vec::new(),
                true,
            )
            .await?;
        Ok(RunTarget { sandbox, context })
    }

    /// Runs code in a context and returns its result; live events go to
    /// `events` when given (streaming).
    pub async fn run_code(
        &self,
        principal: &Principal,
        target: &RunTarget,
        request: RunCode,
        events: Option<mpsc::Sender<RunStreamEvent>>,
    ) -> Result<RunCodeResult, CoreError> {
        let started = Instant::now();
        let (sandbox, context) = (&target.sandbox, &target.context);
        // The row was read by `context_for_run`; the sandbox may have been
        // killed since.
        let live = self
            .live_sandbox(&sandbox.id)
            .ok_or_else(|| CoreError::SandboxDestroyed(sandbox.id.clone()))?;
        let timeout_ms = request.timeout_ms.unwrap_or(DEFAULT_RUN_TIMEOUT_MS);
        let mut session = live
            .agent
            .code_run(RunRequest {
                context_id: context.id.clone(),
                code: request.code,
                timeout_ms,
            })
            .await?;
        let mut raw = RawRun::default();
        let send = |event: RunStreamEvent| {
            if let Some(events) = &events {
                // A slow or gone reader never blocks the run.
                let _ = events.try_send(event);
            }
        };
        while let Some(output) = session.next().await {
            match output {
                Err(e) => {
                    raw.notes
                        .push(format!("lost the sandbox agent during the run: {e}"));
                    break;
                }
                Ok(RunOutput::Finished(end)) => {
                    raw.end = Some(end);
                    break;
                }
                Ok(RunOutput::Stdout(bytes)) => {
                    if let Some(text) =
                        raw.push_stream(true, String::from_utf8_lossy(&bytes).into_owned())
                    {
                        send(RunStreamEvent::Stdout(text));
                    }
                }
                Ok(RunOutput::Stderr(bytes)) => {
                    if let Some(text) =
                        raw.push_stream(false, String::from_utf8_lossy(&bytes).into_owned())
                    {
                        send(RunStreamEvent::Stderr(text));
                    }
                }
                Ok(RunOutput::Event(line)) => match serde_json::from_slice::<RawEvent>(&line) {
                    Ok(RawEvent::Stream { name, text }) => {
                        let stdout = name != "stderr";
                        if let Some(text) = raw.push_stream(stdout, text) {
                            send(if stdout {
                                RunStreamEvent::Stdout(text)
                            } else {
                                RunStreamEvent::Stderr(text)
                            });
                        }
                    }
                    Ok(RawEvent::DisplayData { data }) => raw.bundles.push((false, data)),
                    Ok(RawEvent::ExecuteResult {
                        execution_count,
                        data,
                    }) => {
                        raw.execution_count = execution_count.or(raw.execution_count);
                        raw.bundles.push((true, data));
                    }
                    Ok(RawEvent::Error {
                        ename,
                        evalue,
                        traceback,
                    }) => {
                        let error = RunError {
                            name: ename,
                            message: evalue,
                            traceback: (!traceback.is_empty()).then(|| traceback.join("\n")),
                        };
                        send(RunStreamEvent::Error(error.clone()));
                        raw.error = Some(error);
                    }
                    Ok(RawEvent::Done { execution_count }) => {
                        raw.execution_count = execution_count.or(raw.execution_count);
                    }
                    Ok(RawEvent::Other) => {}
                    Err(_) => raw
                        .notes
                        .push(String::from("an unreadable interpreter event was ignored")),
                },
            }
        }
        let end = raw.end.clone().unwrap_or(RunEnd {
            timed_out: false,
            interpreter_died: Some(String::from("the run ended without a result")),
            restarted: false,
            unknown_context: false,
        });
        if end.unknown_context {
            lock(&self.code_contexts).remove(&context.id);
            return Err(CoreError::NotFound {
                kind: "code context",
                id: context.id.clone(),
            });
        }
        if end.timed_out && raw.error.is_none() {
            raw.error = Some(RunError {
                name: String::from("TimeoutError"),
                message: format!(
                    "the run exceeded its timeout of {timeout_ms} ms and was interrupted"
                ),
                traceback: None,
            });
        }
        if let Some(reason) = &end.interpreter_died {
            let error = RunError {
                name: String::from("InterpreterDied"),
                message: format!(
                    "{reason}; the context's state was lost and the next run starts a fresh interpreter"
                ),
                traceback: None,
            };
            if raw.error.is_none() || end.timed_out {
                raw.error = Some(error);
            }
        }
        let template = self.template(&sandbox.template)?;
        let outputs = self
            .process_outputs(
                principal,
                sandbox,
                &template,
                context.language,
                &raw.bundles,
                request.artifact_policy,
                &mut raw.notes,
            )
            .await;
        for output in &outputs {
            send(RunStreamEvent::Output(output.clone()));
        }
        Ok(RunCodeResult {
            context_id: context.id.clone(),
            stdout: raw.stdout,
            stderr: raw.stderr,
            outputs,
            execution_count: raw.execution_count,
            error: raw.error,
            duration_ms: started.elapsed().as_millis() as u64,
            interpreter_restarted: end.interpreter_died.is_some(),
            state_lost: end.restarted,
            notes: raw.notes,
        })
    }
}

/// Contexts known to the host, by id.
pub type ContextMap = HashMap<String, CodeContext>;
