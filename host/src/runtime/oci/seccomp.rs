//! The seccomp profile of every OCI sandbox, as Rust data.
//!
//! Same shape as Docker's default profile (deny by default with EPERM, an
//! allow list of ordinary syscalls, `clone` only without namespace flags,
//! `clone3` answering ENOSYS so libc falls back to `clone`), written from the
//! syscall tables rather than copied, and stricter: no `ptrace`, no
//! `io_uring`, no `pidfd_getfd`, no cross-process memory access.
//!
//! Unknown names (e.g. 32-bit-only syscalls on a libseccomp that lacks them)
//! are skipped by runc, so the list can name syscalls of all three x86 ABIs.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
/// CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`: `clone` is allowed only when
/// none of these bits is set.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// Syscalls allowed unconditionally.
#[rustfmt::skip]
pub const ALLOWED: &[&str] = &[
    // Files and directories.
    "access", "chdir", "chmod", "chown", "chown32", "close", "close_range", "copy_file_range",
    "creat", "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fadvise64_64",
    "fallocate", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat",
    "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fremovexattr",
    "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futimesat", "getcwd", "getdents", "getdents64", "getxattr", "lchown",
    "lchown32", "lgetxattr", "link", "linkat", "listxattr", "llistxattr", "_llseek",
    "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "mkdir", "mkdirat", "mknod",
    "mknodat", "newfstatat", "open", "openat", "openat2", "pread64", "preadv", "preadv2",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "removexattr", "rename", "renameat", "renameat2", "rmdir", "sendfile", "sendfile64",
    "setxattr", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync_file_range", "syncfs", "tee", "truncate", "truncate64", "umask",
    "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes", "vmsplice",
    "write", "writev",
    // Pipes, polling, events and notification.
    "pipe", "pipe2",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "inotify_add_watch",
    "inotify_init", "inotify_init1", "inotify_rm_watch", "_newselect", "poll", "ppoll",
    "ppoll_time64", "pselect6", "pselect6_time64", "select", "signalfd", "signalfd4",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64",
    // Asynchronous I/O (the classic AIO interface; io_uring stays denied).
    "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "io_setup", "io_submit",
    // Memory.
    "brk", "madvise", "membarrier", "mincore", "mlock", "mlock2", "mlockall",
    "mprotect", "mremap", "msync", "munlock", "munlockall", "munmap",
    "get_mempolicy", "mbind", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
    "set_mempolicy",
    // Processes, threads and credentials (the agent drops to the sandbox user).
    "arch_prctl", "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork",
    "get_robust_list", "get_thread_area", "getcpu", "getegid", "getegid32", "geteuid",
    "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getpgid", "getpgrp",
    "getpid", "getppid", "getpriority", "getresgid", "getresgid32", "getresuid", "getresuid32",
    "getrlimit", "getrusage", "getsid", "gettid", "getuid", "getuid32", "ioprio_get",
    "ioprio_set", "prctl", "prlimit64", "rseq", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "set_robust_list", "set_thread_area", "set_tid_address",
    "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setpgid", "setpriority", "setregid", "setregid32", "setresgid",
    "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit",
    "setsid", "setuid", "setuid32", "nice", "ugetrlimit", "vfork", "wait4", "waitid", "waitpid",
    // Signals.
    "kill", "pause", "sigaction", "signal", "sigpending", "sigsuspend", "pidfd_open", "pidfd_send_signal", "restart_syscall", "rt_sigaction",
    "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sigaltstack",
    "sigprocmask", "sigreturn", "tgkill", "tkill",
    // Time (reading and sleeping only; setting the clock is denied).
    "alarm", "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "getitimer", "gettimeofday", "nanosleep",
    "setitimer", "time", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime",
    "timer_gettime64", "timer_settime", "timer_settime64", "times",
    // Futexes.
    "futex", "futex_time64", "futex_waitv",
    // Sockets (the network namespace has only `lo`; `socket` and
    // `socketpair` have family rules below; `socketcall`, the 32-bit
    // multiplexer seccomp cannot look into, is denied).
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send", "sendmmsg",
    "sendmsg", "sendto", "setsockopt", "shutdown",
    // System V and POSIX IPC (private to the sandbox's IPC namespace).
    "ipc", "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive",
    "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink", "msgctl",
    "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "shmat", "shmctl", "shmdt",
    // Miscellaneous.
    "getrandom", "ioctl", "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    "sysinfo", "uname",
];

