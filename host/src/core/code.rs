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
use tokio::sync::mpsc;

use super::{CoreError, Host, lock};
use crate::agent::RunOutput as AgentOutput;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::ids;
use crate::plugins::{Format, RawEvent, RejectReason, RunnerEvent, StreamName};
use crate::store::SandboxRow;

/// Largest accepted source of one run.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_RUN_TIMEOUT_MS: u64 = 60_000;
pub const MAX_RUN_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Contexts one sandbox may hold, whatever its memory.
pub const MAX_CONTEXTS_PER_SANDBOX: usize = 16;
/// Memory one context needs, for the per-sandbox cap.
pub const MIB_PER_CONTEXT: u64 = 64;

/// Contexts a sandbox of `memory_mib` may hold.
pub fn max_contexts(memory_mib: u64) -> usize {
    ((memory_mib / MIB_PER_CONTEXT) as usize).clamp(1, MAX_CONTEXTS_PER_SANDBOX)
}
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

impl CodeContext {
    pub(crate) fn to_row(&self) -> crate::store::ContextRow {
        crate::store::ContextRow {
            id: self.id.clone(),
            sandbox_id: self.sandbox_id.clone(),
            language: self.language.as_str().to_string(),
            cwd: self.cwd.clone(),
            implementation: self.implementation.clone(),
            is_default: self.is_default,
            created_at: self.created_at,
        }
    }

    /// `None` for a row naming a language this build does not know.
    pub(crate) fn from_row(row: crate::store::ContextRow) -> Option<Self> {
        Some(Self {
            language: parse_language(&row.language)?,
            id: row.id,
            sandbox_id: row.sandbox_id,
            cwd: row.cwd,
            implementation: row.implementation,
            is_default: row.is_default,
            created_at: row.created_at,
        })
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactPolicy {
    #[default]
    Inline,
    Promote,
}

/// A request to run code, as the client sent it.
#[derive(Debug, Clone)]
pub struct RunCode {
    pub language: Language,
    pub code: String,
    pub context_id: Option<String>,
    pub artifact_policy: ArtifactPolicy,
    pub timeout_ms: Option<u64>,
}

/// A request that passed [`RunCode::validate`].
#[derive(Debug, Clone)]
pub struct ValidRunCode {
    pub language: Language,
    pub code: String,
    pub context_id: Option<String>,
    pub artifact_policy: ArtifactPolicy,
    pub timeout_ms: u64,
}

impl RunCode {
    /// Checks a run before anything starts (so that streaming callers can
    /// answer errors with a status, not a stream).
    pub fn validate(self) -> Result<ValidRunCode, CoreError> {
        if self.code.len() > MAX_CODE_BYTES {
            return Err(CoreError::CodeTooLarge {
                size: self.code.len(),
                max: MAX_CODE_BYTES,
            });
        }
        let timeout_ms = match self.timeout_ms {
            None => DEFAULT_RUN_TIMEOUT_MS,
            Some(t) if t > 0 && t <= MAX_RUN_TIMEOUT_MS => t,
            Some(_) => {
                return Err(CoreError::invalid(
                    "timeoutMs",
                    format!("timeoutMs must be between 1 and {MAX_RUN_TIMEOUT_MS}"),
                ));
            }
        };
        Ok(ValidRunCode {
            language: self.language,
            code: self.code,
            context_id: self.context_id,
            artifact_policy: self.artifact_policy,
            timeout_ms,
        })
    }
}

/// An interpreter error (a result, not an API error).
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The content of an inlined output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InlineContent {
    Text(String),
    /// Valid JSON text (the `json`, `data` and `chart` formats).
    Json(String),
    /// Binary content, base64-encoded.
    Base64(String),
}

/// One rich output of a run, after the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutput {
    Inline {
        format: Format,
        content: InlineContent,
        mime: String,
    },
    Artifact {
        format: Format,
        artifact_id: String,
        mime: String,
        size: u64,
    },
    Rejected {
        format: Format,
        reason: RejectReason,
    },
}

/// The result of a run: the same shape blocking and streamed (`complete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCodeResult {
    pub context_id: String,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub outputs: Vec<RunOutput>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStreamEvent {
    Stdout(String),
    Stderr(String),
    Output(RunOutput),
    Error(RunError),
}

/// Everything a run produced before the pipeline.
#[derive(Debug, Default)]
struct RawRun {
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Display data and execute results, in order, for the pipeline.
    bundles: Vec<RawEvent>,
    /// Bytes of `bundles`, bounded by the host's limit.
    bundle_bytes: usize,
    /// Outputs refused before the pipeline (too large).
    refused: Vec<RunOutput>,
    error: Option<RunError>,
    execution_count: Option<u64>,
    end: Option<RunEnd>,
    stream_bytes: usize,
    notes: Vec<String>,
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

