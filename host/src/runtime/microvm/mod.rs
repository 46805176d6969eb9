//! The `microvm` runtime: each sandbox is a virtual machine with its own
//! guest kernel (Debian's cloud kernel), run by a VMM: QEMU (here, under
//! TCG; `-M microvm` under KVM) or crosvm (KVM only; built and unit-tested,
//! not exercised on this host, see `crosvm.rs`).
//!
//! A guest boots the kernel with an initramfs whose `/init` is the static
//! agent (`crownest-agent --vm`, `agent/src/vm.rs`), which loads the virtio
//! modules, disables module loading, mounts the template rootfs from a
//! read-only ext4 image (`/dev/vda`) and the sandbox's own sparse scratch
//! disk (`/dev/vdb`, `diskMiB`) at `/workspace`, and serves the host on a
//! virtio serial port. There is no network device: egress and previews go
//! through the agent's streams exactly as in containers.
//!
//! How it differs from `oci`, and why:
//! - **The kernel is the guest's.** Sandbox code never makes a system call
//!   to the host kernel; the VMM does, as an unprivileged host uid (the
//!   sandbox's uid slot base, so no two VMMs share a uid) under QEMU's
//!   seccomp sandbox or crosvm's minijail.
//! - **Limits are the VM's size**: `vcpus` and `memoryMiB` are the guest's
//!   CPUs and RAM; `pids` is the sandbox user's `RLIMIT_NPROC` in the guest
//!   (no cgroup); `diskMiB` sizes the scratch disk, not a tmpfs.
//! - **The channel** is a unix socket QEMU listens on (a `virtserialport`
//!   named [`AGENT_PORT_NAME`], `/dev/vportNpM` in the guest); a restarted
//!   host connects again and the handshake resyncs on the same port. crosvm
//!   only connects out, once, so a relay process sits between (`crosvm.rs`).
//! - **Outliving the host**: the VMM runs in its own session; a record
//!   `<root>/<id>.json` (pid, process start time, VMM) lets a restarted
//!   host find it ([`Runtime::list`], [`Runtime::adopt`]) without trusting a
//!   recycled pid.
//!
//! State dir layout: `vm/` (owned by the VMM's uid): `scratch.img`,
//! `agent.sock`, `console.log` (the guest's serial console), `vmm.log`;
//! for crosvm also `serial.sock`, `control.sock` and `relay.log`.

pub mod crosvm;
pub mod guest;
pub mod qemu;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::oci::bundle;
use super::{
    Isolation, MAX_SOCKET_PATH, Runtime, RuntimeError, SandboxSpec, Started, UnixChannel,
    host_id_base, io_error, validate_id,
};
use crosvm::CrosvmCommand;
use guest::Kernel;
use qemu::{QemuAccel, QemuCommand};

/// The name of the agent's virtio-serial port under QEMU.
pub const AGENT_PORT_NAME: &str = "org.crownest.agent";

/// How long a guest may take from VMM start to the agent's handshake:
/// a kernel boot under TCG on a loaded 2-core host takes tens of seconds.
const TCG_BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const KVM_BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// QEMU's TCG translation cache per VM.
const TCG_TB_MIB: u32 = 64;

/// How long `crosvm stop` may take, and then crosvm to exit.
const CROSVM_STOP_WAIT: Duration = Duration::from_secs(5);

/// How long a killed VMM may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Which VMM runs a template's microVMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vmm {
    Qemu,
    Crosvm,
}

impl Vmm {
    pub const ALL: [Self; 2] = [Self::Qemu, Self::Crosvm];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Crosvm => "crosvm",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

/// How a microVM's CPU is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Accel {
    /// KVM when this host can use it (see [`kvm_usable`]), else TCG.
    Auto,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's emulator: works everywhere, many times slower.
    Tcg,
}

impl Accel {
    pub const ALL: [Self; 3] = [Self::Auto, Self::Kvm, Self::Tcg];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// Whether `/dev/kvm` can run guests well: it opens, answers
/// `KVM_GET_API_VERSION` with 12, and this host is not itself a guest
/// (the `hypervisor` CPU flag): nested KVM here exists but crawls and dies
/// with emulation failures, so `auto` does not pick it. An operator who
/// trusts a nested KVM says `accel = "kvm"`.
pub fn kvm_usable() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))?;
    // KVM_GET_API_VERSION = _IO(0xAE, 0x00)
    const KVM_GET_API_VERSION: libc::Ioctl = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        return Err(format!("/dev/kvm answered API version {version}, not 12"));
    }
    Ok(())
}

