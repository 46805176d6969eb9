//! Commands: processes started through the agent, recorded durably with
//! their output log.
//!
//! - `validate.rs`: a request becomes a [`ValidRunCommand`] before any I/O;
//! - `live.rs`: the [`LiveCommand`] of a running process and its driver;
//! - `log.rs`: the in-memory log (coalescing, retention, resume points).
//!
//! Log readers resume by event sequence number: recorded events first,
//! then live ones, without gaps or repeats.

mod live;
mod log;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use crownest_proto::{DEFAULT_PATH, ExecRequest, ExecUser, WORKSPACE};
use tokio::sync::mpsc;

pub(crate) use live::Begin;
pub use live::LiveCommand;
pub(crate) use log::Tail;
pub use log::{LogEvent, Retention};
pub use validate::{
    MAX_COLLECT_ITEMS, RunCommand, SIGNALS, ValidRunCommand, parse_signal, resolve_cwd,
    resolve_cwd_in, valid_env_name, validate_env,
};

use super::{CoreError, Host, lock};
use crate::agent::ExecInput;
use crate::auth::Principal;
use crate::ids;
use crate::model::{CommandStatus, SandboxStatus};
use crate::store::{CommandRow, Cursor, Quota, SandboxRow};

/// A stream of log events, ending after the exit event.
pub type CommandLog = mpsc::Receiver<Result<LogEvent, CoreError>>;

/// How many recorded events a log reader fetches from the store at once.
const STORE_PAGE: usize = 256;

