//! `Open::ArchiveExtract`: unpack an untrusted gzipped tar archive into
//! /workspace (a Workspace Run's checkout).
//!
//! The bytes arrive as `FileInput` frames and are unpacked as they come, on
//! the blocking pool (`tar` and `flate2` read synchronously), never held
//! whole. Every entry is created through [`Workspace::parent`], so its
//! parent is resolved beneath /workspace by the kernel (or the walk) and
//! the final component is created relative to that directory fd, never
//! through a symlink:
//! - a path that is absolute or has `..` is refused (`Unsafe`), as are
//!   device nodes, fifos and hard links to what is not an earlier regular
//!   file of the archive;
//! - a symlink is kept only if its target, resolved lexically from the
//!   link's own directory, stays beneath /workspace; others are skipped
//!   (and reported in `Done`);
//! - setuid, setgid and sticky bits are dropped; what is created belongs to
//!   the sandbox user;
//! - entries, unpacked bytes and the compression ratio are bounded: a gzip
//!   bomb fails with `TooLarge` when it passes a limit, not when the disk
//!   is full.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crownest_proto::frame::{FrameDecoder, write_message};
use crownest_proto::{
    ARCHIVE_RATIO_GRACE, ArchiveErrorKind, ArchiveExtract, ArchiveReply, ExecUser, FileErrorKind,
    FileInput, decode,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use nix::unistd::{UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::files::{FsError, Workspace, cstring, make_dir, owner_ids};

/// Progress is reported at most this often (in entries or bytes).
const PROGRESS_EVERY_ENTRIES: u64 = 200;
const PROGRESS_EVERY_BYTES: u64 = 8 * 1024 * 1024;

/// Skipped entries reported in `Done`.
const MAX_SKIPPED_REPORTED: usize = 32;

/// Chunks of archive bytes in flight between the stream and the unpacker.
const CHANNEL_CHUNKS: usize = 16;

/// A refusal: what `Failed` says.
#[derive(Debug)]
struct Refusal {
    kind: ArchiveErrorKind,
    entry: Option<String>,
    message: String,
}

impl Refusal {
    fn new(kind: ArchiveErrorKind, entry: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            kind,
            entry: entry.map(str::to_string),
            message: message.into(),
        }
    }

    fn fs(error: FsError, entry: &str) -> Self {
        let kind = match error.kind {
            FileErrorKind::OutsideWorkspace | FileErrorKind::InvalidPath => {
                ArchiveErrorKind::Unsafe
            }
            FileErrorKind::NoSpace | FileErrorKind::TooLarge => ArchiveErrorKind::TooLarge,
            _ => ArchiveErrorKind::Io,
        };
        Self::new(kind, Some(entry), error.message)
    }

    fn errno(errno: Errno, entry: &str) -> Self {
        let kind = match errno {
            Errno::ENOSPC | Errno::EDQUOT => ArchiveErrorKind::TooLarge,
            Errno::EXDEV | Errno::ELOOP => ArchiveErrorKind::Unsafe,
            _ => ArchiveErrorKind::Io,
        };
        Self::new(kind, Some(entry), format!("{entry}: {errno}"))
    }
}

/// Serves one extraction stream.
pub async fn serve<R, W>(request: ArchiveExtract, mut reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (bytes_tx, bytes_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
    let (progress_tx, mut progress_rx) = mpsc::channel::<ArchiveReply>(8);
    let compressed = Arc::new(AtomicU64::new(0));
    let counted = compressed.clone();
    let mut unpacking = tokio::task::spawn_blocking(move || {
        let input = ChannelReader {
            rx: bytes_rx,
            pending: Vec::new(),
            offset: 0,
        };
        unpack(
            &Workspace::default(),
            &request,
            input,
            &counted,
            &progress_tx,
        )
    });
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sender = Some(bytes_tx);
    let mut complete = false;
    let mut eof = false;
    // Feed the bytes in while passing progress out, until the unpacker ends.
    let outcome = loop {
        tokio::select! {
            read = reader.read(&mut buf), if sender.is_some() => {
                let n: usize = read.unwrap_or_default();
                if n == 0 {
                    eof = true;
                    sender = None;
                    continue;
                }
                decoder.push(&buf[..n]);
                while let Ok(Some(frame)) = decoder.next_frame() {
                    match decode::<FileInput>(&frame) {
                        Ok(FileInput::Data(data)) => {
                            compressed.fetch_add(data.len() as u64, Ordering::Relaxed);
                            let Some(tx) = &sender else { break };
                            // The unpacker is the backpressure.
                            if tx.send(data).await.is_err() {
                                sender = None;
                            }
                        }
                        Ok(FileInput::End) => {
                            complete = true;
                            sender = None;
                        }
                        Err(_) => sender = None,
                    }
                }
            }
            Some(progress) = progress_rx.recv() => {
                if write_message(&mut writer, &progress).await.is_err() {
                    return;
                }
            }
            joined = &mut unpacking => break joined.unwrap_or_else(|e| {
                Err(Refusal::new(
                    ArchiveErrorKind::Io,
                    None,
                    format!("the unpacker stopped: {e}"),
                ))
            }),
        }
    };
    // The unpacker may finish (tar's end marker and the gzip trailer read)
    // before the host's `End` frame was: read on to it, so a stream cut
    // short is still told from a complete one. Bytes past the archive's
    // end are dropped.
    if outcome.is_ok() && !complete {
        drop(sender.take());
        'frames: loop {
            while let Ok(Some(frame)) = decoder.next_frame() {
                match decode::<FileInput>(&frame) {
                    Ok(FileInput::End) => {
                        complete = true;
                        break 'frames;
                    }
                    Ok(FileInput::Data(_)) => {}
                    Err(_) => break 'frames,
                }
            }
            if eof {
                break;
            }
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => decoder.push(&buf[..n]),
            }
        }
    }
    drop(sender);
    let reply = match outcome {
        Ok(done) => done,
        Err(refusal) => ArchiveReply::Failed {
            kind: refusal.kind,
            entry: refusal.entry,
            message: refusal.message,
        },
    };
    let reply = match reply {
        ArchiveReply::Done { .. } if !complete => ArchiveReply::Failed {
            kind: ArchiveErrorKind::Corrupt,
            entry: None,
            message: String::from("the archive stream ended before its last byte"),
        },
        other => other,
    };
    while let Ok(progress) = progress_rx.try_recv() {
        let _ = write_message(&mut writer, &progress).await;
    }
    if write_message(&mut writer, &reply).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// A `Read` over chunks sent from the async side.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    offset: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.offset >= self.pending.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.pending = chunk;
                    self.offset = 0;
                }
                // The host side ended: EOF (truncation is judged by tar).
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.pending.len() - self.offset);
        out[..n].copy_from_slice(&self.pending[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Counts decompressed bytes, for the ratio limit.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpacks `input` beneath the workspace root, on the blocking pool.
fn unpack(
    workspace: &Workspace,
    request: &ArchiveExtract,
    input: impl Read,
    compressed: &AtomicU64,
    progress: &mpsc::Sender<ArchiveReply>,
) -> Result<ArchiveReply, Refusal> {
    let root = workspace.root_fd().map_err(|e| Refusal::fs(e, "."))?;
    let gz = flate2::read::GzDecoder::new(input);
    let mut archive = tar::Archive::new(Counting {
        inner: gz,
        count: 0,
    });
    let (mut entries, mut bytes) = (0u64, 0u64);
    let (mut reported_entries, mut reported_bytes) = (0u64, 0u64);
    let mut skipped = Vec::new();
    let corrupt = |e: std::io::Error| {
        Refusal::new(
            ArchiveErrorKind::Corrupt,
            None,
            format!("not a readable .tar.gz: {e}"),
        )
    };
    let iter = archive.entries().map_err(corrupt)?;
    for entry in iter {
        let mut entry = entry.map_err(corrupt)?;
        entries += 1;
        if entries > request.max_entries {
            return Err(Refusal::new(
                ArchiveErrorKind::TooLarge,
                None,
                format!("the archive has more than {} entries", request.max_entries),
            ));
        }
        let raw_path = entry.path_bytes().into_owned();
        let path = String::from_utf8_lossy(&raw_path).into_owned();
        let parts = entry_parts(&path)?;
        let Some(shown) = (!parts.is_empty()).then(|| parts.join("/")) else {
            // `./`: the workspace itself.
            continue;
        };
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            tar::EntryType::Directory => {
                let (dir, name) = Workspace::parent(&root, &shown, Some(request.owner))
                    .map_err(|e| Refusal::fs(e, &shown))?;
                match make_dir(&dir, name, request.owner) {
                    Ok(()) => {}
                    Err(Errno::EEXIST) if is_dir(&dir, name) => {}
                    Err(e) => return Err(Refusal::errno(e, &shown)),
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.header().size().unwrap_or(0);
                if bytes.saturating_add(size) > request.max_bytes {
                    return Err(too_large(request.max_bytes));
                }
                let (dir, name) = Workspace::parent(&root, &shown, Some(request.owner))
                    .map_err(|e| Refusal::fs(e, &shown))?;
                let file = create_file(&dir, name, mode, request.owner)
                    .map_err(|e| Refusal::errno(e, &shown))?;
                let mut file = std::fs::File::from(file);
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = entry.read(&mut chunk).map_err(corrupt)?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                    if bytes > request.max_bytes {
                        return Err(too_large(request.max_bytes));
                    }
                    let packed = compressed.load(Ordering::Relaxed).max(1);
                    if bytes > ARCHIVE_RATIO_GRACE && bytes / packed > request.max_ratio {
                        return Err(Refusal::new(
                            ArchiveErrorKind::TooLarge,
                            Some(&shown),
                            format!(
                                "the archive unpacks to more than {} times its size (a compression bomb?)",
                                request.max_ratio
                            ),
                        ));
                    }
                    file.write_all(&chunk[..n]).map_err(|e| {
                        Refusal::errno(
                            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                            &shown,
                        )
                    })?;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                if !stays_inside(&parts, &target) {
                    if skipped.len() < MAX_SKIPPED_REPORTED {
                        skipped.push((
                            shown.clone(),
                            format!("a symlink to `{target}`, outside /workspace"),
                        ));
                    }
                    continue;
                }
                let (dir, name) = Workspace::parent(&root, &shown, Some(request.owner))
                    .map_err(|e| Refusal::fs(e, &shown))?;
                replace_entry(&dir, name).map_err(|e| Refusal::errno(e, &shown))?;
                let target_c = CString::new(target).map_err(|_| {
                    Refusal::new(ArchiveErrorKind::Unsafe, Some(&shown), "a NUL in a link")
                })?;
                let name_c = cstring(name).map_err(|e| Refusal::fs(e, &shown))?;
                symlinkat(target_c.as_c_str(), &dir, name_c.as_c_str())
                    .map_err(|e| Refusal::errno(e, &shown))?;
                let (uid, gid) = owner_ids(request.owner);
                if uid.is_some() {
                    fchownat(
                        &dir,
                        name_c.as_c_str(),
                        uid,
                        gid,
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| Refusal::errno(e, &shown))?;
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target_parts = entry_parts(&target)?;
                let target_shown = target_parts.join("/");
                let unsafe_link = || {
                    Refusal::new(
                        ArchiveErrorKind::Unsafe,
                        Some(&shown),
                        format!(
                            "a hard link to `{target}`, which is no earlier file of the archive"
                        ),
                    )
                };
                if target_parts.is_empty() {
                    return Err(unsafe_link());
                }
                let (from_dir, from_name) =
                    Workspace::parent(&root, &target_shown, None).map_err(|_| unsafe_link())?;
                let from_c = cstring(from_name).map_err(|e| Refusal::fs(e, &shown))?;
                let is_file = fstatat(&from_dir, from_c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits());
                if !is_file {
                    return Err(unsafe_link());
                }
                let (dir, name) = Workspace::parent(&root, &shown, Some(request.owner))
                    .map_err(|e| Refusal::fs(e, &shown))?;
                replace_entry(&dir, name).map_err(|e| Refusal::errno(e, &shown))?;
                let name_c = cstring(name).map_err(|e| Refusal::fs(e, &shown))?;
                linkat(
                    &from_dir,
                    from_c.as_c_str(),
                    &dir,
                    name_c.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| Refusal::errno(e, &shown))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => {
                return Err(Refusal::new(
                    ArchiveErrorKind::Unsafe,
                    Some(&shown),
                    format!(
                        "`{shown}` is a {}: only files, directories and links are unpacked",
                        describe(other)
                    ),
                ));
            }
        }
        if entries - reported_entries >= PROGRESS_EVERY_ENTRIES
            || bytes - reported_bytes >= PROGRESS_EVERY_BYTES
        {
            reported_entries = entries;
            reported_bytes = bytes;
            let _ = progress.blocking_send(ArchiveReply::Progress { entries, bytes });
        }
    }
    // The gzip stream must end cleanly: a truncated archive is corrupt even
    // when its tar part looked complete.
    let mut rest = archive.into_inner();
    let mut sink = [0u8; 4096];
    loop {
        match rest.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => return Err(corrupt(e)),
        }
    }
    Ok(ArchiveReply::Done {
        entries,
        bytes,
        skipped,
    })
}

fn too_large(max: u64) -> Refusal {
    Refusal::new(
        ArchiveErrorKind::TooLarge,
        None,
        format!("the archive unpacks to more than {max} bytes"),
    )
}

fn describe(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        _ => "special entry",
    }
}

/// The components of an entry path, refusing absolute paths and `..`.
fn entry_parts(path: &str) -> Result<Vec<&str>, Refusal> {
    if path.starts_with('/') {
        return Err(Refusal::new(
            ArchiveErrorKind::Unsafe,
            Some(path),
            format!("`{path}` is an absolute path"),
        ));
    }
    if path.contains('\0') {
        return Err(Refusal::new(
            ArchiveErrorKind::Unsafe,
            Some(path),
            "a NUL in a path",
        ));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(Refusal::new(
            ArchiveErrorKind::Unsafe,
            Some(path),
            format!("`{path}` climbs out with `..`"),
        ));
    }
    Ok(parts)
}

/// Whether a symlink at `link` (components) pointing at `target` resolves,
/// lexically, beneath the workspace root.
fn stays_inside(link: &[&str], target: &str) -> bool {
    if target.is_empty() {
        return false;
    }
    let mut at: Vec<&str> = if let Some(rest) = target.strip_prefix('/') {
        // Absolute: inside only as a path under /workspace.
        match rest.strip_prefix("workspace") {
            Some("") => return true,
            Some(under) if under.starts_with('/') => Vec::new(),
            _ => return false,
        }
    } else {
        link[..link.len().saturating_sub(1)].to_vec()
    };
    let relative = target
        .strip_prefix("/workspace")
        .filter(|_| target.starts_with('/'))
        .unwrap_or(target);
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            other => at.push(other),
        }
    }
    true
}

