//! The OCI bundle of one sandbox: `config.json`, built with `oci-spec`.
//!
//! What the config says, and why:
//! - root: the shared template rootfs, read-only. Nothing writes into it:
//!   every mount point that is not already in the rootfs lives on the `/run`
//!   tmpfs, so runc never creates directories in the shared tree.
//! - process: the agent as PID 1, with six capabilities it needs to manage
//!   files and run commands as the sandbox user (which loses them on
//!   `setuid`), bounding set the same, `NoNewPrivileges`, seccomp.
//! - a user namespace mapping container 0..65536 to the slot's host range,
//!   plus new pid, mount, ipc, uts, cgroup and network namespaces (the
//!   network namespace has only `lo`).
//! - writable places are tmpfs only: `/workspace` (owned by the sandbox
//!   user, `diskMiB` large), `/tmp`, `/dev/shm`, `/run`; plus the host's
//!   `<state_dir>/run` at `/run/crownest` for the agent's socket.
//! - cgroup limits: memory (no swap), pids, cpu quota; all devices denied
//!   except runc's defaults (null, zero, full, tty, random, urandom, pts).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{
    Capability, HookBuilder, HooksBuilder, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxHugepageLimitBuilder, LinuxIdMappingBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use super::seccomp;
use crate::runtime::{
    AGENT_SOCKET_IN_SANDBOX, IDS_PER_SANDBOX, NetworkMode, RuntimeError, SandboxSpec, host_id_base,
};

/// Directory the agent binary is bind-mounted into (read-only).
pub const AGENT_DIR_IN_SANDBOX: &str = "/run/crownest-agent";
/// The agent's path inside the sandbox.
pub const AGENT_IN_SANDBOX: &str = "/run/crownest-agent/crownest-agent";
/// Where `<state_dir>/run` appears inside the sandbox.
pub const RUN_DIR_IN_SANDBOX: &str = "/run/crownest";

/// Host tasks a gVisor sandbox's sentry and gofer need beyond one (ptrace
/// stub) per sandbox task: their own threads.
const GVISOR_HOST_TASKS: i64 = 256;

/// CFS period; the quota is `vcpus` times this.
const CPU_PERIOD_US: u64 = 100_000;
/// Open files per process (soft = hard), capped by the host's own hard
/// limit: runc sets it from inside the user namespace, which cannot raise it.
const NOFILE: u64 = 65_536;

fn nofile_limit() -> u64 {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => NOFILE.min(hard),
        Err(_) => 1024,
    }
}
/// Makes the kernel's OOM killer prefer sandbox processes over host ones
/// when the whole machine, not just a sandbox, runs out of memory.
const OOM_SCORE_ADJ: i32 = 500;

/// The default PID 1: the agent listening on its socket.
pub fn agent_args() -> Vec<String> {
    vec![
        AGENT_IN_SANDBOX.to_owned(),
        "--listen".to_owned(),
        format!("unix:{AGENT_SOCKET_IN_SANDBOX}"),
    ]
}

/// `sbx_0123456789abcdef…` -> `sbx-0123456789ab`: short, and a valid host name.
pub fn hostname(id: &str) -> String {
    let short: String = id
        .strip_prefix("sbx_")
        .unwrap_or(id)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("sbx-{}", short.to_ascii_lowercase())
}

/// The cgroup path (relative to each controller's root).
pub fn cgroups_path(id: &str) -> PathBuf {
    PathBuf::from(format!("/crownest/{id}"))
}

/// The capabilities PID 1 keeps (bounding = effective = permitted).
pub fn agent_capabilities() -> HashSet<Capability> {
    [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fowner,
        Capability::Kill,
        Capability::Setuid,
        Capability::Setgid,
    ]
    .into_iter()
    .collect()
}

/// Which OCI runtime the bundle is for: what differs between runc and
/// runsc.
#[derive(Debug, Clone, Copy)]
pub enum Flavour<'a> {
    /// runc: a user namespace mapping the slot's host id range, and `hook`
    /// (the `crownest` binary) as the `createRuntime` hook when given.
    Runc { hook: Option<&'a Path> },
    /// runsc: no user namespace in the config (runsc runs the sentry and
    /// gofer as `nobody` in user namespaces of its own, and sandbox uids
    /// exist only in gVisor's kernel) and no hooks (gVisor's kernel keeps
    /// its own inotify and other counters). The seccomp profile is kept and
    /// enforced by the sentry (`--oci-seccomp`). `lib_dir` (read-only at
    /// [`LIB_DIR_IN_SANDBOX`]) and `preload` (at `/etc/ld.so.preload`)
    /// carry the stat shim (see `gvisor.rs`).
    Runsc {
        lib_dir: &'a Path,
        preload: &'a Path,
    },
}