impl Host {
    /// Starts a command. Returns when it started (`background`) or ended.
    /// `quota` is the org's quota when the caller read it already.
    pub async fn run_command(
        self: &Arc<Self>,
        principal: &Principal,
        sandbox_id: &str,
        request: RunCommand,
        quota: Option<Quota>,
    ) -> Result<CommandRow, CoreError> {
        let limits = &self.config.limits;
        let request = request.validate(limits)?;
        let (sandbox, live_sandbox) = self.usable_sandbox(principal, sandbox_id).await?;
        if !request.collect.is_empty() && !principal.has_scope("artifacts:create") {
            return Err(CoreError::MissingScope("artifacts:create"));
        }
        let max = limits.max_running_commands_per_sandbox;
        if self.running_commands_of(&sandbox.id) >= max {
            return Err(CoreError::SandboxBusy {
                sandbox_id: sandbox.id.clone(),
                what: "running commands",
                max,
            });
        }
        let template = live_sandbox.template.clone();
        let mut request = request;
        request.cwd = resolve_cwd_in(request.raw_cwd.as_deref(), &template.workdir)?;
        // The agent stream comes first: a busy sandbox refuses the request
        // before anything is recorded.
        let stream = live_sandbox.agent.reserve().await.map_err(|e| match e {
            crate::agent::AgentError::Busy => CoreError::SandboxBusy {
                sandbox_id: sandbox.id.clone(),
                what: "operations in flight",
                max: limits.max_agent_streams,
            },
            other => CoreError::Agent(other),
        })?;
        let quota = match quota {
            Some(quota) => quota,
            None => self.quota(&sandbox.org_id).await?,
        };
        let output_limit = self.output_limit(&quota);
        let command_id = ids::new(ids::Kind::Command);
        let now = self.clock.now_ms();
        let record = CommandRow {
            id: command_id.clone(),
            sandbox_id: sandbox.id.clone(),
            org_id: sandbox.org_id.clone(),
            command: request.command.clone(),
            cwd: request.cwd.clone(),
            env: request.env.clone(),
            background: request.background,
            status: CommandStatus::Running,
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_dropped: 0,
            stderr_dropped: 0,
            timeout_ms: request.timeout_ms.map(|t| t as i64),
            created_at: now,
            started_at: None,
            ended_at: None,
            cancel_requested_at: None,
            error: None,
            created_by_key: principal.key_id.clone(),
            collect: request.collect.clone(),
            collected: None,
            stdin: request.stdin,
            stdout_offset: 0,
            stderr_offset: 0,
        };
        let exec = exec_request(
            &command_id,
            &sandbox,
            &template,
            &live_sandbox.env,
            &request,
        );
        let creator = Principal {
            key_id: principal.key_id.clone(),
            org_id: sandbox.org_id.clone(),
            project_id: sandbox.project_id.clone(),
            scopes: principal.scopes.clone(),
        };
        let live = Arc::new(LiveCommand::new(
            record.clone(),
            output_limit,
            creator,
            self.log_retention(),
        ));
        // The org's quota of running commands is checked and taken in one
        // step, before the record exists.
        {
            let mut running = lock(&self.running);
            if let Some(max) = quota.max_concurrent_commands {
                let current = running
                    .values()
                    .filter(|c| c.org_id() == sandbox.org_id && !c.is_finished())
                    .count() as i64;
                if current >= max {
                    return Err(CoreError::QuotaExceeded {
                        limit: "maxConcurrentCommands",
                        max,
                        current,
                    });
                }
            }
            running.insert(live.id.clone(), live.clone());
        }
        if let Err(e) = self.store.call(move |s| s.insert_command(&record)).await {
            lock(&self.running).remove(&live.id);
            return Err(e.into());
        }
        let mut changes = live.changed.subscribe();
        let host = self.clone();
        let driven = live.clone();
        tokio::spawn(async move {
            host.drive_command(driven, live_sandbox, stream, Begin::Exec(exec))
                .await
        });

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

    /// Tail kept per output stream: the host limit, or the org's quota
    /// when that is lower.
    pub(crate) fn output_limit(&self, quota: &Quota) -> usize {
        let limit = self.config.limits.output_tail_bytes;
        quota
            .max_command_output_bytes
            .map_or(limit, |q| (q.max(0) as usize).min(limit))
    }

    pub(crate) fn log_retention(&self) -> Retention {
        Retention {
            bytes: self.config.limits.log_retention_bytes,
            events: self.config.limits.log_retention_events,
        }
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
                while !live.is_finished() {
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

    /// Running commands of a sandbox, for limits.
    pub(crate) fn running_commands_of(&self, sandbox_id: &str) -> usize {
        lock(&self.running)
            .values()
            .filter(|c| c.sandbox_id == sandbox_id && !c.is_finished())
            .count()
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
            let send_page = |page: Vec<crate::store::CommandEventRow>, last: &mut i64| {
                let tx = tx.clone();
                let mut out = Vec::with_capacity(page.len());
                for event in page {
                    *last = event.seq;
                    out.push(LogEvent::from(event));
                }
                async move {
                    for event in out {
                        if tx.send(Ok(event)).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            };
            if let Some(live) = live {
                let mut changes = live.changed.subscribe();
                loop {
                    let (events, first, finished) = live.events_after(last);
                    // Events older than what memory holds (a reader far
                    // behind, or a command taken over after a restart) come
                    // from the store first.
                    if let Some(first) = first
                        && first > last + 1
                    {
                        let id = row.id.clone();
                        let from = last;
                        let page = match store
                            .call(move |s| s.command_events(&id, from, STORE_PAGE))
                            .await
                        {
                            Ok(page) => page,
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        };
                        let older: Vec<_> = page.into_iter().filter(|e| e.seq < first).collect();
                        if older.is_empty() {
                            last = first - 1;
                        } else if !send_page(older, &mut last).await {
                            return;
                        }
                        continue;
                    }
                    if !events.is_empty() {
                        if !send_page(events, &mut last).await {
                            return;
                        }
                        continue;
                    }
                    if finished || changes.changed().await.is_err() {
                        // The exit event is in memory once `finished` is set.
                        let (events, _, _) = live.events_after(last);
                        let _ = send_page(events, &mut last).await;
                        return;
                    }
                }
            }
            loop {
                let id = row.id.clone();
                let from = last;
                let page = match store
                    .call(move |s| s.command_events(&id, from, STORE_PAGE))
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if page.is_empty() || !send_page(page, &mut last).await {
                    return;
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
        if sandbox.status == SandboxStatus::Destroyed {
            return Err(CoreError::SandboxDestroyed(sandbox.id));
        }
        let not_running = || CoreError::CommandNotRunning(row.id.clone());
        let live = live.ok_or_else(not_running)?;
        let input = lock(&live.input).clone().ok_or_else(not_running)?;
        if live.is_finished() {
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

    /// Cancels a running command: records the request, kills everything
    /// it started, and the command ends as `canceled`.
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
        input.kill_all().await?;
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

/// The agent request of a command. Its environment, each layer overriding
/// the one before: the defaults, the egress proxy, the template's `env`,
/// the sandbox's `env`, the request's `env`.
fn exec_request(
    command_id: &str,
    sandbox: &SandboxRow,
    template: &crate::templates::Template,
    sandbox_env: &[(String, String)],
    request: &ValidRunCommand,
) -> ExecRequest {
    let mut env = vec![
        (String::from("PATH"), String::from(DEFAULT_PATH)),
        (String::from("HOME"), String::from(WORKSPACE)),
        (String::from("USER"), template.user_name.clone()),
        (String::from("LANG"), String::from("C.UTF-8")),
        (String::from("CROWNEST_SANDBOX_ID"), sandbox.id.clone()),
    ];
    env.extend(crate::core::egress::proxy_env(template));
    for (key, value) in template.env.iter().chain(sandbox_env).chain(&request.env) {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    ExecRequest {
        id: command_id.to_string(),
        argv: vec![
            String::from("/bin/sh"),
            String::from("-c"),
            request.command.clone(),
        ],
        cwd: request.cwd.clone(),
        env,
        user: Some(ExecUser {
            uid: template.user.uid,
            gid: template.user.gid,
        }),
        timeout_ms: request.timeout_ms,
        stdin: request.stdin,
    }
}
