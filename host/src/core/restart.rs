//! Surviving a host restart. A host process that stops (SIGTERM, a crash,
//! kill -9, a deploy) leaves its sandboxes running; the next one takes each
//! over when its container still runs and its agent answers: same id, same
//! state, its code contexts, and its running commands, whose output the
//! agent held while no host read it ([`crownest_proto::ExecInput::Ack`]).
//! What cannot be taken over is destroyed and tombstoned `host_restart`.
//!
//! TTLs are absolute times, so they keep counting across the outage (the
//! reaper destroys what expired meanwhile on its first pass); metering runs
//! to the last heartbeat, so a sandbox taken over is metered through the
//! outage and one that died in it up to the previous process's last pass.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crownest_proto::ExecAttach;
use tokio_util::sync::CancellationToken;

use super::code::CodeContext;
use super::commands::{Begin, LiveCommand, Tail};
use super::{CoreError, Host, LiveSandbox, ledger, lock, slots};
use crate::auth::Principal;
use crate::model::{EndReason, SandboxStatus};
use crate::store::{CommandEnd, CommandRow, SandboxRow};

/// How long the whole take-over may take before the sandboxes that have
/// not answered are given up.
pub const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Host::reconcile`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Sandboxes taken over, by id.
    pub adopted: Vec<String>,
    /// Sandboxes destroyed because they could not be, with why.
    pub destroyed: Vec<(String, String)>,
    /// Running commands taken over.
    pub commands: usize,
}

impl Host {
    /// Brings the runtime in line with the store after a start: every
    /// sandbox the store thinks is alive is taken over if its container
    /// runs and its agent answers within [`ADOPT_TIMEOUT`]; the others are
    /// destroyed and tombstoned, their running commands failed. Containers
    /// the store does not know are destroyed. Nothing is left orphaned.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Reconciled, CoreError> {
        let rows = self.store.call(|s| s.live_sandboxes()).await?;
        let attempts = rows.iter().map(|row| async move {
            let result = match tokio::time::timeout(ADOPT_TIMEOUT, self.adopt(row)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "its agent did not answer within {} s",
                    ADOPT_TIMEOUT.as_secs()
                )),
            };
            (row, result)
        });
        let mut report = Reconciled::default();
        for (row, result) in futures::future::join_all(attempts).await {
            match result {
                Ok(commands) => {
                    tracing::info!(sandbox = %row.id, commands, "took over a sandbox left by a previous host process");
                    report.adopted.push(row.id.clone());
                    report.commands += commands;
                }
                Err(reason) => {
                    tracing::info!(sandbox = %row.id, %reason, "destroying a sandbox left by a previous host process");
                    self.give_up(row).await?;
                    report.destroyed.push((row.id.clone(), reason));
                }
            }
        }
        let started_at = self.started_at;
        self.store
            .call(move |s| {
                s.purge_idempotent(started_at - ledger::IDEMPOTENCY_TTL_MS, Some(started_at))
            })
            .await?;
        let kept: HashSet<&String> = report.adopted.iter().collect();
        for driver in self.runtimes.drivers() {
            for id in driver.list().await? {
                if kept.contains(&id) {
                    continue;
                }
                let state_dir = self.state_dir(&id);
                tracing::info!(container = %id, runtime = driver.name(), "destroying unknown container");
                if let Err(e) = driver.destroy(&id, &state_dir).await {
                    tracing::warn!(container = %id, error = %e, "could not destroy unknown container");
                }
            }
        }
        Ok(report)
    }

    /// Takes one sandbox over; `Ok(commands taken over)`, or why not. On
    /// `Err` nothing of it is in memory.
    async fn adopt(self: &Arc<Self>, row: &SandboxRow) -> Result<usize, String> {
        if row.status != SandboxStatus::Running {
            return Err(String::from("it was still starting"));
        }
        let driver = self
            .runtimes
            .driver(&row.runtime)
            .ok_or_else(|| format!("this host has no `{}` runtime", row.runtime))?;
        // The slot's lock went with the previous process; a runc sandbox
        // still runs as its range's uids, so no other host may have taken
        // it (they look for processes in a range before they take it).
        let slot = match slots::try_hold(&self.slot_dir, row.uid_slot)
            .map_err(|e| format!("cannot hold its uid slot: {e}"))?
        {
            Some(lock) => Some(lock),
            // gVisor sandboxes run as no host uid: sharing the number is
            // harmless.
            None if !driver.uses_host_uid_range() => None,
            None => return Err(String::from("another process holds its uid slot")),
        };
        let state_dir = self.state_dir(&row.id);
        let started = driver
            .adopt(&row.id, &state_dir)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("its container is no longer running")?;
        let agent = super::sandboxes::connect_agent(
            started.channel.as_ref(),
            ADOPT_TIMEOUT,
            &self.config.limits,
        )
        .await
        .map_err(|e| e.to_string())?;
        let execs = agent.exec_list().await.map_err(|e| e.to_string())?;
        let alive = agent.context_list().await.map_err(|e| e.to_string())?;
        let id = row.id.clone();
        let (contexts, commands) = self
            .store
            .call(move |s| Ok((s.contexts_of(&id)?, s.running_commands(&id)?)))
            .await
            .map_err(|e| e.to_string())?;

        // The version it started with is gone with the old process: it runs
        // on under the current template of its name.
        let template = Arc::new(
            self.template(&row.template)
                .map_err(|_| format!("its template `{}` no longer exists", row.template))?,
        );
        let env = self
            .open_sandbox_env(row)
            .await
            .map_err(|e| format!("cannot open its environment: {e}"))?;
        let mut live = LiveSandbox {
            id: row.id.clone(),
            row: row.clone(),
            template,
            env,
            slot: std::sync::Mutex::new(slot),
            agent,
            channel: started.channel,
            state_dir,
            stopping: CancellationToken::new(),
            egress: None,
        };
        live.egress = self.start_egress(&live);
        let sandbox = Arc::new(live);
        let (kept, gone): (Vec<_>, Vec<_>) =
            contexts.into_iter().partition(|c| alive.contains(&c.id));
        for context in gone {
            let id = context.id;
            if let Err(e) = self.store.call(move |s| s.delete_context(&id)).await {
                tracing::warn!(error = %e, "could not forget a dead code context");
            }
        }
        self.adopt_contexts(kept.into_iter().filter_map(CodeContext::from_row).collect());
        lock(&self.live).insert(row.id.clone(), sandbox.clone());

        let mut resumed = 0;
        for command in commands {
            if execs.iter().any(|e| e.id == command.id) {
                match self.resume_command(command, &sandbox).await {
                    Ok(()) => resumed += 1,
                    Err(e) => {
                        tracing::warn!(sandbox = %row.id, error = %e, "could not take over a command")
                    }
                }
            } else {
                self.end_lost_command(command).await;
            }
        }
        Ok(resumed)
    }

    /// Takes over one running command: rebuilds its record's tails and log
    /// position from the store and attaches to its process where the
    /// recorded output ends.
    async fn resume_command(
        self: &Arc<Self>,
        record: CommandRow,
        sandbox: &Arc<LiveSandbox>,
    ) -> Result<(), CoreError> {
        let quota = self.quota(&record.org_id).await?;
        let output_limit = self.output_limit(&quota);
        let key_id = record.created_by_key.clone();
        let key = self.store.call(move |s| s.get_key(&key_id)).await?;
        // Collection acts for the key that ran the command; a key revoked
        // since collects nothing.
        let creator = Principal {
            key_id: record.created_by_key.clone(),
            org_id: sandbox.row.org_id.clone(),
            project_id: sandbox.row.project_id.clone(),
            scopes: key
                .filter(|k| k.revoked_at.is_none())
                .map(|k| k.scopes)
                .unwrap_or_default(),
        };
        let (next_seq, tails) = self.recorded_output(&record.id, output_limit).await?;
        let attach = ExecAttach {
            id: record.id.clone(),
            stdout_from: u64::try_from(record.stdout_offset).unwrap_or(0),
            stderr_from: u64::try_from(record.stderr_offset).unwrap_or(0),
        };
        let (stdout_offset, stderr_offset) = (record.stdout_offset, record.stderr_offset);
        let (mut stdout, mut stderr) = tails;
        // The tails hold what the log holds; the rest was dropped.
        stdout.dropped = stdout_offset.saturating_sub(stdout.len() as i64).max(0);
        stderr.dropped = stderr_offset.saturating_sub(stderr.len() as i64).max(0);
        let live = Arc::new(LiveCommand::resume(
            record,
            output_limit,
            creator,
            self.log_retention(),
            next_seq,
            (stdout, stderr),
        ));
        let stream = sandbox.agent.reserve().await?;
        lock(&self.running).insert(live.id.clone(), live.clone());
        let host = self.clone();
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            host.drive_command(live, sandbox, stream, Begin::Attach(attach))
                .await
        });
        Ok(())
    }

    /// The next log seq of a command and the tails of its recorded output.
    async fn recorded_output(
        &self,
        command_id: &str,
        limit: usize,
    ) -> Result<(i64, (Tail, Tail)), CoreError> {
        let mut tails = (Tail::default(), Tail::default());
        let mut after = 0;
        loop {
            let id = command_id.to_string();
            let page = self
                .store
                .call(move |s| s.command_events(&id, after, 256))
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for event in page {
                if let crate::store::LogBody::Output { stream, data } = event.body {
                    match stream {
                        crate::model::OutputStream::Stdout => tails.0.push(&data, limit),
                        crate::model::OutputStream::Stderr => tails.1.push(&data, limit),
                    }
                }
            }
        }
        let id = command_id.to_string();
        let last = self
            .store
            .call(move |s| s.last_command_event_seq(&id))
            .await?;
        Ok((last.max(after) + 1, tails))
    }

    /// Ends a command whose process the agent no longer holds.
    async fn end_lost_command(&self, record: CommandRow) {
        let now = self.clock.now_ms();
        let end = CommandEnd {
            status: crate::model::CommandStatus::Failed,
            started_at: record.started_at,
            exit_code: None,
            signal: None,
            stdout: record.stdout,
            stderr: record.stderr,
            stdout_dropped: record.stdout_dropped,
            stderr_dropped: record.stderr_dropped,
            ended_at: now,
            error: Some(String::from(
                "the command's process was lost while the host was down",
            )),
            collected: None,
        };
        let id = record.id.clone();
        if let Err(e) = self
            .store
            .call(move |s| s.finish_command(&id, &end, &[]))
            .await
        {
            tracing::warn!(command = %record.id, error = %e, "could not end a lost command");
        }
    }

    /// Destroys and tombstones a sandbox that could not be taken over.
    async fn give_up(&self, row: &SandboxRow) -> Result<(), CoreError> {
        // A take-over that timed out half way may have put it in memory.
        if let Some(live) = lock(&self.live).remove(&row.id) {
            live.stopping.cancel();
        }
        self.drop_contexts_of(&row.id);
        let now = self.clock.now_ms();
        let state_dir = self.state_dir(&row.id);
        match self.runtimes.driver(&row.runtime) {
            Some(driver) => {
                if let Err(e) = driver.destroy(&row.id, &state_dir).await {
                    tracing::warn!(sandbox = %row.id, error = %e, "could not destroy leftover sandbox");
                }
            }
            None => {
                tracing::warn!(sandbox = %row.id, runtime = %row.runtime, "no driver to destroy a leftover sandbox")
            }
        }
        let id = row.id.clone();
        self.store
            .call(move |s| {
                s.fail_running_commands(&id, "the host restarted while the command ran", now)?;
                s.end_sandbox(&id, EndReason::HostRestart, now)
            })
            .await?;
        self.audit_system_destroy(&row.id, &row.org_id, EndReason::HostRestart)
            .await;
        Ok(())
    }
}
