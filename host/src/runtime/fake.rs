//! A runtime for unit tests: no container, and an in-process agent that
//! speaks the real protocol (handshake, yamux, frames) over an in-memory
//! byte stream, so `core` is tested in milliseconds without root or runc.
//!
//! What the fake agent does:
//! - `Exec` runs the argv on the host with `tokio::process` (the commands
//!   tests use are `/bin/sh -c …`), in its own process group, with the
//!   workspace mapped to a temporary directory; timeouts, signals and
//!   `Kill` reach the group.
//! - file operations work on that directory (no sandboxing: tests only);
//! - code contexts run a tiny line language instead of an interpreter:
//!   `print TEXT`, `eprint TEXT`, `set K V`, `get K`, `display MIME DATA`,
//!   `result TEXT`, `raise NAME MESSAGE`, `sleep MS`, `die`, `big BYTES`
//!   and `raw JSON`, each answered with the Jupyter-shaped event lines the
//!   real runners write.
//! - `TcpConnect` connects to the port on the host's loopback.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crownest_proto::code::{ContextReply, RunEnd, RunEvent};
use crownest_proto::frame::{read_message, write_message};
use crownest_proto::{
    ExecEvent, ExecInput, ExecRequest, FileErrorKind, FileInfo, FileInput, FileKind, FileReply,
    Open, Pong, TunnelReply, WORKSPACE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use super::{AgentChannel, AgentStream, Runtime, RuntimeError, SandboxSpec, Started};

/// One fake sandbox: its workspace and its interpreter state.
#[derive(Debug)]
pub struct FakeSandbox {
    pub id: String,
    pub workspace: PathBuf,
    boot_id: u64,
    running: AtomicU32,
    /// Context id -> its variables.
    contexts: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Ids of the execs running now (the fake cannot replay their output:
    /// an attach finds none).
    execs: Mutex<std::collections::HashSet<String>>,
    /// Cancelled on destroy: sessions end, processes are killed.
    stopped: CancellationToken,
}

/// The fake runtime. Cheap to create; each test gets its own.
#[derive(Debug)]
pub struct FakeRuntime {
    root: PathBuf,
    sandboxes: Mutex<HashMap<String, Arc<FakeSandbox>>>,
    /// Makes the next start fail (as a broken rootfs would).
    pub fail_next_start: AtomicBool,
    /// Starts so far.
    pub starts: AtomicU32,
}

impl FakeRuntime {
    /// Workspaces go under `root`, which the caller keeps alive.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            sandboxes: Mutex::new(HashMap::new()),
            fail_next_start: AtomicBool::new(false),
            starts: AtomicU32::new(0),
        }
    }

    /// A live fake sandbox by id.
    pub fn sandbox(&self, id: &str) -> Option<Arc<FakeSandbox>> {
        lock(&self.sandboxes).get(id).cloned()
    }

    /// Ends a sandbox as a crash would: its agent goes away.
    pub fn crash(&self, id: &str) {
        if let Some(sandbox) = lock(&self.sandboxes).remove(id) {
            sandbox.stopped.cancel();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    /// It stands in for the `oci` driver (what the templates name).
    fn name(&self) -> &'static str {
        "oci"
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<Started, RuntimeError> {
        super::validate_id(&spec.id)?;
        self.starts.fetch_add(1, Ordering::Relaxed);
        if self.fail_next_start.swap(false, Ordering::Relaxed) {
            return Err(RuntimeError::Command {
                command: String::from("fake start"),
                status: String::from("exit status: 1"),
                stderr: String::from("the fake runtime was told to fail"),
            });
        }
        let workspace = self.root.join(&spec.id);
        std::fs::create_dir_all(&workspace).map_err(|source| RuntimeError::Io {
            action: "cannot create",
            path: workspace.clone(),
            source,
        })?;
        let sandbox = Arc::new(FakeSandbox {
            id: spec.id.clone(),
            workspace,
            boot_id: rand::random(),
            running: AtomicU32::new(0),
            contexts: Mutex::new(HashMap::new()),
            execs: Mutex::new(std::collections::HashSet::new()),
            stopped: CancellationToken::new(),
        });
        lock(&self.sandboxes).insert(spec.id.clone(), sandbox.clone());
        Ok(Started::new(Arc::new(FakeChannel { sandbox })))
    }

    async fn destroy(&self, id: &str, _state_dir: &Path) -> Result<(), RuntimeError> {
        if let Some(sandbox) = lock(&self.sandboxes).remove(id) {
            sandbox.stopped.cancel();
            let _ = std::fs::remove_dir_all(&sandbox.workspace);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(lock(&self.sandboxes).keys().cloned().collect())
    }

    async fn adopt(&self, id: &str, _state_dir: &Path) -> Result<Option<Started>, RuntimeError> {
        Ok(self
            .sandbox(id)
            .map(|sandbox| Started::new(Arc::new(FakeChannel { sandbox }))))
    }
}

/// Each open is a fresh in-memory stream with a new agent session on its
/// other end.
#[derive(Debug)]
struct FakeChannel {
    sandbox: Arc<FakeSandbox>,
}

#[async_trait::async_trait]
impl AgentChannel for FakeChannel {
    async fn open(&self, _timeout: Duration) -> Result<AgentStream, RuntimeError> {
        if self.sandbox.stopped.is_cancelled() {
            return Err(RuntimeError::Io {
                action: "cannot reach the fake agent of",
                path: PathBuf::from(&self.sandbox.id),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        let (host, agent) = tokio::io::duplex(1 << 20);
        let sandbox = self.sandbox.clone();
        tokio::spawn(async move {
            let stopped = sandbox.stopped.clone();
            tokio::select! {
                _ = serve(agent, sandbox) => {}
                _ = stopped.cancelled() => {}
            }
        });
        Ok(Box::new(host))
    }
}

async fn serve<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut io: T,
    sandbox: Arc<FakeSandbox>,
) {
    let handshake =
        crownest_proto::handshake::agent_handshake(&mut io, sandbox.boot_id, "fake").await;
    if handshake.is_err() {
        return;
    }
    let mut connection = yamux::Connection::new(
        io.compat(),
        crownest_proto::mux::config(),
        yamux::Mode::Server,
    );
    while let Some(Ok(stream)) = std::future::poll_fn(|cx| connection.poll_next_inbound(cx)).await {
        tokio::spawn(stream_task(stream, sandbox.clone()));
    }
}

async fn stream_task(stream: yamux::Stream, sandbox: Arc<FakeSandbox>) {
    let (mut reader, mut writer) = tokio::io::split(stream.compat());
    let Ok(Some(open)) = read_message::<Open, _>(&mut reader).await else {
        return;
    };
    match open {
        Open::Ping => {
            let pong = Pong {
                boot_id: sandbox.boot_id,
                running: sandbox.running.load(Ordering::Relaxed),
            };
            let _ = write_message(&mut writer, &pong).await;
        }
        Open::Exec(request) => return exec(request, reader, writer, sandbox).await,
        Open::FileStat { path } => {
            let reply = stat(&sandbox.workspace.join(&path), &path)
                .map_or_else(error_reply, FileReply::Stat);
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::FileList { path } => {
            let dir = sandbox.workspace.join(&path);
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    let infos: Vec<FileInfo> = entries
                        .filter_map(|e| {
                            let e = e.ok()?;
                            let name = e.file_name().to_string_lossy().into_owned();
                            stat(&e.path(), &name).ok()
                        })
                        .collect();
                    for batch in infos.chunks(crownest_proto::MAX_ENTRIES_PER_FRAME) {
                        let _ =
                            write_message(&mut writer, &FileReply::Entries(batch.to_vec())).await;
                    }
                    let _ = write_message(&mut writer, &FileReply::End).await;
                }
                Err(e) => {
                    let _ = write_message(&mut writer, &error_reply(e)).await;
                }
            }
        }
        Open::FileRead { path } => {
            let full = sandbox.workspace.join(&path);
            match (stat(&full, &path), std::fs::read(&full)) {
                (Ok(info), Ok(bytes)) => {
                    let _ = write_message(&mut writer, &FileReply::Stat(info)).await;
                    for chunk in bytes.chunks(crownest_proto::MAX_CHUNK_LEN) {
                        let _ = write_message(&mut writer, &FileReply::Data(chunk.to_vec())).await;
                    }
                    let _ = write_message(&mut writer, &FileReply::End).await;
                }
                (Err(e), _) | (_, Err(e)) => {
                    let _ = write_message(&mut writer, &error_reply(e)).await;
                }
            }
        }
        Open::FileWrite(request) => {
            let full = sandbox.workspace.join(&request.path);
            let mut bytes = Vec::new();
            let mut complete = false;
            while let Ok(Some(input)) = read_message::<FileInput, _>(&mut reader).await {
                match input {
                    FileInput::Data(data) => bytes.extend(data),
                    FileInput::End => {
                        complete = true;
                        break;
                    }
                }
            }
            if !complete {
                return;
            }
            if let Some(parent) = full.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let reply = std::fs::write(&full, &bytes)
                .and_then(|()| stat(&full, &request.path))
                .map_or_else(error_reply, FileReply::Stat);
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::FileMove { from, to, .. } => {
            let target = sandbox.workspace.join(&to);
            let reply = std::fs::rename(sandbox.workspace.join(&from), &target)
                .and_then(|()| stat(&target, &to))
                .map_or_else(error_reply, FileReply::Stat);
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::FileMkdir { path, .. } => {
            let dir = sandbox.workspace.join(&path);
            let reply = std::fs::create_dir_all(&dir)
                .and_then(|()| stat(&dir, &path))
                .map_or_else(error_reply, FileReply::Stat);
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::FileRemove { path, .. } => {
            let full = sandbox.workspace.join(&path);
            let removed = if full.is_dir() {
                std::fs::remove_dir_all(&full)
            } else {
                std::fs::remove_file(&full)
            };
            let reply = removed.map_or_else(error_reply, |()| FileReply::Done);
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::CodeContextCreate(request) => {
            lock(&sandbox.contexts).insert(request.context_id, HashMap::new());
            let reply = ContextReply::Ready {
                implementation: String::from("fake 1.0"),
                warm: false,
            };
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::CodeContextDelete { context_id } => {
            lock(&sandbox.contexts).remove(&context_id);
            let _ = write_message(&mut writer, &ContextReply::Deleted).await;
        }
        Open::CodeContextRestart { context_id } => {
            let reply = match lock(&sandbox.contexts).get_mut(&context_id) {
                Some(variables) => {
                    variables.clear();
                    ContextReply::Ready {
                        implementation: String::from("fake 1.0"),
                        warm: false,
                    }
                }
                None => ContextReply::Failed {
                    message: format!("no context {context_id}"),
                },
            };
            let _ = write_message(&mut writer, &reply).await;
        }
        Open::Stats => {
            let stats = crownest_proto::Stats {
                workspace_total_bytes: 64 * 1024 * 1024,
                tasks: u64::from(sandbox.running.load(Ordering::Relaxed)) + 1,
                ..Default::default()
            };
            let _ = write_message(&mut writer, &stats).await;
        }
        Open::FileWatch { .. } => {
            // The fake has no inotify: a watch is refused as an agent
            // without it would refuse it.
            let refused = crownest_proto::WatchEvent::Error {
                kind: crownest_proto::FileErrorKind::Other,
                message: String::from("the fake agent cannot watch files"),
            };
            let _ = write_message(&mut writer, &refused).await;
        }
        Open::CodeRun(request) => return code_run(request, writer, sandbox).await,
        Open::ExecAttach(_) => {
            let _ = write_message(&mut writer, &ExecEvent::NotFound).await;
        }
        Open::ExecList => {
            let execs = lock(&sandbox.execs)
                .iter()
                .map(|id| crownest_proto::ExecSummary {
                    id: id.clone(),
                    pid: 0,
                    running: true,
                })
                .collect();
            let _ = write_message(&mut writer, &crownest_proto::ExecList { execs }).await;
        }
        Open::CodeContextList => {
            let ids = lock(&sandbox.contexts).keys().cloned().collect();
            let _ = write_message(&mut writer, &ContextReply::Contexts(ids)).await;
        }
        Open::ArchiveExtract(_) => {
            // The fake does not unpack: it takes the bytes and reports
            // them (enough for the core's run driver).
            let mut bytes = 0u64;
            while let Ok(Some(input)) = read_message::<FileInput, _>(&mut reader).await {
                match input {
                    FileInput::Data(data) => bytes += data.len() as u64,
                    FileInput::End => {
                        let reply = crownest_proto::ArchiveReply::Done {
                            entries: 0,
                            bytes,
                            skipped: Vec::new(),
                        };
                        let _ = write_message(&mut writer, &reply).await;
                        break;
                    }
                }
            }
        }
        Open::TcpConnect { port } => {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(mut upstream) => {
                    if write_message(&mut writer, &TunnelReply::Connected)
                        .await
                        .is_ok()
                    {
                        let mut host = tokio::io::join(reader, writer);
                        let _ = tokio::io::copy_bidirectional(&mut host, &mut upstream).await;
                    }
                }
                Err(e) => {
                    let reply = TunnelReply::Failed {
                        message: e.to_string(),
                    };
                    let _ = write_message(&mut writer, &reply).await;
                }
            }
            return;
        }
        Open::EgressListen => {
            // No program in a fake sandbox connects: the offer waits until
            // the host closes it.
            let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
            return;
        }
    }
    let _ = writer.shutdown().await;
}

fn stat(path: &Path, name: &str) -> std::io::Result<FileInfo> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    let kind = if meta.is_dir() {
        FileKind::Dir
    } else if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    Ok(FileInfo {
        name: name.rsplit('/').next().unwrap_or(name).to_string(),
        kind,
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
        mtime_ms: 0,
    })
}

fn error_reply(error: std::io::Error) -> FileReply {
    let kind = match error.kind() {
        std::io::ErrorKind::NotFound => FileErrorKind::NotFound,
        std::io::ErrorKind::AlreadyExists => FileErrorKind::AlreadyExists,
        std::io::ErrorKind::PermissionDenied => FileErrorKind::PermissionDenied,
        _ => FileErrorKind::Other,
    };
    FileReply::Error {
        kind,
        message: error.to_string(),
    }
}

/// The host path of a sandbox path (the workspace is a temporary dir).
fn host_path(sandbox: &FakeSandbox, path: &str) -> PathBuf {
    match path.strip_prefix(WORKSPACE) {
        Some(rest) => sandbox.workspace.join(rest.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

async fn exec<R, W>(request: ExecRequest, mut reader: R, mut writer: W, sandbox: Arc<FakeSandbox>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let Some((program, args)) = request.argv.split_first() else {
        let _ = write_message(
            &mut writer,
            &ExecEvent::SpawnFailed {
                message: String::from("empty argv"),
            },
        )
        .await;
        return;
    };
    let cwd = host_path(&sandbox, &request.cwd);
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env.iter().filter(|(k, _)| k != "PATH").cloned())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("FAKE_WORKSPACE", &sandbox.workspace)
        .current_dir(&cwd)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(if request.stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("{program}: {e}");
            let _ = write_message(&mut writer, &ExecEvent::SpawnFailed { message }).await;
            return;
        }
    };
    sandbox.running.fetch_add(1, Ordering::Relaxed);
    lock(&sandbox.execs).insert(request.id.clone());
    let pid = child.id().unwrap_or(0);
    let pgid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = write_message(&mut writer, &ExecEvent::Started { pid }).await;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdin = child.stdin.take();
    let (input_tx, mut input_rx) = tokio::sync::mpsc::unbounded_channel();
    let input = tokio::spawn(async move {
        while let Ok(Some(message)) = read_message::<ExecInput, _>(&mut reader).await {
            if input_tx.send(message).is_err() {
                return;
            }
        }
    });
    let deadline = request
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut out = [0u8; 16 * 1024];
    let mut err = [0u8; 16 * 1024];
    let kill = |pgid| {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    };
    let status = loop {
        tokio::select! {
            n = read_opt(&mut stdout, &mut out) => match n {
                Some(n) => { let _ = write_message(&mut writer, &ExecEvent::Stdout(out[..n].to_vec())).await; }
                None => stdout = None,
            },
            n = read_opt(&mut stderr, &mut err) => match n {
                Some(n) => { let _ = write_message(&mut writer, &ExecEvent::Stderr(err[..n].to_vec())).await; }
                None => stderr = None,
            },
            message = input_rx.recv() => match message {
                Some(ExecInput::Stdin(bytes)) => {
                    if let Some(pipe) = &mut stdin {
                        let _ = pipe.write_all(&bytes).await;
                    }
                }
                Some(ExecInput::CloseStdin) => stdin = None,
                Some(ExecInput::Signal(number)) => {
                    if let Ok(signal) = nix::sys::signal::Signal::try_from(number) {
                        let _ = nix::sys::signal::killpg(pgid, signal);
                    }
                }
                Some(ExecInput::Kill) => kill(pgid),
                Some(ExecInput::Ack { .. } | ExecInput::Release) | None => {}
            },
            () = sleep_until_opt(deadline), if !timed_out => {
                timed_out = true;
                kill(pgid);
            }
            () = sandbox.stopped.cancelled() => {
                kill(pgid);
                break child.wait().await;
            }
            status = child.wait(), if stdout.is_none() && stderr.is_none() => break status,
        }
    };
    input.abort();
    sandbox.running.fetch_sub(1, Ordering::Relaxed);
    lock(&sandbox.execs).remove(&request.id);
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match status {
        Ok(status) => (status.code(), status.signal()),
        Err(_) => (None, None),
    };
    let _ = write_message(
        &mut writer,
        &ExecEvent::Exited {
            code,
            signal,
            timed_out,
        },
    )
    .await;
    let _ = writer.shutdown().await;
}

async fn read_opt<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match reader {
        Some(r) => match r.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes one runner event line as event parts.
async fn event<W: AsyncWrite + Unpin>(writer: &mut W, line: String) {
    let bytes = line.into_bytes();
    let chunks: Vec<&[u8]> = bytes.chunks(crownest_proto::MAX_CHUNK_LEN).collect();
    if chunks.is_empty() {
        return;
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let part = RunEvent::EventPart {
            data: chunk.to_vec(),
            last: i == last,
        };
        if write_message(writer, &part).await.is_err() {
            return;
        }
    }
}

fn stream_line(name: &str, text: &str) -> String {
    serde_json::json!({ "type": "stream", "name": name, "text": text }).to_string()
}

async fn code_run<W: AsyncWrite + Unpin>(
    request: crownest_proto::code::RunRequest,
    mut writer: W,
    sandbox: Arc<FakeSandbox>,
) {
    let mut end = RunEnd {
        timed_out: false,
        interpreter_died: None,
        restarted: false,
        unknown_context: false,
    };
    if !lock(&sandbox.contexts).contains_key(&request.context_id) {
        end.unknown_context = true;
        let _ = write_message(&mut writer, &RunEvent::Finished(end)).await;
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.timeout_ms);
    for line in request.code.lines() {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "print" => event(&mut writer, stream_line("stdout", &format!("{rest}\n"))).await,
            "eprint" => event(&mut writer, stream_line("stderr", &format!("{rest}\n"))).await,
            "set" => {
                let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
                if let Some(vars) = lock(&sandbox.contexts).get_mut(&request.context_id) {
                    vars.insert(key.to_string(), value.to_string());
                }
            }
            "get" => {
                let value = lock(&sandbox.contexts)
                    .get(&request.context_id)
                    .and_then(|vars| vars.get(rest).cloned());
                match value {
                    Some(value) => {
                        event(&mut writer, stream_line("stdout", &format!("{value}\n"))).await
                    }
                    None => {
                        let error = serde_json::json!({
                            "type": "error", "ename": "NameError",
                            "evalue": format!("name '{rest}' is not defined"), "traceback": [],
                        });
                        event(&mut writer, error.to_string()).await;
                    }
                }
            }
            "display" => {
                let (mime, data) = rest.split_once(' ').unwrap_or((rest, ""));
                let line = serde_json::json!({
                    "type": "display_data", "data": { mime: data }, "metadata": {},
                });
                event(&mut writer, line.to_string()).await;
            }
            "result" => {
                let line = serde_json::json!({
                    "type": "execute_result", "execution_count": 1,
                    "data": { "text/plain": rest }, "metadata": {},
                });
                event(&mut writer, line.to_string()).await;
            }
            "raise" => {
                let (name, message) = rest.split_once(' ').unwrap_or((rest, ""));
                let line = serde_json::json!({
                    "type": "error", "ename": name, "evalue": message,
                    "traceback": [format!("{name}: {message}")],
                });
                event(&mut writer, line.to_string()).await;
            }
            "sleep" => {
                let ms: u64 = rest.trim().parse().unwrap_or(0);
                let until = tokio::time::Instant::now() + Duration::from_millis(ms);
                if until > deadline {
                    tokio::time::sleep_until(deadline).await;
                    end.timed_out = true;
                    break;
                }
                tokio::time::sleep_until(until).await;
            }
            "die" => {
                lock(&sandbox.contexts).insert(request.context_id.clone(), HashMap::new());
                end.interpreter_died = Some(String::from("the interpreter was killed"));
                break;
            }
            "big" => {
                let n: usize = rest.trim().parse().unwrap_or(0);
                let line = serde_json::json!({
                    "type": "display_data", "data": { "text/plain": "x".repeat(n) },
                });
                event(&mut writer, line.to_string()).await;
            }
            "raw" => event(&mut writer, rest.to_string()).await,
            _ => {}
        }
    }
    event(
        &mut writer,
        serde_json::json!({ "type": "done", "execution_count": 1 }).to_string(),
    )
    .await;
    let _ = write_message(&mut writer, &RunEvent::Finished(end)).await;
    let _ = writer.shutdown().await;
}
