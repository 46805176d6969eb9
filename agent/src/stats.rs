//! `Open::Stats`: the sandbox's resources as the agent sees them from
//! inside: /workspace's filesystem, and CPU, memory and tasks of every
//! process in its PID namespace (a VM guest's whole-guest memory). The host
//! measures what it can itself (cgroups) and uses these for the rest.

use crownest_proto::{Stats, WORKSPACE};

/// USER_HZ: the unit of the CPU times in /proc/PID/stat on Linux.
const CLOCK_TICKS_PER_SEC: u64 = 100;

pub async fn collect(vm: bool) -> Stats {
    // A few hundred small /proc reads: off the single-threaded runtime.
    tokio::task::spawn_blocking(move || collect_now(vm))
        .await
        .unwrap_or_default()
}

fn collect_now(vm: bool) -> Stats {
    let mut stats = Stats::default();
    if let Ok(fs) = nix::sys::statvfs::statvfs(WORKSPACE) {
        let block = fs.fragment_size();
        stats.workspace_total_bytes = fs.blocks().saturating_mul(block);
        stats.workspace_used_bytes = fs
            .blocks()
            .saturating_sub(fs.blocks_free())
            .saturating_mul(block);
    }
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    let mut ticks = 0u64;
    let mut resident = 0u64;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(fields) = stat_fields(&stat) else {
                continue;
            };
            // Fields after `(comm)`, 0-based from field 3 (state): utime
            // is field 14, stime 15, cutime 16, cstime 17, num_threads 20.
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            ticks += field(14).unwrap_or(0) + field(15).unwrap_or(0);
            if pid == "1" {
                // The agent is init: the children it reaped are here.
                ticks += field(16).unwrap_or(0) + field(17).unwrap_or(0);
            }
            stats.tasks += field(20).unwrap_or(1);
            if let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm"))
                && let Some(pages) = statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u64>().ok())
            {
                resident += pages * page;
            }
        }
    }
    stats.cpu_usec = ticks.saturating_mul(1_000_000 / CLOCK_TICKS_PER_SEC);
    stats.memory_used_bytes = resident;
    if vm && let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        let kib = |key: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map(|k| k * 1024)
        };
        if let (Some(total), Some(available)) = (kib("MemTotal:"), kib("MemAvailable:")) {
            stats.memory_total_bytes = total;
            stats.memory_used_bytes = total.saturating_sub(available);
        }
    }
    stats
}

/// The fields of a /proc/PID/stat line after the command name (which may
/// hold spaces and parentheses: it ends at the last `)`).
fn stat_fields(line: &str) -> Option<Vec<&str>> {
    let (_, rest) = line.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_skip_a_command_name_with_spaces_and_parens() {
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 5 0 0";
        let fields = stat_fields(line).expect("fields");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[14 - 3], "7");
        assert_eq!(fields[20 - 3], "5");
    }

    #[test]
    fn this_process_is_counted() {
        let stats = collect_now(false);
        assert!(stats.tasks >= 1);
        assert!(stats.memory_used_bytes > 0);
    }
}
