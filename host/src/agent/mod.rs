//! The host's client of `crownest-agent`, the PID 1 of every sandbox.
//!
//! One [`AgentClient`] per sandbox connection: it runs the handshake
//! (`crownest_proto::handshake`), then a yamux client session whose
//! connection is owned by one driver task. The driver opens outbound streams
//! on request and rejects inbound ones (the agent never opens streams). Each
//! operation is one logical stream: [`AgentClient::ping`], or
//! [`AgentClient::exec`] which yields an [`ExecSession`] (events from the
//! agent) and a cloneable [`ExecInput`] (stdin and signals to it).
//!
//! **Architecture Invariant:** nothing from the agent is trusted. Frames are
//! bounded by `MAX_FRAME_LEN` before any allocation, a frame that does not
//! decode ends that logical stream with [`AgentError::Protocol`], and no byte
//! from the agent can panic the host.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use crownest_proto::frame::{FrameDecoder, write_message};
use crownest_proto::handshake::host_handshake;
use crownest_proto::{
    ExecAttach, ExecEvent, ExecList, ExecRequest, ExecSummary, MAX_CHUNK_LEN, Open, Pong,
    ProtoError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

mod code;
mod egress;
mod files;
#[cfg(test)]
mod tests;
mod tunnel;

pub use code::{MAX_RUN_BYTES, RunOutput, RunSession};
pub use egress::{EgressOffer, EgressStream};
pub use files::{FileReader, FileWatch, FileWriter};
pub use tunnel::Tunnel;

/// Failures talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent handshake failed: {0}")]
    Handshake(ProtoError),
    #[error("agent connection closed")]
    Closed,
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    #[error("timed out waiting for the agent")]
    Timeout,
    #[error("request cannot be sent to the agent: {0}")]
    InvalidRequest(String),
    #[error("agent i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The agent refused a file operation (not found, outside /workspace, …).
    #[error("{message}")]
    File {
        kind: crownest_proto::FileErrorKind,
        message: String,
    },
    /// Nothing in the sandbox accepted a TCP connection to the port.
    #[error("{0}")]
    PortUnreachable(String),
    /// Every logical stream of the connection is in use.
    #[error("the sandbox agent has no free stream")]
    Busy,
}

impl AgentError {
    /// Maps an error of writing to the agent.
    fn from_write(error: ProtoError) -> Self {
        match error {
            ProtoError::Io(e) => Self::Io(e),
            other => Self::InvalidRequest(other.to_string()),
        }
    }

    /// Maps an error of reading from the agent.
    fn from_read(error: ProtoError) -> Self {
        match error {
            ProtoError::Io(e) => Self::Io(e),
            other => Self::Protocol(other.to_string()),
        }
    }
}

/// Logical streams one client keeps open at once by default: well below
/// yamux's limit of 512, past which the agent's side would tear the whole
/// connection down (and the sandbox with it).
pub const DEFAULT_MAX_STREAMS: usize = 256;

/// How long an operation waits for a free stream before the sandbox is
/// reported busy, by default.
pub const DEFAULT_STREAM_WAIT: Duration = Duration::from_secs(5);

/// A place for one logical stream, taken ahead of opening it.
pub struct StreamPermit(OwnedSemaphorePermit);

/// The read half of a logical stream; holds the stream's place in the
/// client's budget for as long as either half lives.
pub(crate) struct StreamReader {
    io: ReadHalf<Compat<yamux::Stream>>,
    _permit: Arc<OwnedSemaphorePermit>,
}

