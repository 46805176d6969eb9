//! Reading a sandbox's cgroup: CPU time, memory and tasks as the host
//! kernel accounts them (cgroup v2, or v1's per-controller hierarchies).
//! Both OCI drivers put a sandbox at [`super::oci::bundle::cgroups_path`].

use std::path::{Path, PathBuf};

/// One reading of a sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupSample {
    /// CPU time of every task in it, ended ones included.
    pub cpu_usec: u64,
    /// Memory charged to it, less the page cache the kernel can drop at
    /// once (inactive file pages), as `docker stats` counts it.
    pub memory_bytes: u64,
    /// Its memory limit; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub tasks: u64,
    /// Its task limit; `None` when unlimited.
    pub tasks_limit: Option<u64>,
}

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup at `relative` (`/crownest/sbx_…`) under the host's cgroup
/// root, or `None` when it is not there (the sandbox is gone, or the
/// runtime put it elsewhere).
pub fn sample(relative: &Path) -> Option<CgroupSample> {
    sample_under(Path::new(ROOT), relative)
}

fn sample_under(root: &Path, relative: &Path) -> Option<CgroupSample> {
    let relative = relative.strip_prefix("/").unwrap_or(relative);
    if root.join("cgroup.controllers").is_file() {
        v2(&root.join(relative))
    } else {
        v1(root, relative)
    }
}

fn read(path: PathBuf) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A limit file's value: a number, or `max` / a huge v1 sentinel for none.
fn limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    // v1 writes "no limit" as the largest page-aligned i64.
    (n < (1 << 62)).then_some(n)
}

/// `key value` lines (`cpu.stat`, `memory.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn v2(dir: &Path) -> Option<CgroupSample> {
    let cpu_usec = keyed(&read(dir.join("cpu.stat"))?, "usage_usec")?;
    let current: u64 = read(dir.join("memory.current"))?.trim().parse().ok()?;
    let inactive = read(dir.join("memory.stat"))
        .and_then(|s| keyed(&s, "inactive_file"))
        .unwrap_or(0);
    Some(CgroupSample {
        cpu_usec,
        memory_bytes: current.saturating_sub(inactive),
        memory_limit_bytes: read(dir.join("memory.max")).and_then(|t| limit(&t)),
        tasks: read(dir.join("pids.current"))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        tasks_limit: read(dir.join("pids.max")).and_then(|t| limit(&t)),
    })
}

fn v1(root: &Path, relative: &Path) -> Option<CgroupSample> {
    let controller = |names: &[&str]| {
        names
            .iter()
            .map(|name| root.join(name).join(relative))
            .find(|dir| dir.is_dir())
    };
    let cpu = controller(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"])?;
    let usage_ns: u64 = read(cpu.join("cpuacct.usage"))?.trim().parse().ok()?;
    let memory = controller(&["memory"])?;
    let usage: u64 = read(memory.join("memory.usage_in_bytes"))?
        .trim()
        .parse()
        .ok()?;
    let inactive = read(memory.join("memory.stat"))
        .and_then(|s| keyed(&s, "total_inactive_file"))
        .unwrap_or(0);
    let pids = controller(&["pids"]);
    Some(CgroupSample {
        cpu_usec: usage_ns / 1000,
        memory_bytes: usage.saturating_sub(inactive),
        memory_limit_bytes: read(memory.join("memory.limit_in_bytes")).and_then(|t| limit(&t)),
        tasks: pids
            .as_ref()
            .and_then(|p| read(p.join("pids.current")))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        tasks_limit: pids
            .and_then(|p| read(p.join("pids.max")))
            .and_then(|t| limit(&t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    #[test]
    fn a_v2_cgroup_is_read_from_its_one_directory() {
        let root = tree(&[
            ("cgroup.controllers", "cpu memory pids"),
            (
                "crownest/sbx_a/cpu.stat",
                "usage_usec 2500000\nuser_usec 2000000\n",
            ),
            ("crownest/sbx_a/memory.current", "10485760\n"),
            (
                "crownest/sbx_a/memory.stat",
                "anon 1\ninactive_file 1048576\n",
            ),
            ("crownest/sbx_a/memory.max", "536870912\n"),
            ("crownest/sbx_a/pids.current", "7\n"),
            ("crownest/sbx_a/pids.max", "max\n"),
        ]);
        let sample = sample_under(root.path(), Path::new("/crownest/sbx_a")).expect("sample");
        assert_eq!(
            sample,
            CgroupSample {
                cpu_usec: 2_500_000,
                memory_bytes: 9 * 1024 * 1024,
                memory_limit_bytes: Some(512 * 1024 * 1024),
                tasks: 7,
                tasks_limit: None,
            }
        );
        assert!(sample_under(root.path(), Path::new("/crownest/sbx_gone")).is_none());
    }

    #[test]
    fn a_v1_cgroup_is_read_from_each_controller() {
        let root = tree(&[
            ("cpuacct/crownest/sbx_b/cpuacct.usage", "1500000000\n"),
            ("memory/crownest/sbx_b/memory.usage_in_bytes", "4096\n"),
            (
                "memory/crownest/sbx_b/memory.stat",
                "cache 0\ntotal_inactive_file 0\n",
            ),
            (
                "memory/crownest/sbx_b/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            ("pids/crownest/sbx_b/pids.current", "3\n"),
            ("pids/crownest/sbx_b/pids.max", "256\n"),
        ]);
        let sample = sample_under(root.path(), Path::new("/crownest/sbx_b")).expect("sample");
        assert_eq!(sample.cpu_usec, 1_500_000);
        assert_eq!(sample.memory_bytes, 4096);
        assert_eq!(sample.memory_limit_bytes, None);
        assert_eq!((sample.tasks, sample.tasks_limit), (3, Some(256)));
    }
}
