//! File operations under /workspace for the host's `Open::File*` streams.
//!
//! **Invariant:** no path is ever resolved by string: every path is resolved
//! by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! relative to a directory fd of the workspace, so `..` and symlinks
//! (absolute, or relative ones pointing out, including symlinks that code in
//! the sandbox plants or swaps in while an operation runs) cannot lead
//! outside it: the kernel answers `EXDEV`, reported as `OutsideWorkspace`.
//! Where `openat2` is missing (gVisor's kernel before 2023), the same
//! resolution is done one component at a time ([`resolve_by_walk`]).
//! Operations that create, rename or remove an entry open its *parent* that
//! way and then act on the final component relative to that fd, never
//! following a symlink in the final component.
//!
//! The filesystem work runs on the blocking pool; the stream side streams
//! bounded chunks with yamux flow control as backpressure, so no file is
//! ever held in memory whole.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crownest_proto::frame::{FrameDecoder, write_message};
use crownest_proto::{
    ExecUser, FileErrorKind, FileInfo, FileInput, FileKind, FileReply, FileWriteRequest,
    MAX_CHUNK_LEN, MAX_ENTRIES_PER_FRAME, Open, decode,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

pub use crownest_proto::WORKSPACE;

/// Deepest directory tree a recursive remove descends into.
const MAX_REMOVE_DEPTH: usize = 256;

/// Times `openat2` is retried when it answers `EAGAIN` (a concurrent rename
/// or mount during `..` resolution).
const EAGAIN_RETRIES: usize = 16;

/// A failed file operation, as sent to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    pub kind: FileErrorKind,
    pub message: String,
}

impl FsError {
    pub(crate) fn new(kind: FileErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn errno(errno: Errno, path: &str) -> Self {
        let shown = if path.is_empty() { "." } else { path };
        let kind = match errno {
            Errno::ENOENT => FileErrorKind::NotFound,
            Errno::EXDEV => FileErrorKind::OutsideWorkspace,
            Errno::ENOTDIR => FileErrorKind::NotADirectory,
            Errno::EISDIR => FileErrorKind::IsADirectory,
            Errno::EEXIST => FileErrorKind::AlreadyExists,
            Errno::ENOTEMPTY => FileErrorKind::NotEmpty,
            Errno::EACCES | Errno::EPERM | Errno::EROFS => FileErrorKind::PermissionDenied,
            Errno::ENOSPC | Errno::EDQUOT => FileErrorKind::NoSpace,
            Errno::EFBIG => FileErrorKind::TooLarge,
            Errno::ENAMETOOLONG | Errno::EINVAL => FileErrorKind::InvalidPath,
            _ => FileErrorKind::Other,
        };
        let message = match kind {
            FileErrorKind::OutsideWorkspace => {
                format!("`{shown}` resolves outside /workspace")
            }
            _ => format!("`{shown}`: {}", errno.desc().to_lowercase()),
        };
        Self { kind, message }
    }

    pub(crate) fn io(error: &std::io::Error, path: &str) -> Self {
        match error.raw_os_error() {
            Some(code) => Self::errno(Errno::from_raw(code), path),
            None => Self::new(FileErrorKind::Other, format!("`{path}`: {error}")),
        }
    }

    fn reply(self) -> FileReply {
        FileReply::Error {
            kind: self.kind,
            message: self.message,
        }
    }
}

type FsResult<T> = Result<T, FsError>;

/// The components of a host path: relative, `/`-separated, no empty, `.` or
/// `..` component (the host normalizes; anything else is refused here too).
pub(crate) fn components(path: &str) -> FsResult<Vec<&str>> {
    if path.starts_with('/') || path.contains('\0') {
        return Err(FsError::new(
            FileErrorKind::InvalidPath,
            format!("`{path}` is not a relative path"),
        ));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(FsError::new(
            FileErrorKind::InvalidPath,
            format!("`{path}` has `.` or `..` components"),
        ));
    }
    Ok(parts)
}

pub(crate) fn cstring(name: &str) -> FsResult<CString> {
    CString::new(name).map_err(|_| FsError::new(FileErrorKind::InvalidPath, "path has a NUL"))
}

fn info(name: &str, stat: &FileStat) -> FileInfo {
    let format = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    let kind = match format {
        SFlag::S_IFREG => FileKind::File,
        SFlag::S_IFDIR => FileKind::Dir,
        SFlag::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    };
    FileInfo {
        name: name.to_string(),
        kind,
        size: stat.st_size.max(0) as u64,
        mode: stat.st_mode & 0o7777,
        mtime_ms: stat.st_mtime * 1000 + stat.st_mtime_nsec / 1_000_000,
    }
}

pub(crate) fn owner_ids(owner: Option<ExecUser>) -> (Option<Uid>, Option<Gid>) {
    match owner {
        Some(o) => (Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))),
        None => (None, None),
    }
}