/// The write half of a logical stream.
pub(crate) struct StreamWriter {
    io: WriteHalf<Compat<yamux::Stream>>,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request to the driver for a new outbound stream.
type OpenRequest = oneshot::Sender<Result<yamux::Stream, AgentError>>;

/// A connected, handshaken agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

/// Shared by the client's clones and by every open [`ExecSession`] and
/// [`ExecInput`]: the driver keeps the connection up while any holds it.
struct Inner {
    boot_id: u64,
    agent_version: String,
    opener: mpsc::UnboundedSender<OpenRequest>,
    /// Set by the driver when the connection ended.
    closed: Arc<AtomicBool>,
    /// Places for logical streams (see [`DEFAULT_MAX_STREAMS`]).
    streams: Arc<Semaphore>,
    /// How long `open` waits for a place.
    stream_wait: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("boot_id", &self.inner.boot_id)
            .field("agent_version", &self.inner.agent_version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl AgentClient {
    /// Handshake + yamux over a byte stream to the agent (what a runtime's
    /// `AgentChannel` opens).
    pub async fn connect<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        transport: T,
    ) -> Result<AgentClient, AgentError> {
        Self::connect_with(transport, DEFAULT_MAX_STREAMS, DEFAULT_STREAM_WAIT).await
    }

    /// [`AgentClient::connect`] with at most `max_streams` logical streams
    /// open at once; an operation past it waits up to `wait`, then fails
    /// with [`AgentError::Busy`] (the connection stays up).
    pub async fn connect_with<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        mut transport: T,
        max_streams: usize,
        wait: Duration,
    ) -> Result<AgentClient, AgentError> {
        let nonce: u64 = rand::random();
        let ack = host_handshake(&mut transport, nonce)
            .await
            .map_err(AgentError::Handshake)?;
        let connection = yamux::Connection::new(
            transport.compat(),
            crownest_proto::mux::config(),
            yamux::Mode::Client,
        );
        let (opener, requests) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(connection, requests, closed.clone()));
        Ok(AgentClient {
            inner: Arc::new(Inner {
                boot_id: ack.boot_id,
                agent_version: ack.agent_version,
                opener,
                closed,
                streams: Arc::new(Semaphore::new(max_streams.clamp(1, 400))),
                stream_wait: wait,
            }),
        })
    }

    /// Random per agent start: a change means the sandbox rebooted.
    pub fn boot_id(&self) -> u64 {
        self.inner.boot_id
    }

    /// The agent's crate version, for logs.
    pub fn agent_version(&self) -> &str {
        &self.inner.agent_version
    }

    /// Round trip to the agent; also reports how many processes it runs.
    pub async fn ping(&self) -> Result<Pong, AgentError> {
        let (mut reader, _writer) = self.open(&Open::Ping).await?;
        let mut frames = FrameReader::default();
        let payload = frames.next(&mut reader).await?.ok_or(AgentError::Closed)?;
        crownest_proto::decode(&payload).map_err(AgentError::from_read)
    }

