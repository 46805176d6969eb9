//! One `Open::Exec` stream: spawn the process, stream its output as
//! [`ExecEvent`]s, feed it [`ExecInput`]s, report how it ended.
//!
//! The process belongs to the agent, not to the stream: when the host goes
//! away mid-run the process keeps running to completion and its output is
//! read and dropped (so it never blocks on a full pipe).

use std::collections::VecDeque;
use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crownest_proto::frame::{FrameDecoder, write_message};
use crownest_proto::{ExecEvent, ExecInput, ExecRequest, ExecUser, MAX_CHUNK_LEN, decode};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::time::{Instant, sleep_until};

use crate::{Shared, reaper, tree};

/// After the main process exits, output is drained until the pipes reach EOF
/// or stay quiet this long (a backgrounded grandchild may hold them open).
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// Upper bound of the drain after exit, even if a grandchild keeps writing.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Stdin bytes buffered for a process that does not read them yet; beyond
/// this the agent stops reading the stream (yamux then pushes back).
const STDIN_BUFFER: usize = 1024 * 1024;

/// Writes events until the host side breaks, then drops them.
struct EventSink<W> {
    writer: W,
    broken: bool,
}

impl<W: AsyncWrite + Unpin> EventSink<W> {
    async fn send(&mut self, event: &ExecEvent) {
        if self.broken {
            return;
        }
        if write_message(&mut self.writer, event).await.is_err() {
            self.broken = true;
        }
    }

    async fn close(mut self) {
        if !self.broken {
            let _ = self.writer.shutdown().await;
        }
    }
}

/// Counts a running process in [`Shared::running`] for as long as it lives.
struct Running(Arc<Shared>);

impl Running {
    fn new(shared: Arc<Shared>) -> Self {
        shared.running.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one exec stream to its end.
pub async fn run<R, W>(request: ExecRequest, reader: R, writer: W, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut sink = EventSink {
        writer,
        broken: false,
    };
    let spawned = build_command(&request)
        .and_then(|mut command| reaper::spawn(&mut command).map_err(|e| spawn_error(&request, &e)));
    let (mut child, exit_rx) = match spawned {
        Ok(spawned) => spawned,
        Err(message) => {
            sink.send(&ExecEvent::SpawnFailed { message }).await;
            sink.close().await;
            return;
        }
    };
    let _running = Running::new(shared);
    let pid = child.id();
    let pgid = Pid::from_raw(pid as i32);
    let mut stdout = child.stdout.take().and_then(|fd| receiver(fd.into()));
    let mut stderr = child.stderr.take().and_then(|fd| receiver(fd.into()));
    let stdin = child.stdin.take().and_then(|fd| {
        pipe::Sender::from_owned_fd(OwnedFd::from(fd))
            .map_err(|e| eprintln!("crownest-agent: stdin pipe: {e}"))
            .ok()
    });
    drop(child);

    sink.send(&ExecEvent::Started { pid }).await;
    let exited = Arc::new(AtomicBool::new(false));
    let input = tokio::spawn(input_loop(reader, stdin, pgid, exited.clone()));

    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let deadline = request
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut exit = None;
    let mut exit_rx = exit_rx;
    let mut drain_until = far;
    let mut drain_cap = far;
    let mut out_buf = vec![0u8; MAX_CHUNK_LEN];
    let mut err_buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        if exit.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf), if stdout.is_some() => match read {
                Ok(n) if n > 0 => {
                    sink.send(&ExecEvent::Stdout(out_buf[..n].to_vec())).await;
                    drain_until = Instant::now() + DRAIN_QUIET;
                }
                _ => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf), if stderr.is_some() => match read {
                Ok(n) if n > 0 => {
                    sink.send(&ExecEvent::Stderr(err_buf[..n].to_vec())).await;
                    drain_until = Instant::now() + DRAIN_QUIET;
                }
                _ => stderr = None,
            },
            status = &mut exit_rx, if exit.is_none() => {
                exited.store(true, Ordering::Relaxed);
                // A dropped sender means the reaper lost the status; report
                // "unknown" rather than hang.
                exit = Some(status.unwrap_or(reaper::Exit { code: None, signal: None }));
                let now = Instant::now();
                drain_until = now + DRAIN_QUIET;
                drain_cap = now + DRAIN_MAX;
            },
            () = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && exit.is_none() && !timed_out => {
                timed_out = true;
                kill_all(pgid);
            },
            () = sleep_until(drain_until.min(drain_cap)), if exit.is_some() => break,
        }
    }
    input.abort();
    let exit = exit.unwrap_or(reaper::Exit {
        code: None,
        signal: None,
    });
    sink.send(&ExecEvent::Exited {
        code: exit.code,
        signal: exit.signal,
        timed_out,
    })
    .await;
    sink.close().await;
}

async fn read_some(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await,
        None => std::future::pending().await,
    }
}

fn receiver(fd: OwnedFd) -> Option<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| eprintln!("crownest-agent: output pipe: {e}"))
        .ok()
}