    fn refuse_oversized(&mut self, size: usize, max: usize) -> RunOutput {
        let output = RunOutput::Rejected {
            format: Format::Unknown,
            reason: RejectReason::OutputTooLarge,
        };
        self.notes.push(format!(
            "an output of {size} bytes was rejected: a run keeps at most {max} bytes of rich output"
        ));
        self.refused.push(output.clone());
        output
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

    /// Takes over contexts a previous host process recorded.
    pub(crate) fn adopt_contexts(&self, contexts: Vec<CodeContext>) {
        let mut map = lock(&self.code_contexts);
        for context in contexts {
            map.insert(context.id.clone(), context);
        }
    }

    /// Forgets the contexts of a sandbox that is gone.
    pub(crate) fn drop_contexts_of(&self, sandbox_id: &str) {
        lock(&self.code_contexts).retain(|_, c| c.sandbox_id != sandbox_id);
    }

    fn check_language(
        &self,
        template: &crate::templates::Template,
        language: Language,
    ) -> Result<(), CoreError> {
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
        let template = live.template.clone();
        self.check_language(&template, language)?;
        super::commands::validate_env(&env)?;
        let cwd = super::commands::resolve_cwd_in(cwd.as_deref(), &template.workdir)?;
        // An interpreter takes tens of MiB: the cap follows the sandbox's
        // memory so that every context it allows can live.
        let max = max_contexts(template.resources.memory_mib);
        let count = lock(&self.code_contexts)
            .values()
            .filter(|c| c.sandbox_id == sandbox.id)
            .count();
        if count >= max {
            return Err(CoreError::invalid(
                "language",
                format!(
                    "this sandbox may hold at most {max} code contexts (one per {MIB_PER_CONTEXT} MiB of memory, at most {MAX_CONTEXTS_PER_SANDBOX}); delete one first"
                ),
            ));
        }
        let id = ids::new(ids::Kind::CodeContext);
        // As for commands: proxy, template, sandbox, then the request's own.
        let mut layered = super::egress::proxy_env(&template);
        for (key, value) in template.env.iter().chain(&live.env).chain(&env) {
            layered.retain(|(k, _)| k != key);
            layered.push((key.clone(), value.clone()));
        }
        let env = layered;
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
                // The agent's words stay in the log: they can name paths
                // and processes of the sandbox's implementation.
                tracing::warn!(sandbox = %sandbox.id, %message, "an interpreter failed to start");
                return Err(CoreError::ContextFailed(language));
            }
            ContextReply::BadCwd { cwd } => {
                return Err(CoreError::invalid(
                    "cwd",
                    format!(
                        "the working directory `{}` does not exist in the sandbox; create it first",
                        cwd.chars().take(200).collect::<String>()
                    ),
                ));
            }
            ContextReply::Deleted | ContextReply::Contexts(_) => {
                tracing::warn!(sandbox = %sandbox.id, "unexpected context reply from the agent");
                return Err(CoreError::ContextFailed(language));
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
        // Recorded so that a restarted host knows the interpreters it takes
        // over with the sandbox.
        let row = context.to_row();
        if let Err(e) = self.store.call(move |s| s.insert_context(&row)).await {
            if let Err(stop) = live.agent.context_delete(&context.id).await {
                tracing::warn!(context = %context.id, error = %stop, "could not stop an unrecorded context");
            }
            return Err(e.into());
        }
        lock(&self.code_contexts).insert(context.id.clone(), context.clone());
        Ok(context)
    }

    /// A context of the sandbox, or `not_found`.
    fn known_context(&self, sandbox_id: &str, context_id: &str) -> Result<CodeContext, CoreError> {
        self.context_of(sandbox_id, context_id)
            .ok_or_else(|| CoreError::NotFound {
                kind: "code context",
                id: context_id.to_string(),
            })
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
        self.known_context(&sandbox.id, context_id)
    }

    pub async fn delete_context(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        context_id: &str,
    ) -> Result<CodeContext, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let context = self.known_context(&sandbox.id, context_id)?;
        lock(&self.code_contexts).remove(&context.id);
        let id = context.id.clone();
        self.store.call(move |s| s.delete_context(&id)).await?;
        if let Err(e) = live.agent.context_delete(&context.id).await {
            tracing::warn!(context = %context.id, error = %e, "could not stop a context's interpreter");
        }
        Ok(context)
    }

    /// Replaces a context's interpreter with a fresh one: same id, cwd and
    /// environment, no variables or imports. A run in it ends as if its
    /// interpreter had died.
    pub async fn restart_context(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        context_id: &str,
    ) -> Result<CodeContext, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let context = self.known_context(&sandbox.id, context_id)?;
        match live.agent.context_restart(&context.id).await? {
            ContextReply::Ready { implementation, .. } => {
                let mut contexts = lock(&self.code_contexts);
                let Some(held) = contexts.get_mut(&context.id) else {
                    // Deleted meanwhile.
                    return Err(CoreError::NotFound {
                        kind: "code context",
                        id: context.id,
                    });
                };
                held.implementation = implementation;
                Ok(held.clone())
            }
            ContextReply::Failed { message } => {
                tracing::warn!(sandbox = %sandbox.id, context = %context.id, %message, "an interpreter failed to restart");
                Err(CoreError::ContextFailed(context.language))
            }
            other => {
                tracing::warn!(sandbox = %sandbox.id, ?other, "unexpected context reply from the agent");
                Err(CoreError::ContextFailed(context.language))
            }
        }
    }