/// The workspace root every path is resolved beneath. A parameter so that
/// tests can stand a temporary directory in for /workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new(WORKSPACE)
    }
}

impl Workspace {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub(crate) fn root_fd(&self) -> FsResult<OwnedFd> {
        openat(
            nix::fcntl::AT_FDCWD,
            self.root.as_path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::new(FileErrorKind::Other, format!("workspace: {e}")))
    }

    /// Opens `parts` beneath `root` (the root itself when empty), following
    /// symlinks only while they stay beneath it.
    pub(crate) fn resolve(
        root: &OwnedFd,
        parts: &[&str],
        flags: OFlag,
        mode: Mode,
    ) -> FsResult<OwnedFd> {
        let joined = parts.join("/");
        let path = if joined.is_empty() { "." } else { &joined };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        if !openat2_works() {
            return resolve_by_walk(root, path, flags, mode)
                .map_err(|e| FsError::errno(e, &joined));
        }
        let mut tries = 0;
        loop {
            match openat2(root, Path::new(path), how) {
                Err(Errno::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(FsError::errno(e, &joined)),
                Ok(fd) => return Ok(fd),
            }
        }
    }

    /// The parent directory of a path (resolved beneath the root) and the
    /// final component, which must name something (not the root itself).
    pub(crate) fn parent<'p>(
        root: &OwnedFd,
        path: &'p str,
        create: Option<Option<ExecUser>>,
    ) -> FsResult<(OwnedFd, &'p str)> {
        let parts = components(path)?;
        let Some((last, dirs)) = parts.split_last() else {
            return Err(FsError::new(
                FileErrorKind::InvalidPath,
                "the workspace itself cannot be the target of this operation",
            ));
        };
        if let Some(owner) = create {
            mkdir_all(root, dirs, owner)?;
        }
        let dir = Self::resolve(
            root,
            dirs,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| parent_error(e, path))?;
        Ok((dir, last))
    }

    /// Metadata of a path, following symlinks that stay inside.
    pub fn stat(&self, path: &str) -> FsResult<FileInfo> {
        let root = self.root_fd()?;
        let parts = components(path)?;
        let fd = Self::resolve(&root, &parts, OFlag::O_PATH, Mode::empty())?;
        let stat = fstat(&fd).map_err(|e| FsError::errno(e, path))?;
        Ok(info(parts.last().copied().unwrap_or(""), &stat))
    }

