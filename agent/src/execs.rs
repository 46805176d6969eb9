//! The execs the agent holds, and the streams attached to them.
//!
//! An exec is created by `Open::Exec` under the host's id and outlives its
//! stream and its session: the host forgets it with `ExecInput::Release`
//! after its end, or a new exec evicts it when the registry is full and it
//! has ended. The process itself is [`exec`]'s supervisor's; what the host
//! sees is the exec's held [`Output`] and its end.
//!
//! At most one stream is attached to an exec. `Open::Exec` attaches its own
//! stream from offset 0 (events `Started`, output, `Exited`, as in protocol
//! version 1); `Open::ExecAttach` takes the exec over from the offsets the
//! host recorded (`Attached`, the held output from there, live output, the
//! end). The attached stream's writer sends whatever its cursor has not
//! sent yet; its reader applies the host's input. A new attachment stops
//! the previous one's writer and makes its reader's frames no-ops; a
//! broken writer (the host went away) only detaches, so output keeps
//! accumulating for the next host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crownest_proto::frame::{read_message, write_message};
use crownest_proto::{
    ExecAttach, ExecEvent, ExecInput, ExecList, ExecRequest, ExecSummary, MAX_CHUNK_LEN, MAX_EXECS,
    MAX_UNACKED_BYTES, ProtoError,
};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use crate::Shared;
use crate::exec::{self, Running, StdinInput};
use crate::output::{Cursor, Output, Stream};

/// Longest exec id accepted: an [`ExecList`] of [`MAX_EXECS`] such ids
/// stays well inside one frame.
pub const MAX_ID_LEN: usize = crownest_proto::MAX_EXEC_ID_LEN;

/// Stdin frames queued for a process that does not read them yet; beyond
/// this the agent stops reading the stream (yamux then pushes back).
const STDIN_QUEUE: usize = 16;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent, so a poisoned
    // lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The registry of execs, by the host's id.
#[derive(Debug)]
pub struct Execs {
    held: Mutex<Held>,
    /// Execs held at most ([`MAX_EXECS`]; smaller in tests).
    max_execs: usize,
    /// Unacknowledged output held per exec ([`MAX_UNACKED_BYTES`]; smaller
    /// in tests).
    max_unacked: u64,
}

#[derive(Debug, Default)]
struct Held {
    by_id: HashMap<String, Arc<Exec>>,
    /// Execs created so far: the next one's [`Exec::seq`].
    created: u64,
}

impl Default for Execs {
    fn default() -> Self {
        Self::new(MAX_EXECS, MAX_UNACKED_BYTES)
    }
}

impl Execs {
    pub fn new(max_execs: usize, max_unacked: u64) -> Self {
        Self {
            held: Mutex::default(),
            max_execs,
            max_unacked,
        }
    }