    /// Starts a process in the sandbox.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, AgentError> {
        let (reader, writer) = self.open(&Open::Exec(request)).await?;
        Ok(self.session(reader, writer))
    }

    fn session(&self, reader: StreamReader, writer: StreamWriter) -> ExecSession {
        ExecSession {
            reader,
            frames: FrameReader::default(),
            done: false,
            input: ExecInput {
                writer: Arc::new(Mutex::new(writer)),
                _client: self.inner.clone(),
            },
        }
    }

    /// Whether the connection to the agent has ended (a new client is needed).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Logical streams open now.
    pub fn open_streams(&self, max_streams: usize) -> usize {
        max_streams.saturating_sub(self.inner.streams.available_permits())
    }

    /// Takes a place for one logical stream now (waiting briefly), to open
    /// it later with [`AgentClient::exec_with`]: a caller can then refuse
    /// a request before it records anything.
    pub async fn reserve(&self) -> Result<StreamPermit, AgentError> {
        let permit = tokio::time::timeout(
            self.inner.stream_wait,
            self.inner.streams.clone().acquire_owned(),
        )
        .await
        .map_err(|_| AgentError::Busy)?
        .map_err(|_| AgentError::Closed)?;
        Ok(StreamPermit(permit))
    }

    /// Starts a process on a stream place taken with [`AgentClient::reserve`].
    pub async fn exec_with(
        &self,
        permit: StreamPermit,
        request: ExecRequest,
    ) -> Result<ExecSession, AgentError> {
        let (reader, writer) = self.open_on(permit, &Open::Exec(request)).await?;
        Ok(self.session(reader, writer))
    }

    /// Takes over an exec the agent holds (started by this host process or
    /// one before it), replaying its output from the given offsets. The
    /// first event is [`ExecEvent::Attached`] or [`ExecEvent::NotFound`].
    pub async fn attach_with(
        &self,
        permit: StreamPermit,
        attach: ExecAttach,
    ) -> Result<ExecSession, AgentError> {
        let (reader, writer) = self.open_on(permit, &Open::ExecAttach(attach)).await?;
        Ok(self.session(reader, writer))
    }

    /// The execs the agent holds.
    pub async fn exec_list(&self) -> Result<Vec<ExecSummary>, AgentError> {
        let (mut reader, _writer) = self.open(&Open::ExecList).await?;
        let mut frames = FrameReader::default();
        let payload = frames.next(&mut reader).await?.ok_or(AgentError::Closed)?;
        let list: ExecList = crownest_proto::decode(&payload).map_err(AgentError::from_read)?;
        Ok(list.execs)
    }

    /// The agent's view of the sandbox's resources (untrusted figures).
    pub async fn stats(&self) -> Result<crownest_proto::Stats, AgentError> {
        let (mut reader, _writer) = self.open(&Open::Stats).await?;
        let mut frames = FrameReader::default();
        let payload = frames.next(&mut reader).await?.ok_or(AgentError::Closed)?;
        crownest_proto::decode(&payload).map_err(AgentError::from_read)
    }

    /// Opens a logical stream and writes its `Open` frame.
    async fn open(&self, open: &Open) -> Result<(StreamReader, StreamWriter), AgentError> {
        let permit = self.reserve().await?;
        self.open_on(permit, open).await
    }

    async fn open_on(
        &self,
        permit: StreamPermit,
        open: &Open,
    ) -> Result<(StreamReader, StreamWriter), AgentError> {
        let permit = Arc::new(permit.0);
        let (tx, rx) = oneshot::channel();
        self.inner.opener.send(tx).map_err(|_| AgentError::Closed)?;
        let stream = rx.await.map_err(|_| AgentError::Closed)??;
        let (reader, writer) = tokio::io::split(stream.compat());
        let reader = StreamReader {
            io: reader,
            _permit: permit.clone(),
        };
        let mut writer = StreamWriter {
            io: writer,
            _permit: permit,
        };
        write_message(&mut writer, open)
            .await
            .map_err(AgentError::from_write)?;
        Ok((reader, writer))
    }
}

/// Why the driver stopped.
enum DriveEnd {
    /// Every client, session and input handle is gone.
    Unused,
    /// The agent closed the connection or it broke.
    Ended(Option<yamux::ConnectionError>),
}

