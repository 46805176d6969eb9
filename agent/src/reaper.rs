//! The agent's one child reaper.
//!
//! As PID 1 of the sandbox's PID namespace the agent inherits every orphan,
//! so it must `waitpid(-1)` on `SIGCHLD` or zombies pile up. Exit statuses of
//! processes the agent started go to the exec task waiting for them (a
//! pid -> oneshot map); statuses of unknown pids (orphans) are just reaped.
//! Nothing else in the agent may wait for children (no `tokio::process`).
//!
//! Spawning and reaping take the same lock, so a child cannot be reaped
//! before its waiter is registered, and `std`'s own `waitpid` on a child
//! whose `exec` failed cannot race with `waitpid(-1)`.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Waiters by pid. Process-wide because `waitpid(-1)` is.
static WAITERS: Mutex<BTreeMap<i32, oneshot::Sender<Exit>>> = Mutex::new(BTreeMap::new());

fn waiters() -> MutexGuard<'static, BTreeMap<i32, oneshot::Sender<Exit>>> {
    // A panic while holding the lock leaves the map consistent (single inserts
    // and removes), so a poisoned lock is still usable.
    WAITERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `command` and registers for its exit status.
pub fn spawn(command: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
    let mut waiters = waiters();
    let child = command.spawn()?;
    let (tx, rx) = oneshot::channel();
    // Registered before the lock is released, so before any reap can see it.
    waiters.insert(child.id() as i32, tx);
    Ok((child, rx))
}

/// Reaps every child that has ended, without blocking.
pub fn reap() {
    let mut waiters = waiters();
    loop {
        let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (
                pid,
                Exit {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, signal, _core)) => (
                pid,
                Exit {
                    code: None,
                    signal: Some(signal as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("crownest-agent: waitpid: {e}");
                return;
            }
        };
        if let Some(waiter) = waiters.remove(&pid.as_raw()) {
            // The exec task may be gone already; nothing to tell then.
            let _ = waiter.send(exit);
        }
    }
}

/// Reaps on every `SIGCHLD`, forever.
pub async fn run() -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    loop {
        reap();
        if sigchld.recv().await.is_none() {
            return Ok(());
        }
    }
}