fn spawn_error(request: &ExecRequest, error: &io::Error) -> String {
    let program = request.argv.first().map(String::as_str).unwrap_or("");
    format!("{program}: {error}")
}

/// Reads [`ExecInput`] frames from the host: stdin bytes, stdin close,
/// signals for the process group. Ends when the host side ends.
async fn input_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut stdin: Option<pipe::Sender>,
    pgid: Pid,
    exited: Arc<AtomicBool>,
) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut reader_open = true;
    let mut close_requested = false;
    loop {
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("crownest-agent: bad exec input frame: {e}");
                    reader_open = false;
                    break;
                }
            };
            match decode::<ExecInput>(&frame) {
                Ok(ExecInput::Stdin(bytes)) if !close_requested && stdin.is_some() => {
                    pending.extend(bytes)
                }
                Ok(ExecInput::Stdin(_)) => {}
                Ok(ExecInput::CloseStdin) => close_requested = true,
                Ok(ExecInput::Signal(number)) => signal_group(pgid, number, &exited),
                Ok(ExecInput::Kill) => {
                    if !exited.load(Ordering::Relaxed) {
                        kill_all(pgid);
                    }
                }
                Err(e) => {
                    eprintln!("crownest-agent: bad exec input: {e}");
                    reader_open = false;
                    break;
                }
            }
        }
        if pending.is_empty() && (close_requested || !reader_open) {
            stdin = None;
        }
        if !reader_open && stdin.is_none() {
            return;
        }
        let room = pending.len() < STDIN_BUFFER;
        let chunk = pending.make_contiguous();
        tokio::select! {
            read = reader.read(&mut buf), if reader_open && room => match read {
                Ok(n) if n > 0 => decoder.push(&buf[..n]),
                _ => reader_open = false,
            },
            written = write_some(&mut stdin, chunk), if stdin.is_some() && !chunk.is_empty() => match written {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(_) => {
                    // The process closed its stdin: drop what it will never read.
                    stdin = None;
                    pending.clear();
                }
            },
            else => return,
        }
    }
}

async fn write_some(pipe: &mut Option<pipe::Sender>, bytes: &[u8]) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.write(bytes).await,
        None => std::future::pending().await,
    }
}

/// Kills the command's process, everything below it, and its process
/// group (what left the tree by undoing its subreaper bit but not its
/// group).
fn kill_all(pgid: Pid) {
    tree::kill_tree(pgid.as_raw());
    if let Err(e) = killpg(pgid, Signal::SIGKILL)
        && e != nix::errno::Errno::ESRCH
    {
        eprintln!("crownest-agent: kill process group {pgid}: {e}");
    }
}

fn signal_group(pgid: Pid, number: i32, exited: &AtomicBool) {
    if exited.load(Ordering::Relaxed) {
        // The group may be gone and its id reused: never signal after exit.
        return;
    }
    match Signal::try_from(number) {
        Ok(signal) => {
            if let Err(e) = killpg(pgid, signal) {
                eprintln!("crownest-agent: signal {number} to process group {pgid}: {e}");
            }
        }
        Err(_) => eprintln!("crownest-agent: ignoring unknown signal number {number}"),
    }
}

/// Builds the command for a request, or the message of a spawn failure.
fn build_command(request: &ExecRequest) -> Result<Command, String> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err("empty argv".to_owned());
    };
    if !Path::new(&request.cwd).is_dir() {
        return Err(format!(
            "working directory {}: no such directory",
            request.cwd
        ));
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&request.cwd)
        .stdin(if request.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let user = request.user;
    // SAFETY: the closure runs in the forked child before exec; `child_setup`
    // only calls async-signal-safe functions (open, write, close, setsid, prctl,
    // setgroups, setgid, setuid) and does not allocate.
    unsafe {
        command.pre_exec(move || child_setup(user));
    }
    Ok(command)
}

/// In the child, between fork and exec.
fn child_setup(user: Option<ExecUser>) -> io::Result<()> {
    const OOM_SCORE_ADJ: &CStr = c"/proc/self/oom_score_adj";
    const MOST_KILLABLE: &[u8] = b"1000";
    // SAFETY: a valid NUL-terminated path; the fd is checked and closed.
    // Failure only means the OOM killer does not prefer this process.
    unsafe {
        let fd = libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let _ = libc::write(fd, MOST_KILLABLE.as_ptr().cast(), MOST_KILLABLE.len());
            libc::close(fd);
        }
    }
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Orphans of what the command starts come back to it, not to the agent,
    // so a timeout or cancel can find and kill them (see `tree`). Kept
    // across exec.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument
    // and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(user) = user {
        let groups = [user.gid as libc::gid_t];
        // SAFETY: `groups` is a valid array of one gid for the call's duration.
        if unsafe { libc::setgroups(1, groups.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: setgid/setuid have no memory-safety preconditions.
        if unsafe { libc::setgid(user.gid) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::setuid(user.uid) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