/// Owns the yamux connection: opens outbound streams on request, drops
/// inbound ones, and keeps polling so that every stream makes progress.
async fn drive<T>(
    mut connection: yamux::Connection<T>,
    mut requests: mpsc::UnboundedReceiver<OpenRequest>,
    closed: Arc<AtomicBool>,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenRequest> = None;
    let end = poll_fn(|cx| {
        loop {
            if pending.is_none() {
                match requests.poll_recv(cx) {
                    Poll::Ready(Some(request)) => pending = Some(request),
                    Poll::Ready(None) => return Poll::Ready(DriveEnd::Unused),
                    Poll::Pending => {}
                }
            }
            let Some(request) = pending.take() else {
                break;
            };
            if request.is_closed() {
                continue;
            }
            match connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    // The requester may have given up; the stream then drops.
                    let _ = request.send(Ok(stream));
                }
                Poll::Ready(Err(yamux::ConnectionError::TooManyStreams)) => {
                    // Streams being closed still count; the connection is
                    // fine. The budget normally keeps this from happening.
                    let _ = request.send(Err(AgentError::Busy));
                }
                Poll::Ready(Err(e)) => {
                    let _ = request.send(Err(AgentError::Closed));
                    return Poll::Ready(DriveEnd::Ended(Some(e)));
                }
                Poll::Pending => {
                    pending = Some(request);
                    break;
                }
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                // The agent never opens streams: drop (reset) any it tries.
                Poll::Ready(Some(Ok(_inbound))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(DriveEnd::Ended(Some(e))),
                Poll::Ready(None) => return Poll::Ready(DriveEnd::Ended(None)),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    closed.store(true, Ordering::Release);
    if let Some(request) = pending {
        let _ = request.send(Err(AgentError::Closed));
    }
    requests.close();
    while let Ok(request) = requests.try_recv() {
        let _ = request.send(Err(AgentError::Closed));
    }
    match end {
        DriveEnd::Unused => {
            let close = poll_fn(|cx| connection.poll_close(cx));
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        }
        DriveEnd::Ended(Some(e)) => tracing::debug!(error = %e, "agent connection ended"),
        DriveEnd::Ended(None) => tracing::debug!("agent connection closed"),
    }
}

/// Cancel-safe reading of bounded frames from a logical stream.
#[derive(Default)]
struct FrameReader {
    decoder: FrameDecoder,
}

impl FrameReader {
    /// Next payload; `Ok(None)` at the end of the stream.
    async fn next(&mut self, reader: &mut StreamReader) -> Result<Option<Vec<u8>>, AgentError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(payload) = self
                .decoder
                .next_frame()
                .map_err(|e| AgentError::Protocol(e.to_string()))?
            {
                return Ok(Some(payload));
            }
            // Cancel safety: bytes are only consumed into `decoder`, which
            // outlives this future.
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

/// A running process: events from the agent, in order.
pub struct ExecSession {
    reader: StreamReader,
    frames: FrameReader,
    /// Set after the last event (or an error): later calls return `None`.
    done: bool,
    input: ExecInput,
}

impl ExecSession {
    /// A cloneable handle for stdin and signals, usable while
    /// [`ExecSession::next_event`] is being awaited.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// Next event from the agent; None after Exited/SpawnFailed or when the stream ends.
    ///
    /// Cancel safe: dropping the future loses no event.
    pub async fn next_event(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.done {
            return None;
        }
        let result = match self.frames.next(&mut self.reader).await {
            Ok(Some(payload)) => {
                crownest_proto::decode::<ExecEvent>(&payload).map_err(AgentError::from_read)
            }
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(ExecEvent::Exited { .. } | ExecEvent::SpawnFailed { .. } | ExecEvent::NotFound)
            | Err(_) => {
                self.done = true;
            }
            Ok(_) => {}
        }
        Some(result)
    }
}

/// Sends stdin and signals to a running process. Cheap to clone.
#[derive(Clone)]
pub struct ExecInput {
    writer: Arc<Mutex<StreamWriter>>,
    /// Keeps the connection driver alive while input may still be sent.
    _client: Arc<Inner>,
}

impl ExecInput {
    /// Writes bytes to the process's stdin (the request must have set
    /// `stdin`); large writes are split into bounded frames.
    pub async fn stdin(&self, bytes: Vec<u8>) -> Result<(), AgentError> {
        let mut writer = self.writer.lock().await;
        if bytes.len() <= MAX_CHUNK_LEN {
            return write_message(&mut *writer, &crownest_proto::ExecInput::Stdin(bytes))
                .await
                .map_err(AgentError::from_write);
        }
        for chunk in bytes.chunks(MAX_CHUNK_LEN) {
            let message = crownest_proto::ExecInput::Stdin(chunk.to_vec());
            write_message(&mut *writer, &message)
                .await
                .map_err(AgentError::from_write)?;
        }
        Ok(())
    }

    /// Closes the process's stdin once the bytes sent before are written.
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        self.send(&crownest_proto::ExecInput::CloseStdin).await
    }

    /// Delivers a signal (by number) to the process's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.send(&crownest_proto::ExecInput::Signal(signal)).await
    }

    /// Kills the process and every process it started.
    pub async fn kill_all(&self) -> Result<(), AgentError> {
        self.send(&crownest_proto::ExecInput::Kill).await
    }

    /// Tells the agent the host has recorded output up to these offsets.
    pub async fn ack(&self, stdout: u64, stderr: u64) -> Result<(), AgentError> {
        self.send(&crownest_proto::ExecInput::Ack { stdout, stderr })
            .await
    }

    /// Tells the agent the host has recorded the end: it forgets the exec.
    pub async fn release(&self) -> Result<(), AgentError> {
        self.send(&crownest_proto::ExecInput::Release).await
    }

    async fn send(&self, message: &crownest_proto::ExecInput) -> Result<(), AgentError> {
        let mut writer = self.writer.lock().await;
        write_message(&mut *writer, message)
            .await
            .map_err(AgentError::from_write)
    }
}
