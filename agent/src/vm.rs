//! The agent as the init of a microVM guest (`--vm`): the kernel runs it as
//! `/init` from the initramfs the host built (the agent binary and the
//! virtio modules, nothing else). Before serving it does what runc does for
//! a container, in the guest's own kernel:
//!
//! 1. mounts devtmpfs, proc and sysfs, loads the virtio modules from
//!    `/lib/modules` in the order the host listed them, then forbids any
//!    further module loading (`kernel.modules_disabled`);
//! 2. waits for the two disks and the agent's named virtio-serial port;
//! 3. mounts the template rootfs (`/dev/vda`, ext4, read-only) and the
//!    sandbox's scratch disk (`/dev/vdb`, ext4) at `/workspace` on it, tmpfs
//!    at `/tmp`, `/run`, `/dev/shm` and the user's home, and moves the root
//!    there (the `switch_root` dance: `MS_MOVE` onto `/`, then `chroot`);
//! 4. brings up loopback (the egress proxy and previews dial it), sets the
//!    hostname, caps the sandbox user's processes at the template's `pids`
//!    and makes itself the OOM killer's last choice, so that a memory bomb
//!    kills the bomb, not the guest.
//!
//! Whatever fails here is fatal: init exiting panics the guest kernel,
//! which (`panic=-1`, QEMU `-no-reboot`) ends the VM, and the host sees a
//! sandbox that never answered.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};

/// The name the host gives the agent's virtio-serial port.
pub const AGENT_PORT_NAME: &str = "org.crownest.agent";

/// Where the template rootfs is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";

/// How long to wait for the disks and the port to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// Settings from the kernel command line (everything after `--`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// Module file names under `/lib/modules`, loaded in this order.
    pub modules: Vec<String>,
    /// The sandbox user: owner of the home tmpfs.
    pub uid: u32,
    pub gid: u32,
    /// The user's home in the rootfs (a tmpfs is mounted on it), if any.
    pub home: Option<String>,
    /// Size of `/tmp` and the home tmpfs.
    pub tmp_mib: u64,
    pub hostname: String,
    /// Processes the sandbox user may have at once (`RLIMIT_NPROC`, which
    /// the agent's children inherit; the agent itself, root, is exempt):
    /// the template's `pids`, which a container gets from its pids cgroup.
    pub pids: Option<u64>,
    /// The agent's port as a device path (crosvm's single-port console,
    /// a tty), instead of the virtio-serial port named [`AGENT_PORT_NAME`].
    pub port: Option<PathBuf>,
}

impl VmConfig {
    /// Parses `--modules a.ko,b.ko --user UID:GID --home PATH --tmp-mib N
    /// --hostname NAME` (the flags after `--vm`).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut config = Self {
            tmp_mib: 64,
            hostname: String::from("sandbox"),
            ..Self::default()
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--modules" => {
                    config.modules = value()?
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if let Some(bad) = config
                        .modules
                        .iter()
                        .find(|m| m.contains('/') || !m.ends_with(".ko"))
                    {
                        return Err(format!("--modules: `{bad}` is not a module file name"));
                    }
                }
                "--user" => {
                    let text = value()?;
                    let (uid, gid) = text
                        .split_once(':')
                        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                        .ok_or_else(|| format!("--user {text}: expected UID:GID"))?;
                    config.uid = uid;
                    config.gid = gid;
                }
                "--home" => {
                    let home = value()?;
                    if !home.starts_with('/') || home.split('/').any(|c| c == "..") {
                        return Err(format!("--home {home}: expected an absolute path"));
                    }
                    config.home = Some(home);
                }
                "--tmp-mib" => {
                    let text = value()?;
                    config.tmp_mib = text
                        .parse()
                        .map_err(|_| format!("--tmp-mib {text}: expected a number"))?;
                }
                "--hostname" => config.hostname = value()?,
                "--pids" => {
                    let text = value()?;
                    config.pids = Some(
                        text.parse()
                            .map_err(|_| format!("--pids {text}: expected a number"))?,
                    );
                }
                "--port" => {
                    let port = value()?;
                    if !port.starts_with("/dev/") || port.contains("..") {
                        return Err(format!("--port {port}: expected a /dev path"));
                    }
                    config.port = Some(PathBuf::from(port));
                }
                other => return Err(format!("unknown --vm argument {other}")),
            }
        }
        Ok(config)
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| io::Error::other(format!("mount {fstype} {source} on {target}: {e}")))
}

fn mkdir(path: &str) -> io::Result<()> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("mkdir {path}: {e}"))),
    }
}

