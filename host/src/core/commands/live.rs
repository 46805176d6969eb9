//! A command whose process has not ended: one driver task per command reads
//! the agent's events, keeps the record's output tails, appends to the log
//! in memory (for live readers, woken through a watch channel) and flushes
//! it to the store in small batches. The end state and the last events
//! commit in one transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crownest_proto::{ExecAttach, ExecEvent, ExecRequest};
use tokio::sync::watch;
use tokio::time::Instant;

use super::log::{Log, Retention, Tail, Utf8Carry};
use crate::agent::ExecInput;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::core::{CoreError, Host, LiveSandbox, lock};
use crate::model::{CollectItem, Collected, CommandExit, CommandStatus, OutputStream};
use crate::store::{CommandEnd, CommandEventRow, CommandRow, LogBody, OutputProgress};

/// How long log events may wait in memory before they are written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(25);
/// Bytes of log that trigger an early flush.
const FLUSH_BYTES: usize = 256 * 1024;
/// How long output waits to be merged with what follows.
const COALESCE: Duration = Duration::from_millis(super::log::COALESCE_MS as u64);

#[derive(Debug)]
pub(super) struct LiveState {
    pub log: Log,
    pub stdout: Tail,
    pub stderr: Tail,
    stdout_carry: Utf8Carry,
    stderr_carry: Utf8Carry,
    pub started_at: Option<Millis>,
    pub canceled: bool,
    /// The final record, once the command ended and it is durable.
    pub finished: Option<CommandRow>,
    /// Bytes of stdout and stderr received from the agent, ever (a
    /// resumed command starts at what the store had).
    stdout_received: u64,
    stderr_received: u64,
    /// What the store has, as last written.
    recorded: OutputProgress,
    /// The newest log event the store has. Readers are served only
    /// events up to it: an event still only in memory could be numbered
    /// differently by the next host process after a crash, and a reader
    /// resuming after it would miss what it held.
    durable_seq: i64,
}

impl LiveState {
    /// How far the output is in log events (bytes held back as an
    /// incomplete UTF-8 character are not).
    fn progress(&self) -> OutputProgress {
        let at = |received: u64, carry: &Utf8Carry| {
            i64::try_from(received.saturating_sub(carry.len() as u64)).unwrap_or(i64::MAX)
        };
        OutputProgress {
            stdout_offset: at(self.stdout_received, &self.stdout_carry),
            stderr_offset: at(self.stderr_received, &self.stderr_carry),
        }
    }
}

/// How a driver reaches its command's process.
pub(crate) enum Begin {
    /// Start it.
    Exec(ExecRequest),
    /// Take over a process a previous host process started.
    Attach(ExecAttach),
}

/// A command whose process has not ended (or just ended).
pub struct LiveCommand {
    pub id: String,
    pub sandbox_id: String,
    pub(super) record: CommandRow,
    pub(super) stdin_open: bool,
    /// Tail kept per output stream: the host limit, or the org's quota when
    /// that is lower.
    output_limit: usize,
    /// What to promote to artifacts at the end, on behalf of the creator.
    collect: Vec<CollectItem>,
    /// The key that ran it, with the sandbox's org and project: collection
    /// acts for it after the request that started the command is gone.
    creator: Principal,
    pub(super) state: Mutex<LiveState>,
    /// Bumped on every change of `state`; readers wait on it.
    pub(in crate::core) changed: watch::Sender<u64>,
    pub(super) input: Mutex<Option<ExecInput>>,
}

impl LiveCommand {
    pub(super) fn new(
        record: CommandRow,
        output_limit: usize,
        creator: Principal,
        retention: Retention,
    ) -> Self {
        Self {
            id: record.id.clone(),
            sandbox_id: record.sandbox_id.clone(),
            collect: record.collect.clone(),
            state: Mutex::new(LiveState {
                log: Log::new(&record.id, 1, retention),
                stdout: Tail::default(),
                stderr: Tail::default(),
                stdout_carry: Utf8Carry::default(),
                stderr_carry: Utf8Carry::default(),
                started_at: None,
                canceled: false,
                finished: None,
                stdout_received: 0,
                stderr_received: 0,
                recorded: OutputProgress {
                    stdout_offset: 0,
                    stderr_offset: 0,
                },
                durable_seq: 0,
            }),
            stdin_open: record.stdin,
            record,
            output_limit,
            creator,
            changed: watch::channel(0).0,
            input: Mutex::new(None),
        }
    }

