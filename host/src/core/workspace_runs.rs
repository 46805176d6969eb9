//! Workspace Runs (seed 003): "run this checkout, give me proof of what
//! happened". A run is created with its archive's declared size and
//! SHA-256, receives the archive (direct or staged; verified before it is
//! kept, at `data_dir/archives/<id>.tgz`), and once started is driven by
//! one task: a fresh sandbox as the run's creator, the archive unpacked
//! into /workspace by the agent, the command in the background with its
//! output copied into the run's event log, the named artifacts collected,
//! the terminal event, the sandbox destroyed (unless `keepSandbox`) and
//! the signed Evidence Bundle written. The event log is durable and
//! numbered without gaps (the store assigns `seq`); readers follow it from
//! the store, woken by the driver.
//!
//! A host restart ends the runs a previous process left in progress as
//! `failed` with reason `host_restart` (their sandboxes are destroyed
//! unless kept) and writes their evidence: a run's phases are not resumed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::files::TransferTicket;
use super::secrets::KeyUse;
use super::{CoreError, CreateSandbox, Host, RunCommand, lock};
use crate::auth::Principal;
use crate::clock::{Millis, rfc3339};
use crate::config::Limits;
use crate::evidence;
use crate::ids;
use crate::model::{
    CollectItem, CommandStatus, EndReason, Metadata, OutputStream, RunArtifact, RunEventBody,
    RunReason, RunStatus, TransferKind,
};
use crate::store::{
    Cursor, LogBody, RunEnd, RunEventRow, RunFilter, TransferRow, TransferTarget, WorkspaceRunRow,
};

/// Largest archive a run may declare.
pub const MAX_ARCHIVE_BYTES: u64 = 1024 * 1024 * 1024;
/// Most artifact paths a run may name.
pub const MAX_ARTIFACTS: usize = 32;
pub const DEFAULT_TIMEOUT_MS: i64 = 600_000;
pub const MIN_TIMEOUT_MS: i64 = 1_000;
pub const MAX_TIMEOUT_MS: i64 = 86_400_000;
pub const DEFAULT_TEMPLATE: &str = "python-node";
/// Most metadata filters in one list request.
pub const MAX_METADATA_FILTERS: usize = 8;

/// Entries an archive may hold.
const MAX_ARCHIVE_ENTRIES: u64 = 200_000;
/// Unpacked bytes per compressed byte an archive may reach (past the
/// protocol's grace): source trees compress 3-10x, a gzip bomb 1000x.
const MAX_ARCHIVE_RATIO: u64 = 200;
/// A `heartbeat` event this often while the command runs.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// How long `cancel` waits for the run to end before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Sandbox lifetime beyond the run's timeout (collection, cleanup).
const SANDBOX_TTL_MARGIN_MS: i64 = 10 * 60 * 1000;
/// The metadata key that names a run's sandbox's run.
const RUN_METADATA_KEY: &str = "workspaceRun";
/// Events read from the store at once by a follower.
const EVENT_PAGE: usize = 256;

/// A request to create a run, as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct CreateRun {
    pub template: Option<String>,
    pub command: String,
    pub archive_size: i64,
    pub archive_sha256: String,
    pub artifacts: Vec<CollectItem>,
    pub timeout_ms: Option<i64>,
    pub env: Vec<(String, String)>,
    pub keep_sandbox: bool,
    pub metadata: Metadata,
}

/// A request that passed [`CreateRun::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreateRun {
    pub template: String,
    pub command: String,
    pub archive_size: i64,
    pub archive_sha256: String,
    pub artifacts: Vec<CollectItem>,
    pub timeout_ms: i64,
    pub env: Vec<(String, String)>,
    pub keep_sandbox: bool,
    pub metadata: Metadata,
}

impl CreateRun {
    pub fn validate(self, limits: &Limits) -> Result<ValidCreateRun, CoreError> {
        let template = self
            .template
            .unwrap_or_else(|| String::from(DEFAULT_TEMPLATE));
        // The command and env follow the rules of any command.
        RunCommand {
            command: self.command.clone(),
            env: self.env.clone(),
            ..RunCommand::default()
        }
        .validate(limits)?;
        if self.archive_size < 1 || self.archive_size as u64 > MAX_ARCHIVE_BYTES {
            if self.archive_size as u64 > MAX_ARCHIVE_BYTES {
                return Err(CoreError::ArchiveTooLarge {
                    declared: self.archive_size as u64,
                    max: MAX_ARCHIVE_BYTES,
                });
            }
            return Err(CoreError::invalid(
                "archive.sizeBytes",
                format!("archive.sizeBytes must be between 1 and {MAX_ARCHIVE_BYTES}"),
            ));
        }
        let sha = self.archive_sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CoreError::invalid(
                "archive.sha256",
                "archive.sha256 must be the archive's SHA-256 as 64 hex characters",
            ));
        }
        if self.artifacts.len() > MAX_ARTIFACTS {
            return Err(CoreError::invalid(
                "artifacts",
                format!("at most {MAX_ARTIFACTS} artifact paths may be named"),
            ));
        }
        let mut artifacts = Vec::with_capacity(self.artifacts.len());
        for item in self.artifacts {
            artifacts.push(CollectItem {
                path: artifact_path(&item.path)?,
                name: item.name,
            });
            if let Some(name) = &artifacts[artifacts.len() - 1].name
                && (name.is_empty() || name.len() > 255 || name.contains(['/', '\0']))
            {
                return Err(CoreError::invalid(
                    "artifacts",
                    "an artifact name must be 1 to 255 bytes without `/` or NUL",
                ));
            }
        }
        let timeout_ms = self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(CoreError::invalid(
                "timeoutMs",
                format!("timeoutMs must be between {MIN_TIMEOUT_MS} and {MAX_TIMEOUT_MS}"),
            ));
        }
        let size = serde_json::to_vec(&self.metadata).map_or(usize::MAX, |v| v.len());
        if size > limits.max_metadata_bytes {
            return Err(CoreError::invalid(
                "metadata",
                format!(
                    "metadata is {size} bytes serialized; the limit is {}",
                    limits.max_metadata_bytes
                ),
            ));
        }
        if template.is_empty() || template.len() > 64 {
            return Err(CoreError::invalid(
                "template",
                "template must be a template name of 1 to 64 characters; see GET /v1/templates",
            ));
        }
        Ok(ValidCreateRun {
            template,
            command: self.command,
            archive_size: self.archive_size,
            archive_sha256: sha,
            artifacts,
            timeout_ms,
            env: self.env,
            keep_sandbox: self.keep_sandbox,
            metadata: self.metadata,
        })
    }
}

