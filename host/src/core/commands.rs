//! Commands: processes started through the agent, recorded durably with
//! their output log.
//!
//! A running command is a [`LiveCommand`] driven by one task that reads the
//! agent's events, keeps the record's output tails, appends log events to
//! memory (for live readers, woken through a watch channel) and flushes them
//! to the store in small batches. The end state and the last events commit
//! in one transaction. Log readers resume by event sequence number.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crownest_proto::{ExecEvent, ExecRequest, ExecUser};
use tokio::sync::{mpsc, watch};

use super::{CoreError, Host, LiveSandbox, lock};
use crate::agent::ExecInput;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::core::artifacts::{CollectItem, Collected};
use crate::ids;
use crate::store::{CommandEnd, CommandEventRow, CommandRow, Cursor, SandboxRow};

/// How long log events may wait in memory before they are written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(25);
/// Bytes of log that trigger an early flush.
const FLUSH_BYTES: usize = 256 * 1024;
/// The PATH commands get unless the client sets one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const WORKSPACE: &str = "/workspace";

/// Signals a client may send to a command, by name.
pub const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGKILL", libc::SIGKILL),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGTERM", libc::SIGTERM),
    ("SIGCONT", libc::SIGCONT),
    ("SIGSTOP", libc::SIGSTOP),
    ("SIGTSTP", libc::SIGTSTP),
    ("SIGWINCH", libc::SIGWINCH),
];

/// A validated request to run a command.
#[derive(Debug, Clone)]
pub struct RunCommand {
    pub command: String,
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
    pub timeout_ms: Option<i64>,
    pub background: bool,
    pub stdin: bool,
    /// Files to promote to artifacts when the command ends.
    pub collect: Vec<CollectItem>,
    /// The org's quota, when the caller read it already this request.
    pub quota: Option<crate::store::Quota>,
}

/// Most paths one command may collect.
pub const MAX_COLLECT_ITEMS: usize = 32;

/// One entry of a command log as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub seq: i64,
    /// `stdout`, `stderr` or `exit`.
    pub kind: String,
    /// Output bytes, or for `exit` a JSON object with the end state.
    pub data: Vec<u8>,
}

/// A stream of log events, ending after the `exit` event.
pub type CommandLog = mpsc::Receiver<Result<LogEvent, CoreError>>;

/// The last `limit` bytes of an output stream.
#[derive(Debug, Default)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped: i64,
}

impl Tail {
    fn push(&mut self, data: &[u8], limit: usize) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(limit);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.dropped += excess as i64;
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }
}

