//! `Open::FileWatch`: changes under a directory of /workspace, from
//! inotify, as [`WatchEvent`]s.
//!
//! The watched directory and every directory below it are opened the way
//! every file operation opens paths (beneath the workspace, `files.rs`), and
//! the watch is added through the opened fd (`/proc/self/fd/N`), never by a
//! path name: a symlink planted or swapped in cannot move a watch outside
//! /workspace. Directories created later are watched as they appear (and
//! what is already in them is reported as created, so a `mkdir -p a/b &&
//! touch a/b/c` is seen whole). At most [`MAX_WATCHED_DIRS`] directories per
//! watch and [`MAX_WATCHES`] watches per agent; the kernel's queue is
//! bounded too, and its overflow is reported, not hidden.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use crownest_proto::frame::write_message;
use crownest_proto::{ChangeKind, FileErrorKind, MAX_WATCHED_DIRS, WatchEvent};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use nix::sys::stat::{Mode, SFlag, fstatat};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::files::{self, FsError, Workspace};

/// Most watches one agent serves at once.
pub const MAX_WATCHES: usize = 16;

/// What each directory is watched for.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// The inotify instance as tokio's `AsyncFd` wants it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watched directories by watch descriptor, with their paths relative to
/// /workspace.
struct Watcher {
    workspace: Workspace,
    inotify: AsyncFd<InotifyFd>,
    dirs: HashMap<WatchDescriptor, String>,
    /// The watched directory's path: the watch ends when it goes.
    root: String,
    recursive: bool,
    /// Set once [`MAX_WATCHED_DIRS`] was reached (reported once).
    limited: bool,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Watcher {
    /// Needs the runtime (for the `AsyncFd`).
    fn new(workspace: Workspace, root: String, recursive: bool) -> Result<Self, FsError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| FsError::errno(e, "inotify"))?;
        // SAFETY: the `Inotify` owns its fd, which stays open and unchanged
        // until the `AsyncFd` (which owns the `Inotify`) is dropped.
        let inotify = unsafe { AsyncFd::register(InotifyFd(inotify)) }
            .map_err(|e| FsError::io(&std::io::Error::from(e), "inotify"))?;
        Ok(Self {
            workspace,
            inotify,
            dirs: HashMap::new(),
            root,
            recursive,
            limited: false,
        })
    }

    /// Watches `dir` (opened, at `path`) and, recursively, what is below
    /// it; entries found below are passed to `found` (a directory that
    /// appeared after the watch started has its contents reported).
    fn add_tree(
        &mut self,
        dir: OwnedFd,
        path: String,
        mut found: impl FnMut(String, bool),
    ) -> Result<(), FsError> {
        let mut pending = vec![(dir, path)];
        while let Some((fd, path)) = pending.pop() {
            if self.dirs.len() >= MAX_WATCHED_DIRS {
                self.limited = true;
                return Ok(());
            }
            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
            let wd = match self.inotify.get_ref().0.add_watch(link.as_str(), mask()) {
                Ok(wd) => wd,
                // Gone or replaced since it was listed.
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(e) => return Err(FsError::errno(e, &path)),
            };
            self.dirs.insert(wd, path.clone());
            if !self.recursive {
                continue;
            }
            let Ok(listing) = openat(
                &fd,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            let Ok(mut entries) = nix::dir::Dir::from_fd(listing) else {
                continue;
            };
            for entry in entries.iter().flatten() {
                let name = entry.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                let Ok(stat) = fstatat(&fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
                    continue;
                };
                let is_dir =
                    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
                let child = join(&path, &String::from_utf8_lossy(name.to_bytes()));
                found(child.clone(), is_dir);
                if is_dir
                    && let Ok(sub) = openat(
                        &fd,
                        name,
                        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                {
                    pending.push((sub, child));
                }
            }
        }
        Ok(())
    }

    /// Watches a directory that appeared at `path`, reporting what is
    /// already in it.
    fn add_new_dir(&mut self, path: &str, events: &mut Vec<WatchEvent>) {
        let Ok(root) = self.workspace.root_fd() else {
            return;
        };
        let Ok(parts) = files::components(path) else {
            return;
        };
        let Ok(fd) = Workspace::resolve(
            &root,
            &parts,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ) else {
            return;
        };
        let _ = self.add_tree(fd, path.to_string(), |path, is_dir| {
            events.push(WatchEvent::Change {
                kind: ChangeKind::Create,
                path,
                is_dir,
                old_path: None,
            });
        });
    }

    /// A moved directory's watches keep their descriptors: rename their
    /// paths.
    fn renamed(&mut self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        for path in self.dirs.values_mut() {
            if path == from {
                *path = to.to_string();
            } else if let Some(rest) = path.strip_prefix(&prefix) {
                *path = join(to, rest);
            }
        }
    }

    /// Turns one batch of inotify events into changes, pairing each
    /// `MOVED_FROM` with its `MOVED_TO` by cookie.
    fn translate(&mut self, batch: Vec<InotifyEvent>, out: &mut Vec<WatchEvent>) -> bool {
        let mut moved_from: Option<(u32, String, bool)> = None;
        let mut alive = true;
        let flush = |pending: &mut Option<(u32, String, bool)>, out: &mut Vec<WatchEvent>| {
            if let Some((_, path, is_dir)) = pending.take() {
                out.push(WatchEvent::Change {
                    kind: ChangeKind::Delete,
                    path,
                    is_dir,
                    old_path: None,
                });
            }
        };
        for event in batch {
            let mask = event.mask;
            if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                flush(&mut moved_from, out);
                out.push(WatchEvent::Overflow);
                continue;
            }
            if mask.contains(AddWatchFlags::IN_IGNORED) {
                // The kernel dropped a watch (its directory is gone).
                if self.dirs.remove(&event.wd).is_some_and(|p| p == self.root) {
                    alive = false;
                }
                continue;
            }
            let Some(dir) = self.dirs.get(&event.wd).cloned() else {
                continue;
            };
            let Some(name) = event.name.as_ref() else {
                // Events on the directory itself (DELETE_SELF): its parent's
                // watch, if any, reports the delete.
                continue;
            };
            let path = join(&dir, &name.to_string_lossy());
            let is_dir = mask.contains(AddWatchFlags::IN_ISDIR);
            if mask.contains(AddWatchFlags::IN_MOVED_TO) {
                match moved_from.take() {
                    Some((cookie, old, _)) if cookie == event.cookie => {
                        if is_dir {
                            self.renamed(&old, &path);
                        }
                        out.push(WatchEvent::Change {
                            kind: ChangeKind::Rename,
                            path: path.clone(),
                            is_dir,
                            old_path: Some(old),
                        });
                    }
                    other => {
                        moved_from = other;
                        flush(&mut moved_from, out);
                        out.push(WatchEvent::Change {
                            kind: ChangeKind::Create,
                            path: path.clone(),
                            is_dir,
                            old_path: None,
                        });
                        if is_dir && self.recursive {
                            self.add_new_dir(&path, out);
                        }
                    }
                }
                continue;
            }
            flush(&mut moved_from, out);
            if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                moved_from = Some((event.cookie, path, is_dir));
                continue;
            }
            let kind = if mask.contains(AddWatchFlags::IN_CREATE) {
                ChangeKind::Create
            } else if mask.contains(AddWatchFlags::IN_DELETE) {
                ChangeKind::Delete
            } else if mask.intersects(AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ATTRIB) {
                ChangeKind::Modify
            } else {
                continue;
            };
            // A write loop is many MODIFYs in a row: one is enough per batch.
            if kind == ChangeKind::Modify
                && matches!(out.last(), Some(WatchEvent::Change { kind: ChangeKind::Modify, path: last, .. }) if *last == path)
            {
                continue;
            }
            out.push(WatchEvent::Change {
                kind,
                path: path.clone(),
                is_dir,
                old_path: None,
            });
            if kind == ChangeKind::Create && is_dir && self.recursive {
                self.add_new_dir(&path, out);
            }
        }
        // A move out of the watched tree: its entry is gone from here.
        flush(&mut moved_from, out);
        alive
    }
}

