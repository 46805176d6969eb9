//! Runtime drivers: boot a sandbox (an isolation instance whose PID 1 is
//! `crownest-agent`), hand back a channel to its agent, destroy it, and list
//! what is running so the host can reconcile after a restart.
//!
//! The rest of the host only sees [`Runtimes`], [`Runtime`],
//! [`SandboxSpec`], [`Started`] and [`AgentChannel`]: a way to open a byte
//! stream to the agent. Whether that stream is a unix socket, a container's
//! stdio or a VM's serial port is the driver's business; nothing outside
//! this module builds a runc or runsc command line or an OCI config.
//!
//! Drivers: `oci` (runc: namespaces, seccomp, cgroups on the host kernel)
//! and `gvisor` (runsc: the same bundle, run on gVisor's user-space kernel).
//! A template picks one ([`Isolation`]); [`Runtimes`] holds the drivers and
//! says which isolations this host can run, and why not.
//!
//! **Architecture Invariant**: no sandbox process runs as a host uid a host
//! account or another live sandbox uses. Under `oci` every sandbox has its
//! own user namespace whose root maps to an unprivileged host id range
//! ([`host_id_base`]`(uid_slot)`, 65536 ids); under `gvisor` sandbox uids
//! exist only in gVisor's kernel, and runsc runs the sentry and gofer as
//! `nobody` in user namespaces of their own.

pub mod cgroup;
#[cfg(test)]
pub mod fake;
pub mod gvisor;
pub mod microvm;
pub mod oci;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use gvisor::GvisorRuntime;
pub use microvm::{Accel, MicrovmRuntime, Vmm};
pub use oci::OciRuntime;

/// How a template's sandboxes are isolated: which driver, with which
/// options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isolation {
    /// runc over a user-namespaced OCI bundle: the host kernel, behind
    /// namespaces, seccomp and cgroups.
    Oci,
    /// runsc: the same bundle on gVisor's kernel (the sentry), which
    /// implements Linux in user space; `platform` is how the sentry traps
    /// the sandbox's system calls.
    Gvisor { platform: GvisorPlatform },
    /// A virtual machine with its own guest kernel, run by `vmm` with
    /// `accel` (hardware virtualisation, or QEMU's emulator).
    Microvm { vmm: Vmm, accel: Accel },
}

impl Isolation {
    /// The driver's name: `oci`, `gvisor` or `microvm` (what the API shows).
    pub fn kind(self) -> &'static str {
        match self {
            Self::Oci => "oci",
            Self::Gvisor { .. } => "gvisor",
            Self::Microvm { .. } => "microvm",
        }
    }

    /// The gVisor platform, for `gvisor`.
    pub fn platform(self) -> Option<GvisorPlatform> {
        match self {
            Self::Gvisor { platform } => Some(platform),
            Self::Oci | Self::Microvm { .. } => None,
        }
    }

    /// The accelerator a `microvm` template asks for.
    pub fn accel(self) -> Option<Accel> {
        match self {
            Self::Microvm { accel, .. } => Some(accel),
            Self::Oci | Self::Gvisor { .. } => None,
        }
    }

    /// The VMM, for `microvm`.
    pub fn vmm(self) -> Option<Vmm> {
        match self {
            Self::Microvm { vmm, .. } => Some(vmm),
            Self::Oci | Self::Gvisor { .. } => None,
        }
    }
}

/// How gVisor's sentry intercepts system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GvisorPlatform {
    /// `PTRACE_SYSEMU`: works everywhere, slowest.
    Ptrace,
    /// Hardware virtualisation: needs a usable `/dev/kvm`.
    Kvm,
    /// seccomp traps: fast without KVM; needs runsc from mid-2023 on.
    Systrap,
}