/// Where a `gvisor` sandbox sees the host's shim directory.
pub const LIB_DIR_IN_SANDBOX: &str = "/run/crownest-lib";

/// Builds the config for `spec`, with `args` as PID 1 (normally
/// [`agent_args`]; tests use a plain init).
pub fn config(
    spec: &SandboxSpec,
    args: Vec<String>,
    flavour: Flavour<'_>,
) -> Result<Spec, RuntimeError> {
    build(spec, args, flavour).map_err(|e| RuntimeError::Config {
        id: spec.id.clone(),
        message: e.to_string(),
    })
}

/// Whether the cgroup v1 hugetlb controller is mounted (then the
/// sandbox's huge page allowance is set to none).
fn hugetlb_cgroup() -> bool {
    Path::new("/sys/fs/cgroup/hugetlb").is_dir()
}

fn build(
    spec: &SandboxSpec,
    args: Vec<String>,
    flavour: Flavour<'_>,
) -> Result<Spec, oci_spec::OciSpecError> {
    let (user_namespace, hook) = match flavour {
        Flavour::Runc { hook } => (true, hook),
        Flavour::Runsc { .. } => (false, None),
    };
    let host_base = host_id_base(spec.uid_slot);
    let caps = agent_capabilities();
    let mut rlimits = vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(nofile_limit())
            .hard(nofile_limit())
            .build()?,
        // No core dumps: they would be written into the sandbox's
        // memory-backed disk by the kernel, at the crash's size.
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitCore)
            .soft(0u64)
            .hard(0u64)
            .build()?,
    ];
    if !user_namespace {
        // gVisor: the host pids cgroup counts the sentry's own threads and
        // stubs, and the sentry dies when it cannot make one; the sandbox's
        // processes are bounded inside instead, per user, by gVisor's kernel.
        let tasks = u64::try_from(spec.resources.pids).unwrap_or(u64::MAX);
        rlimits.push(
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNproc)
                .soft(tasks)
                .hard(tasks)
                .build()?,
        );
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args)
        .env(vec![
            format!("PATH={}", crownest_proto::DEFAULT_PATH),
            "HOME=/root".to_owned(),
            "LANG=C.UTF-8".to_owned(),
        ])
        .cwd("/")
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .rlimits(rlimits)
        .oom_score_adj(OOM_SCORE_ADJ)
        .build()?;

    let id_map = || {
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(host_base)
            .size(IDS_PER_SANDBOX)
            .build()
    };
    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Cgroup,
    ] {
        if typ == LinuxNamespaceType::User && !user_namespace {
            continue;
        }
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    match spec.network {
        // A new, empty network namespace (no path = create): only `lo`.
        NetworkMode::None => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .build()?,
        ),
    }

    let memory_bytes =
        i64::try_from(spec.resources.memory_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let mut resources = LinuxResourcesBuilder::default();
    if hugetlb_cgroup() {
        let none = |size: &str| {
            LinuxHugepageLimitBuilder::default()
                .page_size(size)
                .limit(0)
                .build()
        };
        resources = resources.hugepage_limits(vec![none("2MB")?, none("1GB")?]);
    }
    let resources = resources
        .devices(vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()?,
        ])
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory_bytes)
                // memory+swap = memory: no swap.
                .swap(memory_bytes)
                .build()?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(if user_namespace {
                    spec.resources.pids
                } else {
                    spec.resources
                        .pids
                        .saturating_mul(2)
                        .saturating_add(GVISOR_HOST_TASKS)
                })
                .build()?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(spec.resources.vcpus.max(1)) * CPU_PERIOD_US as i64)
                .period(CPU_PERIOD_US)
                .build()?,
        )
        .build()?;

    let mut linux = LinuxBuilder::default();
    if user_namespace {
        linux = linux
            .uid_mappings(vec![id_map()?])
            .gid_mappings(vec![id_map()?]);
    }
    let linux = linux
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(cgroups_path(&spec.id))
        .seccomp(match flavour {
            Flavour::Runc { .. } => seccomp::profile()?,
            Flavour::Runsc { .. } => seccomp::gvisor_profile()?,
        })
        .masked_paths(
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/interrupts",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/sys/devices/virtual/powercap",
                "/sys/firmware",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
        .readonly_paths(
            [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
        .build()?;

    let mut builder = SpecBuilder::default();
    if let Some(hook) = hook {
        let hook = HookBuilder::default()
            .path(hook)
            .args(vec![
                String::from("crownest"),
                String::from("hook"),
                String::from("userns-limits"),
            ])
            .timeout(10)
            .build()?;
        builder = builder.hooks(HooksBuilder::default().create_runtime(vec![hook]).build()?);
    }
    builder
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path(spec.rootfs.clone())
                .readonly(true)
                .build()?,
        )
        .hostname(hostname(&spec.id))
        .process(process)
        .mounts(mounts(spec, flavour)?)
        .linux(linux)
        .build()
}

fn mount(
    destination: &str,
    typ: &str,
    source: impl Into<PathBuf>,
    options: &[&str],
) -> Result<Mount, oci_spec::OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source.into())
        .options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
        .build()
}

