//! The `gvisor` runtime: each sandbox is a runsc container over the same
//! OCI bundle as the `oci` runtime ([`super::oci::bundle`]), built with
//! [`Flavour::Runsc`]. The sandbox's processes talk to gVisor's kernel (the
//! sentry), not the host's: the host kernel only sees the sentry and the
//! gofer (its file server), both running as `nobody` under a seccomp
//! filter of runsc's own.
//!
//! How it differs from `oci`, and why:
//! - **No user namespace in the config.** runsc puts the sentry and gofer
//!   in user namespaces of their own; sandbox uids exist only inside the
//!   sentry, so no host id range (uid slot) is needed for isolation. The
//!   slot is still held, so the accounting is the same for every runtime.
//! - **seccomp is enforced by the sentry** (`--oci-seccomp`) on the
//!   sandbox's system calls, on top of runsc's own host filter.
//! - **No `createRuntime` hook.** The counters the hook bounds under runc
//!   (inotify instances and watches per user namespace) are gVisor's own.
//! - **Network `none`**: `--network=none`, only loopback, in the sentry.
//! - **The agent socket** is a host unix socket in `<state_dir>/run`
//!   that the agent creates through the gofer (`--host-uds=create`: the
//!   sandbox may create sockets on its bind mounts, never connect to host
//!   sockets). `/run/crownest` is the only writable bind mount.
//! - **Mount points of bind mounts must exist in the rootfs**: the gofer
//!   creates them in the host directory (runc makes them on the `/run`
//!   tmpfs instead). [`ensure_mount_points`] creates the two empty ones in
//!   the template's cache entry before the first start.
//! - **A stat shim** is preloaded (`/etc/ld.so.preload`, from
//!   `native/gvisor_stat_shim.c`): runsc before 2023 answers `EINVAL` to
//!   `statx`/`fstatat` with `AT_NO_AUTOMOUNT`, which coreutils passes, so
//!   `ls -l` and `stat` would fail on every file. The shim drops the flag
//!   (gVisor has no automounts). The empty mount points `/etc/ld.so.preload`
//!   and `/run/crownest-lib` are created in the rootfs like the others; an
//!   empty `ld.so.preload` changes nothing for `oci` sandboxes.
//! - **No `openat2`** in runsc before 2023: the agent resolves workspace
//!   paths one component at a time instead, with the same guarantees.
//! - **No child subreaper** for commands (runsc 2022 refuses
//!   `PR_SET_CHILD_SUBREAPER` outside PID 1): what a command starts and
//!   moves out of its process group is reaped by the agent, and killed with
//!   the sandbox rather than with the command.
//! - **Platform** (`--platform`): `ptrace` works everywhere; `kvm` needs a
//!   usable `/dev/kvm`; `systrap` needs runsc from 2023 on. [`Runtime::check`]
//!   tries each one a template names with a real `runsc do /bin/true`.
//!
//! State dir layout: as for `oci` (`bundle/`, `run/`, `console.log`,
//! `runsc.log`, `container.pid`); runsc's own state is under `--root`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::process::Command;

use super::oci::bundle::{self, AGENT_IN_SANDBOX, Flavour, LIB_DIR_IN_SANDBOX, RUN_DIR_IN_SANDBOX};
use super::oci::runc::{Runc, runc_log_errors};
use super::{
    GvisorPlatform, Isolation, Runtime, RuntimeError, SandboxSpec, Started, UnixChannel, io_error,
    validate_id,
};

/// The stat shim (see the module docs), built by `build.rs`.
const STAT_SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gvisor_stat_shim.so"));

/// Its file name in the shim directory.
const STAT_SHIM_NAME: &str = "crownest-gvisor-stat-shim.so";

/// How long a platform probe (`runsc do /bin/true`) may take: a KVM that
/// exists but does not work (nested virtualisation) hangs rather than fails.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `gvisor` runtime driver.
#[derive(Debug, Clone)]
pub struct GvisorRuntime {
    runsc: Runc,
    /// `runsc --version`'s first line, once checked.
    version: Arc<OnceLock<String>>,
}

impl GvisorRuntime {
    /// `binary` is runsc (a name looked up in `PATH`, or a path); `root` its
    /// state dir, under the host's data dir like runc's.
    pub fn new(binary: PathBuf, root: PathBuf) -> Self {
        Self {
            runsc: Runc { binary, root },
            version: Arc::default(),
        }
    }