    /// A command a previous host process started, taken over: its log goes
    /// on at `next_seq`, its record's tails are `stdout`/`stderr` (rebuilt
    /// from the recorded log) and its output resumes at the record's
    /// offsets.
    pub(crate) fn resume(
        record: CommandRow,
        output_limit: usize,
        creator: Principal,
        retention: Retention,
        next_seq: i64,
        (stdout, stderr): (Tail, Tail),
    ) -> Self {
        let live = Self::new(record, output_limit, creator, retention);
        let recorded = OutputProgress {
            stdout_offset: live.record.stdout_offset,
            stderr_offset: live.record.stderr_offset,
        };
        {
            let mut state = lock(&live.state);
            state.log = Log::new(&live.record.id, next_seq, retention);
            state.stdout = stdout;
            state.stderr = stderr;
            state.started_at = live.record.started_at;
            state.canceled = live.record.cancel_requested_at.is_some();
            state.stdout_received = u64::try_from(recorded.stdout_offset).unwrap_or(0);
            state.stderr_received = u64::try_from(recorded.stderr_offset).unwrap_or(0);
            state.recorded = recorded;
            state.durable_seq = next_seq - 1;
        }
        live
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The record as it stands, with the output so far.
    pub(super) fn snapshot(&self) -> CommandRow {
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

    /// Retained events after `after`, and whether the command has ended.
    pub(super) fn events_after(&self, after: i64) -> (Vec<CommandEventRow>, Option<i64>, bool) {
        let state = lock(&self.state);
        let finished = state.finished.is_some();
        let mut events = state.log.after(after);
        // Once finished, its whole log is durable (the end commits it).
        if !finished {
            events.retain(|e| e.seq <= state.durable_seq);
        }
        (events, state.log.first_seq(), finished)
    }

    pub(super) fn org_id(&self) -> &str {
        &self.record.org_id
    }

    pub(in crate::core) fn is_finished(&self) -> bool {
        lock(&self.state).finished.is_some()
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

impl Host {
    /// Runs one command to its end: starts it through the agent (or takes
    /// over the process a previous host process started), records its
    /// output, collects its artifacts, writes its end.
    pub(crate) async fn drive_command(
        self: Arc<Self>,
        live: Arc<LiveCommand>,
        sandbox: Arc<LiveSandbox>,
        stream: crate::agent::StreamPermit,
        begin: Begin,
    ) {
        let mut input = None;
        let outcome = async {
            let mut session = match begin {
                Begin::Exec(exec) => sandbox.agent.exec_with(stream, exec).await?,
                Begin::Attach(attach) => sandbox.agent.attach_with(stream, attach).await?,
            };
            *lock(&live.input) = Some(session.input());
            input = Some(session.input());
            let mut flush = tokio::time::interval(FLUSH_INTERVAL);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut coalesce_at: Option<Instant> = None;
            loop {
                let event = tokio::select! {
                    event = session.next_event() => event,
                    _ = flush.tick() => {
                        self.flush_log(&live).await;
                        continue;
                    }
                    () = sleep_until_some(coalesce_at) => {
                        coalesce_at = None;
                        if lock(&live.state).log.flush_pending() {
                            live.bump();
                        }
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
                    Some(Ok(ExecEvent::Attached {
                        lost_stdout,
                        lost_stderr,
                        ..
                    })) => {
                        if lost_stdout + lost_stderr > 0 {
                            // The agent's unacknowledged tail overflowed
                            // while no host read it: the gap is counted.
                            tracing::warn!(command = %live.id, lost_stdout, lost_stderr, "output was lost while the host was down");
                            let mut state = lock(&live.state);
                            state.stdout.dropped += i64::try_from(lost_stdout).unwrap_or(0);
                            state.stderr.dropped += i64::try_from(lost_stderr).unwrap_or(0);
                            state.stdout_received += lost_stdout;
                            state.stderr_received += lost_stderr;
                        }
                    }
                    Some(Ok(ExecEvent::NotFound)) => {
                        return Ok(Ending::Lost(String::from(
                            "the command's process was lost while the host was down",
                        )));
                    }
                    Some(Ok(ExecEvent::Stdout(data))) => {
                        self.record_output(&live, OutputStream::Stdout, &data);
                        coalesce_at.get_or_insert_with(|| Instant::now() + COALESCE);
                    }
                    Some(Ok(ExecEvent::Stderr(data))) => {
                        self.record_output(&live, OutputStream::Stderr, &data);
                        coalesce_at.get_or_insert_with(|| Instant::now() + COALESCE);
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
                        return Ok(Ending::SpawnFailed(message));
                    }
                }
                if lock(&live.state).log.unflushed_bytes >= FLUSH_BYTES {
                    self.flush_log(&live).await;
                }
            }
        }
        .await;
        let ending = outcome.unwrap_or_else(|e| Ending::Lost(e.to_string()));
        let collected = if live.collect.is_empty() {
            None
        } else if matches!(ending, Ending::Exited { .. }) {
            Some(
                self.collect_artifacts(&live.creator, &live.sandbox_id, &live.collect)
                    .await,
            )
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
        // A process that ended is forgotten by the agent once its end is
        // recorded; one that was lost or is still running (the sandbox is
        // going away) is left to the sandbox.
        let ended = matches!(ending, Ending::Exited { .. } | Ending::SpawnFailed(_));
        self.finish_command(&live, ending, collected).await;
        if ended && let Some(input) = input {
            let _ = input.release().await;
        }
    }

    fn record_output(&self, live: &LiveCommand, stream: OutputStream, data: &[u8]) {
        let now = self.clock.now_ms();
        let mut guard = lock(&live.state);
        let state = &mut *guard;
        let (tail, carry) = match stream {
            OutputStream::Stdout => {
                state.stdout_received += data.len() as u64;
                (&mut state.stdout, &mut state.stdout_carry)
            }
            OutputStream::Stderr => {
                state.stderr_received += data.len() as u64;
                (&mut state.stderr, &mut state.stderr_carry)
            }
        };
        tail.push(data, live.output_limit);
        let text = carry.split(data);
        let emitted = state.log.output(stream, text, now);
        drop(guard);
        if emitted {
            live.bump();
        }
    }

    /// Writes buffered log events (and pending retention trims) to the
    /// store with how far the output is recorded, then tells the agent it
    /// may forget that much: what a restarted host resumes from.
    pub(crate) async fn flush_command_log(&self, live: &LiveCommand) {
        self.flush_log(live).await;
    }

    async fn flush_log(&self, live: &LiveCommand) {
        let (events, trim, progress, newest) = {
            let mut state = lock(&live.state);
            // Output waiting to be coalesced goes too: what is not in an
            // event is not recorded.
            if state.log.flush_pending() {
                live.bump();
            }
            let progress = state.progress();
            if state.log.unflushed.is_empty()
                && state.log.trim_from.is_none()
                && progress == state.recorded
            {
                return;
            }
            let (events, trim) = state.log.take_unflushed();
            let newest = events.last().map(|e| e.seq);
            (events, trim, progress, newest)
        };
        let id = live.id.clone();
        let result = self
            .store
            .call(move |s| s.record_command_output(&id, &events, progress, trim))
            .await;
        match result {
            Ok(()) => {
                {
                    let mut state = lock(&live.state);
                    state.recorded = progress;
                    if let Some(seq) = newest {
                        state.durable_seq = state.durable_seq.max(seq);
                    }
                }
                // Readers wait for what is durable: wake them.
                live.bump();
                let input = lock(&live.input).clone();
                if let Some(input) = input {
                    let (stdout, stderr) = (
                        u64::try_from(progress.stdout_offset).unwrap_or(0),
                        u64::try_from(progress.stderr_offset).unwrap_or(0),
                    );
                    let _ = input.ack(stdout, stderr).await;
                }
            }
            Err(e) => {
                tracing::error!(command = %live.id, error = %e, "could not write command log");
            }
        }
    }

    async fn finish_command(
        &self,
        live: &LiveCommand,
        ending: Ending,
        collected: Option<Vec<Collected>>,
    ) {
        let now = self.clock.now_ms();
        let (end, events, trim) = {
            let mut guard = lock(&live.state);
            let state = &mut *guard;
            for stream in [OutputStream::Stdout, OutputStream::Stderr] {
                let rest = match stream {
                    OutputStream::Stdout => state.stdout_carry.finish(),
                    OutputStream::Stderr => state.stderr_carry.finish(),
                };
                state.log.output(stream, rest, now);
            }
            state.log.flush_pending();
            let exit = exit_of(&ending, state.canceled);
            let end = CommandEnd {
                status: exit.status,
                started_at: state.started_at,
                exit_code: exit.exit_code,
                signal: exit.signal,
                stdout: state.stdout.to_vec(),
                stderr: state.stderr.to_vec(),
                stdout_dropped: state.stdout.dropped,
                stderr_dropped: state.stderr.dropped,
                ended_at: now,
                error: exit.error.clone(),
                collected,
            };
            state.log.push(LogBody::Exit(exit), now);
            let (events, trim) = state.log.take_unflushed();
            (end, events, trim)
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
            let canceled = state.canceled;
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
                cancel_requested_at: canceled.then_some(now).or(live.record.cancel_requested_at),
                ..live.record.clone()
            });
        }
        lock(&self.running).remove(&live.id);
        live.bump();
    }
}

/// The status and details a command ends with.
fn exit_of(ending: &Ending, canceled: bool) -> CommandExit {
    let (status, exit_code, signal, error) = match ending {
        Ending::Exited { .. } if canceled => (CommandStatus::Canceled, None, None, None),
        Ending::Exited {
            timed_out: true,
            signal,
            ..
        } => (
            CommandStatus::TimedOut,
            None,
            signal.map(i64::from),
            Some(String::from(
                "the command exceeded its timeout and was killed",
            )),
        ),
        Ending::Exited { code, signal, .. } => (
            CommandStatus::Completed,
            code.map(i64::from),
            signal.map(i64::from),
            None,
        ),
        Ending::SpawnFailed(message) | Ending::Lost(message) => {
            (CommandStatus::Failed, None, None, Some(message.clone()))
        }
    };
    CommandExit {
        status,
        exit_code,
        signal,
        error,
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