/// Holds back an incomplete UTF-8 sequence at the end of a chunk so that log
/// events split only on character boundaries.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn split(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.pending);
        data.extend_from_slice(chunk);
        let keep = incomplete_utf8_suffix(&data);
        self.pending = data.split_off(data.len() - keep);
        data
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// Length of a trailing, incomplete (but so far valid) UTF-8 sequence.
fn incomplete_utf8_suffix(data: &[u8]) -> usize {
    for back in 1..=3.min(data.len()) {
        let byte = data[data.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte: look further back
        }
        let needed = match byte {
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

#[derive(Debug, Default)]
struct LiveState {
    /// Retained log, oldest first.
    events: VecDeque<CommandEventRow>,
    retained_bytes: usize,
    next_seq: i64,
    /// Events not yet in the store.
    unflushed: Vec<CommandEventRow>,
    unflushed_bytes: usize,
    /// Store events below this seq are to be deleted (retention).
    trim_from: Option<i64>,
    stdout: Tail,
    stderr: Tail,
    stdout_carry: Utf8Carry,
    stderr_carry: Utf8Carry,
    started_at: Option<Millis>,
    spawn_error: Option<String>,
    canceled: bool,
    /// The final record, once the command ended and it is durable.
    finished: Option<CommandRow>,
}

/// A command whose process has not ended (or just ended).
pub struct LiveCommand {
    pub id: String,
    pub sandbox_id: String,
    record: CommandRow,
    stdin_open: bool,
    /// Tail kept per output stream: the host limit, or the org's quota when
    /// that is lower.
    output_limit: usize,
    /// What to promote to artifacts at the end, on behalf of the creator.
    collect: Vec<CollectItem>,
    /// The key that ran it, with the sandbox's org and project: collection
    /// acts for it after the request that started the command is gone.
    creator: Principal,
    state: Mutex<LiveState>,
    /// Bumped on every change of `state`; readers wait on it.
    changed: watch::Sender<u64>,
    input: Mutex<Option<ExecInput>>,
}

impl LiveCommand {
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The record as it stands, with the output so far.
    fn snapshot(&self) -> CommandRow {
        let state = lock(&self.state);
        if let Some(done) = &state.finished {
            return done.clone();
        }
        CommandRow {
            stdout: state.stdout.to_vec(),
            stderr: state.stderr.to_vec(),
            stdout_dropped: state.stdout.dropped,
            stderr_dropped: state.stderr.dropped,
            started_at: state.started_at,
            ..self.record.clone()
        }
    }

    fn events_after(&self, after: i64) -> (Vec<CommandEventRow>, bool) {
        let state = lock(&self.state);
        let events = state
            .events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        (events, state.finished.is_some())
    }
}

impl Host {
    /// Starts a command. Returns when it started (`background`) or ended.
    pub async fn run_command(
        self: &Arc<Self>,
        principal: &Principal,
        sandbox_id: &str,
        mut request: RunCommand,
    ) -> Result<CommandRow, CoreError> {
        let (sandbox, live_sandbox) = self.usable_sandbox(principal, sandbox_id).await?;
        let limits = &self.config.limits;
        if request.command.trim().is_empty() {
            return Err(CoreError::invalid("command", "command must not be empty"));
        }
        if request.command.len() > limits.max_command_bytes {
            return Err(CoreError::invalid(
                "command",
                format!("command is longer than {} bytes", limits.max_command_bytes),
            ));
        }
        if request.command.contains('\0') {
            return Err(CoreError::invalid(
                "command",
                "command must not contain NUL",
            ));
        }
        let cwd = resolve_cwd(request.cwd.as_deref())?;
        for (key, value) in &request.env {
            if !valid_env_name(key) || value.contains('\0') {
                return Err(CoreError::invalid(
                    "env",
                    format!(
                        "`{key}` is not a valid environment variable name or its value has a NUL"
                    ),
                ));
            }
        }
        if request.collect.len() > MAX_COLLECT_ITEMS {
            return Err(CoreError::invalid(
                "collect",
                format!("at most {MAX_COLLECT_ITEMS} paths may be collected"),
            ));
        }
        if request
            .collect
            .iter()
            .any(|c| c.path.is_empty() || c.path.len() > 4096 || c.path.contains('\0'))
        {
            return Err(CoreError::invalid(
                "collect",
                "each collect path must be 1 to 4096 bytes without NUL",
            ));
        }
        if let Some(t) = request.timeout_ms
            && (t <= 0 || t > limits.max_command_timeout_ms)
        {
            return Err(CoreError::invalid(
                "timeoutMs",
                format!(
                    "timeoutMs must be between 1 and {}",
                    limits.max_command_timeout_ms
                ),
            ));
        }

        let template = self.template(&sandbox.template)?;
        let quota = match request.quota.take() {
            Some(quota) => quota,
            None => self.quota(&sandbox.org_id).await?,
        };
        let output_limit = quota
            .max_command_output_bytes
            .map_or(limits.output_tail_bytes, |q| {
                (q.max(0) as usize).min(limits.output_tail_bytes)
            });
        let now = self.clock.now_ms();
        let env_json = serde_json::Value::Object(
            request
                .env
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
        .to_string();
        let record = CommandRow {
            id: ids::new(ids::Kind::Command),
            sandbox_id: sandbox.id.clone(),
            org_id: sandbox.org_id.clone(),
            command: request.command.clone(),
            cwd: cwd.clone(),
            env: env_json,
            background: request.background,
            status: String::from("running"),
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_dropped: 0,
            stderr_dropped: 0,
            timeout_ms: request.timeout_ms,
            created_at: now,
            started_at: None,
            ended_at: None,
            cancel_requested_at: None,
            error: None,
            created_by_key: principal.key_id.clone(),
            collect: (!request.collect.is_empty())
                .then(|| serde_json::to_string(&request.collect).unwrap_or_default()),
            collected: None,
        };
        {
            let record = record.clone();
            self.store.call(move |s| s.insert_command(&record)).await?;
        }

        let mut env = vec![
            (String::from("PATH"), String::from(DEFAULT_PATH)),
            (String::from("HOME"), String::from(WORKSPACE)),
            (String::from("USER"), template.user_name.clone()),
            (String::from("LANG"), String::from("C.UTF-8")),
            (String::from("CROWNEST_SANDBOX_ID"), sandbox.id.clone()),
        ];
        for (key, value) in request.env {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        }
        let exec = ExecRequest {
            argv: vec![String::from("/bin/sh"), String::from("-c"), request.command],
            cwd,
            env,
            user: Some(ExecUser {
                uid: template.user.uid,
                gid: template.user.gid,
            }),
            timeout_ms: request.timeout_ms.map(|t| t as u64),
            stdin: request.stdin,
        };

        let live = Arc::new(LiveCommand {
            id: record.id.clone(),
            sandbox_id: sandbox.id.clone(),
            record,
            stdin_open: request.stdin,
            output_limit,
            collect: request.collect.clone(),
            creator: Principal {
                key_id: principal.key_id.clone(),
                org_id: sandbox.org_id.clone(),
                project_id: sandbox.project_id.clone(),
                scopes: Vec::new(),
            },
            state: Mutex::new(LiveState {
                next_seq: 1,
                ..LiveState::default()
            }),
            changed: watch::channel(0).0,
            input: Mutex::new(None),
        });
        lock(&self.running).insert(live.id.clone(), live.clone());
        let mut changes = live.changed.subscribe();
        let host = self.clone();
        let driven = live.clone();
        tokio::spawn(async move { host.drive_command(driven, live_sandbox, exec).await });

        // Wait for the start (background) or the end.
        loop {
            {
                let state = lock(&live.state);
                if let Some(done) = &state.finished {
                    return Ok(done.clone());
                }
                if request.background && state.started_at.is_some() {
                    break;
                }
            }
            if changes.changed().await.is_err() {
                break;
            }
        }
        Ok(live.snapshot())
    }

    async fn drive_command(
        self: Arc<Self>,
        live: Arc<LiveCommand>,
        sandbox: Arc<LiveSandbox>,
        exec: ExecRequest,
    ) {
        let limits = self.config.limits.clone();
        let outcome = async {
            let mut session = sandbox.agent.exec(exec).await?;
            *lock(&live.input) = Some(session.input());
            let mut flush = tokio::time::interval(FLUSH_INTERVAL);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let event = tokio::select! {
                    event = session.next_event() => event,
                    _ = flush.tick() => {
                        self.flush_log(&live).await;
                        continue;
                    }
                    _ = sandbox.stopping.cancelled() => {
                        return Ok::<_, CoreError>(Ending::Lost(String::from("the sandbox was destroyed")));
                    }
                };
                match event {
                    None => {
                        return Ok(Ending::Lost(String::from(
                            "the sandbox agent closed the command stream",
                        )));
                    }
                    Some(Err(e)) => return Ok(Ending::Lost(format!("lost the sandbox agent: {e}"))),
                    Some(Ok(ExecEvent::Started { .. })) => {
                        let now = self.clock.now_ms();
                        lock(&live.state).started_at = Some(now);
                        // Written beside the run, not before its next event:
                        // the end record carries `started_at` as well, and
                        // whichever lands second keeps the first.
                        let id = live.id.clone();
                        let store = self.store.clone();
                        tokio::spawn(async move {
                            if let Err(e) = store.call(move |s| s.mark_command_started(&id, now)).await {
                                tracing::error!(error = %e, "could not record a command start");
                            }
                        });
                        live.bump();
                    }
                    Some(Ok(ExecEvent::Stdout(data))) => {
                        self.record_output(&live, "stdout", &data, &limits);
                    }
                    Some(Ok(ExecEvent::Stderr(data))) => {
                        self.record_output(&live, "stderr", &data, &limits);
                    }
                    Some(Ok(ExecEvent::Exited {
                        code,
                        signal,
                        timed_out,
                    })) => {
                        return Ok(Ending::Exited {
                            code,
                            signal,
                            timed_out,
                        });
                    }
                    Some(Ok(ExecEvent::SpawnFailed { message })) => {
                        lock(&live.state).spawn_error = Some(message.clone());
                        return Ok(Ending::SpawnFailed(message));
                    }
                }
                if lock(&live.state).unflushed_bytes >= FLUSH_BYTES {
                    self.flush_log(&live).await;
                }
            }
        }
        .await;
        let ending = outcome.unwrap_or_else(|e| Ending::Lost(e.to_string()));
        let collected = if live.collect.is_empty() {
            None
        } else if matches!(ending, Ending::Exited { .. }) {
            let results = self
                .collect_artifacts(&live.creator, &live.sandbox_id, &live.collect)
                .await;
            Some(results)
        } else {
            Some(
                live.collect
                    .iter()
                    .map(|c| Collected {
                        path: c.path.clone(),
                        name: c.name.clone().unwrap_or_default(),
                        artifact_id: None,
                        error: Some(String::from(
                            "the command did not run, so nothing was collected",
                        )),
                    })
                    .collect(),
            )
        };
        let collected = collected.map(|c| serde_json::to_string(&c).unwrap_or_default());
        self.finish_command(&live, ending, collected).await;
    }

    fn record_output(
        &self,
        live: &LiveCommand,
        kind: &str,
        data: &[u8],
        limits: &crate::config::Limits,
    ) {
        let now = self.clock.now_ms();
        let mut guard = lock(&live.state);
        let state = &mut *guard;
        let (tail, carry) = if kind == "stdout" {
            (&mut state.stdout, &mut state.stdout_carry)
        } else {
            (&mut state.stderr, &mut state.stderr_carry)
        };
        tail.push(data, live.output_limit);
        let text = carry.split(data);
        if text.is_empty() {
            return;
        }
        push_event(state, &live.id, kind, text, now, limits.log_retention_bytes);
        drop(guard);
        live.bump();
    }

    /// Writes buffered log events (and pending retention trims) to the store.
    async fn flush_log(&self, live: &LiveCommand) {
        let (events, trim) = {
            let mut state = lock(&live.state);
            state.unflushed_bytes = 0;
            (std::mem::take(&mut state.unflushed), state.trim_from.take())
        };
        if events.is_empty() && trim.is_none() {
            return;
        }
        let id = live.id.clone();
        let result = self
            .store
            .call(move |s| {
                s.append_command_events(&events)?;
                if let Some(keep_from) = trim {
                    s.trim_command_events(&id, keep_from)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::error!(command = %live.id, error = %e, "could not write command log");
        }
    }

    async fn finish_command(&self, live: &LiveCommand, ending: Ending, collected: Option<String>) {
        let now = self.clock.now_ms();
        let limits = &self.config.limits;
        let (end, events, trim) = {
            let mut guard = lock(&live.state);
            let state = &mut *guard;
            for kind in ["stdout", "stderr"] {
                let rest = if kind == "stdout" {
                    state.stdout_carry.finish()
                } else {
                    state.stderr_carry.finish()
                };
                if !rest.is_empty() {
                    push_event(state, &live.id, kind, rest, now, limits.log_retention_bytes);
                }
            }
            let (status, exit_code, signal, error) = match &ending {
                Ending::Exited { .. } if state.canceled => ("canceled", None, None, None),
                Ending::Exited {
                    timed_out: true,
                    signal,
                    ..
                } => (
                    "timed_out",
                    None,
                    signal.map(i64::from),
                    Some(String::from(
                        "the command exceeded its timeout and was killed",
                    )),
                ),
                Ending::Exited { code, signal, .. } => (
                    "completed",
                    code.map(i64::from),
                    signal.map(i64::from),
                    None,
                ),
                Ending::SpawnFailed(message) => ("failed", None, None, Some(message.clone())),
                Ending::Lost(message) => ("failed", None, None, Some(message.clone())),
            };
            let end = CommandEnd {
                status: status.to_string(),
                started_at: state.started_at,
                exit_code,
                signal,
                stdout: state.stdout.to_vec(),
                stderr: state.stderr.to_vec(),
                stdout_dropped: state.stdout.dropped,
                stderr_dropped: state.stderr.dropped,
                ended_at: now,
                error,
                collected,
            };
            let exit = serde_json::json!({
                "status": end.status,
                "exitCode": end.exit_code,
                "signal": end.signal,
                "error": end.error,
            });
            push_event(
                state,
                &live.id,
                "exit",
                exit.to_string().into_bytes(),
                now,
                limits.log_retention_bytes,
            );
            state.unflushed_bytes = 0;
            (
                end,
                std::mem::take(&mut state.unflushed),
                state.trim_from.take(),
            )
        };
        let id = live.id.clone();
        let stored = {
            let end = end.clone();
            self.store
                .call(move |s| {
                    s.finish_command(&id, &end, &events)?;
                    if let Some(keep_from) = trim {
                        s.trim_command_events(&id, keep_from)?;
                    }
                    Ok(())
                })
                .await
        };
        if let Err(e) = stored {
            tracing::error!(command = %live.id, error = %e, "could not record the end of a command");
        }
        {
            let mut state = lock(&live.state);
            let started_at = state.started_at;
            state.finished = Some(CommandRow {
                status: end.status,
                exit_code: end.exit_code,
                signal: end.signal,
                stdout: end.stdout,
                stderr: end.stderr,
                stdout_dropped: end.stdout_dropped,
                stderr_dropped: end.stderr_dropped,
                started_at,
                ended_at: Some(end.ended_at),
                error: end.error,
                collected: end.collected,
                cancel_requested_at: state
                    .canceled
                    .then_some(now)
                    .or(live.record.cancel_requested_at),
                ..live.record.clone()
            });
        }
        lock(&self.running).remove(&live.id);
        live.bump();
    }

    /// Waits (bounded) until no command of the sandbox is running.
    pub(crate) async fn wait_for_commands_of(&self, sandbox_id: &str, limit: Duration) {
        let commands: Vec<Arc<LiveCommand>> = lock(&self.running)
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect();
        let all = async {
            for live in commands {
                let mut changes = live.changed.subscribe();
                while lock(&live.state).finished.is_none() {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!(sandbox = %sandbox_id, "commands did not end in time after destroy");
        }
    }

    async fn command_of(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
    ) -> Result<(SandboxRow, CommandRow, Option<Arc<LiveCommand>>), CoreError> {
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let not_found = || CoreError::NotFound {
            kind: "command",
            id: command_id.to_string(),
        };
        if !ids::is_valid(ids::Kind::Command, command_id) {
            return Err(not_found());
        }
        let live = lock(&self.running)
            .get(command_id)
            .filter(|c| c.sandbox_id == sandbox.id)
            .cloned();
        if let Some(live) = live {
            let row = live.snapshot();
            return Ok((sandbox, row, Some(live)));
        }
        let (sid, cid) = (sandbox.id.clone(), command_id.to_string());
        let row = self
            .store
            .call(move |s| s.get_command(&sid, &cid))
            .await?
            .ok_or_else(not_found)?;
        Ok((sandbox, row, None))
    }

    pub async fn get_command(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
    ) -> Result<CommandRow, CoreError> {
        Ok(self.command_of(principal, sandbox_id, command_id).await?.1)
    }

    pub async fn list_commands(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<CommandRow>, CoreError> {
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let mut rows = self
            .store
            .call(move |s| s.list_commands(&sandbox.id, after.as_ref(), limit))
            .await?;
        let running = lock(&self.running);
        for row in &mut rows {
            if let Some(live) = running.get(&row.id) {
                *row = live.snapshot();
            }
        }
        Ok(rows)
    }

    /// The log of a command from after event `after` on: recorded events
    /// first, then live ones until the command ends.
    pub async fn command_log(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
        after: i64,
    ) -> Result<CommandLog, CoreError> {
        let (_, row, live) = self.command_of(principal, sandbox_id, command_id).await?;
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last = after;
            if let Some(live) = live {
                let mut changes = live.changed.subscribe();
                loop {
                    let (events, finished) = live.events_after(last);
                    for event in events {
                        last = event.seq;
                        if tx.send(Ok(to_log_event(event))).await.is_err() {
                            return;
                        }
                    }
                    if finished || changes.changed().await.is_err() {
                        // The exit event is in memory once `finished` is set.
                        let (events, _) = live.events_after(last);
                        for event in events {
                            if tx.send(Ok(to_log_event(event))).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                }
            }
            loop {
                let id = row.id.clone();
                let page = match store.call(move |s| s.command_events(&id, last, 256)).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if page.is_empty() {
                    return;
                }
                for event in page {
                    last = event.seq;
                    if tx.send(Ok(to_log_event(event))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn running_command(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
    ) -> Result<(Arc<LiveCommand>, ExecInput), CoreError> {
        let (sandbox, row, live) = self.command_of(principal, sandbox_id, command_id).await?;
        if sandbox.status == "destroyed" {
            return Err(CoreError::SandboxDestroyed(sandbox.id));
        }
        let not_running = || CoreError::CommandNotRunning(row.id.clone());
        let live = live.ok_or_else(not_running)?;
        let input = lock(&live.input).clone().ok_or_else(not_running)?;
        if lock(&live.state).finished.is_some() {
            return Err(not_running());
        }
        Ok((live, input))
    }

    pub async fn command_stdin(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
        data: Vec<u8>,
        close: bool,
    ) -> Result<CommandRow, CoreError> {
        let (live, input) = self
            .running_command(principal, sandbox_id, command_id)
            .await?;
        if !live.stdin_open {
            return Err(CoreError::StdinNotOpen(live.id.clone()));
        }
        if !data.is_empty() {
            input.stdin(data).await?;
        }
        if close {
            input.close_stdin().await?;
        }
        Ok(live.snapshot())
    }

    pub async fn command_signal(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
        signal: i32,
    ) -> Result<CommandRow, CoreError> {
        let (live, input) = self
            .running_command(principal, sandbox_id, command_id)
            .await?;
        input.signal(signal).await?;
        Ok(live.snapshot())
    }

    /// Cancels a running command: records the request, kills its process
    /// group, and the command ends as `canceled`.
    pub async fn cancel_command(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        command_id: &str,
    ) -> Result<CommandRow, CoreError> {
        let (live, input) = self
            .running_command(principal, sandbox_id, command_id)
            .await?;
        let now = self.clock.now_ms();
        let id = live.id.clone();
        self.store
            .call(move |s| s.request_command_cancel(&id, now))
            .await?;
        lock(&live.state).canceled = true;
        input.signal(libc::SIGKILL).await?;
        let mut changes = live.changed.subscribe();
        loop {
            if let Some(done) = &lock(&live.state).finished {
                return Ok(done.clone());
            }
            if changes.changed().await.is_err() {
                return Ok(live.snapshot());
            }
        }
    }
}

/// How a command's process ended, as the driver saw it.
enum Ending {
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    SpawnFailed(String),
    /// The agent or sandbox went away.
    Lost(String),
}

fn push_event(
    state: &mut LiveState,
    command_id: &str,
    kind: &str,
    data: Vec<u8>,
    at: Millis,
    retention: usize,
) {
    let event = CommandEventRow {
        command_id: command_id.to_string(),
        seq: state.next_seq,
        kind: kind.to_string(),
        data,
        at,
    };
    state.next_seq += 1;
    state.retained_bytes += event.data.len();
    state.unflushed_bytes += event.data.len();
    state.events.push_back(event.clone());
    state.unflushed.push(event);
    // Keep the tail of the log: drop the oldest events past the limit (the
    // exit event is always kept).
    while state.retained_bytes > retention && state.events.len() > 1 {
        if let Some(old) = state.events.pop_front() {
            state.retained_bytes -= old.data.len();
            state.trim_from = Some(old.seq + 1);
        }
    }
}

fn to_log_event(row: CommandEventRow) -> LogEvent {
    LogEvent {
        seq: row.seq,
        kind: row.kind,
        data: row.data,
    }
}

/// Commands run in /workspace unless told otherwise; a relative cwd is
/// relative to /workspace. The agent checks that it exists.
pub(crate) fn resolve_cwd(cwd: Option<&str>) -> Result<String, CoreError> {
    let cwd = match cwd {
        None | Some("") => return Ok(String::from(WORKSPACE)),
        Some(c) => c,
    };
    if cwd.contains('\0') || cwd.len() > 4096 {
        return Err(CoreError::invalid("cwd", "cwd must be a path without NUL"));
    }
    if cwd.starts_with('/') {
        Ok(cwd.to_string())
    } else {
        Ok(format!("{WORKSPACE}/{cwd}"))
    }
}

pub(crate) fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        && name.len() <= 256
}

/// Parses a signal given by name (`SIGTERM`, `TERM`) or number.
pub fn parse_signal(text: &str) -> Option<i32> {
    let upper = text.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return SIGNALS.iter().find(|(_, s)| *s == n).map(|(_, s)| *s);
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_dropped() {
        let mut tail = Tail::default();
        tail.push(b"hello ", 8);
        tail.push(b"world", 8);
        assert_eq!(tail.to_vec(), b"lo world");
        assert_eq!(tail.dropped, 3);
    }

    #[test]
    fn utf8_carry_never_splits_a_character() {
        let text = "héllo wörld €".as_bytes();
        for split in 0..text.len() {
            let mut carry = Utf8Carry::default();
            let mut out = carry.split(&text[..split]);
            assert!(std::str::from_utf8(&out).is_ok(), "split at {split}");
            out.extend(carry.split(&text[split..]));
            out.extend(carry.finish());
            assert_eq!(out, text);
        }
    }

    #[test]
    fn utf8_carry_passes_invalid_bytes_through() {
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.split(&[0xff, b'a']), vec![0xff, b'a']);
    }

    #[test]
    fn retention_drops_oldest_events_but_keeps_the_newest() {
        let mut state = LiveState {
            next_seq: 1,
            ..LiveState::default()
        };
        for _ in 0..10 {
            push_event(&mut state, "cmd", "stdout", vec![b'x'; 100], 0, 350);
        }
        assert!(state.retained_bytes <= 350);
        assert_eq!(state.events.back().map(|e| e.seq), Some(10));
        assert_eq!(state.trim_from, Some(8));
    }

    #[test]
    fn cwd_defaults_to_workspace_and_relative_paths_resolve_under_it() {
        assert_eq!(resolve_cwd(None).expect("cwd"), "/workspace");
        assert_eq!(resolve_cwd(Some("src")).expect("cwd"), "/workspace/src");
        assert_eq!(resolve_cwd(Some("/tmp")).expect("cwd"), "/tmp");
        assert!(resolve_cwd(Some("a\0b")).is_err());
    }

    #[test]
    fn env_names_are_validated() {
        assert!(valid_env_name("FOO_1"));
        assert!(valid_env_name("_x"));
        assert!(!valid_env_name("1FOO"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }

    #[test]
    fn signals_parse_by_name_and_number_from_the_allow_list() {
        assert_eq!(parse_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("int"), Some(libc::SIGINT));
        assert_eq!(parse_signal("9"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("SIGSEGV"), None);
        assert_eq!(parse_signal("64"), None);
    }
}