impl GvisorPlatform {
    pub const ALL: [Self; 3] = [Self::Ptrace, Self::Kvm, Self::Systrap];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ptrace => "ptrace",
            Self::Kvm => "kvm",
            Self::Systrap => "systrap",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

/// First host uid/gid handed to sandboxes. Far above normal accounts
/// (< 60000), `nobody` (65534) and the usual `/etc/subuid` ranges
/// (100000 + 65536·n for the first few thousand users).
pub const HOST_ID_BASE: u32 = 1_000_000_000;

/// Ids per sandbox: a full 16-bit range, so every uid a Debian rootfs uses
/// (0..=65534) is mapped.
pub const IDS_PER_SANDBOX: u32 = 65_536;

/// Number of distinct uid slots: `HOST_ID_BASE + MAX_UID_SLOTS * 65536` stays
/// below `u32::MAX` (4294967295, which the kernel reserves as "invalid").
pub const MAX_UID_SLOTS: u32 = 49_000;

/// Where the agent listens inside every sandbox.
pub const AGENT_SOCKET_IN_SANDBOX: &str = "/run/crownest/agent.sock";

/// Longest unix socket path `connect(2)` accepts (`sun_path` is 108 bytes,
/// one of which is the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// First host uid (and gid) of a slot's range: sandbox root maps to this.
pub fn host_id_base(uid_slot: u32) -> u32 {
    HOST_ID_BASE + uid_slot.min(MAX_UID_SLOTS - 1) * IDS_PER_SANDBOX
}

/// Resource limits of one sandbox (cgroup limits plus the /workspace size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// CPU quota in whole CPUs (CFS quota = vcpus × period).
    pub vcpus: u32,
    /// Memory limit; swap is disabled (memory+swap = memory).
    pub memory_mib: u64,
    /// Maximum number of tasks (processes and threads).
    pub pids: i64,
    /// Size of the writable /workspace tmpfs. tmpfs pages are charged to the
    /// sandbox's memory cgroup, so this is also bounded by `memory_mib`.
    pub disk_mib: u64,
}

/// Network policy of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// A fresh network namespace with only `lo` (brought up by runc).
    None,
}

/// The default unprivileged user commands run as (ids inside the sandbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxUser {
    pub uid: u32,
    pub gid: u32,
}

/// Everything a runtime needs to boot one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The driver's options (a driver ignores what is not its own).
    pub isolation: Isolation,
    /// `sbx_…`; also the runc container id.
    pub id: String,
    /// Template rootfs (absolute path), mounted read-only and shared by all
    /// sandboxes of the template. Every parent directory must be searchable by "others"
    /// (`o+x`): the user-namespaced container root has to reach it.
    pub rootfs: PathBuf,
    /// Per-sandbox directory under the data dir (absolute); the runtime owns its
    /// content (`bundle/`, `run/`, logs) and removes it on destroy. Keep it
    /// short: `<state_dir>/run/agent.sock` must fit in [`MAX_SOCKET_PATH`].
    pub state_dir: PathBuf,
    /// Host path of the static `crownest-agent`, bind-mounted read-only.
    pub agent_binary: PathBuf,
    pub resources: Resources,
    pub network: NetworkMode,
    /// Distinct per live sandbox, `< MAX_UID_SLOTS`: host uid/gid range is
    /// `HOST_ID_BASE + slot * 65536`, size 65536.
    pub uid_slot: u32,
    pub user: SandboxUser,
}

/// A byte stream to an agent: what the handshake and yamux run over.
pub trait AgentIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AgentIo for T {}

/// An open byte stream to an agent.
pub type AgentStream = Box<dyn AgentIo>;

/// How the host reaches one sandbox's agent: opened after the start, and
/// opened again when a session breaks or a restarted host takes the
/// sandbox over. The agent's handshake resyncs on a reused stream, so a
/// channel may hand back the same underlying transport twice.
#[async_trait::async_trait]
pub trait AgentChannel: Send + Sync + std::fmt::Debug {
    /// Opens the stream, waiting up to `timeout` for the agent to accept it.
    async fn open(&self, timeout: Duration) -> Result<AgentStream, RuntimeError>;
}

