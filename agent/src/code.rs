//! Code contexts: one persistent interpreter process per context (the
//! runners in `agent/runners/`, embedded in this binary), runs of code in
//! them, interruption on timeout, and replacement of an interpreter that
//! died.
//!
//! A runner reads requests on fd 3 and writes JSON event lines on fd 4; its
//! own stdout/stderr carry output of subprocesses. One pre-started spare
//! interpreter per language is kept after the first context of that
//! language, so later contexts start without the interpreter's import time.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crownest_proto::code::{
    ContextCreate, ContextReply, Language, MAX_EVENT_LEN, RunEnd, RunEvent, RunRequest,
};
use crownest_proto::frame::write_message;
use crownest_proto::{ExecUser, MAX_CHUNK_LEN};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Mutex, oneshot};

use crate::reaper;

const PYTHON_RUNNER: &str = include_str!("../runners/python_runner.py");
const NODE_RUNNER: &str = include_str!("../runners/node_runner.js");
/// How long an interpreter may take to start (IPython imports take seconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGINT, how long a run may take to stop before the interpreter is
/// killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
use crownest_proto::DEFAULT_PATH;

/// One interpreter process.
struct Runner {
    pid: i32,
    requests: pipe::Sender,
    lines: EventLines,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    exit: oneshot::Receiver<reaper::Exit>,
    implementation: String,
    user: Option<ExecUser>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        // The runner leads its own process group: take its children along.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

struct Context {
    language: Language,
    setup: Setup,
    /// `None` after the interpreter died; the next run starts a fresh one.
    runner: Mutex<Option<Runner>>,
    /// The interpreter's pid while it has one (0: none), readable while a
    /// run holds `runner`, so that a restart can kill it mid-run.
    pid: std::sync::atomic::AtomicI32,
}

#[derive(Clone)]
struct Setup {
    cwd: String,
    env: Vec<(String, String)>,
    user: Option<ExecUser>,
}

/// The agent's code contexts.
#[derive(Default)]
pub struct Contexts {
    contexts: std::sync::Mutex<HashMap<String, Arc<Context>>>,
    spares: std::sync::Mutex<HashMap<Language, Runner>>,
}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contexts")
            .field("contexts", &lock(&self.contexts).len())
            .finish()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates a pipe whose ends are at fds >= 10, so that moving them to 3
/// and 4 in the child never clobbers one with the other.
fn high_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let high = |fd: OwnedFd| -> io::Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new owned fd.
        let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `new` is a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    Ok((high(read)?, high(write)?))
}