fn mounts(spec: &SandboxSpec, flavour: Flavour<'_>) -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    let disk = format!("size={}m", spec.resources.disk_mib.max(1));
    let user_uid = format!("uid={}", spec.user.uid);
    let user_gid = format!("gid={}", spec.user.gid);
    let run_dir = spec.state_dir.join("run");
    let mut list = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        // runc can mount sysfs here because the sandbox has its own network
        // namespace (checked on this kernel with runc 1.1.5).
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        // /run is a tmpfs so the mount points below are created there, never
        // in the shared read-only rootfs.
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=755", "size=16m"],
        )?,
        mount(
            RUN_DIR_IN_SANDBOX,
            "bind",
            run_dir,
            &["rbind", "rw", "nosuid", "nodev", "noexec"],
        )?,
        mount(
            AGENT_IN_SANDBOX,
            "bind",
            spec.agent_binary.clone(),
            &["bind", "ro", "nosuid", "nodev"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &disk],
        )?,
        mount(
            crownest_proto::WORKSPACE,
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=0755", &user_uid, &user_gid, &disk],
        )?,
    ];
    // The read-only rootfs would leave the user without a writable home
    // (IPython, matplotlib and npm all write there): give it a tmpfs.
    if let Some(home) = user_home(&spec.rootfs, spec.user.uid) {
        list.push(mount(
            &home,
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=0755", &user_uid, &user_gid, &disk],
        )?);
    }
    if let Flavour::Runsc { lib_dir, preload } = flavour {
        list.push(mount(
            LIB_DIR_IN_SANDBOX,
            "bind",
            lib_dir,
            &["bind", "ro", "nosuid", "nodev"],
        )?);
        list.push(mount(
            "/etc/ld.so.preload",
            "bind",
            preload,
            &["bind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }
    Ok(list)
}

/// The home directory of `uid` in the rootfs's /etc/passwd, if it is a
/// plain absolute path below / that exists in the rootfs.
pub(crate) fn user_home(rootfs: &Path, uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    let home = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() == 7 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_owned())
    })?;
    let path = Path::new(&home);
    let plain = path.is_absolute()
        && path.components().count() > 1
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let dir = rootfs.join(path.strip_prefix("/").ok()?);
    (plain && dir.is_dir() && !dir.is_symlink()).then_some(home)
}