    /// The context a run uses: the given one (same sandbox and language), or
    /// the sandbox's default context for the language, created on first use.
    pub async fn context_for_run(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        request: &ValidRunCode,
    ) -> Result<RunTarget, CoreError> {
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        self.check_language(&live.template, request.language)?;
        if let Some(id) = &request.context_id {
            let context = self.known_context(&sandbox.id, id)?;
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
        request: ValidRunCode,
        events: Option<mpsc::Sender<RunStreamEvent>>,
    ) -> Result<RunCodeResult, CoreError> {
        let started = Instant::now();
        let (sandbox, context) = (&target.sandbox, &target.context);
        // The row was read by `context_for_run`; the sandbox may have been
        // killed since.
        let live = self
            .live_sandbox(&sandbox.id)
            .ok_or_else(|| CoreError::SandboxDestroyed(sandbox.id.clone()))?;
        if request.artifact_policy == ArtifactPolicy::Promote
            && !principal.has_scope("artifacts:create")
        {
            return Err(CoreError::MissingScope("artifacts:create"));
        }
        let limits = &self.config.limits;
        let timeout_ms = request.timeout_ms;
        let mut session = live
            .agent
            .code_run(
                RunRequest {
                    context_id: context.id.clone(),
                    code: request.code,
                    timeout_ms,
                },
                limits.max_run_event_bytes,
            )
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
                    tracing::warn!(sandbox = %sandbox.id, error = %e, "lost the agent during a code run");
                    raw.notes
                        .push(String::from("lost the sandbox agent during the run"));
                    break;
                }
                Ok(AgentOutput::Finished(end)) => {
                    raw.end = Some(end);
                    break;
                }
                Ok(AgentOutput::Stdout(bytes)) => {
                    if let Some(text) =
                        raw.push_stream(true, String::from_utf8_lossy(&bytes).into_owned())
                    {
                        send(RunStreamEvent::Stdout(text));
                    }
                }
                Ok(AgentOutput::Stderr(bytes)) => {
                    if let Some(text) =
                        raw.push_stream(false, String::from_utf8_lossy(&bytes).into_owned())
                    {
                        send(RunStreamEvent::Stderr(text));
                    }
                }
                Ok(AgentOutput::OversizedEvent { size }) => {
                    let output = raw.refuse_oversized(size, limits.max_run_event_bytes);
                    send(RunStreamEvent::Output(output));
                }
                Ok(AgentOutput::Event(line)) => {
                    match RunnerEvent::decode(&line, limits.max_run_event_bytes) {
                        Ok(RunnerEvent::Raw(RawEvent::Stream { name, text })) => {
                            let stdout = name == StreamName::Stdout;
                            if let Some(text) = raw.push_stream(stdout, text) {
                                send(if stdout {
                                    RunStreamEvent::Stdout(text)
                                } else {
                                    RunStreamEvent::Stderr(text)
                                });
                            }
                        }
                        Ok(RunnerEvent::Raw(
                            event @ (RawEvent::DisplayData { .. } | RawEvent::ExecuteResult { .. }),
                        )) => {
                            let size = line.len();
                            if raw.bundle_bytes + size > limits.max_run_output_bytes {
                                let output =
                                    raw.refuse_oversized(size, limits.max_run_output_bytes);
                                send(RunStreamEvent::Output(output));
                                continue;
                            }
                            raw.bundle_bytes += size;
                            if let RawEvent::ExecuteResult {
                                execution_count: Some(n),
                                ..
                            } = &event
                            {
                                raw.execution_count = Some(u64::from(*n));
                            }
                            raw.bundles.push(event);
                        }
                        Ok(RunnerEvent::Raw(RawEvent::Error {
                            ename,
                            evalue,
                            traceback,
                        })) => {
                            let error = RunError {
                                name: ename,
                                message: evalue,
                                traceback: (!traceback.is_empty()).then(|| traceback.join("\n")),
                            };
                            send(RunStreamEvent::Error(error.clone()));
                            raw.error = Some(error);
                        }
                        Ok(RunnerEvent::Done { execution_count }) => {
                            if let Some(n) = execution_count {
                                raw.execution_count = Some(u64::from(n));
                            }
                        }
                        Ok(RunnerEvent::Other) => {}
                        Err(crate::plugins::DecodeError::TooLarge { size, max }) => {
                            let output = raw.refuse_oversized(size, max);
                            send(RunStreamEvent::Output(output));
                        }
                        Err(crate::plugins::DecodeError::Malformed(_)) => raw
                            .notes
                            .push(String::from("an unreadable interpreter event was ignored")),
                    }
                }
            }
        }
        drop(session);
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
        let template = self.template_of(sandbox)?;
        let bundles = std::mem::take(&mut raw.bundles);
        let mut outputs = std::mem::take(&mut raw.refused);
        let processed = self
            .process_outputs(
                principal,
                sandbox,
                &template,
                context.language,
                bundles,
                request.artifact_policy,
                &mut raw.notes,
            )
            .await;
        for output in &processed {
            send(RunStreamEvent::Output(output.clone()));
        }
        outputs.extend(processed);
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