fn spawn_runner(language: Language, user: Option<ExecUser>) -> io::Result<Runner> {
    let (request_read, request_write) = high_pipe()?;
    let (event_read, event_write) = high_pipe()?;
    let mut command = match language {
        Language::Python => {
            let mut c = Command::new("python3");
            c.args(["-u", "-c", PYTHON_RUNNER]);
            c
        }
        Language::JavaScript | Language::TypeScript => {
            let mut c = Command::new("node");
            c.args(["-e", NODE_RUNNER]);
            c
        }
    };
    let home = if user.is_some() {
        crownest_proto::WORKSPACE
    } else {
        "/root"
    };
    command
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("MPLBACKEND", "Agg")
        .env("PYTHONUNBUFFERED", "1")
        .env("NODE_PATH", "/usr/share/nodejs:/usr/lib/node_modules")
        .env("CROWNEST_LANGUAGE", language.as_str())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The runner reopens its ends through /proc (to make them
    // close-on-exec, see the runners), which checks the pipe's owner.
    // gVisor's pipes have no owner to change (EPERM); its /proc reopens
    // them without the check.
    if let Some(user) = user {
        for fd in [&request_read, &event_write] {
            match nix::unistd::fchown(
                fd,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            ) {
                Ok(()) | Err(nix::errno::Errno::EPERM) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let (fd3, fd4) = (request_read.as_raw_fd(), event_write.as_raw_fd());
    // SAFETY: runs between fork and exec; only async-signal-safe calls
    // (dup2, setsid, setgroups, setgid, setuid, open, write, close).
    unsafe {
        command.pre_exec(move || child_setup(fd3, fd4, user));
    }
    let (mut child, exit) = reaper::spawn(&mut command)?;
    drop(request_read);
    drop(event_write);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    Ok(Runner {
        pid: child.id() as i32,
        requests: pipe::Sender::from_owned_fd(request_write)?,
        lines: EventLines {
            events: pipe::Receiver::from_owned_fd(event_read)?,
            pending: Vec::new(),
        },
        stdout: stdout.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()),
        stderr: stderr.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()),
        exit,
        implementation: String::new(),
        user,
    })
}

fn child_setup(fd3: RawFd, fd4: RawFd, user: Option<ExecUser>) -> io::Result<()> {
    // SAFETY: dup2 onto 3 and 4 clears close-on-exec on the copies; the
    // sources are >= 10, so neither overwrites the other.
    unsafe {
        if libc::dup2(fd3, 3) < 0 || libc::dup2(fd4, 4) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let _ = libc::write(fd, b"1000".as_ptr().cast(), 4);
            libc::close(fd);
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(user) = user {
            let groups = [user.gid as libc::gid_t];
            if libc::setgroups(1, groups.as_ptr()) < 0
                || libc::setgid(user.gid) < 0
                || libc::setuid(user.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The runner's event pipe, read as lines.
struct EventLines {
    events: pipe::Receiver,
    /// Bytes read after the last complete line.
    pending: Vec<u8>,
}

impl EventLines {
    /// Reads the next complete event line, bounded by [`MAX_EVENT_LEN`];
    /// `Ok(None)` at EOF. An oversized line is skipped and reported as
    /// `Err(len)` so the caller can note it.
    async fn next_line(&mut self) -> io::Result<Option<Result<Vec<u8>, usize>>> {
        let mut skipping = 0usize;
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if skipping > 0 {
                    return Ok(Some(Err(skipping + line.len())));
                }
                return Ok(Some(Ok(line)));
            }
            if self.pending.len() > MAX_EVENT_LEN {
                skipping += self.pending.len();
                self.pending.clear();
            }
            let mut buf = vec![0u8; 256 * 1024];
            let n = self.events.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

impl Runner {
    async fn send(&mut self, request: &serde_json_lite::Value) -> io::Result<()> {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.requests.write_all(&line).await
    }

    /// Waits for the runner's `ready` line.
    async fn ready(&mut self) -> Result<(), String> {
        let line = tokio::time::timeout(START_TIMEOUT, self.lines.next_line())
            .await
            .map_err(|_| String::from("the interpreter did not start in time"))?
            .map_err(|e| format!("reading from the interpreter: {e}"))?;
        match line {
            Some(Ok(line)) => {
                let text = String::from_utf8_lossy(&line);
                match serde_json_lite::field(&text, "implementation") {
                    Some(implementation) if text.contains("\"ready\"") => {
                        self.implementation = implementation;
                        Ok(())
                    }
                    _ => Err(format!(
                        "unexpected first line from the interpreter: {text:.200}"
                    )),
                }
            }
            _ => Err(self.died_message().await),
        }
    }

    async fn setup(&mut self, setup: &Setup) -> Result<(), String> {
        let request = serde_json_lite::setup(&setup.cwd, &setup.env);
        self.send(&request)
            .await
            .map_err(|e| format!("writing to the interpreter: {e}"))?;
        loop {
            match self.lines.next_line().await {
                Ok(Some(Ok(line))) => {
                    let text = String::from_utf8_lossy(&line);
                    if text.contains("\"setup_done\"") {
                        return Ok(());
                    }
                    if text.contains("\"setup_error\"") {
                        return Err(serde_json_lite::field(&text, "message")
                            .unwrap_or_else(|| String::from("setup failed")));
                    }
                }
                Ok(Some(Err(_))) => {}
                _ => return Err(self.died_message().await),
            }
        }
    }

    async fn died_message(&mut self) -> String {
        let mut stderr = Vec::new();
        if let Some(pipe) = self.stderr.as_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(200), pipe.read_to_end(&mut stderr))
                .await;
        }
        let status = match tokio::time::timeout(Duration::from_millis(500), &mut self.exit).await {
            Ok(Ok(exit)) => match (exit.code, exit.signal) {
                (Some(code), _) => format!("exited with status {code}"),
                (_, Some(signal)) => format!("was killed by signal {signal}"),
                _ => String::from("ended"),
            },
            _ => String::from("stopped answering"),
        };
        let tail = String::from_utf8_lossy(&stderr);
        let tail: String = tail
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if tail.trim().is_empty() {
            format!("the interpreter {status}")
        } else {
            format!("the interpreter {status}: {}", tail.trim())
        }
    }
}

impl Contexts {
    /// Starts a runner, or takes the warm spare of that language.
    async fn start(
        &self,
        language: Language,
        user: Option<ExecUser>,
    ) -> Result<(Runner, bool), String> {
        let spare = lock(&self.spares).remove(&language);
        if let Some(spare) = spare
            && spare.user == user
        {
            return Ok((spare, true));
        }
        let mut runner = spawn_runner(language, user)
            .map_err(|e| format!("could not start the {} interpreter: {e}", language.as_str()))?;
        runner.ready().await?;
        Ok((runner, false))
    }

    /// Keeps one started interpreter of `language` ready for the next context.
    fn refill_spare(self: &Arc<Self>, language: Language, user: Option<ExecUser>) {
        if lock(&self.spares).contains_key(&language) {
            return;
        }
        let contexts = self.clone();
        tokio::spawn(async move {
            let Ok(mut runner) = spawn_runner(language, user) else {
                return;
            };
            if runner.ready().await.is_ok() {
                lock(&contexts.spares).entry(language).or_insert(runner);
            }
        });
    }

    pub async fn create(self: &Arc<Self>, request: ContextCreate) -> ContextReply {
        if !std::path::Path::new(&request.cwd).is_dir() {
            return ContextReply::BadCwd { cwd: request.cwd };
        }
        let setup = Setup {
            cwd: request.cwd,
            env: request.env,
            user: request.user,
        };
        let (mut runner, warm) = match self.start(request.language, setup.user).await {
            Ok(started) => started,
            Err(message) => return ContextReply::Failed { message },
        };
        if let Err(message) = runner.setup(&setup).await {
            return ContextReply::Failed { message };
        }
        let implementation = runner.implementation.clone();
        let context = Arc::new(Context {
            language: request.language,
            setup,
            pid: std::sync::atomic::AtomicI32::new(runner.pid),
            runner: Mutex::new(Some(runner)),
        });
        lock(&self.contexts).insert(request.context_id, context);
        self.refill_spare(request.language, request.user);
        ContextReply::Ready {
            implementation,
            warm,
        }
    }

    /// Ids of the contexts this agent holds, sorted; at most what one frame
    /// holds. A context whose interpreter died is held too: its next run
    /// restarts the interpreter and says so (`interpreter_restarted`), for
    /// a host that was away when it died as for one that was not.
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = lock(&self.contexts).keys().cloned().collect();
        held.sort_unstable();
        // A length prefix of up to 5 bytes per id, and room for the envelope.
        let mut budget = crownest_proto::MAX_FRAME_LEN - 64;
        held.retain(|id| {
            let cost = id.len() + 5;
            let fits = cost <= budget;
            if fits {
                budget -= cost;
            }
            fits
        });
        held
    }

    /// Replaces a context's interpreter with a fresh one (same setup, same
    /// id): its variables and imports are gone. A run in progress ends
    /// with the old interpreter's death.
    pub async fn restart(self: &Arc<Self>, context_id: &str) -> ContextReply {
        use std::sync::atomic::Ordering;
        let context = lock(&self.contexts).get(context_id).cloned();
        let Some(context) = context else {
            return ContextReply::Failed {
                message: format!("no context {context_id}"),
            };
        };
        let pid = context.pid.swap(0, Ordering::SeqCst);
        if pid > 0 {
            // The runner leads its process group; a run waiting on it sees
            // it die and gives `runner` back.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let mut slot = context.runner.lock().await;
        // Dropping the old runner kills what is left of its group.
        *slot = None;
        let (mut runner, warm) = match self.start(context.language, context.setup.user).await {
            Ok(started) => started,
            Err(message) => return ContextReply::Failed { message },
        };
        if let Err(message) = runner.setup(&context.setup).await {
            return ContextReply::Failed { message };
        }
        let implementation = runner.implementation.clone();
        context.pid.store(runner.pid, Ordering::SeqCst);
        *slot = Some(runner);
        drop(slot);
        self.refill_spare(context.language, context.setup.user);
        ContextReply::Ready {
            implementation,
            warm,
        }
    }

    pub fn delete(&self, context_id: &str) -> ContextReply {
        match lock(&self.contexts).remove(context_id) {
            // Dropping the runner kills its process group.
            Some(_) => ContextReply::Deleted,
            None => ContextReply::Failed {
                message: format!("no context {context_id}"),
            },
        }
    }

    /// Runs code, writing [`RunEvent`]s to `writer`. The run finishes even
    /// if the host goes away (events are then dropped).
    pub async fn run<W: AsyncWrite + Unpin>(self: &Arc<Self>, request: RunRequest, mut writer: W) {
        let mut sink = Sink {
            writer: &mut writer,
            broken: false,
        };
        let context = lock(&self.contexts).get(&request.context_id).cloned();
        let Some(context) = context else {
            sink.send(&RunEvent::Finished(RunEnd {
                timed_out: false,
                interpreter_died: None,
                restarted: false,
                unknown_context: true,
            }))
            .await;
            return;
        };
        let mut slot = context.runner.lock().await;
        let mut restarted = false;
        if slot.is_none() {
            restarted = true;
            match self.start(context.language, context.setup.user).await {
                Ok((mut runner, _)) => match runner.setup(&context.setup).await {
                    Ok(()) => {
                        context
                            .pid
                            .store(runner.pid, std::sync::atomic::Ordering::SeqCst);
                        *slot = Some(runner);
                    }
                    Err(message) => {
                        sink.send(&died(message, true, false)).await;
                        return;
                    }
                },
                Err(message) => {
                    sink.send(&died(message, true, false)).await;
                    return;
                }
            }
        }
        let Some(runner) = slot.as_mut() else {
            return;
        };
        let end = drive_run(runner, &request, &mut sink).await;
        if end.interpreter_died.is_some() {
            *slot = None;
            context.pid.store(0, std::sync::atomic::Ordering::SeqCst);
        }
        sink.send(&RunEvent::Finished(RunEnd { restarted, ..end }))
            .await;
        let _ = writer.shutdown().await;
    }
}

fn died(message: String, restarted: bool, timed_out: bool) -> RunEvent {
    RunEvent::Finished(RunEnd {
        timed_out,
        interpreter_died: Some(message),
        restarted,
        unknown_context: false,
    })
}

struct Sink<'a, W> {
    writer: &'a mut W,
    broken: bool,
}

impl<W: AsyncWrite + Unpin> Sink<'_, W> {
    async fn send(&mut self, event: &RunEvent) {
        if !self.broken && write_message(self.writer, event).await.is_err() {
            self.broken = true;
        }
    }

    async fn line(&mut self, line: &[u8]) {
        let mut parts = line.chunks(MAX_CHUNK_LEN).peekable();
        if parts.peek().is_none() {
            return;
        }
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            self.send(&RunEvent::EventPart {
                data: part.to_vec(),
                last,
            })
            .await;
        }
    }
}

async fn read_pipe(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Sends the code and forwards events until the runner says `done` for this
/// run, or dies; interrupts on timeout.
async fn drive_run<W: AsyncWrite + Unpin>(
    runner: &mut Runner,
    request: &RunRequest,
    sink: &mut Sink<'_, W>,
) -> RunEnd {
    let run_id = rand::random::<u32>();
    // The end of the run is the `done` event carrying this nonce: the code
    // can read the run id, but never the nonce (the runner takes it out of
    // the request before the code runs).
    let nonce = format!("{:032x}", rand::random::<u128>());
    let mut end = RunEnd {
        timed_out: false,
        interpreter_died: None,
        restarted: false,
        unknown_context: false,
    };
    let message = serde_json_lite::run(run_id, &nonce, &request.code);
    if let Err(e) = runner.send(&message).await {
        end.interpreter_died = Some(format!("writing to the interpreter failed: {e}"));
        return end;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.timeout_ms.max(1));
    let mut kill_at: Option<tokio::time::Instant> = None;
    let done_marker = format!("\"nonce\": \"{nonce}\"");
    let done_marker_compact = format!("\"nonce\":\"{nonce}\"");
    let mut out = vec![0u8; MAX_CHUNK_LEN];
    let mut err = vec![0u8; MAX_CHUNK_LEN];
    loop {
        let wake = kill_at.unwrap_or(deadline);
        tokio::select! {
            line = runner.lines.next_line() => match line {
                Ok(Some(Ok(line))) => {
                    let text = String::from_utf8_lossy(&line);
                    let ours = text.contains(&done_marker) || text.contains(&done_marker_compact);
                    let done = text.contains("\"type\": \"done\"") || text.contains("\"type\":\"done\"");
                    sink.line(&line).await;
                    if ours && done {
                        return end;
                    }
                }
                Ok(Some(Err(len))) => {
                    let note = format!("[crownest: an output of {len} bytes exceeded the {MAX_EVENT_LEN}-byte limit and was dropped]\n");
                    sink.send(&RunEvent::Stderr(note.into_bytes())).await;
                }
                Ok(None) | Err(_) => {
                    end.interpreter_died = Some(runner.died_message().await);
                    return end;
                }
            },
            n = read_pipe(&mut runner.stdout, &mut out) => match n {
                Ok(n) if n > 0 => sink.send(&RunEvent::Stdout(out[..n].to_vec())).await,
                _ => runner.stdout = None,
            },
            n = read_pipe(&mut runner.stderr, &mut err) => match n {
                Ok(n) if n > 0 => sink.send(&RunEvent::Stderr(err[..n].to_vec())).await,
                _ => runner.stderr = None,
            },
            _ = tokio::time::sleep_until(wake) => {
                if kill_at.is_none() {
                    end.timed_out = true;
                    let _ = kill(Pid::from_raw(runner.pid), Signal::SIGINT);
                    kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                } else {
                    let _ = killpg(Pid::from_raw(runner.pid), Signal::SIGKILL);
                    end.interpreter_died = Some(String::from(
                        "the interpreter did not stop after an interrupt and was killed",
                    ));
                    return end;
                }
            }
        }
    }
}

/// The few JSON shapes the agent writes to runners and reads back, without
/// a JSON dependency in the static agent.
mod serde_json_lite {
    pub struct Value(String);

    impl std::fmt::Display for Value {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    pub fn string(text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 2);
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    pub fn run(id: u32, nonce: &str, code: &str) -> Value {
        Value(format!(
            "{{\"id\":{id},\"nonce\":{},\"code\":{}}}",
            string(nonce),
            string(code)
        ))
    }

    pub fn setup(cwd: &str, env: &[(String, String)]) -> Value {
        let env: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("{}:{}", string(k), string(v)))
            .collect();
        Value(format!(
            "{{\"setup\":{{\"cwd\":{},\"env\":{{{}}}}}}}",
            string(cwd),
            env.join(",")
        ))
    }

    /// The string value of a top-level `"key": "value"` in a line the
    /// runner wrote (simple values only: ready/setup lines).
    pub fn field(text: &str, key: &str) -> Option<String> {
        let start = text.find(&format!("\"{key}\""))?;
        let rest = &text[start + key.len() + 2..];
        let rest = rest
            .trim_start()
            .strip_prefix(':')?
            .trim_start()
            .strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(value),
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    't' => value.push('\t'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn strings_are_escaped_for_json() {
            assert_eq!(string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
            assert_eq!(
                run(7, "n0nce", "print(1)").to_string(),
                "{\"id\":7,\"nonce\":\"n0nce\",\"code\":\"print(1)\"}"
            );
        }

        #[test]
        fn fields_are_read_back() {
            let line = "{\"type\": \"ready\", \"implementation\": \"ipython 8.5.0\"}";
            assert_eq!(
                field(line, "implementation").as_deref(),
                Some("ipython 8.5.0")
            );
            assert_eq!(field(line, "missing"), None);
        }
    }
}
