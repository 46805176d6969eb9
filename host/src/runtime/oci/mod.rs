//! The `oci` runtime: each sandbox is a runc container (any runc-compatible
//! CLI can be configured) over a bundle in `<state_dir>/bundle`.
//!
//! State dir layout (the runtime owns all of it):
//!
//! ```text
//! <state_dir>/bundle/config.json   the OCI config (see bundle.rs)
//! <state_dir>/run/                 /run/crownest inside; agent.sock appears here
//! <state_dir>/console.log          PID 1's stdout and stderr
//! <state_dir>/runc.log             runc's own log (errors end up here)
//! <state_dir>/container.pid        host pid of PID 1
//! ```
//!
//! Reaping: `runc run -d` exits once the container runs, so PID 1 of the
//! container is re-parented to the nearest child subreaper, or to host PID 1.
//! Host PID 1 may be no init that reaps, so killed sandboxes would stay
//! zombies. `crownest serve` therefore makes itself a child subreaper
//! ([`become_subreaper`]), and [`Runtime::destroy`] reaps the container's
//! PID 1 after killing it. (A sandbox taken over after a restart is not
//! our child: whoever inherited it reaps it.)

pub mod bundle;
pub mod hook;
pub mod runc;
pub mod seccomp;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use self::runc::Runc;
use super::{
    MAX_SOCKET_PATH, MAX_UID_SLOTS, Runtime, RuntimeError, SandboxSpec, Started, UnixChannel,
    host_id_base, io_error, validate_id,
};

/// The `oci` runtime driver.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    runc: Runc,
    /// The `crownest` binary runc runs as the sandboxes' `createRuntime`
    /// hook (`hook.rs`); `None` runs no hook (tests of the runtime alone).
    hook_binary: Option<PathBuf>,
    /// The version `checked_version` found.
    version: std::sync::Arc<std::sync::OnceLock<String>>,
}

/// Makes this process the reaper of what its children leave: the
/// containers and runsc processes re-parented when `runc run -d` or
/// `runsc run --detach` exits. Called once by `serve`, not by the drivers:
/// a process that merely uses a driver (tests, the CLI) must not become one
/// and collect orphans it never reaps.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; destroyed sandboxes may stay zombies");
    }
}

impl OciRuntime {
    /// `binary` is the OCI runtime CLI (`runc` or a path); `root` is its
    /// `--root` state dir. Put `root` under the host's data dir: then
    /// `runc --root <root> list` shows only this host's sandboxes, and two
    /// hosts with different data dirs never see each other's containers.
    pub fn new(binary: PathBuf, root: PathBuf) -> Self {
        Self {
            runc: Runc { binary, root },
            hook_binary: None,
            version: std::sync::Arc::default(),
        }
    }

    /// Runs `binary hook userns-limits` as each sandbox's `createRuntime`
    /// hook, bounding the kernel counters its user namespace shares with
    /// the host (see `hook.rs`), and raises the host's own limits.
    pub fn with_userns_hook(mut self, binary: PathBuf) -> Self {
        hook::raise_host_limits();
        self.hook_binary = Some(binary);
        self
    }

    /// The runc version in use, refused when it is vulnerable to
    /// CVE-2024-21626 (see [`runc::check_version`]).
    pub async fn checked_version(&self) -> Result<String, RuntimeError> {
        let out = tokio::process::Command::new(&self.runc.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|source| RuntimeError::Spawn {
                binary: self.runc.binary.clone(),
                source,
            })?;
        let version =
            runc::check_version(&String::from_utf8_lossy(&out.stdout)).map_err(|message| {
                RuntimeError::Unsafe {
                    binary: self.runc.binary.clone(),
                    message,
                }
            })?;
        let _ = self.version.set(version.clone());
        Ok(version)
    }