    /// The entries of a directory (symlinks reported as such), in batches.
    pub fn list(&self, path: &str, mut batch: impl FnMut(Vec<FileInfo>) -> bool) -> FsResult<()> {
        let root = self.root_fd()?;
        let parts = components(path)?;
        let fd = Self::resolve(
            &root,
            &parts,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        let dup = fd.try_clone().map_err(|e| FsError::io(&e, path))?;
        let mut dir = nix::dir::Dir::from_fd(dup).map_err(|e| FsError::errno(e, path))?;
        let mut entries = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| FsError::errno(e, path))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            // An entry removed since the read is simply not listed.
            let Ok(stat) = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            entries.push(info(&String::from_utf8_lossy(name.to_bytes()), &stat));
            if entries.len() == MAX_ENTRIES_PER_FRAME && !batch(std::mem::take(&mut entries)) {
                return Ok(());
            }
        }
        if !entries.is_empty() {
            batch(entries);
        }
        Ok(())
    }

    /// Opens a regular file for reading; the stat is of the opened file.
    pub fn open_read(&self, path: &str) -> FsResult<(File, FileInfo)> {
        let root = self.root_fd()?;
        let parts = components(path)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer.
        let fd = Self::resolve(
            &root,
            &parts,
            OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
            Mode::empty(),
        )?;
        let stat = fstat(&fd).map_err(|e| FsError::errno(e, path))?;
        let info = info(parts.last().copied().unwrap_or(""), &stat);
        match info.kind {
            FileKind::File => Ok((File::from(fd), info)),
            FileKind::Dir => Err(FsError::new(
                FileErrorKind::IsADirectory,
                format!("`{path}` is a directory"),
            )),
            _ => Err(FsError::new(
                FileErrorKind::NotAFile,
                format!("`{path}` is not a regular file"),
            )),
        }
    }

    /// Starts writing a file: a temporary file beside the target.
    pub fn begin_write(&self, request: &FileWriteRequest) -> FsResult<PendingWrite> {
        let root = self.root_fd()?;
        let create = request.parents.then_some(request.owner);
        let (dir, name) = Self::parent(&root, &request.path, create)?;
        let name_c = cstring(name)?;
        // Overwriting keeps the existing file's permissions unless told.
        let existing = fstatat(&dir, name_c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok();
        // The rename would replace a symlink, never follow it; still, a
        // write aimed at a link that points outside is refused as such.
        if existing.is_some_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits()) {
            let parts = components(&request.path)?;
            match Self::resolve(&root, &parts, OFlag::O_PATH, Mode::empty()) {
                Err(e) if e.kind == FileErrorKind::OutsideWorkspace => return Err(e),
                _ => {}
            }
        }
        let mode = request.mode.map(|m| m & 0o7777).unwrap_or_else(|| {
            existing
                .filter(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits())
                .map_or(0o644, |s| s.st_mode & 0o7777)
        });
        let (file, temp) = loop {
            let temp = cstring(&format!(".crownest-upload-{:016x}", rand::random::<u64>()))?;
            match openat(
                &dir,
                temp.as_c_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => break (File::from(fd), temp),
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(FsError::errno(e, &request.path)),
            }
        };
        let pending = PendingWrite {
            dir,
            temp,
            name: name_c,
            path: request.path.clone(),
            file,
            mode,
            written: 0,
            max_bytes: request.max_bytes,
            committed: false,
        };
        let (uid, gid) = owner_ids(request.owner);
        fchown(pending.file.as_fd(), uid, gid).map_err(|e| FsError::errno(e, &request.path))?;
        Ok(pending)
    }

    /// Renames `from` to `to` (both beneath the root, parents not created).
    pub fn rename(&self, from: &str, to: &str, overwrite: bool) -> FsResult<FileInfo> {
        let root = self.root_fd()?;
        let (from_dir, from_name) = Self::parent(&root, from, None)?;
        let (to_dir, to_name) = Self::parent(&root, to, None)?;
        let (from_c, to_c) = (cstring(from_name)?, cstring(to_name)?);
        let flags = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
        // SAFETY: renameat2 reads two NUL-terminated strings that outlive
        // the call and two open directory fds; it has no other effect on
        // this process's memory. (nix offers renameat2 on glibc only.)
        let result = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                from_dir.as_raw_fd(),
                from_c.as_ptr(),
                to_dir.as_raw_fd(),
                to_c.as_ptr(),
                flags,
            )
        };
        if result != 0 {
            let errno = Errno::last();
            let shown =
                if errno == Errno::EEXIST || errno == Errno::EISDIR || errno == Errno::ENOTDIR {
                    to
                } else {
                    from
                };
            return Err(FsError::errno(errno, shown));
        }
        let stat = fstatat(&to_dir, to_c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::errno(e, to))?;
        Ok(info(to_name, &stat))
    }

    /// Creates a directory (and its parents with `parents`).
    pub fn mkdir(&self, path: &str, parents: bool, owner: Option<ExecUser>) -> FsResult<FileInfo> {
        let root = self.root_fd()?;
        let parts = components(path)?;
        if parts.is_empty() {
            if parents {
                return self.stat(path);
            }
            return Err(FsError::new(
                FileErrorKind::AlreadyExists,
                "the workspace already exists",
            ));
        }
        if parents {
            mkdir_all(&root, &parts, owner)?;
        } else {
            let (dir, name) = Self::parent(&root, path, None)?;
            make_dir(&dir, name, owner).map_err(|e| FsError::errno(e, path))?;
        }
        let fd = Self::resolve(
            &root,
            &parts,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        let stat = fstat(&fd).map_err(|e| FsError::errno(e, path))?;
        Ok(info(parts.last().copied().unwrap_or(""), &stat))
    }

    /// Removes a file, a symlink (not its target) or a directory (with its
    /// contents when `recursive`).
    pub fn remove(&self, path: &str, recursive: bool) -> FsResult<()> {
        let root = self.root_fd()?;
        let (dir, name) = Self::parent(&root, path, None)?;
        let name_c = cstring(name)?;
        let stat = fstatat(&dir, name_c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| FsError::errno(e, path))?;
        let is_dir = stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits();
        let result = if !is_dir {
            unlinkat(&dir, name_c.as_c_str(), UnlinkatFlags::NoRemoveDir)
        } else if recursive {
            remove_tree(dir.as_fd(), &name_c, 0)
        } else {
            unlinkat(&dir, name_c.as_c_str(), UnlinkatFlags::RemoveDir)
        };
        result.map_err(|e| FsError::errno(e, path))
    }
}

/// Reports a failure to open a parent directory against the whole path.
fn parent_error(error: FsError, path: &str) -> FsError {
    match error.kind {
        FileErrorKind::OutsideWorkspace => FsError::new(
            FileErrorKind::OutsideWorkspace,
            format!("`{path}` resolves outside /workspace"),
        ),
        _ => error,
    }
}