/// Whether this host runs as a guest of another hypervisor.
fn nested() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false)
}

/// What a restarted host needs to find a VMM again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Record {
    pid: i32,
    /// `/proc/<pid>/stat` field 22: tells a recycled pid apart.
    start_time: u64,
    vmm: String,
    /// crosvm's relay, which must die with the VM.
    relay_pid: Option<i32>,
    relay_start_time: Option<u64>,
}

/// Start time of a live (not zombie) process, from `/proc/<pid>/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); start time is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(pid: i32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// The `microvm` runtime driver.
#[derive(Debug)]
pub struct MicrovmRuntime {
    qemu: PathBuf,
    crosvm: PathBuf,
    /// The `crownest` binary (crosvm's relay is `crownest microvm-relay`).
    relay: PathBuf,
    /// The artifact cache (the rootfs cache dir).
    cache: PathBuf,
    /// Records of live VMMs.
    root: PathBuf,
    /// A server-wide override of every template's `accel`.
    force_accel: Option<Accel>,
    /// The initramfs of the current agent binary, once made.
    initramfs: Mutex<Option<(PathBuf, PathBuf)>>,
    qemu_version: OnceLock<String>,
    /// What `auto` picks on this host, decided once (it reads
    /// /proc/cpuinfo and opens /dev/kvm).
    auto_accel: OnceLock<Accel>,
}

impl MicrovmRuntime {
    pub fn new(
        qemu: PathBuf,
        crosvm: PathBuf,
        relay: PathBuf,
        cache: PathBuf,
        root: PathBuf,
    ) -> Self {
        Self {
            qemu,
            crosvm,
            relay,
            cache,
            root,
            force_accel: None,
            initramfs: Mutex::new(None),
            qemu_version: OnceLock::new(),
            auto_accel: OnceLock::new(),
        }
    }

    /// Forces one accelerator for every template (`--microvm-accel`).
    pub fn with_accel(mut self, accel: Option<Accel>) -> Self {
        self.force_accel = accel;
        self
    }