    async fn installed_version(&self) -> Result<String, String> {
        if let Some(version) = self.version.get() {
            return Ok(version.clone());
        }
        let out = Command::new(&self.runsc.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                format!(
                    "runsc (`{}`) cannot be run: {e}; install gVisor (apt-get install runsc) or pass --runsc",
                    self.runsc.binary.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("runsc version "))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| {
                format!(
                    "`{} --version` printed no runsc version; is it gVisor's runsc?",
                    self.runsc.binary.display()
                )
            })?;
        let _ = self.version.set(version.clone());
        Ok(version)
    }

    /// Whether this runsc build knows `platform` (its flag help lists them).
    async fn knows_platform(&self, platform: GvisorPlatform) -> Result<bool, String> {
        let out = Command::new(&self.runsc.binary)
            .arg("flags")
            .output()
            .await
            .map_err(|e| format!("runsc flags: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let listed = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("-platform"))
            .nth(1)
            .unwrap_or("");
        Ok(listed.contains(platform.as_str()))
    }

    /// Runs `/bin/true` in a throw-away sandbox on `platform`.
    async fn probe(&self, platform: GvisorPlatform) -> Result<(), String> {
        let root = self.runsc.root.join("probe");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut command = Command::new(&self.runsc.binary);
        command
            .arg("--root")
            .arg(&root)
            .arg(format!("--platform={}", platform.as_str()))
            .args(["--network=none", "do", "/bin/true"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
            Err(_) => Err(format!(
                "a gVisor sandbox on the {} platform did not start within {} s (is /dev/kvm usable? nested virtualisation often is not); use platform = \"ptrace\"",
                platform.as_str(),
                PROBE_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("runsc do: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "a gVisor sandbox on the {} platform failed to run /bin/true ({}): {}",
                platform.as_str(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    async fn run_detached(
        &self,
        spec: &SandboxSpec,
        platform: GvisorPlatform,
    ) -> Result<(), RuntimeError> {
        let bundle_dir = spec.state_dir.join("bundle");
        let console_path = spec.state_dir.join("console.log");
        let log_path = spec.state_dir.join("runsc.log");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(io_error("cannot open", &console_path))?;
        let console_err = console
            .try_clone()
            .map_err(io_error("cannot duplicate", &console_path))?;
        let mut command = Command::new(&self.runsc.binary);
        command
            .arg("--root")
            .arg(&self.runsc.root)
            .arg("--log")
            .arg(&log_path)
            .arg(format!("--platform={}", platform.as_str()))
            .args(["--network=none", "--host-uds=create", "--oci-seccomp"])
            .args(["run", "--detach", "--pid-file"])
            .arg(spec.state_dir.join("container.pid"))
            .arg("--bundle")
            .arg(&bundle_dir)
            .arg(&spec.id)
            .stdin(std::process::Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .kill_on_drop(true);
        let status = command.status().await.map_err(|e| RuntimeError::Spawn {
            binary: self.runsc.binary.clone(),
            source: e,
        })?;
        if status.success() {
            return Ok(());
        }
        let console = std::fs::read_to_string(&console_path).unwrap_or_default();
        let mut stderr = runc_log_errors(&log_path);
        if !console.trim().is_empty() && !stderr.contains(console.trim()) {
            stderr = format!("{stderr}; console: {}", console.trim());
        }
        Err(RuntimeError::Command {
            command: format!("runsc run --detach {}", spec.id),
            status: status.to_string(),
            stderr,
        })
    }

    /// `(status, sandbox pid, gofer pid)` when runsc knows the container.
    async fn state(&self, id: &str) -> Result<Option<(String, Option<Pid>)>, RuntimeError> {
        let out = self.runsc.run(&["state", id]).await?;
        if !out.success {
            return Ok(None);
        }
        let state: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Output {
                command: format!("runsc state {id}"),
                message: e.to_string(),
            })?;
        let pid = state["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1)
            .map(Pid::from_raw);
        Ok(Some((
            state["status"].as_str().unwrap_or("").to_owned(),
            pid,
        )))
    }

    /// The host directory bind-mounted at [`LIB_DIR_IN_SANDBOX`] and the
    /// `ld.so.preload` naming the shim in it, written on first use.
    fn shim(&self) -> Result<(PathBuf, PathBuf), RuntimeError> {
        let dir = self.runsc.root.with_file_name("runsc-lib");
        let shim = dir.join(STAT_SHIM_NAME);
        let preload = dir.join("ld.so.preload");
        std::fs::create_dir_all(&dir).map_err(io_error("cannot create", &dir))?;
        let line = format!("{LIB_DIR_IN_SANDBOX}/{STAT_SHIM_NAME}\n");
        for (path, content) in [(&shim, STAT_SHIM), (&preload, line.as_bytes())] {
            if std::fs::read(path).ok().as_deref() == Some(content) {
                continue;
            }
            // Written aside and renamed: a sandbox starting meanwhile sees
            // the old file or the new one, never half of one.
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, content).map_err(io_error("cannot write", &temp))?;
            std::fs::rename(&temp, path).map_err(io_error("cannot write", path))?;
        }
        Ok((dir, preload))
    }

    /// A pid from runsc's own state file (best effort: its format is
    /// runsc's, so a change only costs a zombie until we exit).
    fn state_file_pid(&self, id: &str, field: &[&str]) -> Option<Pid> {
        let path = self.runsc.root.join(format!("{id}_sandbox:{id}.state"));
        let text = std::fs::read_to_string(path).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        let value = field.iter().try_fold(&state, |v, key| v.get(*key))?;
        let pid = i32::try_from(value.as_i64()?).ok()?;
        (pid > 1).then(|| Pid::from_raw(pid))
    }

    fn gofer_pid(&self, id: &str) -> Option<Pid> {
        self.state_file_pid(id, &["goferPid"])
    }

    fn sandbox_pid(&self, id: &str) -> Option<Pid> {
        self.state_file_pid(id, &["sandbox", "pid"])
    }
}

/// Creates the mount points of the bundle's bind mounts in the rootfs when
/// they are missing (see the module docs): empty `/run/crownest` and
/// `/run/crownest-lib` directories, and empty
/// `/run/crownest-agent/crownest-agent` and `/etc/ld.so.preload` files.
pub fn ensure_mount_points(rootfs: &Path) -> Result<(), RuntimeError> {
    let inside = |p: &str| rootfs.join(p.trim_start_matches('/'));
    let run_dir = inside(RUN_DIR_IN_SANDBOX);
    std::fs::create_dir_all(&run_dir).map_err(io_error("cannot create", &run_dir))?;
    let lib_dir = inside(LIB_DIR_IN_SANDBOX);
    std::fs::create_dir_all(&lib_dir).map_err(io_error("cannot create", &lib_dir))?;
    for file in [inside(AGENT_IN_SANDBOX), inside("/etc/ld.so.preload")] {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
        }
        if !file.exists() {
            std::fs::File::create(&file).map_err(io_error("cannot create", &file))?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Runtime for GvisorRuntime {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn version(&self) -> Option<String> {
        self.version.get().cloned()
    }

    fn uses_host_uid_range(&self) -> bool {
        false
    }

    fn cgroup_sample(&self, id: &str) -> Option<super::cgroup::CgroupSample> {
        super::cgroup::sample(&bundle::cgroups_path(id))
    }

    async fn check(&self, isolation: Isolation) -> Result<(), String> {
        let Some(platform) = isolation.platform() else {
            return Err(String::from("the gvisor driver runs only gvisor templates"));
        };
        let version = self.installed_version().await?;
        if !self.knows_platform(platform).await? {
            return Err(format!(
                "runsc {version} does not support the {} platform; install a newer gVisor or use platform = \"ptrace\"",
                platform.as_str()
            ));
        }
        self.probe(platform).await
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<Started, RuntimeError> {
        validate_id(&spec.id)?;
        let Some(platform) = spec.isolation.platform() else {
            return Err(RuntimeError::Config {
                id: spec.id.clone(),
                message: String::from("not a gvisor sandbox"),
            });
        };
        let agent_socket = super::oci::check_spec(spec)?;
        if self.state(&spec.id).await?.is_some() {
            return Err(RuntimeError::AlreadyExists {
                id: spec.id.clone(),
            });
        }
        ensure_mount_points(&spec.rootfs)?;
        let (lib_dir, preload) = self.shim()?;
        let config = bundle::config(
            spec,
            bundle::agent_args(),
            Flavour::Runsc {
                lib_dir: &lib_dir,
                preload: &preload,
            },
        )?;
        let prepared = (|| {
            let bundle_dir = spec.state_dir.join("bundle");
            let run_dir = spec.state_dir.join("run");
            for dir in [&bundle_dir, &run_dir, &self.runsc.root] {
                std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
                    action: "cannot create",
                    path: dir.clone(),
                    source,
                })?;
            }
            // Only root (the host, and the agent through the gofer) uses it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| RuntimeError::Io {
                    action: "cannot chmod",
                    path: run_dir.clone(),
                    source,
                },
            )?;
            bundle::write(&bundle_dir, &config)
        })();
        let result = match prepared {
            Ok(()) => self.run_detached(spec, platform).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            if let Err(cleanup) = self.destroy(&spec.id, &spec.state_dir).await {
                tracing::warn!(id = %spec.id, error = %cleanup, "cleanup after failed start failed");
            }
            return Err(e);
        }
        Ok(Started::new(Arc::new(UnixChannel { path: agent_socket })))
    }

    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        validate_id(id)?;
        if let Some((_, pid)) = self.state(id).await? {
            let gofer = self.gofer_pid(id);
            let _ = self.runsc.run(&["kill", id, "KILL"]).await?;
            // The sandbox and gofer processes are our children (we are
            // their subreaper): reap them first, or `runsc delete` waits
            // for zombies that never go away until its deadline.
            let sandbox = pid.or_else(|| self.sandbox_pid(id));
            futures::future::join_all([sandbox, gofer].into_iter().flatten().map(reap)).await;
            // A sandbox that died on its own left zombies runsc no longer
            // names (its state says pid -1).
            reap_orphans();
            let out = self.runsc.run(&["delete", "--force", id]).await?;
            if !out.success && !out.stderr.contains("does not exist") {
                return Err(RuntimeError::Command {
                    command: format!("runsc delete --force {id}"),
                    status: out.status,
                    stderr: out.stderr,
                });
            }
        }
        reap_orphans();
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
        if !self.runsc.root.exists() {
            return Ok(Vec::new());
        }
        let out = self.runsc.run_ok(&["list", "-format", "json"]).await?;
        let entries: Option<Vec<serde_json::Value>> =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Output {
                command: "runsc list -format json".to_owned(),
                message: e.to_string(),
            })?;
        Ok(entries
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect())
    }

    async fn adopt(&self, id: &str, state_dir: &Path) -> Result<Option<Started>, RuntimeError> {
        validate_id(id)?;
        match self.state(id).await? {
            Some((status, _)) if status == "running" => {
                Ok(Some(Started::new(Arc::new(UnixChannel {
                    path: state_dir.join("run").join("agent.sock"),
                }))))
            }
            _ => Ok(None),
        }
    }
}

/// Reaps the zombies of runsc processes re-parented to us (we are a
/// subreaper): a sentry's ptrace stubs, and the sandbox and gofer of a
/// sandbox that died on its own. They are recognised by their name, `exe`
/// (runsc re-executes itself through `/proc/self/exe`); the processes this
/// host starts itself (`runsc`, `runc`, `mmdebstrap`, …) are never named
/// so, so their owners' own waits are not disturbed.
fn reap_orphans() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state …`; comm may hold spaces, so split at the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let comm = head.split_once('(').map_or("", |(_, c)| c);
            if comm == "exe" && rest.trim_start().starts_with('Z') {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
        }
    }
}

/// Waits (up to 5 s) for a killed runsc process to exit and reaps it when
/// it is our child (re-parented to us, the subreaper). Others are left alone.
async fn reap(pid: Pid) {
    for _ in 0..100 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) | Err(_) => return,
        }
    }
    tracing::warn!(pid = pid.as_raw(), "runsc process did not exit within 5 s");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_created_once_and_an_existing_agent_file_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_mount_points(dir.path()).expect("first");
        let agent = dir.path().join("run/crownest-agent/crownest-agent");
        assert!(dir.path().join("run/crownest").is_dir());
        assert!(agent.is_file());
        std::fs::write(&agent, b"x").expect("write");
        ensure_mount_points(dir.path()).expect("second");
        assert_eq!(std::fs::read(&agent).expect("read"), b"x");
    }

    #[tokio::test]
    async fn a_missing_runsc_is_unavailable_with_what_to_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime =
            GvisorRuntime::new(dir.path().join("no-such-runsc"), dir.path().join("runsc"));
        let reason = runtime
            .check(Isolation::Gvisor {
                platform: GvisorPlatform::Ptrace,
            })
            .await
            .expect_err("unavailable");
        assert!(reason.contains("apt-get install runsc"), "{reason}");
    }
}