    /// Like [`Runtime::start`] but with `args` as PID 1 instead of the agent
    /// (for tests and diagnostics).
    pub async fn start_with_init(
        &self,
        spec: &SandboxSpec,
        args: Vec<String>,
    ) -> Result<Started, RuntimeError> {
        validate_id(&spec.id)?;
        let agent_socket = check_spec(spec)?;
        check_reachable(&spec.rootfs)?;
        // Never touch a container (or state dir) we did not create here.
        if self.exists(&spec.id).await? {
            return Err(RuntimeError::AlreadyExists {
                id: spec.id.clone(),
            });
        }
        let config = bundle::config(
            spec,
            args,
            bundle::Flavour::Runc {
                hook: self.hook_binary.as_deref(),
            },
        )?;

        let result = self.create_and_run(spec, &config).await;
        if let Err(e) = result {
            // Leave nothing half-done: no container, no state dir.
            if let Err(cleanup) = self.destroy(&spec.id, &spec.state_dir).await {
                tracing::warn!(id = %spec.id, error = %cleanup, "cleanup after failed start failed");
            }
            return Err(e);
        }
        Ok(Started::new(std::sync::Arc::new(UnixChannel {
            path: agent_socket,
        })))
    }

    async fn create_and_run(
        &self,
        spec: &SandboxSpec,
        config: &oci_spec::runtime::Spec,
    ) -> Result<(), RuntimeError> {
        let bundle_dir = spec.state_dir.join("bundle");
        let run_dir = spec.state_dir.join("run");
        std::fs::create_dir_all(&bundle_dir).map_err(io_error("cannot create", &bundle_dir))?;
        std::fs::create_dir_all(&run_dir).map_err(io_error("cannot create", &run_dir))?;
        // The agent runs as the sandbox's root, an unprivileged host uid:
        // give it the run dir so it can create its socket there.
        let root_id = host_id_base(spec.uid_slot);
        std::os::unix::fs::chown(&run_dir, Some(root_id), Some(root_id))
            .map_err(io_error("cannot chown", &run_dir))?;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o750))
            .map_err(io_error("cannot chmod", &run_dir))?;
        std::fs::create_dir_all(&self.runc.root)
            .map_err(io_error("cannot create", &self.runc.root))?;
        bundle::write(&bundle_dir, config)?;

        let console_path = spec.state_dir.join("console.log");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(io_error("cannot open", &console_path))?;
        self.runc
            .run_detached(
                &spec.id,
                &bundle_dir,
                &spec.state_dir.join("container.pid"),
                &spec.state_dir.join("runc.log"),
                console,
            )
            .await
            .map_err(|e| match e {
                RuntimeError::Command {
                    command,
                    status,
                    stderr,
                } => {
                    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
                    let console = console.trim();
                    let stderr = if console.is_empty() || stderr.contains(console) {
                        stderr
                    } else {
                        format!("{stderr}; console: {console}")
                    };
                    RuntimeError::Command {
                        command,
                        status,
                        stderr,
                    }
                }
                other => other,
            })
    }

    async fn exists(&self, id: &str) -> Result<bool, RuntimeError> {
        Ok(self.state_pid(id).await?.is_some())
    }

    /// `Some(pid)` (0 when stopped) if runc knows the container.
    async fn state_pid(&self, id: &str) -> Result<Option<i32>, RuntimeError> {
        let out = self.runc.run(&["state", id]).await?;
        if !out.success {
            return Ok(None);
        }
        let state: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Output {
                command: format!("runc state {id}"),
                message: e.to_string(),
            })?;
        let pid = state["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or(0);
        Ok(Some(pid))
    }
}

#[async_trait::async_trait]
impl Runtime for OciRuntime {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn version(&self) -> Option<String> {
        self.version.get().cloned()
    }