/// Syscalls that must never be allowed unconditionally: the default action
/// denies them (`clone3` and `personality` have the narrower rules built in
/// [`profile`]). Kept as data so a test can hold the allow list to it.
#[rustfmt::skip]
pub const DENIED: &[&str] = &[
    "acct", "add_key", "bpf", "chroot", "clock_adjtime", "clock_settime", "delete_module",
    "finit_module", "fsconfig", "fsmount", "fsopen", "fspick", "init_module", "io_uring_enter",
    "io_uring_register", "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load",
    "kexec_load", "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pidfd_getfd", "pivot_root", "process_madvise", "process_vm_readv", "process_vm_writev",
    "ptrace", "quotactl", "quotactl_fd", "reboot", "request_key", "setdomainname",
    "sethostname", "setns", "settimeofday", "stime", "swapoff", "swapon", "syslog", "umount",
    "umount2", "unshare", "userfaultfd", "uselib", "vhangup", "adjtimex", "clone3",
    "personality", "sync", "socketcall", "socket", "socketpair", "mmap", "mmap2", "shmget",
    "memfd_create",
];

/// Socket families a sandbox may open: local, IP (loopback only: there is
/// no other interface) and netlink (what `ip`, glibc's getaddrinfo and
/// friends use). `AF_VSOCK`, `AF_ALG`, `AF_PACKET`, … are refused.
pub const SOCKET_FAMILIES: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];

/// `MAP_HUGETLB` (mmap flags), `SHM_HUGETLB` (shmget flags) and
/// `MFD_HUGETLB` (memfd_create flags): huge pages come from a machine-wide
/// pool, so a sandbox may not take them.
const MAP_HUGETLB: u64 = libc::MAP_HUGETLB as u64;
const SHM_HUGETLB: u64 = libc::SHM_HUGETLB as u64;
const MFD_HUGETLB: u64 = libc::MFD_HUGETLB as u64;

/// Personalities `personality(2)` may set: Linux, UNAME26, the two combined
/// with 32-bit, and the 0xffffffff query.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Allows `name` when argument `index` equals `value`, or, with a `mask`,
/// when the argument's `mask` bits equal `value`.
fn arg_rule(
    name: &str,
    index: usize,
    value: u64,
    mask: Option<u64>,
) -> Result<LinuxSyscall, oci_spec::OciSpecError> {
    let arg = match mask {
        Some(mask) => LinuxSeccompArgBuilder::default()
            .index(index)
            .value(mask)
            .value_two(value)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()?,
        None => LinuxSeccompArgBuilder::default()
            .index(index)
            .value(value)
            .op(LinuxSeccompOperator::ScmpCmpEq)
            .build()?,
    };
    LinuxSyscallBuilder::default()
        .names(vec![name.to_owned()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(vec![arg])
        .build()
}

/// The profile put in every `oci` sandbox's `config.json`.
pub fn profile() -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    build(&[])
}

/// The profile of `gvisor` sandboxes, enforced by gVisor's kernel on the
/// sandbox's calls to it: the same, plus `syslog`, which there reads only
/// gVisor's own boot messages (the host kernel's log does not exist
/// inside), so that `dmesg` shows which kernel runs.
pub fn gvisor_profile() -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    build(&["syslog"])
}