/// Writes `<bundle>/config.json`.
pub fn write(bundle: &Path, config: &Spec) -> Result<(), RuntimeError> {
    let path = bundle.join("config.json");
    config.save(&path).map_err(|e| RuntimeError::Io {
        action: "cannot write",
        path,
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Isolation, Resources, SandboxUser};

    const RUNC: Flavour<'static> = Flavour::Runc { hook: None };

    fn spec(slot: u32) -> SandboxSpec {
        SandboxSpec {
            isolation: Isolation::Oci,
            id: "sbx_0123456789abcdefghij".to_owned(),
            rootfs: "/cache/rootfs/python-abc".into(),
            state_dir: "/data/sandboxes/sbx_0123456789abcdefghij".into(),
            agent_binary: "/usr/lib/crownest/crownest-agent".into(),
            resources: Resources {
                vcpus: 2,
                memory_mib: 512,
                pids: 256,
                disk_mib: 1024,
            },
            network: NetworkMode::None,
            uid_slot: slot,
            user: SandboxUser {
                uid: 1000,
                gid: 1000,
            },
        }
    }

    fn linux(c: &Spec) -> &oci_spec::runtime::Linux {
        c.linux().as_ref().expect("linux")
    }

    fn find_mount<'a>(c: &'a Spec, dest: &str) -> &'a Mount {
        c.mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new(dest))
            .unwrap_or_else(|| panic!("no mount at {dest}"))
    }

    #[test]
    fn a_runsc_bundle_has_no_user_namespace_nor_hooks_but_keeps_seccomp_and_limits() {
        let hook = Path::new("/usr/bin/crownest");
        let runc =
            config(&spec(3), agent_args(), Flavour::Runc { hook: Some(hook) }).expect("config");
        assert!(runc.hooks().is_some());
        let runsc = Flavour::Runsc {
            lib_dir: Path::new("/data/runsc-lib"),
            preload: Path::new("/data/runsc-lib/ld.so.preload"),
        };
        let c = config(&spec(3), agent_args(), runsc).expect("config");
        assert_eq!(
            find_mount(&c, "/etc/ld.so.preload").source().as_deref(),
            Some(Path::new("/data/runsc-lib/ld.so.preload"))
        );
        assert!(c.hooks().is_none());
        assert!(linux(&c).uid_mappings().is_none());
        assert!(linux(&c).gid_mappings().is_none());
        let kinds: Vec<_> = linux(&c)
            .namespaces()
            .iter()
            .flatten()
            .map(|n| n.typ())
            .collect();
        assert!(!kinds.contains(&LinuxNamespaceType::User), "{kinds:?}");
        assert!(kinds.contains(&LinuxNamespaceType::Network), "{kinds:?}");
        assert!(linux(&c).seccomp().is_some());
        let resources = linux(&c).resources().as_ref().expect("resources");
        assert_eq!(
            resources.memory().as_ref().and_then(|m| m.limit()),
            Some(512 << 20)
        );
        assert!(
            c.root()
                .as_ref()
                .is_some_and(|r| r.readonly() == Some(true))
        );
    }

    #[test]
    fn uid_and_gid_maps_use_the_slot_range() {
        let c = config(&spec(3), agent_args(), RUNC).expect("config");
        for maps in [linux(&c).uid_mappings(), linux(&c).gid_mappings()] {
            let maps = maps.as_ref().expect("maps");
            assert_eq!(maps.len(), 1);
            assert_eq!(maps[0].container_id(), 0);
            assert_eq!(maps[0].host_id(), 1_000_000_000 + 3 * 65_536);
            assert_eq!(maps[0].size(), 65_536);
        }
    }

    #[test]
    fn every_namespace_is_new_including_network() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let ns = linux(&c).namespaces().as_ref().expect("namespaces");
        for typ in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::User,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Network,
        ] {
            let n = ns
                .iter()
                .find(|n| n.typ() == typ)
                .expect("namespace present");
            assert!(n.path().is_none(), "{typ:?} joins an existing namespace");
        }
    }

    #[test]
    fn root_is_the_template_rootfs_read_only() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let root = c.root().as_ref().expect("root");
        assert_eq!(root.path(), Path::new("/cache/rootfs/python-abc"));
        assert_eq!(root.readonly(), Some(true));
    }

    #[test]
    fn workspace_is_a_sized_tmpfs_owned_by_the_sandbox_user() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let m = find_mount(&c, "/workspace");
        assert_eq!(m.typ().as_deref(), Some("tmpfs"));
        let opts = m.options().as_ref().expect("options");
        for o in ["uid=1000", "gid=1000", "mode=0755", "size=1024m"] {
            assert!(opts.iter().any(|x| x == o), "missing {o}");
        }
    }

    #[test]
    fn agent_is_bound_read_only_and_run_dir_comes_from_state_dir() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let agent = find_mount(&c, AGENT_IN_SANDBOX);
        assert_eq!(
            agent.source().as_deref(),
            Some(Path::new("/usr/lib/crownest/crownest-agent"))
        );
        assert!(agent.options().iter().flatten().any(|o| o == "ro"));
        let run = find_mount(&c, RUN_DIR_IN_SANDBOX);
        assert_eq!(
            run.source().as_deref(),
            Some(Path::new("/data/sandboxes/sbx_0123456789abcdefghij/run"))
        );
        // /run (a tmpfs) must come before the mounts inside it.
        let order: Vec<_> = c
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone())
            .collect();
        let pos = |p: &str| order.iter().position(|d| d == Path::new(p)).expect("mount");
        assert!(pos("/run") < pos(RUN_DIR_IN_SANDBOX));
        assert!(pos("/run") < pos(AGENT_IN_SANDBOX));
    }

    #[test]
    fn pid1_is_the_agent_with_a_small_capability_set_and_no_new_privileges() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let p = c.process().as_ref().expect("process");
        assert_eq!(p.args().as_deref(), Some(&agent_args()[..]));
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().expect("caps");
        assert_eq!(caps.bounding().as_ref(), Some(&agent_capabilities()));
        assert_eq!(caps.effective().as_ref(), Some(&agent_capabilities()));
        assert!(caps.ambient().as_ref().is_some_and(HashSet::is_empty));
        assert!(!agent_capabilities().contains(&Capability::SysAdmin));
    }

    #[test]
    fn limits_follow_resources() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let r = linux(&c).resources().as_ref().expect("resources");
        let mem = r.memory().as_ref().expect("memory");
        assert_eq!(mem.limit(), Some(512 << 20));
        assert_eq!(mem.swap(), Some(512 << 20));
        assert_eq!(r.pids().as_ref().expect("pids").limit(), 256);
        let cpu = r.cpu().as_ref().expect("cpu");
        assert_eq!(cpu.quota(), Some(200_000));
        assert_eq!(cpu.period(), Some(100_000));
        assert_eq!(
            linux(&c).cgroups_path().as_deref(),
            Some(Path::new("/crownest/sbx_0123456789abcdefghij"))
        );
    }

    #[test]
    fn seccomp_in_config_allows_neither_mount_nor_unshare() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let json = serde_json::to_value(&c).expect("json");
        let rules = json["linux"]["seccomp"]["syscalls"]
            .as_array()
            .expect("rules");
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        for rule in rules {
            if rule["action"] == "SCMP_ACT_ALLOW" {
                let names = rule["names"].as_array().expect("names");
                for bad in ["mount", "umount2", "unshare", "setns", "ptrace", "clone3"] {
                    assert!(!names.iter().any(|n| n == bad), "{bad} allowed");
                }
            }
        }
    }

    #[test]
    fn masked_and_readonly_paths_cover_proc_secrets() {
        let c = config(&spec(0), agent_args(), RUNC).expect("config");
        let masked = linux(&c).masked_paths().as_ref().expect("masked");
        for p in [
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/sys/firmware",
        ] {
            assert!(masked.iter().any(|m| m == p), "{p} not masked");
        }
        let ro = linux(&c).readonly_paths().as_ref().expect("readonly");
        assert!(ro.iter().any(|m| m == "/proc/sys"));
    }

    #[test]
    fn user_home_from_rootfs_passwd_gets_a_tmpfs() {
        let rootfs = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(rootfs.path().join("etc")).expect("etc");
        std::fs::create_dir_all(rootfs.path().join("home/user")).expect("home");
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
        )
        .expect("passwd");
        let mut s = spec(0);
        s.rootfs = rootfs.path().to_owned();

        let c = config(&s, agent_args(), RUNC).expect("config");

        let home = find_mount(&c, "/home/user");
        assert!(home.options().iter().flatten().any(|o| o == "uid=1000"));
    }

    #[test]
    fn user_home_outside_the_rootfs_is_ignored() {
        let rootfs = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(rootfs.path().join("etc")).expect("etc");
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "user:x:1000:1000::/home/../../etc:/bin/bash\n",
        )
        .expect("passwd");
        assert_eq!(user_home(rootfs.path(), 1000), None);
        assert_eq!(user_home(rootfs.path(), 1001), None);
    }

    #[test]
    fn hostname_is_short_and_valid() {
        assert_eq!(hostname("sbx_0123456789abcdefghij"), "sbx-0123456789ab");
        assert_eq!(hostname("weird_ID"), "sbx-weirdid");
    }
}