    /// Registers an exec for `request` and starts its process, with the
    /// caller's stream attached from offset 0 (the attachment's
    /// generation is returned). A spawn failure is held as the exec's end;
    /// `Err` means nothing was registered.
    fn create(
        &self,
        request: &ExecRequest,
        shared: &Arc<Shared>,
    ) -> Result<(Arc<Exec>, u64), String> {
        if request.id.is_empty() || request.id.len() > MAX_ID_LEN {
            return Err(format!("an exec id has 1 to {MAX_ID_LEN} bytes"));
        }
        let mut held = lock(&self.held);
        if held.by_id.contains_key(&request.id) {
            return Err(format!("exec id {} is already in use", request.id));
        }
        if held.by_id.len() >= self.max_execs {
            let oldest_ended = held
                .by_id
                .values()
                .filter(|exec| exec.ended())
                .min_by_key(|exec| exec.seq)
                .map(|exec| exec.id.clone());
            match oldest_ended {
                Some(id) => {
                    held.by_id.remove(&id);
                }
                None => return Err(String::from("too many commands held")),
            }
        }
        let seq = held.created;
        held.created += 1;
        let (queue, queue_rx) = mpsc::channel(STDIN_QUEUE);
        let spawned = exec::spawn(request);
        let (pid, end) = match &spawned {
            Ok(spawned) => (spawned.pid, None),
            Err(message) => (
                0,
                Some(ExecEvent::SpawnFailed {
                    message: message.clone(),
                }),
            ),
        };
        let exec = Arc::new(Exec {
            id: request.id.clone(),
            seq,
            pid,
            exited: AtomicBool::new(end.is_some()),
            stdin: request.stdin.then_some(queue),
            state: Mutex::new(State {
                output: Output::new(self.max_unacked),
                end,
                attached: None,
                attachments: 0,
            }),
            changed: watch::Sender::new(()),
            room_freed: Notify::new(),
        });
        // Attached before the supervisor reads anything.
        let (generation, _) = exec.attach(0, 0);
        held.by_id.insert(request.id.clone(), exec.clone());
        drop(held);
        if let Ok(spawned) = spawned {
            let running = Running::new(shared.clone());
            tokio::spawn(exec::supervise(
                exec.clone(),
                spawned,
                request.timeout_ms,
                queue_rx,
                running,
            ));
        }
        Ok((exec, generation))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Exec>> {
        lock(&self.held).by_id.get(id).cloned()
    }

    /// Every held exec, oldest first.
    fn summaries(&self) -> Vec<ExecSummary> {
        let held = lock(&self.held);
        let mut execs: Vec<&Arc<Exec>> = held.by_id.values().collect();
        execs.sort_by_key(|exec| exec.seq);
        execs
            .into_iter()
            .map(|exec| ExecSummary {
                id: exec.id.clone(),
                pid: exec.pid,
                running: !exec.ended(),
            })
            .collect()
    }

    /// Forgets `exec` if it has ended; `false` (and nothing happens) while
    /// it runs.
    fn release(&self, exec: &Arc<Exec>) -> bool {
        if !exec.ended() {
            return false;
        }
        let mut held = lock(&self.held);
        if held
            .by_id
            .get(&exec.id)
            .is_some_and(|current| Arc::ptr_eq(current, exec))
        {
            held.by_id.remove(&exec.id);
        }
        true
    }
}

/// One exec: its process's identity, held output and end, and which
/// stream is attached.
#[derive(Debug)]
pub struct Exec {
    id: String,
    /// Creation order: eviction takes the oldest ended exec.
    seq: u64,
    /// 0 when the process could not be started.
    pid: u32,
    /// Set once the reaper reported the exit: from then on the process
    /// group id may be reused, so nothing is signalled any more.
    exited: AtomicBool,
    /// The supervisor's stdin queue, when the request kept stdin open.
    stdin: Option<mpsc::Sender<StdinInput>>,
    state: Mutex<State>,
    /// Touched when output or the end arrives or the attachment changes:
    /// wakes the writers.
    changed: watch::Sender<()>,
    /// Wakes the supervisor when it may have room to read again (the
    /// attached writer moved on, or detached).
    room_freed: Notify,
}

#[derive(Debug)]
struct State {
    output: Output,
    /// `Exited` or `SpawnFailed`, sent after all the output.
    end: Option<ExecEvent>,
    attached: Option<Attachment>,
    /// Attachments so far: the next one's generation.
    attachments: u64,
}

#[derive(Debug)]
struct Attachment {
    /// Tells this attachment's stream from the ones it replaced.
    generation: u64,
    cursor: Cursor,
}

/// What a writer does next.
enum Next {
    /// Another stream took over: stop.
    Detached,
    Send(ExecEvent),
    /// Send the end, then stop.
    End(ExecEvent),
    Wait,
}

impl Exec {
    fn ended(&self) -> bool {
        lock(&self.state).end.is_some()
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(self.pid as i32)
    }

    /// Attaches a new stream from these offsets, detaching the previous
    /// one; returns its generation and its `Attached` event.
    fn attach(&self, stdout_from: u64, stderr_from: u64) -> (u64, ExecEvent) {
        let mut state = lock(&self.state);
        state.attachments += 1;
        let generation = state.attachments;
        let (cursor, lost) = state.output.cursor_from(stdout_from, stderr_from);
        state.attached = Some(Attachment { generation, cursor });
        let attached = ExecEvent::Attached {
            pid: self.pid,
            running: state.end.is_none(),
            lost_stdout: lost[0],
            lost_stderr: lost[1],
        };
        drop(state);
        // The previous stream's writer wakes up and stops.
        self.changed.send_replace(());
        self.room_freed.notify_one();
        (generation, attached)
    }