/// An artifact path: relative to /workspace, without `..` (an absolute
/// path or one that climbs out is refused, not normalized away).
fn artifact_path(path: &str) -> Result<String, CoreError> {
    let refuse = |why: &str| {
        CoreError::invalid(
            "artifacts",
            format!("artifact path `{path}` {why}: give a path relative to /workspace"),
        )
    };
    if path.is_empty() || path.len() > 4096 || path.contains('\0') {
        return Err(refuse("is empty, too long or has a NUL"));
    }
    if path.starts_with('/') {
        return Err(refuse("is absolute"));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(refuse("has `..`"));
    }
    if parts.is_empty() {
        return Err(refuse("names /workspace itself"));
    }
    Ok(parts.join("/"))
}

/// What [`Host::reconcile_runs`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconciledRuns {
    /// Runs that go on (their sandbox and command were taken over).
    pub resumed: usize,
    /// Runs ended as `host_restart`.
    pub ended: usize,
}

/// A page of a run's events.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<RunEventRow>,
    /// The seq to pass as `afterSeq` for the next page.
    pub next_after_seq: i64,
    /// Whether the last event of the log (`terminal`) is in or before this
    /// page.
    pub terminal: bool,
}

/// A stream of a run's events, ending after `terminal`.
pub type RunEvents = mpsc::Receiver<Result<RunEventRow, CoreError>>;