/// Serves one watch stream until the host closes it, the watched directory
/// goes away, or the stream breaks.
pub async fn serve<R, W>(
    shared: &Shared,
    workspace: Workspace,
    path: &str,
    recursive: bool,
    mut reader: R,
    mut writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if shared.watches.fetch_add(1, Ordering::SeqCst) >= MAX_WATCHES {
        shared.watches.fetch_sub(1, Ordering::SeqCst);
        let refused = WatchEvent::Error {
            kind: FileErrorKind::Other,
            message: format!("at most {MAX_WATCHES} watches at once"),
        };
        let _ = write_message(&mut writer, &refused).await;
        return;
    }
    let result = watch(workspace, path, recursive, &mut reader, &mut writer).await;
    shared.watches.fetch_sub(1, Ordering::SeqCst);
    if let Err(e) = result {
        let error = WatchEvent::Error {
            kind: e.kind,
            message: e.message,
        };
        let _ = write_message(&mut writer, &error).await;
    }
    let _ = writer.shutdown().await;
}

async fn watch<R, W>(
    workspace: Workspace,
    path: &str,
    recursive: bool,
    reader: &mut R,
    writer: &mut W,
) -> Result<(), FsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let parts: Vec<String> = files::components(path)?
        .into_iter()
        .map(String::from)
        .collect();
    let watcher = Watcher::new(workspace, parts.join("/"), recursive)?;
    // The first walk may open thousands of directories: off the runtime.
    let mut watcher = tokio::task::spawn_blocking(move || -> Result<Watcher, FsError> {
        let mut watcher = watcher;
        let root = watcher.workspace.root_fd()?;
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let dir = Workspace::resolve(
            &root,
            &parts,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        let path = watcher.root.clone();
        watcher.add_tree(dir, path, |_, _| {})?;
        Ok(watcher)
    })
    .await
    .map_err(|e| FsError::new(FileErrorKind::Other, e.to_string()))??;
    write_message(writer, &WatchEvent::Ready)
        .await
        .map_err(|e| FsError::new(FileErrorKind::Other, e.to_string()))?;
    let mut told_limited = false;
    let mut sink = [0u8; 64];
    loop {
        if watcher.limited && !told_limited {
            told_limited = true;
            let limited = WatchEvent::Limited {
                max_dirs: MAX_WATCHED_DIRS as u32,
            };
            if write_message(writer, &limited).await.is_err() {
                return Ok(());
            }
        }
        let batch = tokio::select! {
            // The host closes its half (or the stream) to stop.
            read = reader.read(&mut sink) => match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
            ready = watcher.inotify.readable() => {
                let Ok(mut guard) = ready else { return Ok(()) };
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(e)) => return Err(FsError::io(&e, "inotify")),
                    Err(_would_block) => continue,
                }
            }
        };
        let mut events = Vec::new();
        let alive = watcher.translate(batch, &mut events);
        for event in &events {
            if write_message(writer, event).await.is_err() {
                return Ok(());
            }
        }
        if !alive {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crownest_proto::frame::FrameDecoder;
    use std::path::PathBuf;
    use std::time::Duration;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Reads watch events until `done` says so (or 10 s pass).
    async fn events_until(
        reader: &mut (impl AsyncRead + Unpin),
        decoder: &mut FrameDecoder,
        mut done: impl FnMut(&[WatchEvent]) -> bool,
    ) -> Vec<WatchEvent> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(&seen) {
            while let Some(frame) = decoder.next_frame().expect("frame") {
                seen.push(crownest_proto::decode::<WatchEvent>(&frame).expect("event"));
            }
            if done(&seen) {
                break;
            }
            let n = tokio::time::timeout_at(deadline, reader.read(&mut buf))
                .await
                .expect("events in time")
                .expect("read");
            assert!(n > 0, "the stream ended early after {seen:?}");
            decoder.push(&buf[..n]);
        }
        seen
    }

    fn change(kind: ChangeKind, path: &str) -> impl Fn(&WatchEvent) -> bool + '_ {
        move |e| matches!(e, WatchEvent::Change { kind: k, path: p, .. } if *k == kind && p == path)
    }

    #[tokio::test]
    async fn a_recursive_watch_reports_creates_modifies_renames_and_deletes_below_it() {
        let base =
            Dir(std::env::temp_dir().join(format!("cn-watch-{:016x}", rand::random::<u64>())));
        std::fs::create_dir_all(base.0.join("ws/sub")).expect("mkdir");
        std::fs::write(base.0.join("outside"), b"x").expect("write");
        std::os::unix::fs::symlink(&base.0, base.0.join("ws/escape")).expect("symlink");
        let shared = crate::Shared::new();
        let (host, agent) = tokio::io::duplex(64 * 1024);
        let (agent_read, agent_write) = tokio::io::split(agent);
        let workspace = Workspace::new(base.0.join("ws"));
        let task = tokio::spawn(async move {
            serve(&shared, workspace, "", true, agent_read, agent_write).await;
            shared.watches.load(Ordering::SeqCst)
        });
        let (mut reader, mut writer) = tokio::io::split(host);
        let mut decoder = FrameDecoder::default();
        let ready = events_until(&mut reader, &mut decoder, |seen| !seen.is_empty()).await;
        assert_eq!(ready, [WatchEvent::Ready]);

        let ws = base.0.join("ws");
        std::fs::write(ws.join("a.txt"), b"1").expect("create");
        std::fs::write(ws.join("a.txt"), b"22").expect("modify");
        std::fs::create_dir_all(ws.join("new/deeper")).expect("mkdir -p");
        std::fs::write(ws.join("new/deeper/c.txt"), b"c").expect("deep file");
        std::fs::write(ws.join("sub/b.txt"), b"b").expect("existing subdir");
        std::fs::rename(ws.join("sub/b.txt"), ws.join("sub/b2.txt")).expect("rename");
        std::fs::remove_file(ws.join("a.txt")).expect("delete");
        // Changes outside the workspace are never seen, symlink or not.
        std::fs::write(base.0.join("outside"), b"changed").expect("outside");
        std::fs::write(ws.join("last"), b"").expect("marker");
        let seen = events_until(&mut reader, &mut decoder, |seen| {
            seen.iter().any(change(ChangeKind::Create, "last"))
        })
        .await;
        for (kind, path) in [
            (ChangeKind::Create, "a.txt"),
            (ChangeKind::Modify, "a.txt"),
            (ChangeKind::Create, "new"),
            (ChangeKind::Create, "new/deeper/c.txt"),
            (ChangeKind::Create, "sub/b.txt"),
            (ChangeKind::Delete, "a.txt"),
        ] {
            assert!(
                seen.iter().any(change(kind, path)),
                "no {kind:?} {path} in {seen:?}"
            );
        }
        assert!(
            seen.iter().any(|e| matches!(e, WatchEvent::Change {
            kind: ChangeKind::Rename, path, old_path: Some(old), ..
        } if path == "sub/b2.txt" && old == "sub/b.txt")),
            "{seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, WatchEvent::Change { path, .. } if path.contains("outside"))),
            "{seen:?}"
        );
        // The host closing its half ends the watch and frees its place.
        writer.shutdown().await.expect("close");
        drop(writer);
        let left = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch ends")
            .expect("join");
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_watch_of_a_file_or_a_symlink_out_is_refused() {
        let base =
            Dir(std::env::temp_dir().join(format!("cn-watch-{:016x}", rand::random::<u64>())));
        std::fs::create_dir_all(base.0.join("ws")).expect("mkdir");
        std::fs::write(base.0.join("ws/file"), b"x").expect("write");
        std::os::unix::fs::symlink(&base.0, base.0.join("ws/escape")).expect("symlink");
        for (path, kind) in [
            ("file", FileErrorKind::NotADirectory),
            ("escape", FileErrorKind::OutsideWorkspace),
            ("missing", FileErrorKind::NotFound),
        ] {
            let shared = crate::Shared::new();
            let (host, agent) = tokio::io::duplex(64 * 1024);
            let (agent_read, agent_write) = tokio::io::split(agent);
            let workspace = Workspace::new(base.0.join("ws"));
            serve(&shared, workspace, path, true, agent_read, agent_write).await;
            let (mut reader, _writer) = tokio::io::split(host);
            let mut decoder = FrameDecoder::default();
            let seen = events_until(&mut reader, &mut decoder, |seen| !seen.is_empty()).await;
            assert!(
                matches!(&seen[0], WatchEvent::Error { kind: k, .. } if *k == kind),
                "{path}: {seen:?}"
            );
        }
    }
}