    fn detach(&self, generation: u64) {
        let mut state = lock(&self.state);
        if state
            .attached
            .as_ref()
            .is_some_and(|attached| attached.generation == generation)
        {
            state.attached = None;
        }
        drop(state);
        self.room_freed.notify_one();
    }

    fn is_attached(&self, generation: u64) -> bool {
        lock(&self.state)
            .attached
            .as_ref()
            .is_some_and(|attached| attached.generation == generation)
    }

    fn next_event(&self, generation: u64) -> Next {
        let mut state = lock(&self.state);
        let State {
            output,
            end,
            attached,
            ..
        } = &mut *state;
        let Some(attached) = attached
            .as_mut()
            .filter(|attached| attached.generation == generation)
        else {
            return Next::Detached;
        };
        let next = match output.next(&mut attached.cursor) {
            Some((Stream::Stdout, bytes)) => Next::Send(ExecEvent::Stdout(bytes)),
            Some((Stream::Stderr, bytes)) => Next::Send(ExecEvent::Stderr(bytes)),
            None => match end {
                Some(end) => Next::End(end.clone()),
                None => Next::Wait,
            },
        };
        drop(state);
        self.room_freed.notify_one();
        next
    }

    fn ack(&self, generation: u64, stdout: u64, stderr: u64) {
        let mut state = lock(&self.state);
        if state
            .attached
            .as_ref()
            .is_some_and(|attached| attached.generation == generation)
        {
            state.output.ack(stdout, stderr);
        }
    }

    async fn queue_stdin(&self, generation: u64, input: StdinInput) {
        let Some(queue) = &self.stdin else {
            return;
        };
        // Waits while the process does not read; fails once it has ended.
        let Ok(permit) = queue.reserve().await else {
            return;
        };
        if self.is_attached(generation) {
            permit.send(input);
        }
    }

    fn signal(&self, number: i32) {
        // The group may be gone and its id reused: never signal after exit.
        if self.pid != 0 && !self.exited.load(Ordering::Relaxed) {
            exec::signal_group(self.pgid(), number);
        }
    }

    fn kill(&self) {
        if self.pid != 0 && !self.exited.load(Ordering::Relaxed) {
            exec::kill_all(self.pgid());
        }
    }

    // The supervisor's side.

    /// Bytes the supervisor may read now (0: wait for [`Exec::room_freed`]).
    pub fn room(&self) -> usize {
        let state = lock(&self.state);
        match &state.attached {
            Some(attached) => state.output.room(&attached.cursor),
            None => MAX_CHUNK_LEN,
        }
    }

    pub async fn room_freed(&self) {
        self.room_freed.notified().await;
    }

    pub fn push_output(&self, stream: Stream, bytes: &[u8]) {
        lock(&self.state).output.push(stream, bytes);
        self.changed.send_replace(());
    }

    pub fn mark_exited(&self) {
        self.exited.store(true, Ordering::Relaxed);
    }

    /// Records the end, after the last output.
    pub fn finish(&self, end: ExecEvent) {
        let mut state = lock(&self.state);
        state.end = Some(end);
        let [stdout, stderr] = state.output.dropped();
        drop(state);
        if stdout > 0 || stderr > 0 {
            eprintln!(
                "crownest-agent: exec {}: dropped {stdout} bytes of stdout and {stderr} of stderr the host had not acknowledged",
                self.id
            );
        }
        self.changed.send_replace(());
    }

    /// Per stream, the offset of the oldest output byte still held.
    #[cfg(test)]
    pub fn held_from(&self) -> [u64; 2] {
        lock(&self.state).output.held_from()
    }