/// `mkdirat` + chown of the new directory (never through a symlink).
pub(crate) fn make_dir(dir: &OwnedFd, name: &str, owner: Option<ExecUser>) -> Result<(), Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    mkdirat(dir, name.as_c_str(), Mode::from_bits_truncate(0o755))?;
    let (uid, gid) = owner_ids(owner);
    if uid.is_some() {
        fchownat(dir, name.as_c_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// Whether this kernel has a usable `openat2`: gVisor's before 2023 has
/// none (its seccomp layer then answers `EPERM`, not `ENOSYS`). Asked once.
fn openat2_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH);
        match openat2(nix::fcntl::AT_FDCWD, Path::new("/"), how) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("crownest-agent: openat2 is unavailable ({e}): resolving paths one component at a time");
                false
            }
        }
    })
}

/// Symlinks one resolution follows at most (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// What `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` does, done by
/// hand where it is missing: one component at a time, each opened relative
/// to the directory fd before it with `O_NOFOLLOW`, so nothing is resolved
/// by the kernel across more than one name. `..` pops back towards the
/// root and is `EXDEV` past it; a symlink is read and its target walked in
/// its place (an absolute one is `EXDEV`, as under `RESOLVE_BENEATH`);
/// magic links (`/proc/…/fd/…`) can only be reached through an absolute
/// path or a `..` past the root, both refused. A symlink swapped in
/// between the check and the open makes the `O_NOFOLLOW` open fail.
fn resolve_by_walk(root: &OwnedFd, path: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let mut dirs: Vec<OwnedFd> = Vec::new();
    let mut pending: std::collections::VecDeque<Vec<u8>> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.as_slice() {
            b"." => continue,
            b".." => {
                if dirs.pop().is_none() {
                    return Err(Errno::EXDEV);
                }
                continue;
            }
            _ => {}
        }
        let dir = dirs.last().map_or(root.as_fd(), |d| d.as_fd());
        let name_c = CString::new(name).map_err(|_| Errno::EINVAL)?;
        let last = pending.is_empty();
        let stat = match fstatat(dir, name_c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Some(stat),
            Err(Errno::ENOENT) if last && flags.contains(OFlag::O_CREAT) => None,
            Err(e) => return Err(e),
        };
        let is_link =
            stat.is_some_and(|s| s.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits());
        if is_link && !(last && flags.contains(OFlag::O_NOFOLLOW)) {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(Errno::ELOOP);
            }
            let target = nix::fcntl::readlinkat(dir, name_c.as_c_str())?;
            let target = target.as_encoded_bytes();
            if target.starts_with(b"/") {
                return Err(Errno::EXDEV);
            }
            for part in target.split(|b| *b == b'/').rev() {
                if !part.is_empty() {
                    pending.push_front(part.to_vec());
                }
            }
            continue;
        }
        if last {
            let fd = openat(
                dir,
                name_c.as_c_str(),
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                mode,
            )?;
            // O_PATH | O_NOFOLLOW opens a symlink raced into place as
            // itself: refuse it as the kernel refuses a loop.
            if !flags.contains(OFlag::O_NOFOLLOW)
                && fstat(&fd)?.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits()
            {
                return Err(Errno::ELOOP);
            }
            return Ok(fd);
        }
        let next = openat(
            dir,
            name_c.as_c_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        dirs.push(next);
    }
    // The path named the root or ended on `..`/a symlink to a directory:
    // open that directory itself with the flags asked for.
    let dir = dirs.last().map_or(root.as_fd(), |d| d.as_fd());
    openat(dir, c".", flags | OFlag::O_CLOEXEC, mode)
}

/// Creates each missing directory of `parts`, resolving every prefix
/// beneath the root (an existing directory, or a symlink to one inside the
/// workspace, is used as it is).
fn mkdir_all(root: &OwnedFd, parts: &[&str], owner: Option<ExecUser>) -> FsResult<()> {
    for end in 1..=parts.len() {
        let prefix = &parts[..end];
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        match Workspace::resolve(root, prefix, flags, Mode::empty()) {
            Ok(_) => continue,
            Err(e) if e.kind == FileErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let parent = Workspace::resolve(root, &prefix[..end - 1], flags, Mode::empty())?;
        match make_dir(&parent, prefix[end - 1], owner) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(FsError::errno(e, &prefix.join("/"))),
        }
        // A symlink raced into its place is caught here, beneath the root.
        Workspace::resolve(root, prefix, flags, Mode::empty())?;
    }
    Ok(())
}

/// Removes `name` in `dir` and everything below it, by fd, never following
/// a symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> Result<(), Errno> {
    let stat = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if stat.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFDIR.bits() {
        return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir);
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(Errno::ELOOP);
    }
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let names: Vec<CString> = {
        let mut listing = nix::dir::Dir::from_fd(fd.try_clone().map_err(|_| Errno::EMFILE)?)?;
        listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.to_bytes() != b"." && n.to_bytes() != b"..")
            .collect()
    };
    for child in &names {
        match remove_tree(fd.as_fd(), child, depth + 1) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir)
}