/// A run being driven by this process.
pub(crate) struct RunHandle {
    cancel: CancellationToken,
    /// Its driver task (a crash in tests stops it as a real one would).
    task: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// Runs in memory: their handles and the signals their followers wait on.
#[derive(Default)]
pub(crate) struct RunRegistry {
    handles: std::sync::Mutex<HashMap<String, Arc<RunHandle>>>,
    /// Bumped after each change of a run's log.
    signals: std::sync::Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl RunRegistry {
    /// Stops every driver, as the end of the process would.
    #[cfg(test)]
    pub(crate) fn abort_all(&self) {
        for handle in lock(&self.handles).drain().map(|(_, h)| h) {
            if let Some(task) = lock(&handle.task).take() {
                task.abort();
            }
        }
    }

    fn signal(&self, id: &str) -> watch::Sender<u64> {
        lock(&self.signals)
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    fn notify(&self, id: &str) {
        let sender = lock(&self.signals).get(id).cloned();
        if let Some(sender) = sender {
            sender.send_modify(|n| *n += 1);
        }
    }

    fn forget_signal(&self, id: &str) {
        let mut signals = lock(&self.signals);
        if let Some(sender) = signals.get(id)
            && sender.receiver_count() == 0
        {
            signals.remove(id);
        }
    }
}

/// Where a restarted host picks a running run up: its command, adopted
/// with its sandbox, followed on after the last copied log event.
struct Resume {
    sandbox_id: String,
    command_id: String,
    after_seq: i64,
}

/// How the phases of a run ended, before it is terminal.
enum Outcome {
    Exited {
        status: CommandStatus,
        exit_code: Option<i64>,
        signal: Option<i64>,
    },
    Failed {
        reason: RunReason,
        message: String,
    },
}

/// The principal a run's driver acts as: the key that created it, with
/// what a run needs (the creator held `workspace_runs:create`).
fn run_principal(run: &WorkspaceRunRow) -> Principal {
    Principal {
        key_id: run.created_by_key.clone(),
        org_id: run.org_id.clone(),
        project_id: run.project_id.clone(),
        scopes: [
            "sandboxes:create",
            "sandboxes:read",
            "sandboxes:kill",
            "commands:run",
            "commands:read",
            "commands:kill",
            "artifacts:create",
            "files:read",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    }
}

impl Host {
    fn archive_dir(&self) -> PathBuf {
        self.config.data_dir.join("archives")
    }

    fn archive_path(&self, id: &str) -> PathBuf {
        self.archive_dir().join(format!("{id}.tgz"))
    }

    /// The key that signs Evidence Bundles (created at first use, mode
    /// 0600, `evidence.key` in the data dir).
    pub async fn evidence_signing_key(&self) -> Result<ed25519_dalek::SigningKey, CoreError> {
        let seed = self.server_key(KeyUse::Evidence).await?;
        Ok(evidence::signing_key(&seed))
    }

    /// The public halves of the evidence keys.
    pub async fn evidence_keys(&self) -> Result<Vec<evidence::PublicKey>, CoreError> {
        Ok(vec![evidence::public_key(
            &self.evidence_signing_key().await?,
        )])
    }

    pub async fn create_run(
        &self,
        principal: &Principal,
        request: CreateRun,
    ) -> Result<WorkspaceRunRow, CoreError> {
        let request = request.validate(&self.config.limits)?;
        let template = self.template(&request.template)?;
        if let Some(reason) = self.runtimes.unavailable(template.runtime) {
            return Err(CoreError::RuntimeUnavailable {
                template: template.name.clone(),
                runtime: template.runtime.kind(),
                reason: reason.to_string(),
            });
        }
        let row = WorkspaceRunRow {
            id: ids::new(ids::Kind::WorkspaceRun),
            org_id: principal.org_id.clone(),
            project_id: principal.project_id.clone(),
            created_by_key: principal.key_id.clone(),
            template: template.name.clone(),
            command: request.command,
            env: request.env,
            archive_size: request.archive_size,
            archive_sha256: request.archive_sha256,
            archive_uploaded: false,
            artifacts: request.artifacts,
            collected: Vec::new(),
            timeout_ms: request.timeout_ms,
            keep_sandbox: request.keep_sandbox,
            metadata: request.metadata,
            status: RunStatus::AwaitingArchive,
            reason: None,
            sandbox_id: None,
            command_id: None,
            command_seq: 0,
            exit_code: None,
            created_at: self.clock.now_ms(),
            started_at: None,
            ended_at: None,
            evidence_ready: false,
        };
        let stored = row.clone();
        self.store.call(move |s| s.insert_run(&stored)).await?;
        Ok(row)
    }

    pub async fn get_run(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<WorkspaceRunRow, CoreError> {
        let scope = principal.scope();
        let key = id.to_string();
        self.store
            .call(move |s| s.get_run(&scope, &key))
            .await?
            .ok_or_else(|| CoreError::NotFound {
                kind: "workspace run",
                id: id.to_string(),
            })
    }

    pub async fn list_runs(
        &self,
        principal: &Principal,
        filter: RunFilter,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<WorkspaceRunRow>, CoreError> {
        if filter.metadata.len() > MAX_METADATA_FILTERS {
            return Err(CoreError::invalid(
                "metadata",
                format!("at most {MAX_METADATA_FILTERS} metadata filters"),
            ));
        }
        let scope = principal.scope();
        Ok(self
            .store
            .call(move |s| s.list_runs(&scope, &filter, after.as_ref(), limit))
            .await?)
    }

    /// Receives a run's archive from a direct upload.
    pub async fn upload_archive<S>(
        &self,
        principal: &Principal,
        id: &str,
        body: S,
    ) -> Result<WorkspaceRunRow, CoreError>
    where
        S: Stream<Item = Result<Bytes, CoreError>> + Send,
    {
        let run = self.get_run(principal, id).await?;
        self.receive_archive(principal, run, body).await
    }

    /// Stages an archive upload: a signed single-use URL for one `PUT` of
    /// exactly the declared bytes.
    pub async fn create_archive_upload(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<TransferTicket, CoreError> {
        let run = self.get_run(principal, id).await?;
        if run.status != RunStatus::AwaitingArchive {
            return Err(CoreError::RunNotAwaitingArchive(run.id));
        }
        let max_bytes = run.archive_size as u64;
        let (token, expires_at) = self
            .insert_transfer(
                TransferTarget::Run(run.id.clone()),
                &run.org_id,
                TransferKind::ArchiveUpload,
                "",
                Some(max_bytes),
            )
            .await?;
        Ok(TransferTicket {
            token,
            expires_at,
            max_bytes: Some(max_bytes),
            size_bytes: None,
        })
    }

    /// Receives a run's archive through a claimed staged transfer.
    pub async fn upload_archive_transfer<S>(
        &self,
        transfer: &TransferRow,
        body: S,
    ) -> Result<WorkspaceRunRow, CoreError>
    where
        S: Stream<Item = Result<Bytes, CoreError>> + Send,
    {
        let TransferTarget::Run(id) = &transfer.target else {
            return Err(CoreError::TransferNotFound);
        };
        // A transfer acts for the org that staged it.
        let principal = super::files::transfer_principal(transfer);
        let run = self.get_run(&principal, id).await?;
        self.receive_archive(&principal, run, body).await
    }

    /// Streams the bytes to a temporary file while hashing them; keeps
    /// them only when size and digest match what the run declared.
    async fn receive_archive<S>(
        &self,
        principal: &Principal,
        run: WorkspaceRunRow,
        body: S,
    ) -> Result<WorkspaceRunRow, CoreError>
    where
        S: Stream<Item = Result<Bytes, CoreError>> + Send,
    {
        if run.status != RunStatus::AwaitingArchive {
            return Err(CoreError::RunNotAwaitingArchive(run.id));
        }
        let dir = self.archive_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| CoreError::ArchiveStorage(e.to_string()))?;
        let temp = dir.join(format!("{}.{:016x}.part", run.id, rand::random::<u64>()));
        let received = write_verified(&temp, body, run.archive_size as u64).await;
        let (size, digest) = match received {
            Ok(done) => done,
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(e);
            }
        };
        let refuse = |e: CoreError| async {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(e)
        };
        if size != run.archive_size as u64 {
            return refuse(CoreError::ArchiveSizeMismatch {
                expected: run.archive_size as u64,
                received: size,
            })
            .await;
        }
        if digest != run.archive_sha256 {
            return refuse(CoreError::ArchiveDigestMismatch {
                expected: run.archive_sha256.clone(),
                received: digest,
            })
            .await;
        }
        if let Err(e) = tokio::fs::rename(&temp, self.archive_path(&run.id)).await {
            return refuse(CoreError::ArchiveStorage(e.to_string())).await;
        }
        let id = run.id.clone();
        if !self
            .store
            .call(move |s| s.mark_archive_uploaded(&id))
            .await?
        {
            return Err(CoreError::RunNotAwaitingArchive(run.id));
        }
        self.get_run(principal, &run.id).await
    }

    /// Starts a run whose archive is in place.
    pub async fn start_run(
        self: &Arc<Self>,
        principal: &Principal,
        id: &str,
    ) -> Result<WorkspaceRunRow, CoreError> {
        let run = self.get_run(principal, id).await?;
        if run.status != RunStatus::AwaitingArchive {
            return Err(CoreError::RunAlreadyStarted(run.id));
        }
        if !run.archive_uploaded {
            return Err(CoreError::ArchiveNotUploaded(run.id));
        }
        let now = self.clock.now_ms();
        let key = run.id.clone();
        if !self.store.call(move |s| s.start_run(&key, now)).await? {
            // A concurrent start (or cancel) won.
            return Err(CoreError::RunAlreadyStarted(run.id));
        }
        let run = self.get_run(principal, id).await?;
        self.runs.notify(&run.id);
        self.spawn_driver(run.clone(), None);
        Ok(run)
    }

    /// Registers a run's handle and starts its driver.
    fn spawn_driver(self: &Arc<Self>, run: WorkspaceRunRow, resume: Option<Resume>) {
        let handle = Arc::new(RunHandle {
            cancel: CancellationToken::new(),
            task: std::sync::Mutex::new(None),
        });
        lock(&self.runs.handles).insert(run.id.clone(), handle.clone());
        let host = self.clone();
        let driver = handle.clone();
        let task = tokio::spawn(async move { host.drive_run(run, driver, resume).await });
        *lock(&handle.task) = Some(task.abort_handle());
    }

    /// Cancels a run: a run not started ends at once; a started one stops
    /// its command, and this waits (a while) for it to be terminal.
    pub async fn cancel_run(
        self: &Arc<Self>,
        principal: &Principal,
        id: &str,
    ) -> Result<WorkspaceRunRow, CoreError> {
        let run = self.get_run(principal, id).await?;
        if run.status.is_terminal() {
            return Err(CoreError::RunFinished(run.id));
        }
        let handle = lock(&self.runs.handles).get(&run.id).cloned();
        match handle {
            Some(handle) => {
                let mut signal = self.runs.signal(&run.id).subscribe();
                handle.cancel.cancel();
                let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
                loop {
                    let current = self.get_run(principal, id).await?;
                    if current.status.is_terminal() {
                        break;
                    }
                    let wait = tokio::time::timeout_at(deadline, signal.changed()).await;
                    if wait.is_err() {
                        break;
                    }
                    if matches!(wait, Ok(Err(_))) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                self.runs.forget_signal(&run.id);
            }
            None => {
                // Not started (or its driver is gone): end it here.
                self.terminate(
                    &run,
                    Outcome::Failed {
                        reason: RunReason::Canceled,
                        message: String::from("canceled"),
                    },
                    Vec::new(),
                    true,
                )
                .await?;
            }
        }
        self.get_run(principal, id).await
    }

    /// A bounded window of a run's events.
    pub async fn run_event_page(
        &self,
        principal: &Principal,
        id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<EventPage, CoreError> {
        let run = self.get_run(principal, id).await?;
        let key = run.id.clone();
        let events = self
            .store
            .call(move |s| s.run_events(&key, after_seq, limit))
            .await?;
        let next_after_seq = events.last().map_or(after_seq, |e| e.seq);
        let terminal = run.status.is_terminal()
            && (events
                .last()
                .is_some_and(|e| matches!(e.body, RunEventBody::Terminal { .. }))
                || events.len() < limit);
        Ok(EventPage {
            events,
            next_after_seq,
            terminal,
        })
    }

    /// Follows a run's events from after `after_seq`: what is recorded,
    /// then what comes, until `terminal`.
    pub async fn follow_run_events(
        self: &Arc<Self>,
        principal: &Principal,
        id: &str,
        after_seq: i64,
    ) -> Result<RunEvents, CoreError> {
        let run = self.get_run(principal, id).await?;
        let (tx, rx) = mpsc::channel(64);
        let host = self.clone();
        tokio::spawn(async move {
            let mut signal = host.runs.signal(&run.id).subscribe();
            let mut last = after_seq;
            loop {
                let key = run.id.clone();
                let from = last;
                let page = match host
                    .store
                    .call(move |s| s.run_events(&key, from, EVENT_PAGE))
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                };
                let full = page.len() == EVENT_PAGE;
                let mut ended = false;
                for event in page {
                    last = event.seq;
                    ended = matches!(event.body, RunEventBody::Terminal { .. });
                    if tx.send(Ok(event)).await.is_err() {
                        host.runs.forget_signal(&run.id);
                        return;
                    }
                }
                if ended {
                    break;
                }
                if full {
                    continue;
                }
                // Woken by the driver; a poll now and then covers a run
                // driven by no one (ended by a restart, say).
                tokio::select! {
                    _ = signal.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => break,
                }
            }
            drop(signal);
            host.runs.forget_signal(&run.id);
        });
        Ok(rx)
    }

    /// The stored Evidence Bundle document (`{bundle, signature}` JSON).
    pub async fn run_evidence(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Vec<u8>, CoreError> {
        let run = self.get_run(principal, id).await?;
        let scope = principal.scope();
        let key = run.id.clone();
        self.store
            .call(move |s| s.run_evidence(&scope, &key))
            .await?
            .ok_or(CoreError::EvidenceNotReady(run.id))
    }

    async fn append_events(&self, id: &str, events: Vec<RunEventBody>) -> Result<(), CoreError> {
        self.append_events_at(id, events, None).await
    }

    /// Appends events; `command_seq` records how far the command's log is
    /// copied, with them.
    async fn append_events_at(
        &self,
        id: &str,
        events: Vec<RunEventBody>,
        command_seq: Option<i64>,
    ) -> Result<(), CoreError> {
        let now = self.clock.now_ms();
        let key = id.to_string();
        let events: Vec<(Millis, RunEventBody)> = events.into_iter().map(|e| (now, e)).collect();
        self.store
            .call(move |s| s.append_run_events(&key, &events, command_seq))
            .await?;
        self.runs.notify(id);
        Ok(())
    }

    async fn advance(&self, id: &str, status: RunStatus) -> Result<(), CoreError> {
        let now = self.clock.now_ms();
        let key = id.to_string();
        let advanced = self
            .store
            .call(move |s| s.advance_run(&key, status, now))
            .await?;
        self.runs.notify(id);
        if !advanced {
            // Ended meanwhile (a cancel that raced the start): stop here.
            return Err(CoreError::RunFinished(id.to_string()));
        }
        Ok(())
    }

    /// Drives a started run to its end; never returns early without a
    /// terminal state and evidence (unless the store itself fails).
    async fn drive_run(
        self: Arc<Self>,
        run: WorkspaceRunRow,
        handle: Arc<RunHandle>,
        resume: Option<Resume>,
    ) {
        let principal = run_principal(&run);
        let sandbox = std::sync::Mutex::new(resume.as_ref().map(|r| r.sandbox_id.clone()));
        // The timeout runs from the start, across a host restart too.
        let elapsed = (self.clock.now_ms() - run.started_at.unwrap_or(run.created_at)).max(0);
        let left = (run.timeout_ms - elapsed).max(0) as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(left);
        // The sandbox is created by a task of its own: a timeout or cancel
        // never abandons a half-started container; the cleanup below
        // waits for it instead.
        let mut creation = match resume {
            Some(_) => None,
            None => Some(tokio::spawn({
                let host = self.clone();
                let (run, principal) = (run.clone(), principal.clone());
                async move { host.create_run_sandbox(&run, &principal).await }
            })),
        };
        // Boxed, so that it can be dropped (its streams closed) as soon as
        // a timeout or cancel wins.
        let mut phases: std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + '_>> =
            match &resume {
                None => Box::pin(self.run_phases(&run, &principal, &sandbox, &mut creation)),
                Some(r) => Box::pin(self.follow_command(
                    &run,
                    &principal,
                    &r.sandbox_id,
                    &r.command_id,
                    r.after_seq,
                )),
            };
        let mut stopped = None;
        let outcome = tokio::select! {
            outcome = &mut phases => outcome,
            _ = tokio::time::sleep_until(deadline) => {
                stopped = Some(RunReason::Timeout);
                Outcome::Failed {
                    reason: RunReason::Timeout,
                    message: format!("the run passed its timeout of {} ms", run.timeout_ms),
                }
            }
            _ = handle.cancel.cancelled() => {
                stopped = Some(RunReason::Canceled);
                Outcome::Failed {
                    reason: RunReason::Canceled,
                    message: String::from("canceled"),
                }
            }
        };
        drop(phases);
        if let Some(pending) = creation.take()
            && let Ok(Ok(row)) = pending.await
        {
            *lock(&sandbox) = Some(row.id);
        }
        let sandbox_id = lock(&sandbox).clone();
        let command_id = {
            let key = run.id.clone();
            self.store
                .call(move |s| Ok(s.get_run_unscoped(&key)?.and_then(|r| r.command_id)))
                .await
                .ok()
                .flatten()
        };
        // Stop the command (a timeout or cancel), then collect what it
        // left (not after a cancel: the client no longer wants it).
        if stopped.is_some()
            && let (Some(sbx), Some(cmd)) = (&sandbox_id, &command_id)
        {
            let _ = self.cancel_command(&principal, sbx, cmd).await;
        }
        let command_ran = command_id.is_some()
            && matches!(
                outcome,
                Outcome::Exited { .. }
                    | Outcome::Failed {
                        reason: RunReason::Timeout,
                        ..
                    }
            );
        let collected = match (&sandbox_id, command_ran) {
            (Some(sbx), true) => self.collect_run_artifacts(&run, &principal, sbx).await,
            _ => Vec::new(),
        };
        if let Err(e) = self.terminate(&run, outcome, collected, true).await {
            tracing::warn!(run = %run.id, error = %e, "could not end workspace run");
        }
        lock(&self.runs.handles).remove(&run.id);
        self.runs.forget_signal(&run.id);
    }

    /// Sandbox, extraction, command: until the command exits or a phase
    /// fails. The sandbox id is published as soon as there is one.
    async fn run_phases(
        self: &Arc<Self>,
        run: &WorkspaceRunRow,
        principal: &Principal,
        sandbox: &std::sync::Mutex<Option<String>>,
        creation: &mut Option<tokio::task::JoinHandle<Result<crate::store::SandboxRow, CoreError>>>,
    ) -> Outcome {
        let failed = |reason: RunReason, message: String| Outcome::Failed { reason, message };
        let created = match creation.as_mut() {
            Some(pending) => pending.await,
            None => return failed(RunReason::SandboxFailed, String::from("no sandbox")),
        };
        *creation = None;
        let sandbox_row = match created {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => return failed(RunReason::SandboxFailed, e.to_string()),
            Err(e) => return failed(RunReason::SandboxFailed, e.to_string()),
        };
        *lock(sandbox) = Some(sandbox_row.id.clone());

        // Extraction.
        if let Err(e) = self.advance(&run.id, RunStatus::Extracting).await {
            return failed(RunReason::SandboxFailed, e.to_string());
        }
        if let Some(outcome) = self.extract(run, &sandbox_row).await {
            return outcome;
        }

        // The command.
        if let Err(e) = self.advance(&run.id, RunStatus::Running).await {
            return failed(RunReason::SandboxFailed, e.to_string());
        }
        let command = self
            .run_command(
                principal,
                &sandbox_row.id,
                RunCommand {
                    command: run.command.clone(),
                    env: run.env.clone(),
                    background: true,
                    ..RunCommand::default()
                },
                None,
            )
            .await;
        let command = match command {
            Ok(command) => command,
            Err(e) => return failed(RunReason::SandboxFailed, e.to_string()),
        };
        let (key, cmd) = (run.id.clone(), command.id.clone());
        if let Err(e) = self
            .store
            .call(move |s| s.set_run_command(&key, &cmd))
            .await
        {
            return failed(RunReason::SandboxFailed, e.to_string());
        }
        self.follow_command(run, principal, &sandbox_row.id, &command.id, 0)
            .await
    }

    /// Creates the run's sandbox as its creator and records it on the run.
    async fn create_run_sandbox(
        &self,
        run: &WorkspaceRunRow,
        principal: &Principal,
    ) -> Result<crate::store::SandboxRow, CoreError> {
        let ttl = (run.timeout_ms + SANDBOX_TTL_MARGIN_MS).min(self.config.limits.max_ttl_ms);
        let mut metadata = Metadata::new();
        metadata.insert(
            String::from(RUN_METADATA_KEY),
            serde_json::Value::String(run.id.clone()),
        );
        let row = self
            .create_sandbox(
                principal,
                CreateSandbox {
                    template: run.template.clone(),
                    ttl_ms: Some(ttl.max(self.config.limits.min_ttl_ms)),
                    metadata,
                    network: None,
                    env: Vec::new(),
                },
            )
            .await?;
        let (key, sbx) = (run.id.clone(), row.id.clone());
        self.store
            .call(move |s| s.set_run_sandbox(&key, &sbx))
            .await?;
        Ok(row)
    }

    /// Unpacks the archive; `Some` when that ended the run.
    async fn extract(
        &self,
        run: &WorkspaceRunRow,
        sandbox: &crate::store::SandboxRow,
    ) -> Option<Outcome> {
        let failed = |reason: RunReason, message: String| Some(Outcome::Failed { reason, message });
        let Some(live) = self.live_sandbox(&sandbox.id) else {
            return failed(
                RunReason::SandboxFailed,
                String::from("the sandbox went away"),
            );
        };
        let template = match self.template_of(sandbox) {
            Ok(t) => t,
            Err(e) => return failed(RunReason::SandboxFailed, e.to_string()),
        };
        let file = match tokio::fs::File::open(self.archive_path(&run.id)).await {
            Ok(file) => file,
            Err(e) => {
                return failed(
                    RunReason::SandboxFailed,
                    format!("the uploaded archive is gone: {e}"),
                );
            }
        };
        let request = crownest_proto::ArchiveExtract {
            owner: Some(crownest_proto::ExecUser {
                uid: template.user.uid,
                gid: template.user.gid,
            }),
            max_entries: MAX_ARCHIVE_ENTRIES,
            max_bytes: template.resources.disk_mib.saturating_mul(1024 * 1024),
            max_ratio: MAX_ARCHIVE_RATIO,
        };
        let (progress_tx, mut progress_rx) = mpsc::channel::<(u64, u64)>(8);
        let extraction = live.agent.archive_extract(request, file, progress_tx);
        tokio::pin!(extraction);
        let reply = loop {
            tokio::select! {
                reply = &mut extraction => break reply,
                Some((entries, bytes)) = progress_rx.recv() => {
                    let _ = self
                        .append_events(
                            &run.id,
                            vec![RunEventBody::ArchiveProgress { entries, bytes, done: false, skipped: Vec::new() }],
                        )
                        .await;
                }
            }
        };
        match reply {
            Ok(crownest_proto::ArchiveReply::Done {
                entries,
                bytes,
                skipped,
            }) => {
                let skipped = skipped
                    .into_iter()
                    .map(|(path, reason)| crate::model::SkippedEntry { path, reason })
                    .collect();
                let done = RunEventBody::ArchiveProgress {
                    entries,
                    bytes,
                    done: true,
                    skipped,
                };
                if let Err(e) = self.append_events(&run.id, vec![done]).await {
                    return failed(RunReason::SandboxFailed, e.to_string());
                }
                None
            }
            Ok(crownest_proto::ArchiveReply::Failed {
                kind,
                entry,
                message,
            }) => {
                use crownest_proto::ArchiveErrorKind as K;
                let reason = match kind {
                    K::TooLarge => RunReason::ArchiveTooLarge,
                    K::Unsafe => RunReason::ArchiveUnsafe,
                    K::Corrupt => RunReason::ArchiveCorrupt,
                    K::Io => RunReason::SandboxFailed,
                };
                let message = match entry {
                    Some(entry) if !message.contains(&entry) => format!("{entry}: {message}"),
                    _ => message,
                };
                failed(reason, message)
            }
            Ok(crownest_proto::ArchiveReply::Progress { .. }) | Err(_) => {
                let why = match reply {
                    Err(e) => e.to_string(),
                    _ => String::from("the agent ended the extraction early"),
                };
                failed(
                    RunReason::SandboxFailed,
                    format!("extraction failed: {why}"),
                )
            }
        }
    }

    /// Copies the command's output into the run's log (with heartbeats)
    /// until it exits.
    async fn follow_command(
        &self,
        run: &WorkspaceRunRow,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
        after_seq: i64,
    ) -> Outcome {
        // The command's log is read from the store, not from memory: what
        // is there keeps its seq across a host restart, so the point this
        // run has copied to (recorded with the copies) is exact on resume.
        // The command's driver flushes every 25 ms and wakes us.
        let live = lock(&self.running).get(command_id).cloned();
        let mut changes = live.as_ref().map(|c| c.changed.subscribe());
        let started_at = run.started_at.unwrap_or(run.created_at);
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + HEARTBEAT_EVERY,
            HEARTBEAT_EVERY,
        );
        let mut after = after_seq;
        let mut idle_passes = 0u32;
        loop {
            let key = command_id.to_string();
            let from = after;
            let page = match self
                .store
                .call(move |s| s.command_events(&key, from, EVENT_PAGE))
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    return Outcome::Failed {
                        reason: RunReason::SandboxFailed,
                        message: e.to_string(),
                    };
                }
            };
            if page.is_empty() {
                let finished = live.as_ref().is_none_or(|c| c.is_finished());
                if finished {
                    // Its end is flushed with its last events: once it is
                    // finished and nothing more is recorded, read the end
                    // from its record (twice empty, for the last flush).
                    idle_passes += 1;
                    if idle_passes > 2 {
                        return self.command_end(principal, sandbox_id, command_id).await;
                    }
                }
                tokio::select! {
                    _ = async {
                        match changes.as_mut() {
                            Some(rx) => { let _ = rx.changed().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = heartbeat.tick() => self.heartbeat(&run.id, started_at).await,
                }
                continue;
            }
            idle_passes = 0;
            // A command that prints all the time still gets its heartbeats.
            if heartbeat.tick().now_or_never().is_some() {
                self.heartbeat(&run.id, started_at).await;
            }
            for event in page {
                after = event.seq;
                match event.body {
                    LogBody::Output { stream, data } => {
                        let data = String::from_utf8_lossy(&data).into_owned();
                        let body = match stream {
                            OutputStream::Stdout => RunEventBody::Stdout { data },
                            OutputStream::Stderr => RunEventBody::Stderr { data },
                        };
                        let _ = self
                            .append_events_at(&run.id, vec![body], Some(event.seq))
                            .await;
                    }
                    LogBody::Exit(exit) => {
                        if exit.status == CommandStatus::Failed {
                            return Outcome::Failed {
                                reason: RunReason::SandboxFailed,
                                message: exit
                                    .error
                                    .unwrap_or_else(|| String::from("the command failed")),
                            };
                        }
                        return Outcome::Exited {
                            status: exit.status,
                            exit_code: exit.exit_code,
                            signal: exit.signal,
                        };
                    }
                }
            }
        }
    }

    /// A `heartbeat` event of a running run started at `started_at`.
    async fn heartbeat(&self, id: &str, started_at: Millis) {
        let elapsed_ms = (self.clock.now_ms() - started_at).max(0);
        let beat = RunEventBody::Heartbeat {
            status: RunStatus::Running,
            elapsed_ms,
        };
        let _ = self.append_events(id, vec![beat]).await;
    }

    /// How a command ended, from its record, when its log ended without
    /// its exit event (its log's tail was trimmed, or it ended while no
    /// host followed it).
    async fn command_end(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
    ) -> Outcome {
        match self.get_command(principal, sandbox_id, command_id).await {
            Ok(row) if row.status == CommandStatus::Failed => Outcome::Failed {
                reason: RunReason::SandboxFailed,
                message: row
                    .error
                    .unwrap_or_else(|| String::from("the command failed")),
            },
            Ok(row) if !row.status.is_running() => Outcome::Exited {
                status: row.status,
                exit_code: row.exit_code,
                signal: row.signal,
            },
            Ok(_) => Outcome::Failed {
                reason: RunReason::SandboxFailed,
                message: String::from("the command's log ended before its exit"),
            },
            Err(e) => Outcome::Failed {
                reason: RunReason::SandboxFailed,
                message: e.to_string(),
            },
        }
    }

    /// Promotes the run's artifact paths, one event each.
    async fn collect_run_artifacts(
        &self,
        run: &WorkspaceRunRow,
        principal: &Principal,
        sandbox_id: &str,
    ) -> Vec<RunArtifact> {
        let mut collected = Vec::with_capacity(run.artifacts.len());
        for item in &run.artifacts {
            let results = self
                .collect_artifacts(principal, sandbox_id, std::slice::from_ref(item))
                .await;
            let Some(result) = results.into_iter().next() else {
                continue;
            };
            let artifact = match &result.artifact_id {
                Some(id) => self.get_artifact(principal, id).await.ok(),
                None => None,
            };
            let (entry, event) = match (artifact, result.error) {
                (Some(artifact), _) => (
                    RunArtifact {
                        path: result.path.clone(),
                        name: result.name.clone(),
                        artifact_id: Some(artifact.id.clone()),
                        size_bytes: Some(artifact.size),
                        sha256: Some(artifact.sha256.clone()),
                        error: None,
                    },
                    RunEventBody::ArtifactCollected {
                        path: result.path,
                        name: result.name,
                        artifact_id: artifact.id,
                        size_bytes: artifact.size,
                        sha256: artifact.sha256,
                    },
                ),
                (None, error) => {
                    let message = error.unwrap_or_else(|| String::from("not collected"));
                    (
                        RunArtifact {
                            path: result.path.clone(),
                            name: result.name.clone(),
                            artifact_id: None,
                            size_bytes: None,
                            sha256: None,
                            error: Some(message.clone()),
                        },
                        RunEventBody::ArtifactError {
                            path: result.path,
                            name: result.name,
                            message,
                        },
                    )
                }
            };
            let _ = self.append_events(&run.id, vec![event]).await;
            collected.push(entry);
        }
        collected
    }

    /// Ends a run: an `error` event for a failure, the terminal state and
    /// event, the sandbox destroyed unless kept, the archive removed, and
    /// the evidence written. Idempotent on a run already terminal (it
    /// then only writes missing evidence).
    async fn terminate(
        &self,
        run: &WorkspaceRunRow,
        outcome: Outcome,
        collected: Vec<RunArtifact>,
        destroy: bool,
    ) -> Result<(), CoreError> {
        let (status, reason, exit_code, error) = match outcome {
            Outcome::Exited {
                status,
                exit_code,
                signal,
            } => {
                let ok = status == CommandStatus::Completed && exit_code == Some(0);
                let code = exit_code.or(signal.map(|s| 128 + s));
                if ok {
                    (RunStatus::Succeeded, None, code, None)
                } else {
                    (RunStatus::Failed, Some(RunReason::ExitCode), code, None)
                }
            }
            Outcome::Failed {
                reason: RunReason::Canceled,
                ..
            } => (RunStatus::Canceled, Some(RunReason::Canceled), None, None),
            Outcome::Failed { reason, message } => (
                RunStatus::Failed,
                Some(reason),
                None,
                Some((reason, message)),
            ),
        };
        if let Some((reason, message)) = error {
            let _ = self
                .append_events(
                    &run.id,
                    vec![RunEventBody::Error {
                        code: reason.code().to_string(),
                        message,
                    }],
                )
                .await;
        }
        let ended_at = self.clock.now_ms();
        let end = RunEnd {
            status,
            reason,
            exit_code,
            ended_at,
            collected,
            terminal: RunEventBody::Terminal {
                status,
                reason,
                exit_code,
                ended_at: rfc3339(ended_at),
            },
        };
        let key = run.id.clone();
        self.store.call(move |s| s.finish_run(&key, &end)).await?;
        self.runs.notify(&run.id);
        self.finish_run_cleanup(&run.id, destroy).await
    }

    /// After the terminal event: destroy the sandbox (unless kept), drop
    /// the archive, write the evidence.
    async fn finish_run_cleanup(&self, id: &str, destroy: bool) -> Result<(), CoreError> {
        let key = id.to_string();
        let run = self
            .store
            .call(move |s| s.get_run_unscoped(&key))
            .await?
            .ok_or_else(|| CoreError::NotFound {
                kind: "workspace run",
                id: id.to_string(),
            })?;
        if destroy
            && !run.keep_sandbox
            && let Some(sandbox_id) = &run.sandbox_id
            && self.live_sandbox(sandbox_id).is_some()
            && let Err(e) = self.destroy_sandbox(sandbox_id, EndReason::Killed).await
        {
            tracing::warn!(run = %run.id, sandbox = %sandbox_id, error = %e, "could not destroy the run's sandbox");
        }
        let _ = tokio::fs::remove_file(self.archive_path(&run.id)).await;
        let document = self.build_evidence(&run).await?;
        let key = run.id.clone();
        self.store
            .call(move |s| s.set_run_evidence(&key, &document))
            .await?;
        self.runs.notify(&run.id);
        Ok(())
    }

    /// Builds and signs a terminal run's Evidence Bundle.
    async fn build_evidence(&self, run: &WorkspaceRunRow) -> Result<Vec<u8>, CoreError> {
        let mut hasher = evidence::EventHasher::default();
        let mut terminal_event = serde_json::Value::Null;
        let mut after = 0;
        loop {
            let key = run.id.clone();
            let page = self
                .store
                .call(move |s| s.run_events(&key, after, 1000))
                .await?;
            if page.is_empty() {
                break;
            }
            for event in &page {
                let value = evidence::event_value(event.seq, &rfc3339(event.at), &event.body);
                if matches!(event.body, RunEventBody::Terminal { .. }) {
                    terminal_event = value.clone();
                }
                hasher.push(&value);
                after = event.seq;
            }
        }
        let templates = self.templates();
        let template = templates.get(&run.template);
        let (usage, runtime) = match &run.sandbox_id {
            Some(sandbox_id) => {
                let key = sandbox_id.clone();
                let meter = self.store.call(move |s| s.sandbox_meter(&key)).await?;
                let runtime = {
                    let key = sandbox_id.clone();
                    self.store.call(move |s| s.sandbox_runtime(&key)).await?
                };
                (
                    meter.map(|m| evidence::Usage {
                        compute_unit_seconds: super::ledger::usage_lines(
                            std::slice::from_ref(&m),
                            &[],
                            m.started_at,
                            m.metered_until,
                            super::ledger::UsageGroup::Sandbox,
                        )
                        .iter()
                        .map(|line| line.compute_unit_seconds)
                        .sum(),
                        pricing_version: m.pricing_version,
                    }),
                    runtime,
                )
            }
            None => (None, None),
        };
        let bundle = evidence::Bundle {
            version: evidence::VERSION,
            run_id: run.id.clone(),
            status: run.status,
            reason: run.reason,
            exit_code: run.exit_code,
            command: run.command.clone(),
            env_names: run.env.iter().map(|(k, _)| k.clone()).collect(),
            template: evidence::TemplateIdentity {
                name: run.template.clone(),
                recipe_hash: template.map(|t| t.recipe_hash()).unwrap_or_default(),
                runtime: runtime.unwrap_or_else(|| {
                    template
                        .map(|t| t.runtime.kind().to_string())
                        .unwrap_or_default()
                }),
            },
            archive: evidence::ArchiveIdentity {
                sha256: run.archive_sha256.clone(),
                size_bytes: run.archive_size,
            },
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            ended_at: rfc3339(run.ended_at.unwrap_or(run.created_at)),
            metadata: run.metadata.clone(),
            artifacts: run
                .collected
                .iter()
                .filter_map(|a| {
                    Some(evidence::BundleArtifact {
                        path: a.path.clone(),
                        name: a.name.clone(),
                        artifact_id: a.artifact_id.clone()?,
                        sha256: a.sha256.clone()?,
                        size_bytes: a.size_bytes?,
                    })
                })
                .collect(),
            artifact_errors: run
                .collected
                .iter()
                .filter_map(|a| {
                    Some(evidence::BundleArtifactError {
                        path: a.path.clone(),
                        name: a.name.clone(),
                        message: a.error.clone()?,
                    })
                })
                .collect(),
            terminal_event,
            events: hasher.finish(),
            host: evidence::HostIdentity {
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            usage: usage.unwrap_or(evidence::Usage {
                pricing_version: crate::store::PRICING_VERSION.to_string(),
                compute_unit_seconds: 0,
            }),
            sandbox_id: run.sandbox_id.clone(),
        };
        let key = self.evidence_signing_key().await?;
        Ok(evidence::sign(&bundle, &key))
    }

    /// At startup, after the sandboxes were taken over: a `running` run
    /// whose sandbox and command were taken over goes on (its command's
    /// log followed from where it was copied to, its timeout still
    /// counting from its start); any other run a previous process left in
    /// progress ends `failed` (`host_restart`) with its sandbox destroyed
    /// unless kept; terminal runs without evidence get it.
    pub async fn reconcile_runs(self: &Arc<Self>) -> Result<ReconciledRuns, CoreError> {
        let runs = self.store.call(|s| s.unfinished_runs()).await?;
        let mut outcome = ReconciledRuns::default();
        if runs.is_empty() {
            return Ok(outcome);
        }
        // A crash between a run's sandbox starting and its id being
        // recorded leaves the sandbox unnamed on the run: it is found by
        // the run id in its metadata.
        let live = self.store.call(|s| s.live_sandboxes()).await?;
        for mut run in runs {
            if run.sandbox_id.is_none()
                && let Some(sandbox) = live.iter().find(|s| {
                    s.metadata.get(RUN_METADATA_KEY).and_then(|v| v.as_str()) == Some(&run.id)
                })
            {
                let (key, sbx) = (run.id.clone(), sandbox.id.clone());
                self.store
                    .call(move |s| s.set_run_sandbox(&key, &sbx))
                    .await?;
                run.sandbox_id = Some(sandbox.id.clone());
            }
            if run.status == RunStatus::Running
                && let (Some(sandbox_id), Some(command_id)) = (&run.sandbox_id, &run.command_id)
                && self.live_sandbox(sandbox_id).is_some()
            {
                let resume = Resume {
                    sandbox_id: sandbox_id.clone(),
                    command_id: command_id.clone(),
                    after_seq: run.command_seq,
                };
                self.spawn_driver(run, Some(resume));
                outcome.resumed += 1;
                continue;
            }
            let result = if run.status.is_terminal() {
                self.finish_run_cleanup(&run.id, true).await
            } else {
                outcome.ended += 1;
                self.terminate(
                    &run,
                    Outcome::Failed {
                        reason: RunReason::HostRestart,
                        message: String::from("the host restarted while the run was in progress"),
                    },
                    Vec::new(),
                    true,
                )
                .await
            };
            if let Err(e) = result {
                tracing::warn!(run = %run.id, error = %e, "could not end workspace run after restart");
            }
        }
        Ok(outcome)
    }
}

/// Writes `body` to `path`, at most `max` bytes (one more is enough to
/// know it is too long); returns the size and hex SHA-256.
async fn write_verified<S>(path: &PathBuf, body: S, max: u64) -> Result<(u64, String), CoreError>
where
    S: Stream<Item = Result<Bytes, CoreError>> + Send,
{
    let storage = |e: std::io::Error| CoreError::ArchiveStorage(e.to_string());
    let mut file = tokio::fs::File::create(path).await.map_err(storage)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    tokio::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        if size > max {
            return Err(CoreError::ArchiveSizeMismatch {
                expected: max,
                received: size,
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(storage)?;
    }
    file.sync_all().await.map_err(storage)?;
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateRun {
        CreateRun {
            command: String::from("npm test"),
            archive_size: 10,
            archive_sha256: "A".repeat(64),
            ..CreateRun::default()
        }
    }

    fn field(result: Result<ValidCreateRun, CoreError>) -> &'static str {
        match result {
            Err(CoreError::Invalid { field, .. }) => field,
            Err(CoreError::ArchiveTooLarge { .. }) => "archive_too_large",
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_run_request_gets_defaults_and_a_lower_case_digest() {
        let valid = request().validate(&Limits::default()).expect("valid");
        assert_eq!(valid.template, DEFAULT_TEMPLATE);
        assert_eq!(valid.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(valid.archive_sha256, "a".repeat(64));
    }

    #[test]
    fn bad_run_requests_are_refused_by_field() {
        let limits = Limits::default();
        let with = |f: &dyn Fn(&mut CreateRun)| {
            let mut r = request();
            f(&mut r);
            field(r.validate(&limits))
        };
        assert_eq!(with(&|r| r.archive_sha256 = "xyz".into()), "archive.sha256");
        assert_eq!(
            with(&|r| r.archive_sha256 = "g".repeat(64)),
            "archive.sha256"
        );
        assert_eq!(with(&|r| r.archive_size = 0), "archive.sizeBytes");
        assert_eq!(
            with(&|r| r.archive_size = MAX_ARCHIVE_BYTES as i64 + 1),
            "archive_too_large"
        );
        for bad in ["/etc/passwd", "../x", "a/../../x", "", "."] {
            assert_eq!(
                with(&|r| r.artifacts = vec![CollectItem {
                    path: bad.into(),
                    name: None
                }]),
                "artifacts",
                "{bad}"
            );
        }
        assert_eq!(
            with(&|r| r.artifacts = vec![
                CollectItem {
                    path: "a".into(),
                    name: None
                };
                MAX_ARTIFACTS + 1
            ]),
            "artifacts"
        );
        assert_eq!(with(&|r| r.timeout_ms = Some(5)), "timeoutMs");
        assert_eq!(with(&|r| r.command = " ".into()), "command");
        assert_eq!(with(&|r| r.env = vec![("1BAD".into(), "x".into())]), "env");
    }

    #[test]
    fn artifact_paths_are_normalized_beneath_the_workspace() {
        assert_eq!(
            artifact_path("./out//report.json").expect("ok"),
            "out/report.json"
        );
        assert!(artifact_path("out/../../etc").is_err());
    }
}