/// What a successful start hands back.
#[derive(Debug, Clone)]
pub struct Started {
    /// The way to the agent. It may not accept connections yet; `open`
    /// waits.
    pub channel: Arc<dyn AgentChannel>,
    /// How long the agent may take to answer its first handshake, when the
    /// driver knows it needs longer than the host's default (a microVM
    /// boots a kernel first).
    pub boot_timeout: Option<Duration>,
}

impl Started {
    /// A start whose agent answers within the host's default timeout.
    pub fn new(channel: Arc<dyn AgentChannel>) -> Self {
        Self {
            channel,
            boot_timeout: None,
        }
    }
}

/// An agent listening on a unix socket on the host's side of the sandbox.
#[derive(Debug, Clone)]
pub struct UnixChannel {
    pub path: PathBuf,
}

/// How long to wait between attempts while the socket does not accept yet.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

#[async_trait::async_trait]
impl AgentChannel for UnixChannel {
    async fn open(&self, timeout: Duration) -> Result<AgentStream, RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::net::UnixStream::connect(&self.path).await {
                Ok(stream) => return Ok(Box::new(stream)),
                Err(source) => {
                    if tokio::time::Instant::now() + CONNECT_RETRY >= deadline {
                        return Err(RuntimeError::Io {
                            action: "cannot connect to the agent at",
                            path: self.path.clone(),
                            source,
                        });
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid sandbox id `{id}`: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("uid slot {slot} is out of range (max {max})", max = MAX_UID_SLOTS - 1)]
    InvalidUidSlot { slot: u32 },
    #[error(
        "agent socket path {path} is {len} bytes, longer than the unix socket limit of {MAX_SOCKET_PATH}; use a shorter data dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error(
        "rootfs {rootfs} is not reachable from the sandbox user namespace: {dir} is not searchable by others (chmod o+x, or keep the rootfs cache elsewhere)"
    )]
    RootfsUnreachable { rootfs: PathBuf, dir: PathBuf },
    #[error("rootfs {path} does not exist or is not a directory")]
    RootfsMissing { path: PathBuf },
    #[error("agent binary {path} does not exist")]
    AgentMissing { path: PathBuf },
    #[error("container `{id}` already exists")]
    AlreadyExists { id: String },
    #[error("cannot build the oci config for `{id}`: {message}")]
    Config { id: String, message: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot parse `{command}` output: {message}")]
    Output { command: String, message: String },
    #[error("{binary}: {message}")]
    Unsafe { binary: PathBuf, message: String },
    #[error("{0}")]
    Unavailable(String),
}

/// Maps an I/O error on `path` to [`RuntimeError::Io`]: for `map_err`.
pub(crate) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> RuntimeError + use<> {
    let path = path.to_owned();
    move |source| RuntimeError::Io {
        action,
        path,
        source,
    }
}

/// A sandbox runtime driver.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    fn name(&self) -> &'static str;
    /// The runtime's own version, for `GET /v1/health` (checked at start).
    fn version(&self) -> Option<String> {
        None
    }
    /// Boots the sandbox. On error nothing is left behind (no container, no
    /// state dir).
    async fn start(&self, spec: &SandboxSpec) -> Result<Started, RuntimeError>;
    /// Idempotent: destroying something already gone is Ok.
    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError>;
    /// Ids of containers this runtime instance owns (for start-up reconciliation).
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;
    /// Takes over a sandbox a previous host process started: `Some` with
    /// the way to its agent when its container is still running, `None`
    /// when it is gone or stopped (then [`Runtime::destroy`] cleans up).
    async fn adopt(&self, id: &str, state_dir: &Path) -> Result<Option<Started>, RuntimeError>;
    /// Whether the sandboxes of this driver run as the host uids of their
    /// uid slot (so a slot must never be shared while one runs). gVisor's
    /// do not: their uids exist only inside gVisor's kernel.
    fn uses_host_uid_range(&self) -> bool {
        true
    }
    /// What the host kernel accounts to a running sandbox (its cgroup),
    /// when this driver can tell; `None` otherwise (a VM's guest is seen
    /// from inside, through its agent).
    fn cgroup_sample(&self, id: &str) -> Option<cgroup::CgroupSample> {
        let _ = id;
        None
    }
    /// Whether this host can run `isolation` (a driver is asked only about
    /// its own kind): `Err` says why not and what to install.
    async fn check(&self, isolation: Isolation) -> Result<(), String> {
        let _ = isolation;
        Ok(())
    }
    /// Turns a built template rootfs into what this driver boots from (a
    /// microVM's disk image and guest kernel), once per recipe: called
    /// before every start and by `crownest template build`, so it must be
    /// cheap when there is nothing to do.
    async fn prepare(
        &self,
        isolation: Isolation,
        rootfs: &Path,
        progress: bool,
    ) -> Result<(), RuntimeError> {
        let _ = (isolation, rootfs, progress);
        Ok(())
    }
}