/// A file being written: bytes go to a temporary file in the target's
/// directory, renamed over the target by [`PendingWrite::commit`]. Dropped
/// uncommitted, it removes the temporary file.
pub struct PendingWrite {
    dir: OwnedFd,
    temp: CString,
    name: CString,
    path: String,
    file: File,
    mode: u32,
    written: u64,
    max_bytes: Option<u64>,
    committed: bool,
}

impl PendingWrite {
    pub fn write(&mut self, bytes: &[u8]) -> FsResult<()> {
        self.written += bytes.len() as u64;
        if let Some(max) = self.max_bytes
            && self.written > max
        {
            return Err(FsError::new(
                FileErrorKind::TooLarge,
                format!("`{}` would exceed the limit of {max} bytes", self.path),
            ));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| FsError::io(&e, &self.path))
    }

    /// Renames the finished file into place and returns its metadata.
    pub fn commit(mut self) -> FsResult<FileInfo> {
        fchmod(self.file.as_fd(), Mode::from_bits_truncate(self.mode))
            .map_err(|e| FsError::errno(e, &self.path))?;
        nix::fcntl::renameat(
            &self.dir,
            self.temp.as_c_str(),
            &self.dir,
            self.name.as_c_str(),
        )
        .map_err(|e| FsError::errno(e, &self.path))?;
        self.committed = true;
        let stat = fstat(self.file.as_fd()).map_err(|e| FsError::errno(e, &self.path))?;
        Ok(info(&self.name.to_string_lossy(), &stat))
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = unlinkat(&self.dir, self.temp.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Serves one `Open::File*` stream to its end.
pub async fn serve<R, W>(open: Open, workspace: Workspace, reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match open {
        Open::FileStat { path } => {
            let reply = blocking(move || workspace.stat(&path).map(FileReply::Stat)).await;
            finish(&mut writer, reply).await;
        }
        Open::FileMove {
            from,
            to,
            overwrite,
        } => {
            let reply =
                blocking(move || workspace.rename(&from, &to, overwrite).map(FileReply::Stat))
                    .await;
            finish(&mut writer, reply).await;
        }
        Open::FileMkdir {
            path,
            parents,
            owner,
        } => {
            let reply =
                blocking(move || workspace.mkdir(&path, parents, owner).map(FileReply::Stat)).await;
            finish(&mut writer, reply).await;
        }
        Open::FileRemove { path, recursive } => {
            let reply =
                blocking(move || workspace.remove(&path, recursive).map(|()| FileReply::Done))
                    .await;
            finish(&mut writer, reply).await;
        }
        Open::FileList { path } => {
            produce(&mut writer, move |tx| {
                workspace.list(&path, |batch| {
                    tx.blocking_send(FileReply::Entries(batch)).is_ok()
                })
            })
            .await;
        }
        Open::FileRead { path } => {
            produce(&mut writer, move |tx| read_file(&workspace, &path, tx)).await;
        }
        Open::FileWrite(request) => write_file(workspace, request, reader, writer).await,
        Open::Ping
        | Open::Exec(_)
        | Open::CodeContextCreate(_)
        | Open::CodeRun(_)
        | Open::TcpConnect { .. }
        | Open::CodeContextDelete { .. }
        | Open::ExecAttach(_)
        | Open::ExecList
        | Open::CodeContextList
        | Open::ArchiveExtract(_)
        | Open::EgressListen
        | Open::CodeContextRestart { .. }
        | Open::Stats
        | Open::FileWatch { .. } => {}
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(FsError::new(FileErrorKind::Other, format!("worker: {e}"))))
}

async fn finish<W: AsyncWrite + Unpin>(writer: &mut W, reply: FsResult<FileReply>) {
    let reply = reply.unwrap_or_else(FsError::reply);
    if write_message(writer, &reply).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// Runs `work` on the blocking pool, forwarding the replies it sends, then
/// `End` (or the error it returned). A host that goes away stops the work
/// at its next send.
async fn produce<W, F>(writer: &mut W, work: F)
where
    W: AsyncWrite + Unpin,
    F: FnOnce(&mpsc::Sender<FileReply>) -> FsResult<()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<FileReply>(4);
    let worker = tokio::task::spawn_blocking(move || work(&tx));
    let mut broken = false;
    while let Some(reply) = rx.recv().await {
        if write_message(writer, &reply).await.is_err() {
            broken = true;
            break;
        }
    }
    drop(rx);
    let result = worker
        .await
        .unwrap_or_else(|e| Err(FsError::new(FileErrorKind::Other, format!("worker: {e}"))));
    if broken {
        return;
    }
    finish(writer, result.map(|()| FileReply::End)).await;
}

fn read_file(workspace: &Workspace, path: &str, tx: &mpsc::Sender<FileReply>) -> FsResult<()> {
    let (mut file, info) = workspace.open_read(path)?;
    let mut remaining = info.size;
    if tx.blocking_send(FileReply::Stat(info)).is_err() {
        return Ok(());
    }
    // At most the stat's size: the host sets Content-Length from it.
    while remaining > 0 {
        let want = remaining.min(MAX_CHUNK_LEN as u64) as usize;
        let mut chunk = vec![0u8; want];
        let n = file.read(&mut chunk).map_err(|e| FsError::io(&e, path))?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        remaining -= n as u64;
        if tx.blocking_send(FileReply::Data(chunk)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// A write stream: frames from the host feed a [`PendingWrite`] on the
/// blocking pool; `End` commits it, anything else discards it.
async fn write_file<R, W>(
    workspace: Workspace,
    request: FileWriteRequest,
    mut reader: R,
    mut writer: W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<FileInput>(8);
    let worker = tokio::task::spawn_blocking(move || {
        let mut pending = workspace.begin_write(&request)?;
        while let Some(input) = rx.blocking_recv() {
            match input {
                FileInput::Data(bytes) => pending.write(&bytes)?,
                FileInput::End => return pending.commit().map(Some),
            }
        }
        // The host went away before `End`: the drop removes the temp file.
        Ok(None)
    });
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        loop {
            let payload = match decoder.next_frame() {
                Ok(Some(payload)) => payload,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            let Ok(input) = decode::<FileInput>(&payload) else {
                break 'read;
            };
            let end = input == FileInput::End;
            if tx.send(input).await.is_err() || end {
                break 'read;
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
    drop(tx);
    let result = worker
        .await
        .unwrap_or_else(|e| Err(FsError::new(FileErrorKind::Other, format!("worker: {e}"))));
    match result {
        Ok(Some(info)) => finish(&mut writer, Ok(FileReply::Stat(info))).await,
        Ok(None) => {}
        Err(e) => finish(&mut writer, Err(e)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A temporary directory standing in for /workspace, inside a parent
    /// that holds a "secret" outside it.
    struct Fixture {
        base: PathBuf,
        ws: Workspace,
    }

    impl Fixture {
        fn new() -> Self {
            let base =
                std::env::temp_dir().join(format!("cn-agent-files-{:016x}", rand::random::<u64>()));
            std::fs::create_dir_all(base.join("ws")).expect("mkdir");
            std::fs::write(base.join("secret"), b"outside").expect("secret");
            Self {
                ws: Workspace::new(base.join("ws")),
                base,
            }
        }

        fn inside(&self, rel: &str) -> PathBuf {
            self.base.join("ws").join(rel)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    fn write(ws: &Workspace, path: &str, bytes: &[u8]) -> FsResult<FileInfo> {
        let mut pending = ws.begin_write(&FileWriteRequest {
            path: path.to_string(),
            mode: None,
            parents: true,
            owner: None,
            max_bytes: None,
        })?;
        pending.write(bytes)?;
        pending.commit()
    }

    fn read(ws: &Workspace, path: &str) -> FsResult<Vec<u8>> {
        let (mut file, _) = ws.open_read(path)?;
        let mut out = Vec::new();
        file.read_to_end(&mut out).expect("read");
        Ok(out)
    }

    fn kind<T: std::fmt::Debug>(result: FsResult<T>) -> FileErrorKind {
        result.expect_err("should fail").kind
    }

    #[test]
    fn write_then_read_stat_list_move_remove_round_trip() {
        let f = Fixture::new();
        let written = write(&f.ws, "dir/a.bin", &[0, 1, 2, 255]).expect("write");
        assert_eq!(
            (written.size, written.mode, written.kind),
            (4, 0o644, FileKind::File)
        );
        assert_eq!(read(&f.ws, "dir/a.bin").expect("read"), vec![0, 1, 2, 255]);
        assert_eq!(f.ws.stat("dir").expect("stat").kind, FileKind::Dir);
        let mut names = Vec::new();
        f.ws.list("dir", |b| {
            names.extend(b.into_iter().map(|i| i.name));
            true
        })
        .expect("list");
        assert_eq!(names, vec!["a.bin"]);
        f.ws.rename("dir/a.bin", "b.bin", false).expect("move");
        assert_eq!(read(&f.ws, "b.bin").expect("read"), vec![0, 1, 2, 255]);
        f.ws.remove("dir", false).expect("remove empty dir");
        f.ws.remove("b.bin", false).expect("remove file");
        assert_eq!(kind(f.ws.stat("b.bin")), FileErrorKind::NotFound);
    }

    #[test]
    fn the_walk_resolves_every_path_as_openat2_does() {
        use std::os::unix::fs::symlink;
        let f = Fixture::new();
        std::fs::create_dir_all(f.inside("a/b")).expect("mkdir");
        std::fs::write(f.inside("a/f"), b"x").expect("file");
        for (link, target) in [
            ("in_link", "a/f"),
            ("dir_link", "a"),
            ("up_inside", "a/b/.."),
            ("out_abs", "/etc"),
            ("out_rel", "../secret"),
            ("a/b/deep_out", "../../../secret"),
            ("loop1", "loop2"),
            ("loop2", "loop1"),
            ("dangling", "nowhere"),
        ] {
            symlink(target, f.inside(link)).expect("symlink");
        }
        let root = f.ws.root_fd().expect("root");
        let id = |fd: &OwnedFd| fstat(fd).map(|s| (s.st_dev, s.st_ino)).expect("fstat");
        let cases = [
            "",
            "a",
            "a/f",
            "a/b",
            "in_link",
            "dir_link/f",
            "up_inside/f",
            "out_abs",
            "out_rel",
            "a/b/deep_out",
            "loop1",
            "dangling",
            "missing",
            "a/missing",
            "a/f/x",
            "dir_link/b/..",
        ];
        for path in cases {
            for flags in [
                OFlag::O_PATH,
                OFlag::O_RDONLY,
                OFlag::O_PATH | OFlag::O_NOFOLLOW,
            ] {
                let how = OpenHow::new()
                    .flags(flags | OFlag::O_CLOEXEC)
                    .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
                let path_or_dot = if path.is_empty() { "." } else { path };
                let kernel = openat2(&root, Path::new(path_or_dot), how);
                let walked = resolve_by_walk(&root, path, flags, Mode::empty());
                match (&kernel, &walked) {
                    (Ok(k), Ok(w)) => assert_eq!(id(k), id(w), "{path} {flags:?}"),
                    (Err(k), Err(w)) => assert_eq!(k, w, "{path} {flags:?}"),
                    _ => panic!("{path} {flags:?}: openat2 {kernel:?}, walk {walked:?}"),
                }
            }
        }
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let f = Fixture::new();
        assert_eq!(kind(f.ws.stat("../secret")), FileErrorKind::InvalidPath);
        assert_eq!(kind(f.ws.stat("/etc/passwd")), FileErrorKind::InvalidPath);
        assert_eq!(kind(write(&f.ws, "../x", b"x")), FileErrorKind::InvalidPath);
    }

    #[test]
    fn an_absolute_symlink_is_refused_everywhere() {
        let f = Fixture::new();
        symlink("/", f.inside("root")).expect("symlink");
        assert_eq!(
            kind(f.ws.open_read("root/etc/passwd")),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(kind(f.ws.stat("root")), FileErrorKind::OutsideWorkspace);
        assert_eq!(
            kind(f.ws.list("root", |_| true)),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            kind(write(&f.ws, "root/tmp/evil", b"x")),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            kind(f.ws.mkdir("root/tmp/evil", true, None)),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            kind(f.ws.rename("root/tmp", "here", false)),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            kind(f.ws.remove("root/tmp", true)),
            FileErrorKind::OutsideWorkspace
        );
    }

    #[test]
    fn a_relative_symlink_out_is_refused_but_one_inside_works() {
        let f = Fixture::new();
        symlink("../secret", f.inside("out")).expect("symlink");
        symlink("..", f.inside("up")).expect("symlink");
        assert_eq!(kind(f.ws.open_read("out")), FileErrorKind::OutsideWorkspace);
        assert_eq!(
            kind(f.ws.open_read("up/secret")),
            FileErrorKind::OutsideWorkspace
        );
        write(&f.ws, "real/file", b"ok").expect("write");
        symlink("real", f.inside("alias")).expect("symlink");
        assert_eq!(read(&f.ws, "alias/file").expect("read"), b"ok");
    }

    #[test]
    fn writing_over_a_symlink_replaces_the_link_and_refuses_one_pointing_out() {
        let f = Fixture::new();
        write(&f.ws, "target", b"old").expect("write");
        symlink("target", f.inside("link")).expect("symlink");
        write(&f.ws, "link", b"new").expect("write");
        assert_eq!(read(&f.ws, "target").expect("read"), b"old");
        assert_eq!(read(&f.ws, "link").expect("read"), b"new");
        // A link pointing outside is refused, and its target untouched.
        symlink(f.base.join("secret"), f.inside("out")).expect("symlink");
        assert_eq!(
            kind(write(&f.ws, "out", b"x")),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            std::fs::read(f.base.join("secret")).expect("secret"),
            b"outside"
        );
    }

    #[test]
    fn removing_a_symlink_to_a_directory_outside_removes_only_the_link() {
        let f = Fixture::new();
        std::fs::create_dir(f.base.join("outdir")).expect("mkdir");
        std::fs::write(f.base.join("outdir/keep"), b"k").expect("write");
        symlink(f.base.join("outdir"), f.inside("link")).expect("symlink");
        f.ws.remove("link", true).expect("remove");
        assert!(f.base.join("outdir/keep").exists());
        // A tree with a symlink inside: the recursive remove does not follow it.
        write(&f.ws, "tree/x", b"x").expect("write");
        symlink(f.base.join("outdir"), f.inside("tree/link")).expect("symlink");
        f.ws.remove("tree", true).expect("remove tree");
        assert!(f.base.join("outdir/keep").exists());
        assert!(!f.inside("tree").exists());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_between_calls_is_refused() {
        let f = Fixture::new();
        write(&f.ws, "d/file", b"in").expect("write");
        assert_eq!(read(&f.ws, "d/file").expect("read"), b"in");
        // Code in the sandbox swaps the directory for a symlink out.
        std::fs::rename(f.inside("d"), f.inside("d.old")).expect("rename");
        symlink(&f.base, f.inside("d")).expect("symlink");
        assert_eq!(
            kind(f.ws.open_read("d/secret")),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            kind(write(&f.ws, "d/secret", b"x")),
            FileErrorKind::OutsideWorkspace
        );
        assert_eq!(
            std::fs::read(f.base.join("secret")).expect("secret"),
            b"outside"
        );
    }

    #[test]
    fn a_swap_during_a_write_cannot_redirect_it() {
        let f = Fixture::new();
        std::fs::create_dir(f.inside("d")).expect("mkdir");
        let mut pending =
            f.ws.begin_write(&FileWriteRequest {
                path: String::from("d/secret"),
                mode: None,
                parents: false,
                owner: None,
                max_bytes: None,
            })
            .expect("begin");
        // The parent is swapped for a symlink to the outside mid-write.
        std::fs::rename(f.inside("d"), f.inside("d.old")).expect("rename");
        symlink(&f.base, f.inside("d")).expect("symlink");
        pending.write(b"payload").expect("write");
        pending.commit().expect("commit");
        assert_eq!(
            std::fs::read(f.base.join("secret")).expect("secret"),
            b"outside"
        );
        assert_eq!(
            std::fs::read(f.inside("d.old/secret")).expect("moved"),
            b"payload"
        );
    }

    #[test]
    fn final_component_tricks_are_refused() {
        let f = Fixture::new();
        assert_eq!(kind(write(&f.ws, "", b"x")), FileErrorKind::InvalidPath);
        assert_eq!(kind(f.ws.remove("", true)), FileErrorKind::InvalidPath);
        assert_eq!(
            kind(f.ws.rename("a/..", "b", false)),
            FileErrorKind::InvalidPath
        );
        assert_eq!(
            kind(f.ws.mkdir(".", false, None)),
            FileErrorKind::InvalidPath
        );
        assert!(f.base.join("ws").exists());
    }

    #[test]
    fn an_oversized_write_leaves_no_file_and_an_abandoned_one_neither() {
        let f = Fixture::new();
        let mut pending =
            f.ws.begin_write(&FileWriteRequest {
                path: String::from("big"),
                mode: None,
                parents: false,
                owner: None,
                max_bytes: Some(4),
            })
            .expect("begin");
        assert_eq!(kind(pending.write(b"12345")), FileErrorKind::TooLarge);
        drop(pending);
        let abandoned =
            f.ws.begin_write(&FileWriteRequest {
                path: String::from("half"),
                mode: None,
                parents: false,
                owner: None,
                max_bytes: None,
            })
            .expect("begin");
        drop(abandoned);
        let entries = std::fs::read_dir(f.inside("")).expect("read_dir").count();
        assert_eq!(entries, 0);
    }

    #[test]
    fn errors_have_specific_kinds() {
        let f = Fixture::new();
        write(&f.ws, "d/f", b"x").expect("write");
        assert_eq!(kind(f.ws.open_read("d")), FileErrorKind::IsADirectory);
        assert_eq!(
            kind(f.ws.list("d/f", |_| true)),
            FileErrorKind::NotADirectory
        );
        assert_eq!(
            kind(f.ws.mkdir("d", false, None)),
            FileErrorKind::AlreadyExists
        );
        assert_eq!(kind(f.ws.remove("d", false)), FileErrorKind::NotEmpty);
        assert_eq!(
            kind(f.ws.rename("d/f", "d", false)),
            FileErrorKind::AlreadyExists
        );
        assert_eq!(kind(f.ws.stat("nope")), FileErrorKind::NotFound);
        f.ws.mkdir("d", true, None)
            .expect("mkdir -p of an existing dir");
        f.ws.mkdir("x/y/z", true, None).expect("mkdir -p");
        assert_eq!(f.ws.stat("x/y/z").expect("stat").kind, FileKind::Dir);
    }
}