    /// The accelerator a sandbox of `wanted` runs with here.
    fn resolve(&self, vmm: Vmm, wanted: Accel) -> Accel {
        match self.force_accel.unwrap_or(wanted) {
            Accel::Auto if vmm == Vmm::Crosvm => Accel::Kvm,
            Accel::Auto => *self.auto_accel.get_or_init(|| {
                if !nested() && kvm_usable().is_ok() {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }),
            other => other,
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.json"))
    }

    fn read_record(&self, id: &str) -> Option<Record> {
        let text = std::fs::read_to_string(self.record_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write_record(&self, id: &str, record: &Record) -> Result<(), RuntimeError> {
        let path = self.record_path(id);
        std::fs::create_dir_all(&self.root).map_err(io_error("cannot create", &self.root))?;
        let temp = path.with_extension("tmp");
        let text = serde_json::to_vec(record).map_err(|e| RuntimeError::Config {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(io_error("cannot write", &path))
    }

    async fn initramfs(&self, kernel: &Kernel, agent: &Path) -> Result<PathBuf, RuntimeError> {
        if let Some((for_agent, path)) = &*self.lock_initramfs()
            && for_agent == agent
            && path.is_file()
        {
            return Ok(path.clone());
        }
        let path = guest::ensure_initramfs(&self.cache, kernel, agent).await?;
        *self.lock_initramfs() = Some((agent.to_owned(), path.clone()));
        Ok(path)
    }

    fn lock_initramfs(&self) -> std::sync::MutexGuard<'_, Option<(PathBuf, PathBuf)>> {
        self.initramfs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn installed_qemu(&self) -> Result<String, String> {
        if let Some(version) = self.qemu_version.get() {
            return Ok(version.clone());
        }
        let out = tokio::process::Command::new(&self.qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                format!(
                    "QEMU (`{}`) cannot be run: {e}; install it (apt-get install qemu-system-x86) or pass --qemu",
                    self.qemu.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("QEMU emulator version "))
            .map(|v| format!("qemu {}", v.trim()))
            .ok_or_else(|| {
                format!(
                    "`{} --version` printed no QEMU version",
                    self.qemu.display()
                )
            })?;
        let _ = self.qemu_version.set(version.clone());
        Ok(version)
    }

    async fn installed_crosvm(&self) -> Result<String, String> {
        let out = tokio::process::Command::new(&self.crosvm)
            .arg("version")
            .output()
            .await
            .map_err(|e| {
                format!(
                    "crosvm is not installed (`{}` cannot be run: {e}); no package of it exists for this system: build it on a KVM host as docs/microvm.md says and pass --crosvm, or use vmm = \"qemu\"",
                    self.crosvm.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.starts_with("crosvm"))
            .map(|l| l.trim().to_owned())
            .ok_or_else(|| {
                format!(
                    "`{} version` printed no crosvm version",
                    self.crosvm.display()
                )
            })
    }

    /// The guest kernel command line (the agent's settings after `--`).
    fn cmdline(spec: &SandboxSpec, kernel: &Kernel, port: Option<&str>) -> String {
        let modules: Vec<String> = kernel
            .modules()
            .iter()
            .filter_map(|m| m.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut line = String::from(
            "console=ttyS0 quiet loglevel=4 panic=-1 oops=panic random.trust_cpu=on rdinit=/init -- --vm",
        );
        if !modules.is_empty() {
            line.push_str(&format!(" --modules {}", modules.join(",")));
        }
        line.push_str(&format!(" --user {}:{}", spec.user.uid, spec.user.gid));
        if let Some(home) = bundle::user_home(&spec.rootfs, spec.user.uid) {
            line.push_str(&format!(" --home {home}"));
        }
        line.push_str(&format!(
            " --tmp-mib {}",
            spec.resources.disk_mib.clamp(16, 1024)
        ));
        line.push_str(&format!(" --hostname {}", bundle::hostname(&spec.id)));
        line.push_str(&format!(" --pids {}", spec.resources.pids));
        if let Some(port) = port {
            line.push_str(&format!(" --port {port}"));
        }
        line
    }

    /// Spawns `program` in a session of its own as `uid` (no supplementary
    /// groups but `groups`), its output appended to `log`. The child is
    /// left to tokio's orphan reaping while this process lives (no thread
    /// or task per VM); after a host restart, init reaps it.
    fn spawn_as(
        program: &Path,
        args: Vec<std::ffi::OsString>,
        uid: u32,
        groups: Vec<u32>,
        log: &Path,
    ) -> Result<i32, RuntimeError> {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error("cannot open", log))?;
        let errors = output
            .try_clone()
            .map_err(io_error("cannot duplicate", log))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(errors)
            .kill_on_drop(false);
        let gids: Vec<nix::unistd::Gid> =
            groups.into_iter().map(nix::unistd::Gid::from_raw).collect();
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (setsid, setgroups,
        // setresgid, setresuid) on data prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid()?;
                nix::unistd::setgroups(&gids)?;
                let gid = nix::unistd::Gid::from_raw(uid);
                nix::unistd::setresgid(gid, gid, gid)?;
                let user = nix::unistd::Uid::from_raw(uid);
                nix::unistd::setresuid(user, user, user)?;
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| RuntimeError::Spawn {
            binary: program.to_owned(),
            source,
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| {
                RuntimeError::Unavailable(format!("{} exited at once", program.display()))
            })?;
        drop(child);
        Ok(pid)
    }

    /// Asks crosvm to stop through its control socket (`crosvm stop`) and
    /// waits a little for it to exit; the caller kills what is left.
    async fn crosvm_stop(&self, control: &Path, record: &Record) {
        let stop = tokio::process::Command::new(&self.crosvm)
            .args(CrosvmCommand::stop_args(control))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        if let Ok(Ok(status)) = tokio::time::timeout(CROSVM_STOP_WAIT, stop).await
            && status.success()
        {
            let deadline = tokio::time::Instant::now() + CROSVM_STOP_WAIT;
            while alive(record.pid, record.start_time) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Kills a recorded process and waits for it to go.
    async fn kill_and_wait(pid: i32, started: u64) {
        if !alive(pid, started) {
            return;
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        while alive(pid, started) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_vm(
        &self,
        spec: &SandboxSpec,
        vmm: Vmm,
        accel: Accel,
    ) -> Result<Started, RuntimeError> {
        let kernel = guest::ensure_kernel(&self.cache, false).await?;
        let image = guest::image_path(&self.cache, &spec.rootfs);
        if !image.is_file() {
            return Err(RuntimeError::RootfsMissing { path: image });
        }
        let initramfs = self.initramfs(&kernel, &spec.agent_binary).await?;
        let vm_dir = spec.state_dir.join("vm");
        let agent_socket = vm_dir.join("agent.sock");
        let longest = vm_dir.join("control.sock");
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(RuntimeError::SocketPathTooLong { path: longest, len });
        }
        std::fs::create_dir_all(&vm_dir).map_err(io_error("cannot create", &vm_dir))?;
        std::fs::set_permissions(&spec.state_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io_error("cannot chmod", &spec.state_dir))?;
        let vmm_uid = host_id_base(spec.uid_slot);
        let scratch = vm_dir.join("scratch.img");
        guest::make_scratch(
            &scratch,
            spec.resources.disk_mib,
            (spec.user.uid, spec.user.gid),
        )
        .await?;
        for path in [&vm_dir, &scratch] {
            std::os::unix::fs::chown(path, Some(vmm_uid), Some(vmm_uid))
                .map_err(io_error("cannot chown", path))?;
        }
        std::fs::set_permissions(&vm_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("cannot chmod", &vm_dir))?;
        let console_log = vm_dir.join("console.log");
        let kvm_group = || -> Vec<u32> {
            nix::unistd::Group::from_name("kvm")
                .ok()
                .flatten()
                .map(|g| vec![g.gid.as_raw()])
                .unwrap_or_default()
        };
        let (groups, boot_timeout) = match accel {
            Accel::Kvm => (kvm_group(), KVM_BOOT_TIMEOUT),
            Accel::Tcg | Accel::Auto => (Vec::new(), TCG_BOOT_TIMEOUT),
        };
        let record = match vmm {
            Vmm::Qemu => {
                let qemu_accel = match accel {
                    Accel::Kvm => QemuAccel::Kvm,
                    Accel::Tcg | Accel::Auto => QemuAccel::Tcg { tb_mib: TCG_TB_MIB },
                };
                let kernel_path = match qemu_accel {
                    QemuAccel::Kvm => guest::ensure_vmlinux(&kernel).await?,
                    QemuAccel::Tcg { .. } => kernel.bzimage(),
                };
                let command = QemuCommand {
                    binary: self.qemu.clone(),
                    name: spec.id.clone(),
                    accel: qemu_accel,
                    vcpus: spec.resources.vcpus,
                    memory_mib: spec.resources.memory_mib,
                    kernel: kernel_path,
                    initramfs,
                    cmdline: Self::cmdline(spec, &kernel, None),
                    rootfs_image: image,
                    scratch_image: scratch,
                    agent_socket: agent_socket.clone(),
                    console_log,
                };
                let pid = Self::spawn_as(
                    &self.qemu,
                    command.args(),
                    vmm_uid,
                    groups,
                    &vm_dir.join("vmm.log"),
                )?;
                Record {
                    pid,
                    start_time: start_time(pid).unwrap_or(0),
                    vmm: vmm.as_str().to_owned(),
                    relay_pid: None,
                    relay_start_time: None,
                }
            }
            Vmm::Crosvm => {
                let serial_socket = vm_dir.join("serial.sock");
                let relay_pid = Self::spawn_as(
                    &self.relay,
                    vec![
                        "microvm-relay".into(),
                        "--guest".into(),
                        serial_socket.clone().into(),
                        "--host".into(),
                        agent_socket.clone().into(),
                    ],
                    vmm_uid,
                    Vec::new(),
                    &vm_dir.join("relay.log"),
                )?;
                let relay_start_time = start_time(relay_pid);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while !serial_socket.exists() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let command = CrosvmCommand {
                    binary: self.crosvm.clone(),
                    vcpus: spec.resources.vcpus,
                    memory_mib: spec.resources.memory_mib,
                    kernel: kernel.bzimage(),
                    initramfs,
                    cmdline: Self::cmdline(spec, &kernel, Some(crosvm::AGENT_PORT_DEVICE)),
                    rootfs_image: image,
                    scratch_image: scratch,
                    serial_socket,
                    console_log,
                    control_socket: vm_dir.join("control.sock"),
                };
                let pid = Self::spawn_as(
                    &self.crosvm,
                    command.args(),
                    vmm_uid,
                    groups,
                    &vm_dir.join("vmm.log"),
                );
                let pid = match pid {
                    Ok(pid) => pid,
                    Err(e) => {
                        if let Some(started) = relay_start_time {
                            Self::kill_and_wait(relay_pid, started).await;
                        }
                        return Err(e);
                    }
                };
                Record {
                    pid,
                    start_time: start_time(pid).unwrap_or(0),
                    vmm: vmm.as_str().to_owned(),
                    relay_pid: Some(relay_pid),
                    relay_start_time,
                }
            }
        };
        self.write_record(&spec.id, &record)?;
        // A VMM that rejects its command line exits at once: say why rather
        // than waiting out the boot timeout.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !alive(record.pid, record.start_time) {
            let log = std::fs::read_to_string(vm_dir.join("vmm.log")).unwrap_or_default();
            return Err(RuntimeError::Command {
                command: format!("{} for {}", vmm.as_str(), spec.id),
                status: String::from("exited at start"),
                stderr: log.lines().rev().take(5).collect::<Vec<_>>().join("; "),
            });
        }
        Ok(Started {
            channel: Arc::new(UnixChannel { path: agent_socket }),
            boot_timeout: Some(boot_timeout),
        })
    }
}

#[async_trait::async_trait]
impl Runtime for MicrovmRuntime {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn version(&self) -> Option<String> {
        self.qemu_version.get().cloned()
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<Started, RuntimeError> {
        validate_id(&spec.id)?;
        let Isolation::Microvm { vmm, accel } = spec.isolation else {
            return Err(RuntimeError::Config {
                id: spec.id.clone(),
                message: String::from("the microvm driver was given another isolation"),
            });
        };
        if spec.state_dir.exists() {
            return Err(RuntimeError::AlreadyExists {
                id: spec.id.clone(),
            });
        }
        let accel = self.resolve(vmm, accel);
        let result = self.start_vm(spec, vmm, accel).await;
        if result.is_err()
            && let Err(e) = self.destroy(&spec.id, &spec.state_dir).await
        {
            tracing::warn!(sandbox = %spec.id, error = %e, "cleanup after a failed microVM start");
        }
        result
    }

    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        validate_id(id)?;
        if let Some(record) = self.read_record(id) {
            if record.vmm == Vmm::Crosvm.as_str() && alive(record.pid, record.start_time) {
                self.crosvm_stop(&state_dir.join("vm").join("control.sock"), &record)
                    .await;
            }
            Self::kill_and_wait(record.pid, record.start_time).await;
            if let (Some(pid), Some(started)) = (record.relay_pid, record.relay_start_time) {
                Self::kill_and_wait(pid, started).await;
            }
            if alive(record.pid, record.start_time) {
                return Err(RuntimeError::Unavailable(format!(
                    "the {} process {} of {id} did not exit after SIGKILL",
                    record.vmm, record.pid
                )));
            }
        }
        match std::fs::remove_dir_all(state_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error("cannot remove", state_dir)(e));
            }
            _ => {}
        }
        match std::fs::remove_file(self.record_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error("cannot remove", &self.record_path(id))(e))
            }
            _ => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("cannot list", &self.root)(e)),
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_owned)
            })
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn adopt(&self, id: &str, state_dir: &Path) -> Result<Option<Started>, RuntimeError> {
        validate_id(id)?;
        let Some(record) = self.read_record(id) else {
            return Ok(None);
        };
        let relay_alive = match (record.relay_pid, record.relay_start_time) {
            (Some(pid), Some(started)) => alive(pid, started),
            _ => true,
        };
        let control_present = record.vmm != Vmm::Crosvm.as_str()
            || state_dir.join("vm").join("control.sock").exists();
        if !alive(record.pid, record.start_time) || !relay_alive || !control_present {
            return Ok(None);
        }
        Ok(Some(Started::new(Arc::new(UnixChannel {
            path: state_dir.join("vm").join("agent.sock"),
        }))))
    }

    async fn check(&self, isolation: Isolation) -> Result<(), String> {
        let Isolation::Microvm { vmm, accel } = isolation else {
            return Err(String::from("not a microvm isolation"));
        };
        match vmm {
            Vmm::Qemu => {
                self.installed_qemu().await?;
            }
            Vmm::Crosvm => {
                self.installed_crosvm().await?;
                if !Path::new("/var/empty").is_dir() {
                    return Err(String::from(
                        "crosvm jails its devices in /var/empty, which does not exist (mkdir -m 0755 /var/empty)",
                    ));
                }
            }
        }
        match self.resolve(vmm, accel) {
            Accel::Kvm => kvm_usable().map_err(|e| {
                format!(
                    "{} needs KVM here: {e}; {}",
                    vmm.as_str(),
                    if vmm == Vmm::Crosvm {
                        "crosvm has no emulator, so it runs only where /dev/kvm works"
                    } else {
                        "use accel = \"tcg\" (or \"auto\")"
                    }
                )
            }),
            Accel::Tcg | Accel::Auto => Ok(()),
        }
    }

    async fn prepare(
        &self,
        isolation: Isolation,
        rootfs: &Path,
        progress: bool,
    ) -> Result<(), RuntimeError> {
        if !matches!(isolation, Isolation::Microvm { .. }) {
            return Ok(());
        }
        guest::ensure_kernel(&self.cache, progress).await?;
        guest::ensure_image(&self.cache, rootfs, progress).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{NetworkMode, Resources, SandboxUser};

    fn spec(rootfs: &Path) -> SandboxSpec {
        SandboxSpec {
            isolation: Isolation::Microvm {
                vmm: Vmm::Qemu,
                accel: Accel::Tcg,
            },
            id: String::from("sbx_abc"),
            rootfs: rootfs.to_owned(),
            state_dir: PathBuf::from("/d/sbx_abc"),
            agent_binary: PathBuf::from("/a/crownest-agent"),
            resources: Resources {
                vcpus: 1,
                memory_mib: 512,
                pids: 256,
                disk_mib: 2048,
            },
            network: NetworkMode::None,
            uid_slot: 3,
            user: SandboxUser {
                uid: 1000,
                gid: 1000,
            },
        }
    }

    #[test]
    fn the_guest_command_line_hardens_the_kernel_and_carries_the_agent_settings() {
        let rootfs = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(rootfs.path().join("etc")).expect("mkdir");
        std::fs::create_dir_all(rootfs.path().join("home/user")).expect("mkdir");
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .expect("passwd");
        let kernel = Kernel {
            release: String::from("6.1.0-1-cloud-amd64"),
            dir: rootfs.path().join("nokernel"),
        };
        let line = MicrovmRuntime::cmdline(&spec(rootfs.path()), &kernel, None);
        let (kernel_args, agent_args) = line.split_once(" -- ").expect("--");
        for arg in ["panic=-1", "quiet", "rdinit=/init", "oops=panic"] {
            assert!(
                kernel_args.split(' ').any(|a| a == arg),
                "{arg} missing: {line}"
            );
        }
        assert_eq!(
            agent_args,
            format!(
                "--vm --user 1000:1000 --home /home/user --tmp-mib 1024 --hostname {} --pids 256",
                bundle::hostname("sbx_abc")
            )
        );
        let crosvm = MicrovmRuntime::cmdline(&spec(rootfs.path()), &kernel, Some("/dev/hvc0"));
        assert!(crosvm.ends_with(" --port /dev/hvc0"), "{crosvm}");
    }

    #[test]
    fn vmm_and_accel_names_round_trip() {
        for vmm in Vmm::ALL {
            assert_eq!(Vmm::parse(vmm.as_str()), Some(vmm));
        }
        for accel in Accel::ALL {
            assert_eq!(Accel::parse(accel.as_str()), Some(accel));
        }
        assert_eq!(Vmm::parse("firecracker"), None);
    }

    #[test]
    fn a_process_start_time_tells_a_recycled_pid_apart() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let started = start_time(me).expect("own start time");
        assert!(alive(me, started));
        assert!(!alive(me, started + 1));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[tokio::test]
    async fn a_crosvm_template_without_crosvm_installed_is_unavailable_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = MicrovmRuntime::new(
            PathBuf::from("qemu-system-x86_64"),
            dir.path().join("no-crosvm"),
            PathBuf::from("crownest"),
            dir.path().join("cache"),
            dir.path().join("root"),
        );
        let reason = runtime
            .check(Isolation::Microvm {
                vmm: Vmm::Crosvm,
                accel: Accel::Auto,
            })
            .await
            .expect_err("crosvm is not installed here");
        assert!(reason.contains("crosvm is not installed"), "{reason}");
        assert!(reason.contains("docs/microvm.md"), "{reason}");
    }

    #[tokio::test]
    async fn destroying_a_sandbox_with_no_record_or_state_is_fine_and_list_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = MicrovmRuntime::new(
            PathBuf::from("qemu-system-x86_64"),
            PathBuf::from("crosvm"),
            PathBuf::from("crownest"),
            dir.path().join("cache"),
            dir.path().join("root"),
        );
        runtime
            .destroy("sbx_gone", &dir.path().join("sbx_gone"))
            .await
            .expect("idempotent");
        assert!(runtime.list().await.expect("list").is_empty());
        assert!(
            runtime
                .adopt("sbx_gone", &dir.path().join("sbx_gone"))
                .await
                .expect("adopt")
                .is_none()
        );
    }
}