fn build(also_allowed: &[&str]) -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    let mut syscalls: Vec<LinuxSyscall> = vec![
        LinuxSyscallBuilder::default()
            .names(
                ALLOWED
                    .iter()
                    .chain(also_allowed)
                    .map(|s| (*s).to_owned())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActAllow)
            .build()?,
        // clone: argument 0 (flags on x86) & NS_FLAGS must be 0.
        LinuxSyscallBuilder::default()
            .names(vec!["clone".to_owned()])
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(vec![
                LinuxSeccompArgBuilder::default()
                    .index(0usize)
                    .value(CLONE_NAMESPACE_FLAGS)
                    .value_two(0u64)
                    .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                    .build()?,
            ])
            .build()?,
        // clone3 passes its flags in memory, which seccomp cannot inspect:
        // pretend it does not exist so glibc falls back to clone.
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_owned()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(ENOSYS)
            .build()?,
    ];
    // Several entries for one syscall are OR-ed together by libseccomp.
    for family in SOCKET_FAMILIES {
        syscalls.push(arg_rule("socket", 0, *family, None)?);
    }
    syscalls.push(arg_rule("socketpair", 0, libc::AF_UNIX as u64, None)?);
    for (name, index, flag) in [
        ("mmap", 3, MAP_HUGETLB),
        ("mmap2", 3, MAP_HUGETLB),
        ("shmget", 2, SHM_HUGETLB),
        ("memfd_create", 1, MFD_HUGETLB),
    ] {
        syscalls.push(arg_rule(name, index, 0, Some(flag))?);
    }
    for p in PERSONALITIES {
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["personality".to_owned()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![
                    LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(*p)
                        .op(LinuxSeccompOperator::ScmpCmpEq)
                        .build()?,
                ])
                .build()?,
        );
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_names(p: &LinuxSeccomp) -> Vec<String> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow && s.args().is_none())
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn profile_denies_by_default_with_eperm() {
        let p = profile().expect("profile");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(EPERM));
    }

    #[test]
    fn no_denied_syscall_is_allowed_unconditionally() {
        let allowed = allowed_names(&profile().expect("profile"));
        for d in DENIED {
            assert!(!allowed.iter().any(|a| a == d), "{d} is allowed");
        }
        for must in ["mount", "unshare", "setns", "ptrace", "bpf", "keyctl"] {
            assert!(DENIED.contains(&must));
        }
    }

    #[test]
    fn socket_families_and_hugetlb_flags_have_argument_rules() {
        let p = profile().expect("profile");
        let rules: Vec<_> = p.syscalls().iter().flatten().collect();
        let families: Vec<u64> = rules
            .iter()
            .filter(|r| r.names().iter().any(|n| n == "socket"))
            .filter_map(|r| r.args().as_ref().and_then(|a| a.first()).map(|a| a.value()))
            .collect();
        assert_eq!(families, SOCKET_FAMILIES);
        assert!(!families.contains(&(libc::AF_VSOCK as u64)));
        let mmap = rules
            .iter()
            .find(|r| r.names().iter().any(|n| n == "mmap"))
            .and_then(|r| r.args().as_ref().and_then(|a| a.first()))
            .expect("mmap rule");
        assert_eq!(mmap.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!((mmap.value(), mmap.value_two()), (MAP_HUGETLB, Some(0)));
    }

    #[test]
    fn allow_list_has_no_duplicates() {
        let mut v = ALLOWED.to_vec();
        v.sort_unstable();
        let n = v.len();
        v.dedup();
        assert_eq!(n, v.len());
    }

    #[test]
    fn clone_is_allowed_only_without_namespace_flags_and_clone3_is_enosys() {
        let p = profile().expect("profile");
        let rules: Vec<_> = p.syscalls().iter().flatten().collect();
        let clone = rules
            .iter()
            .find(|s| s.names().iter().any(|n| n == "clone"))
            .expect("clone rule");
        let arg = clone
            .args()
            .as_ref()
            .and_then(|a| a.first())
            .expect("clone arg");
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(arg.value(), CLONE_NAMESPACE_FLAGS);
        assert_eq!(arg.value_two(), Some(0));
        let clone3 = rules
            .iter()
            .find(|s| s.names().iter().any(|n| n == "clone3"))
            .expect("clone3 rule");
        assert_eq!(clone3.action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));
    }
}