    fn cgroup_sample(&self, id: &str) -> Option<super::cgroup::CgroupSample> {
        super::cgroup::sample(&bundle::cgroups_path(id))
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<Started, RuntimeError> {
        self.start_with_init(spec, bundle::agent_args()).await
    }

    async fn check(&self, _isolation: super::Isolation) -> Result<(), String> {
        match self.version.get() {
            Some(_) => Ok(()),
            None => self.checked_version().await.map(|_| ()).map_err(|e| match e {
                RuntimeError::Spawn { binary, .. } => format!(
                    "the OCI runtime `{}` is not installed: install the `runc` package (apt-get install runc) or pass --runtime",
                    binary.display()
                ),
                other => other.to_string(),
            }),
        }
    }

    async fn adopt(&self, id: &str, state_dir: &Path) -> Result<Option<Started>, RuntimeError> {
        validate_id(id)?;
        let out = self.runc.run(&["state", id]).await?;
        if !out.success {
            return Ok(None);
        }
        let state: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Output {
                command: format!("runc state {id}"),
                message: e.to_string(),
            })?;
        if state["status"] != "running" {
            return Ok(None);
        }
        Ok(Some(Started::new(std::sync::Arc::new(UnixChannel {
            path: state_dir.join("run").join("agent.sock"),
        }))))
    }

    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        validate_id(id)?;
        if let Some(pid) = self.state_pid(id).await? {
            // "container not running" and friends are fine: delete --force
            // below is what must succeed.
            let _ = self.runc.run(&["kill", id, "KILL"]).await?;
            if pid > 0 {
                reap(Pid::from_raw(pid)).await;
            } else if let Some(pid) = read_pid_file(&state_dir.join("container.pid")) {
                // PID 1 exited on its own: reap its zombie if it is ours.
                let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
            }
            let out = self.runc.run(&["delete", "--force", id]).await?;
            if !out.success && !out.stderr.contains("does not exist") {
                return Err(RuntimeError::Command {
                    command: format!("runc delete --force {id}"),
                    status: out.status,
                    stderr: out.stderr,
                });
            }
        }
        match std::fs::remove_dir_all(state_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Io {
                action: "cannot remove",
                path: state_dir.to_owned(),
                source: e,
            }),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        if !self.runc.root.exists() {
            return Ok(Vec::new());
        }
        let out = self.runc.run_ok(&["list", "--format", "json"]).await?;
        // runc prints `null` when there are no containers.
        let entries: Option<Vec<serde_json::Value>> =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Output {
                command: "runc list --format json".to_owned(),
                message: e.to_string(),
            })?;
        Ok(entries
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect())
    }
}

/// Waits (up to 5 s) for the killed container init `pid` to exit and reaps
/// it if it is our child (we are a subreaper; see the module docs). A pid
/// that is not our child (e.g. a container of a previous host process) is
/// left alone.
async fn reap(pid: Pid) {
    for _ in 0..100 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(50)).await,
            // Exited and reaped, not our child, or gone: nothing left to do.
            Ok(_) | Err(_) => return,
        }
    }
    tracing::warn!(
        pid = pid.as_raw(),
        "container init did not exit within 5 s of SIGKILL"
    );
}

fn read_pid_file(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    (pid > 1).then(|| Pid::from_raw(pid))
}

/// What every OCI-style driver checks of a spec before it starts
/// anything: the uid slot, absolute paths, the agent socket's path length,
/// the rootfs and the agent binary. Returns the agent socket's path.
pub(super) fn check_spec(spec: &SandboxSpec) -> Result<PathBuf, RuntimeError> {
    if spec.uid_slot >= MAX_UID_SLOTS {
        return Err(RuntimeError::InvalidUidSlot {
            slot: spec.uid_slot,
        });
    }
    for (what, path) in [
        ("rootfs", &spec.rootfs),
        ("state dir", &spec.state_dir),
        ("agent binary", &spec.agent_binary),
    ] {
        if !path.is_absolute() {
            return Err(RuntimeError::Config {
                id: spec.id.clone(),
                message: format!("{what} {} is not an absolute path", path.display()),
            });
        }
    }
    let agent_socket = spec.state_dir.join("run").join("agent.sock");
    let len = agent_socket.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(RuntimeError::SocketPathTooLong {
            path: agent_socket,
            len,
        });
    }
    if !spec.rootfs.is_dir() {
        return Err(RuntimeError::RootfsMissing {
            path: spec.rootfs.clone(),
        });
    }
    if !spec.agent_binary.is_file() {
        return Err(RuntimeError::AgentMissing {
            path: spec.agent_binary.clone(),
        });
    }
    Ok(agent_socket)
}

/// The container's root (an unprivileged host uid) must be able to walk to
/// the rootfs: runc bind-mounts it from inside the user namespace.
fn check_reachable(rootfs: &Path) -> Result<(), RuntimeError> {
    for dir in rootfs.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(RuntimeError::RootfsUnreachable {
                rootfs: rootfs.to_owned(),
                dir: dir.to_owned(),
            });
        }
    }
    Ok(())
}
