//! The OCI `createRuntime` hook that bounds kernel counters a sandbox's
//! user namespace would otherwise share with the host.
//!
//! Inotify instances and watches are charged per user namespace *and* to
//! the namespace's owner in every parent: every sandbox's count also lands
//! on host root's (`fs.inotify.max_user_instances`, 128 by default), so one
//! sandbox could exhaust them for every other sandbox and host daemon. A
//! new namespace copies the host's limits, so the host cannot simply raise
//! its own. runc runs this hook (the `crownest` binary, `crownest hook
//! userns-limits`) after it created the sandbox's namespaces and before
//! anything runs in them: it joins the sandbox's user namespace (where it
//! holds every capability) and sets that namespace's own limits, and the
//! host raises its limits to the sum it needs (see `raise_host_limits`).

use std::io::Read;

/// Per-sandbox inotify instances.
pub const SANDBOX_INOTIFY_INSTANCES: u64 = 128;
/// Per-sandbox inotify watches.
pub const SANDBOX_INOTIFY_WATCHES: u64 = 65_536;
/// The host-wide limits the server raises `fs.inotify.*` to, so that many
/// sandboxes at their own limits still leave room for host daemons.
pub const HOST_INOTIFY_INSTANCES: u64 = 1 << 20;
pub const HOST_INOTIFY_WATCHES: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("reading the container state from stdin: {0}")]
    State(String),
    #[error("joining the user namespace of pid {pid}: {source}")]
    Join { pid: i32, source: nix::Error },
    #[error("setting {what}: {source}")]
    Write {
        what: &'static str,
        source: std::io::Error,
    },
}

/// The hook's body: reads runc's state JSON from stdin (its `pid` is the
/// sandbox's init), joins that process's user namespace and writes the
/// namespace's inotify limits. Must run single-threaded (setns of a user
/// namespace refuses threaded callers): call it before any runtime starts.
pub fn userns_limits() -> Result<(), HookError> {
    let mut state = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut state)
        .map_err(|e| HookError::State(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&state).map_err(|e| HookError::State(e.to_string()))?;
    let pid = value["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 1)
        .ok_or_else(|| HookError::State(String::from("no pid in the container state")))?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/user")).map_err(|e| HookError::Join {
        pid,
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|source| HookError::Join { pid, source })?;
    // `/proc/sys/user/*` are the limits of the writer's user namespace,
    // now the sandbox's, where this process holds CAP_SYS_RESOURCE.
    for (what, path, value) in [
        (
            "user.max_inotify_instances",
            "/proc/sys/user/max_inotify_instances",
            SANDBOX_INOTIFY_INSTANCES,
        ),
        (
            "user.max_inotify_watches",
            "/proc/sys/user/max_inotify_watches",
            SANDBOX_INOTIFY_WATCHES,
        ),
    ] {
        std::fs::write(path, value.to_string())
            .map_err(|source| HookError::Write { what, source })?;
    }
    Ok(())
}

/// Raises the host's inotify limits (root's share of every sandbox's) to
/// at least [`HOST_INOTIFY_INSTANCES`] and [`HOST_INOTIFY_WATCHES`].
/// Failing is logged, not fatal: the sandboxes are still bounded.
pub fn raise_host_limits() {
    for (path, want) in [
        (
            "/proc/sys/fs/inotify/max_user_instances",
            HOST_INOTIFY_INSTANCES,
        ),
        (
            "/proc/sys/fs/inotify/max_user_watches",
            HOST_INOTIFY_WATCHES,
        ),
    ] {
        let current: u64 = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        if current < want
            && let Err(e) = std::fs::write(path, want.to_string())
        {
            tracing::warn!(path, error = %e, "cannot raise a host inotify limit");
        }
    }
}
