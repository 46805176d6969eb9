//! Process trees: every process a command started, found through the
//! parent links in `/proc/<pid>/stat`. Each command's main process is a
//! child subreaper (set between fork and exec), so what it starts stays
//! in its tree even when it calls `setsid` or double-forks: orphans are
//! re-parented to it, not to the agent.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Live (not zombie) processes as `(pid, parent pid)`.
fn processes() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let pid: i32 = name.to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(&stat).map(|(state, ppid)| (pid, ppid, state))
        })
        .filter(|(_, _, state)| *state != 'Z')
        .map(|(pid, ppid, _)| (pid, ppid))
        .collect()
}

/// The state and parent pid of a `/proc/<pid>/stat` line. The command name
/// is in parentheses and may hold spaces and parentheses itself, so the
/// fields after it are found from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Every live process below `root` (not `root` itself), deepest last.
pub fn descendants(root: i32) -> Vec<i32> {
    descendants_in(&processes(), root)
}

fn descendants_in(processes: &[(i32, i32)], root: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in processes {
            if ppid == parent && pid != root && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// Kills `root` and everything below it. The tree is frozen first
/// (`SIGSTOP`, again until no new process appears: a fork racing the walk),
/// so that nothing reaps, forks or re-parents while it is killed; a killed
/// root would otherwise hand its orphans to the agent, out of reach.
pub fn kill_tree(root: i32) {
    let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
    let mut frozen: Vec<i32> = Vec::new();
    for _ in 0..50 {
        let fresh: Vec<i32> = descendants(root)
            .into_iter()
            .filter(|pid| !frozen.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in &fresh {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
        }
        frozen.extend(fresh);
    }
    for pid in frozen.iter().rev() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(root), Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parse_stat("12 (sh) S 7 12 12 0"), Some(('S', 7)));
        assert_eq!(
            parse_stat("13 (a (weird) name) R 12 13 13 0"),
            Some(('R', 12))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_follow_parent_links_transitively() {
        let table = [(10, 1), (11, 10), (12, 11), (13, 1), (14, 12)];
        let mut found = descendants_in(&table, 10);
        found.sort_unstable();
        assert_eq!(found, [11, 12, 14]);
        assert!(descendants_in(&table, 13).is_empty());
    }
}
