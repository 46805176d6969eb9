//! Uid slots held machine-wide. A slot picks a sandbox's host uid range
//! (`runtime::host_id_base`); the store knows which slots this host's live
//! sandboxes use, but two `crownest` processes with different data dirs on
//! one machine would not see each other's. So a slot is also held as an
//! exclusive `flock` on `<dir>/<slot>.lock` for the sandbox's life: the
//! kernel drops it when the sandbox's entry is dropped or the process dies,
//! so nothing stale survives a crash.
//!
//! Sandboxes outlive their host process (a restart takes them over), so a
//! dropped lock does not mean a free range: while a host is down, its
//! sandboxes' processes still run as their range's uids. A new slot is
//! therefore also one no process on the machine runs in ([`in_use`]).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where slot locks live: `/run/crownest/uid-slots` (machine-wide, cleared
/// at boot) when running as root, else beside the data dir.
pub fn lock_dir(data_dir: &Path) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/crownest/uid-slots")
    } else {
        data_dir.join("uid-slots")
    }
}

/// A held slot; dropping it releases the slot for any process.
#[derive(Debug)]
pub struct SlotLock {
    _lock: Flock<File>,
}

/// Tries to hold `slot`; `Ok(None)` when another holder has it.
pub fn try_hold(dir: &Path, slot: i64) -> std::io::Result<Option<SlotLock>> {
    std::fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{slot}.lock")))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(SlotLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// Slots whose host uid range some process on the machine runs as now
/// (real, effective, saved or filesystem uid), by reading `/proc`.
pub fn in_use() -> std::collections::HashSet<i64> {
    let mut slots = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return slots;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process gone since the listing is simply skipped.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let Some(uids) = status.lines().find_map(|l| l.strip_prefix("Uid:")) else {
            continue;
        };
        for uid in uids
            .split_whitespace()
            .filter_map(|u| u.parse::<u32>().ok())
        {
            if let Some(slot) = slot_of_uid(uid) {
                slots.insert(slot);
            }
        }
    }
    slots
}

/// The slot whose host range holds `uid`, if any.
fn slot_of_uid(uid: u32) -> Option<i64> {
    let offset = uid.checked_sub(crate::runtime::HOST_ID_BASE)?;
    Some(i64::from(offset / crate::runtime::IDS_PER_SANDBOX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_cannot_be_held_again_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = try_hold(dir.path(), 3).expect("lock").expect("free");
        // Another open file description (as another process would have).
        assert!(try_hold(dir.path(), 3).expect("lock").is_none());
        assert!(try_hold(dir.path(), 4).expect("lock").is_some());
        drop(first);
        assert!(try_hold(dir.path(), 3).expect("lock").is_some());
    }

    #[test]
    fn uids_map_to_the_slot_of_their_range() {
        let base = crate::runtime::HOST_ID_BASE;
        assert_eq!(slot_of_uid(1000), None);
        assert_eq!(slot_of_uid(base), Some(0));
        assert_eq!(slot_of_uid(base + 65_535), Some(0));
        assert_eq!(slot_of_uid(base + 65_536 * 7 + 1000), Some(7));
    }

    #[test]
    fn a_process_running_as_a_ranges_uid_makes_its_slot_in_use() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a process as a sandbox uid");
            return;
        }
        let slot = 48_000;
        let uid = crate::runtime::HOST_ID_BASE + 48_000 * crate::runtime::IDS_PER_SANDBOX + 1000;
        assert!(!in_use().contains(&slot));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .uid(uid)
            .gid(uid)
            .spawn()
            .expect("spawn");
        let seen = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            in_use().contains(&slot)
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen, "slot {slot} not seen in use");
    }
}