/// The drivers of this host, and which isolations it can run.
pub struct Runtimes {
    drivers: Vec<Arc<dyn Runtime>>,
    /// Isolations found unusable at start, with the reason.
    unavailable: std::collections::BTreeMap<Isolation, String>,
}

impl Runtimes {
    pub fn new(drivers: Vec<Arc<dyn Runtime>>) -> Self {
        Self {
            drivers,
            unavailable: std::collections::BTreeMap::new(),
        }
    }

    /// Asks each driver about each isolation in `wanted` (the templates'),
    /// once; the answers hold for the life of the process.
    pub async fn check(&mut self, wanted: impl IntoIterator<Item = Isolation>) {
        let mut seen = std::collections::BTreeSet::new();
        for isolation in wanted {
            if !seen.insert(isolation) {
                continue;
            }
            let verdict = match self.driver(isolation.kind()) {
                Some(driver) => driver.check(isolation).await,
                None => Err(format!(
                    "this host has no `{}` runtime driver",
                    isolation.kind()
                )),
            };
            match verdict {
                Ok(()) => {}
                Err(reason) => {
                    tracing::warn!(runtime = isolation.kind(), platform = ?isolation.platform(), %reason, "runtime unavailable");
                    self.unavailable.insert(isolation, reason);
                }
            }
        }
    }

    /// The driver of a kind (`oci`, `gvisor`).
    pub fn driver(&self, kind: &str) -> Option<&Arc<dyn Runtime>> {
        self.drivers.iter().find(|d| d.name() == kind)
    }

    /// Why `isolation` cannot run here, if it cannot.
    pub fn unavailable(&self, isolation: Isolation) -> Option<&str> {
        self.unavailable.get(&isolation).map(String::as_str)
    }

    pub fn drivers(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        self.drivers.iter()
    }
}

/// runc accepts `^[\w+-\.]+$`; we are stricter (no `+`, no leading `-` or
/// `.`) because the id also names files and cgroups.
pub(crate) fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let invalid = |reason| RuntimeError::InvalidId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() || id.len() > 128 {
        return Err(invalid("must be 1 to 128 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(invalid("only a-z, A-Z, 0-9, '_', '-' and '.' are allowed"));
    }
    if id.starts_with(['-', '.']) {
        return Err(invalid("must not start with '-' or '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_channel_gives_up_after_its_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let channel = UnixChannel {
            path: dir.path().join("none.sock"),
        };
        let started = std::time::Instant::now();
        let result = channel.open(Duration::from_millis(50)).await;
        assert!(matches!(result, Err(RuntimeError::Io { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn host_id_ranges_of_slots_do_not_overlap_and_fit_in_u32() {
        assert_eq!(host_id_base(0), 1_000_000_000);
        assert_eq!(host_id_base(1) - host_id_base(0), IDS_PER_SANDBOX);
        let last = u64::from(host_id_base(MAX_UID_SLOTS - 1)) + u64::from(IDS_PER_SANDBOX);
        assert!(last < u64::from(u32::MAX));
    }

    #[test]
    fn ids_that_could_inject_options_or_paths_are_rejected() {
        assert!(validate_id("sbx_0123abcd").is_ok());
        for bad in ["", "-rf", "../x", "a/b", "a b", ".hidden"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