/// Sets the guest up (see the module docs) and returns the agent's serial
/// port device.
pub fn init(config: &VmConfig) -> io::Result<PathBuf> {
    let plain = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    for dir in ["/dev", "/proc", "/sys", NEW_ROOT] {
        mkdir(dir)?;
    }
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs("proc", "/proc", "proc", plain, None)?;
    mount_fs("sysfs", "/sys", "sysfs", plain, None)?;
    for module in &config.modules {
        load_module(&Path::new("/lib/modules").join(module))?;
    }
    std::fs::write("/proc/sys/kernel/modules_disabled", "1")
        .map_err(|e| io::Error::new(e.kind(), format!("kernel.modules_disabled: {e}")))?;

    let port = wait_for(|| {
        let ready = Path::new("/dev/vda").exists() && Path::new("/dev/vdb").exists();
        match &config.port {
            _ if !ready => None,
            Some(port) => port.exists().then(|| port.clone()),
            None => agent_port(),
        }
    })
    .ok_or_else(|| {
        io::Error::other(format!(
            "no /dev/vda, /dev/vdb or virtio port `{AGENT_PORT_NAME}` within {} s",
            DEVICE_WAIT.as_secs()
        ))
    })?;

    let root = NEW_ROOT;
    mount_fs(
        "/dev/vda",
        root,
        "ext4",
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    )?;
    let inside = |p: &str| format!("{root}{p}");
    mount_fs(
        "/dev/vdb",
        &inside(crownest_proto::WORKSPACE),
        "ext4",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    for dir in ["/dev", "/proc", "/sys"] {
        mount(
            Some(dir),
            inside(dir).as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("move {dir}: {e}")))?;
    }
    let tmp = format!("mode=1777,size={}m", config.tmp_mib.max(1));
    let owned = format!(
        "mode=0755,uid={},gid={},size={}m",
        config.uid,
        config.gid,
        config.tmp_mib.max(1)
    );
    let rw = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("tmpfs", &inside("/tmp"), "tmpfs", rw, Some(&tmp))?;
    mount_fs(
        "tmpfs",
        &inside("/run"),
        "tmpfs",
        rw,
        Some("mode=0755,size=16m"),
    )?;
    mkdir(&inside("/dev/pts"))?;
    mkdir(&inside("/dev/shm"))?;
    mount_fs(
        "devpts",
        &inside("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "shm",
        &inside("/dev/shm"),
        "tmpfs",
        plain,
        Some("mode=1777,size=65536k"),
    )?;
    if let Some(home) = &config.home
        && Path::new(&inside(home)).is_dir()
    {
        mount_fs("tmpfs", &inside(home), "tmpfs", rw, Some(&owned))?;
    }

    if config.port.is_some() {
        raw_tty(&port)?;
    }

    std::env::set_current_dir(root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io::Error::other(format!("move the root: {e}")))?;
    nix::unistd::chroot(".").map_err(|e| io::Error::other(format!("chroot: {e}")))?;
    std::env::set_current_dir("/")?;

    if let Err(e) = loopback_up() {
        eprintln!("crownest-agent: cannot bring up lo: {e}");
    }
    if let Err(e) = nix::unistd::sethostname(&config.hostname) {
        eprintln!("crownest-agent: sethostname: {e}");
    }
    if let Some(pids) = config.pids {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, pids, pids)
            .map_err(|e| io::Error::other(format!("RLIMIT_NPROC: {e}")))?;
    }
    std::fs::write("/proc/self/oom_score_adj", "-1000")
        .map_err(|e| io::Error::new(e.kind(), format!("oom_score_adj: {e}")))?;
    // SAFETY: setsid has no memory-safety preconditions; as PID 1 it fails
    // harmlessly (already a session leader) or makes us one.
    unsafe { libc::setsid() };
    Ok(port)
}

/// Polls `found` until it returns `Some` or [`DEVICE_WAIT`] passes.
fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(value) = found() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/dev/vportNpM` of the port the host named [`AGENT_PORT_NAME`].
fn agent_port() -> Option<PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for port in ports.flatten() {
        let name = std::fs::read_to_string(port.path().join("name")).unwrap_or_default();
        if name.trim_end() == AGENT_PORT_NAME {
            let device = Path::new("/dev").join(port.file_name());
            if device.exists() {
                return Some(device);
            }
        }
    }
    None
}

/// Puts a console port (a tty) in raw mode: no echo, no line discipline,
/// no translation, so it carries the protocol's bytes unchanged.
fn raw_tty(port: &Path) -> io::Result<()> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", port.display())))?;
    let mut termios = tcgetattr(&file).map_err(io::Error::from)?;
    cfmakeraw(&mut termios);
    tcsetattr(&file, SetArg::TCSANOW, &termios).map_err(io::Error::from)
}

/// `finit_module(2)` of one module file; one already loaded (built in, or
/// pulled in before) is fine.
fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let params = CString::default();
    // SAFETY: finit_module reads the module from a valid open fd and takes
    // a NUL-terminated parameter string that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(io::Error::new(
        e.kind(),
        format!("load module {}: {e}", path.display()),
    ))
}

/// `ip link set lo up`, with the two ioctls it is made of.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of the
    // ifreq we own, on a valid socket.
    if unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            &mut request,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the flags member is the one SIOCGIFFLAGS just set.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above, SIOCSIFFLAGS only reads the ifreq.
    if unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCSIFFLAGS as libc::Ioctl,
            &request,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn vm_arguments_parse_and_bad_ones_are_named() {
        let config = VmConfig::parse(&args(
            "--modules virtio.ko,virtio_blk.ko --user 1000:1001 --home /home/user --tmp-mib 256 --hostname sbx-1 --port /dev/hvc0 --pids 256",
        ))
        .expect("parse");
        assert_eq!(config.modules, ["virtio.ko", "virtio_blk.ko"]);
        assert_eq!((config.uid, config.gid), (1000, 1001));
        assert_eq!(config.home.as_deref(), Some("/home/user"));
        assert_eq!(config.tmp_mib, 256);
        assert_eq!(config.hostname, "sbx-1");
        assert_eq!(config.port.as_deref(), Some(Path::new("/dev/hvc0")));
        assert_eq!(config.pids, Some(256));
        for bad in [
            "--modules ../evil.ko",
            "--modules x.so",
            "--user 1000",
            "--home relative",
            "--home /a/../b",
            "--tmp-mib lots",
            "--pids many",
            "--hostname",
            "--port hvc0",
            "--port /dev/../etc/x",
            "--what 1",
        ] {
            assert!(VmConfig::parse(&args(bad)).is_err(), "{bad} accepted");
        }
    }
}
