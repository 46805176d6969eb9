//! Uid slots held machine-wide. A slot picks a sandbox's host uid range
//! (`runtime::host_id_base`); the store knows which slots this host's live
//! sandboxes use, but two `crownest` processes with different data dirs on
//! one machine would not see each other's. So a slot is also held as an
//! exclusive `flock` on `<dir>/<slot>.lock` for the sandbox's life: the
//! kernel drops it when the sandbox's entry is dropped or the process dies,
//! so nothing stale survives a crash.

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
}