fn is_dir(dir: &OwnedFd, name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits())
}

/// Removes what an entry replaces (a later entry of the same name wins),
/// never a directory.
fn replace_entry(dir: &OwnedFd, name: &str) -> Result<(), Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates (or replaces) a regular file, not following a symlink at its
/// name, with `mode` stripped of setuid, setgid and sticky bits.
fn create_file(
    dir: &OwnedFd,
    name: &str,
    mode: u32,
    owner: Option<ExecUser>,
) -> Result<OwnedFd, Errno> {
    replace_entry(dir, name)?;
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    let fd = openat(
        dir,
        name.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate((mode & 0o777) | 0o600),
    )?;
    let (uid, gid) = owner_ids(owner);
    if uid.is_some() {
        fchown(&fd, uid, gid)?;
    }
    // The umask may have narrowed it; set what the archive says (no
    // special bits).
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate((mode & 0o777) | 0o600))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_are_judged_from_the_links_directory() {
        assert!(stays_inside(&["a", "link"], "b/c"));
        assert!(stays_inside(&["a", "link"], "../b"));
        assert!(!stays_inside(&["a", "link"], "../../b"));
        assert!(!stays_inside(&["link"], "/"));
        assert!(!stays_inside(&["link"], "/etc/passwd"));
        assert!(stays_inside(&["link"], "/workspace/x"));
        assert!(!stays_inside(&["link"], "/workspacex"));
        assert!(!stays_inside(&["link"], "/workspace/../etc"));
        assert!(!stays_inside(&["link"], ""));
    }

    #[test]
    fn entry_paths_refuse_absolute_and_dot_dot() {
        assert_eq!(entry_parts("./a/b").expect("ok"), vec!["a", "b"]);
        assert!(entry_parts("/etc/x").is_err());
        assert!(entry_parts("a/../../x").is_err());
        assert!(entry_parts("../x").is_err());
    }
}
