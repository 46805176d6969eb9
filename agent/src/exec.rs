//! The process of one exec: spawning it (its own session and process
//! group, a child subreaper, the requested user), and the supervisor task
//! that owns it until it ends: it reads stdout and stderr into the exec's
//! held output ([`crate::execs`]), writes stdin from a bounded queue,
//! enforces the timeout, waits for the exit through the [`reaper`], and
//! records how it ended.
//!
//! The process belongs to the agent, not to a stream or a session: when the
//! host goes away mid-run the process keeps running, its output is kept
//! (up to [`crownest_proto::MAX_UNACKED_BYTES`] not acknowledged) and a
//! later host gets it by attaching again. Only while a host is attached and
//! that far behind does the supervisor stop reading (the process then waits
//! on a full pipe, as it would on a slow terminal).

use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crownest_proto::{ExecEvent, ExecRequest, ExecUser, MAX_CHUNK_LEN};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::execs::Exec;
use crate::output::Stream;
use crate::{Shared, reaper, tree};

/// After the main process exits, output is drained until the pipes reach EOF
/// or stay quiet this long (a backgrounded grandchild may hold them open).
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// Upper bound of the drain after exit, even if a grandchild keeps writing.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// What the host sends to the process's stdin, in order.
#[derive(Debug)]
pub enum StdinInput {
    Data(Vec<u8>),
    Close,
}

/// Counts a running process in [`Shared::running`] for as long as it lives.
pub struct Running(Arc<Shared>);

impl Running {
    pub fn new(shared: Arc<Shared>) -> Self {
        shared.running.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A started process, before its supervisor takes it over.
pub struct Spawned {
    pub pid: u32,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    stdin: Option<pipe::Sender>,
    exit: oneshot::Receiver<reaper::Exit>,
}

/// Starts the process of a request, or says why it could not be started.
pub fn spawn(request: &ExecRequest) -> Result<Spawned, String> {
    let mut command = build_command(request)?;
    let (mut child, exit) = reaper::spawn(&mut command).map_err(|e| spawn_error(request, &e))?;
    let stdout = child.stdout.take().and_then(|fd| receiver(fd.into()));
    let stderr = child.stderr.take().and_then(|fd| receiver(fd.into()));
    let stdin = child.stdin.take().and_then(|fd| {
        pipe::Sender::from_owned_fd(OwnedFd::from(fd))
            .map_err(|e| eprintln!("crownest-agent: stdin pipe: {e}"))
            .ok()
    });
    Ok(Spawned {
        pid: child.id(),
        stdout,
        stderr,
        stdin,
        exit,
    })
}

/// Owns the process until it has ended and its output is drained, then
/// records the end in `exec`. `stdin` is the exec's input queue (bounded,
/// so a host sending faster than the process reads is pushed back).
pub async fn supervise(
    exec: Arc<Exec>,
    spawned: Spawned,
    timeout_ms: Option<u64>,
    mut stdin_queue: mpsc::Receiver<StdinInput>,
    running: Running,
) {
    let Spawned {
        pid,
        mut stdout,
        mut stderr,
        mut stdin,
        exit: mut exit_rx,
    } = spawned;
    let pgid = Pid::from_raw(pid as i32);
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let deadline = timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut exit = None;
    let mut drain_until = far;
    let mut drain_cap = far;
    let mut out_buf = vec![0u8; MAX_CHUNK_LEN];
    let mut err_buf = vec![0u8; MAX_CHUNK_LEN];
    // Stdin bytes taken from the queue and not yet written.
    let mut pending: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut queue_open = true;
    let mut paused = false;
    loop {
        if exit.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let room = exec.room();
        if paused && room > 0 && exit.is_some() {
            // The pipes were not quiet, they were not read: drain on.
            drain_until = Instant::now() + DRAIN_QUIET;
            drain_cap = drain_cap.max(drain_until);
        }
        paused = room == 0;
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf[..room]), if stdout.is_some() && room > 0 => match read {
                Ok(n) if n > 0 => {
                    exec.push_output(Stream::Stdout, &out_buf[..n]);
                    drain_until = Instant::now() + DRAIN_QUIET;
                }
                _ => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf[..room]), if stderr.is_some() && room > 0 => match read {
                Ok(n) if n > 0 => {
                    exec.push_output(Stream::Stderr, &err_buf[..n]);
                    drain_until = Instant::now() + DRAIN_QUIET;
                }
                _ => stderr = None,
            },
            () = exec.room_freed(), if room == 0 => {}
            status = &mut exit_rx, if exit.is_none() => {
                exec.mark_exited();
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
            () = sleep_until(drain_until.min(drain_cap)), if exit.is_some() && room > 0 => break,
            input = stdin_queue.recv(), if queue_open && pending.is_empty() => match input {
                // Without a pipe (closed, or never asked for) it is dropped.
                Some(StdinInput::Data(bytes)) if stdin.is_some() => {
                    pending = bytes;
                    written = 0;
                }
                Some(StdinInput::Data(_)) => {}
                Some(StdinInput::Close) => stdin = None,
                None => queue_open = false,
            },
            result = write_some(&mut stdin, &pending[written..]), if stdin.is_some() && written < pending.len() => match result {
                Ok(n) => {
                    written += n;
                    if written == pending.len() {
                        pending.clear();
                        written = 0;
                    }
                }
                Err(_) => {
                    // The process closed its stdin: drop what it will never read.
                    stdin = None;
                    pending.clear();
                    written = 0;
                }
            },
        }
    }
    let exit = exit.unwrap_or(reaper::Exit {
        code: None,
        signal: None,
    });
    drop((stdin, stdin_queue));
    exec.finish(ExecEvent::Exited {
        code: exit.code,
        signal: exit.signal,
        timed_out,
    });
    // Counted in `Pong::running` until its end is recorded.
    drop(running);
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

async fn write_some(pipe: &mut Option<pipe::Sender>, bytes: &[u8]) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.write(bytes).await,
        None => std::future::pending().await,
    }
}

/// Kills the command's process, everything below it, and its process
/// group (what left the tree by undoing its subreaper bit but not its
/// group).
pub fn kill_all(pgid: Pid) {
    tree::kill_tree(pgid.as_raw());
    if let Err(e) = killpg(pgid, Signal::SIGKILL)
        && e != nix::errno::Errno::ESRCH
    {
        eprintln!("crownest-agent: kill process group {pgid}: {e}");
    }
}

/// Delivers signal `number` to the process group.
pub fn signal_group(pgid: Pid, number: i32) {
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
    // across exec. gVisor's kernel (runsc 2022) refuses it with EINVAL
    // outside PID 1: there, orphans that left the process group go to the
    // agent and die with the sandbox instead.
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument
    // and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
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