    /// Per stream, output bytes dropped by the cap.
    #[cfg(test)]
    pub fn dropped(&self) -> [u64; 2] {
        lock(&self.state).output.dropped()
    }
}

/// `Open::Exec`: starts the process and streams it from the start.
pub async fn open<R, W>(request: ExecRequest, reader: R, mut writer: W, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    match shared.execs.create(&request, &shared) {
        Ok((exec, generation)) => {
            let first = (exec.pid != 0).then_some(ExecEvent::Started { pid: exec.pid });
            serve(exec, generation, first, reader, writer, shared).await;
        }
        Err(message) => reply_and_close(&mut writer, &ExecEvent::SpawnFailed { message }).await,
    }
}

/// `Open::ExecAttach`: takes a held exec over from the host's offsets.
pub async fn attach<R, W>(request: ExecAttach, reader: R, mut writer: W, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let Some(exec) = shared.execs.get(&request.id) else {
        reply_and_close(&mut writer, &ExecEvent::NotFound).await;
        return;
    };
    let (generation, attached) = exec.attach(request.stdout_from, request.stderr_from);
    serve(exec, generation, Some(attached), reader, writer, shared).await;
}

/// `Open::ExecList`.
pub async fn list<W: AsyncWrite + Unpin>(mut writer: W, shared: &Shared) {
    let list = ExecList {
        execs: shared.execs.summaries(),
    };
    match write_message(&mut writer, &list).await {
        Ok(()) => {
            let _ = writer.shutdown().await;
        }
        Err(ProtoError::Io(_)) => {}
        Err(e) => eprintln!("crownest-agent: exec list: {e}"),
    }
}

/// The one event of a stream that gets no exec.
async fn reply_and_close<W: AsyncWrite + Unpin>(writer: &mut W, event: &ExecEvent) {
    if write_message(writer, event).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// Runs one attached stream: events out until its end is sent, another
/// stream takes over or the host goes away; input in meanwhile (and after
/// the end, for `Release`).
async fn serve<R, W>(
    exec: Arc<Exec>,
    generation: u64,
    first: Option<ExecEvent>,
    reader: R,
    mut writer: W,
    shared: Arc<Shared>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let input = tokio::spawn(apply_input(exec.clone(), generation, reader, shared));
    if send_events(&exec, generation, first, &mut writer).await {
        let _ = input.await;
    } else {
        input.abort();
    }
}

/// Sends `first`, then the output from the attachment's cursor and the
/// end. `true` once the end was sent.
async fn send_events<W: AsyncWrite + Unpin>(
    exec: &Exec,
    generation: u64,
    first: Option<ExecEvent>,
    writer: &mut W,
) -> bool {
    let mut changed = exec.changed.subscribe();
    if let Some(first) = first
        && write_message(writer, &first).await.is_err()
    {
        exec.detach(generation);
        return false;
    }
    loop {
        changed.borrow_and_update();
        match exec.next_event(generation) {
            Next::Detached => {
                let _ = writer.shutdown().await;
                return false;
            }
            Next::Send(event) => {
                if write_message(writer, &event).await.is_err() {
                    // The host went away: the output waits for the next one.
                    exec.detach(generation);
                    return false;
                }
            }
            Next::End(event) => {
                if write_message(writer, &event).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
                return true;
            }
            Next::Wait => {
                if changed.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Applies the host's [`ExecInput`] frames while the stream is attached.
async fn apply_input<R: AsyncRead + Unpin>(
    exec: Arc<Exec>,
    generation: u64,
    mut reader: R,
    shared: Arc<Shared>,
) {
    loop {
        let input = match read_message::<ExecInput, _>(&mut reader).await {
            Ok(Some(input)) => input,
            Ok(None) | Err(ProtoError::Io(_)) => return,
            Err(e) => {
                eprintln!("crownest-agent: bad exec input: {e}");
                return;
            }
        };
        if !exec.is_attached(generation) {
            return;
        }
        match input {
            ExecInput::Stdin(bytes) => exec.queue_stdin(generation, StdinInput::Data(bytes)).await,
            ExecInput::CloseStdin => exec.queue_stdin(generation, StdinInput::Close).await,
            ExecInput::Signal(number) => exec.signal(number),
            ExecInput::Kill => exec.kill(),
            ExecInput::Ack { stdout, stderr } => exec.ack(generation, stdout, stderr),
            ExecInput::Release => {
                if shared.execs.release(&exec) {
                    return;
                }
            }
        }
    }
}
