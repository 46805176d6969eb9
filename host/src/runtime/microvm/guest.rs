//! What a microVM boots from, built on the host without root-only tools
//! (no loop devices, no mounts) and cached under the rootfs cache dir:
//!
//! - `kernels/<release>/`: Debian's cloud kernel (`linux-image-cloud-amd64`,
//!   fetched with `apt-get download`, unpacked with `dpkg-deb -x`): its
//!   `vmlinuz` (a bzImage, which QEMU `-M pc` and crosvm boot), `vmlinux`
//!   (the ELF inside it, for QEMU `-M microvm`, extracted on first use) and
//!   the virtio modules the initramfs loads. `kernels/current` names the
//!   release in use; cached by version, never re-fetched while it exists.
//! - `initramfs/<sha256>.cpio`: a newc archive of `/init` (the static
//!   agent, which runs as the guest's init, see `agent/src/vm.rs`), the
//!   modules and the empty mount points; keyed by the agent's bytes, the
//!   kernel release and the module list, so a new host version gets a new
//!   one and the rootfs image is never rebuilt for it.
//! - `images/<rootfs entry>.v<N>.ext4`: the template rootfs as an ext4
//!   image (`mke2fs -d`), attached read-only to every VM of the recipe.
//!
//! Every artifact is written to a temporary name and renamed into place, under
//! an flock, so a crash never leaves half of one that a start would use.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::runtime::{RuntimeError, io_error};

/// The Debian package whose dependency is the guest kernel.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest loads, in dependency order: the virtio core, both
/// transports (PCI for QEMU `-M pc` and crosvm, MMIO for QEMU `-M
/// microvm`), the console/serial port and the block device. One that the
/// kernel has built in (no `.ko`) is skipped.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
];

/// Bumped when the image layout changes (mke2fs options, added dirs).
const IMAGE_FORMAT: u32 = 1;
/// Bumped when the initramfs layout changes.
const INITRAMFS_FORMAT: u32 = 1;

/// Room left in a rootfs image beyond its content: ext4 metadata and the
/// inode tables (the image is read-only; nothing grows it).
const IMAGE_SLACK_MIB: u64 = 64;

/// A guest kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    pub dir: PathBuf,
}

impl Kernel {
    pub fn bzimage(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The module files present, in [`MODULES`] order.
    pub fn modules(&self) -> Vec<PathBuf> {
        MODULES
            .iter()
            .map(|m| self.dir.join("modules").join(format!("{m}.ko")))
            .filter(|p| p.is_file())
            .collect()
    }
}

/// Creates `dir` (and parents) searchable by others: the VMM runs as an
/// unprivileged uid and opens the artifacts by path.
fn create_dir_shared(dir: &Path) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    let mode = std::fs::metadata(dir)
        .map_err(io_error("cannot stat", dir))?
        .permissions()
        .mode();
    if mode & 0o005 != 0o005 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o005))
            .map_err(io_error("cannot chmod", dir))?;
    }
    Ok(())
}

/// An exclusive flock on `path`, taken on the blocking pool.
async fn lock(path: PathBuf) -> Result<nix::fcntl::Flock<std::fs::File>, RuntimeError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("cannot open", &path))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
            RuntimeError::Io {
                action: "cannot lock",
                path: path.clone(),
                source: errno.into(),
            }
        })
    })
    .await
    .map_err(|e| RuntimeError::Unavailable(format!("lock task failed: {e}")))?
}

/// Runs a build tool; a failure carries the last lines of its output.
async fn run(command: &mut Command, what: &str) -> Result<String, RuntimeError> {
    let program = command.as_std().get_program().to_owned();
    let out = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| RuntimeError::Spawn {
            binary: PathBuf::from(&program),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().rev().take(10).collect();
    Err(RuntimeError::Command {
        command: what.to_owned(),
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

fn spinner(progress: bool, what: &str) -> Option<indicatif::ProgressBar> {
    progress.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
        {
            bar.set_style(style);
        }
        bar.set_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    })
}

/// The cached guest kernel, fetched and unpacked on first use.
pub async fn ensure_kernel(cache: &Path, progress: bool) -> Result<Kernel, RuntimeError> {
    let kernels = cache.join("kernels");
    if let Some(kernel) = current_kernel(&kernels) {
        return Ok(kernel);
    }
    create_dir_shared(cache)?;
    create_dir_shared(&kernels)?;
    let _lock = lock(kernels.join(".lock")).await?;
    if let Some(kernel) = current_kernel(&kernels) {
        return Ok(kernel);
    }
    let bar = spinner(
        progress,
        &format!("fetching the guest kernel ({KERNEL_PACKAGE})"),
    );
    let result = fetch_kernel(&kernels).await;
    if let Some(bar) = bar {
        match &result {
            Ok(k) => bar.finish_with_message(format!("guest kernel {}", k.release)),
            Err(_) => bar.abandon_with_message("fetching the guest kernel failed"),
        }
    }
    result
}

/// The kernel `kernels/current` names, if it is complete.
fn current_kernel(kernels: &Path) -> Option<Kernel> {
    let release = std::fs::read_to_string(kernels.join("current")).ok()?;
    let release = release.trim();
    if release.is_empty() || release.contains('/') || release.starts_with('.') {
        return None;
    }
    let kernel = Kernel {
        release: release.to_owned(),
        dir: kernels.join(release),
    };
    kernel.bzimage().is_file().then_some(kernel)
}

async fn fetch_kernel(kernels: &Path) -> Result<Kernel, RuntimeError> {
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(kernels)
        .map_err(io_error("cannot create a temporary dir in", kernels))?;
    // The meta package depends on the versioned image package.
    let depends = run(
        Command::new("apt-cache").args(["depends", KERNEL_PACKAGE]),
        &format!("apt-cache depends {KERNEL_PACKAGE}"),
    )
    .await?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| RuntimeError::Output {
            command: format!("apt-cache depends {KERNEL_PACKAGE}"),
            message: String::from("no linux-image-* dependency (run apt-get update)"),
        })?
        .to_owned();
    run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(&package)
            .current_dir(work.path()),
        &format!("apt-get download {package}"),
    )
    .await?;
    let deb = std::fs::read_dir(work.path())
        .map_err(io_error("cannot list", work.path()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| RuntimeError::Output {
            command: format!("apt-get download {package}"),
            message: String::from("no .deb was downloaded"),
        })?;
    let unpacked = work.path().join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "dpkg-deb -x",
    )
    .await?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let staged = work.path().join("kernel");
    let modules = staged.join("modules");
    create_dir_shared(&modules)?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::copy(&vmlinuz, staged.join("vmlinuz")).map_err(io_error("cannot copy", &vmlinuz))?;
    let tree = unpacked.join("lib/modules").join(&release);
    for module in MODULES {
        if let Some(found) = find_file(&tree, &format!("{module}.ko")) {
            std::fs::copy(&found, modules.join(format!("{module}.ko")))
                .map_err(io_error("cannot copy", &found))?;
        }
    }
    for entry in [&staged, &modules] {
        std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o755))
            .map_err(io_error("cannot chmod", entry))?;
    }
    let dir = kernels.join(&release);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_error("cannot remove", &dir))?;
    }
    std::fs::rename(&staged, &dir).map_err(io_error("cannot move into place", &dir))?;
    write_atomically(&kernels.join("current"), format!("{release}\n").as_bytes())?;
    Ok(Kernel { release, dir })
}

/// The first file named `name` under `dir` (depth-first).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().ok()?;
        if kind.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if kind.is_file() && entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

/// Writes `path` through a temporary file and a rename, world-readable.
fn write_atomically(path: &Path, content: &[u8]) -> Result<(), RuntimeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_error("cannot create a temporary file in", dir))?;
    temp.write_all(content)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(io_error("cannot write", temp.path()))?;
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(io_error("cannot chmod", temp.path()))?;
    temp.persist(path)
        .map_err(|e| io_error("cannot move into place", path)(e.error))?;
    Ok(())
}

/// The kernel's uncompressed ELF (`vmlinux`), extracted from the bzImage
/// on first use: the payload's compressed stream is found by its magic
/// (LZ4 legacy, gzip, xz or zstd) and inflated with the matching tool.
pub async fn ensure_vmlinux(kernel: &Kernel) -> Result<PathBuf, RuntimeError> {
    let target = kernel.vmlinux();
    if target.is_file() {
        return Ok(target);
    }
    let _lock = lock(kernel.dir.join(".vmlinux.lock")).await?;
    if target.is_file() {
        return Ok(target);
    }
    let bzimage = kernel.bzimage();
    let bytes = std::fs::read(&bzimage).map_err(io_error("cannot read", &bzimage))?;
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (&[0x02, 0x21, 0x4c, 0x18], "lz4", &["-dc"]),
        (&[0x1f, 0x8b, 0x08], "gzip", &["-dc"]),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz", &["-dc"]),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", &["-dc"]),
    ];
    for (magic, tool, args) in FORMATS {
        let Some(start) = bytes.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let payload = kernel.dir.join(".payload");
        std::fs::write(&payload, &bytes[start..]).map_err(io_error("cannot write", &payload))?;
        // The payload is followed by the rest of the image, which the tool
        // reports as trailing garbage after writing the whole stream: judge
        // the output, not the exit status.
        let out = Command::new(tool)
            .args(*args)
            .arg(&payload)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| RuntimeError::Spawn {
                binary: PathBuf::from(tool),
                source,
            })?;
        let _ = std::fs::remove_file(&payload);
        if out.stdout.starts_with(b"\x7fELF") {
            write_atomically(&target, &out.stdout)?;
            return Ok(target);
        }
    }
    Err(RuntimeError::Output {
        command: format!("extracting vmlinux from {}", bzimage.display()),
        message: String::from("no lz4, gzip, xz or zstd payload that inflates to an ELF"),
    })
}

/// A cpio "newc" archive, written in memory.
#[derive(Debug, Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) {
        self.next_ino += 1;
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the archive depends only on its inputs
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040755, 0, (0, 0));
    }

    pub fn file(&mut self, name: &str, mode: u32, content: &[u8]) -> Result<(), RuntimeError> {
        let size = u32::try_from(content.len()).map_err(|_| {
            RuntimeError::Unavailable(format!("{name} is too large for an initramfs"))
        })?;
        self.header(name, 0o100000 | (mode & 0o7777), size, (0, 0));
        self.bytes.extend_from_slice(content);
        self.pad();
        Ok(())
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.header(name, 0o020000 | (mode & 0o7777), 0, (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        self.bytes
    }
}

/// The initramfs for `kernel` and `agent` (see the module docs).
pub async fn ensure_initramfs(
    cache: &Path,
    kernel: &Kernel,
    agent: &Path,
) -> Result<PathBuf, RuntimeError> {
    let agent_bytes = tokio::fs::read(agent)
        .await
        .map_err(|_| RuntimeError::AgentMissing {
            path: agent.to_owned(),
        })?;
    let modules = kernel.modules();
    let mut hash = Sha256::new();
    hash.update(format!(
        "initramfs v{INITRAMFS_FORMAT}\n{}\n",
        kernel.release
    ));
    for module in &modules {
        hash.update(module.file_name().unwrap_or_default().as_encoded_bytes());
        hash.update(b"\n");
    }
    hash.update(&agent_bytes);
    let dir = cache.join("initramfs");
    let path = dir.join(format!("{}.cpio", hex::encode(hash.finalize())));
    if path.is_file() {
        return Ok(path);
    }
    create_dir_shared(&dir)?;
    let mut cpio = Cpio::default();
    for name in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.dir(name);
    }
    // The kernel opens /dev/console for init's stdio before init runs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("init", 0o755, &agent_bytes)?;
    for module in &modules {
        let content = std::fs::read(module).map_err(io_error("cannot read", module))?;
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        cpio.file(&format!("lib/modules/{name}"), 0o644, &content)?;
    }
    write_atomically(&path, &cpio.finish())?;
    Ok(path)
}

/// `images/<rootfs entry>.v<N>.ext4` for a built rootfs directory.
pub fn image_path(cache: &Path, rootfs: &Path) -> PathBuf {
    let entry = rootfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cache
        .join("images")
        .join(format!("{entry}.v{IMAGE_FORMAT}.ext4"))
}

/// Bytes a tree takes on disk (allocated blocks; hard links counted once
/// per path, which only overestimates).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Builds the read-only ext4 image of a built rootfs, once.
pub async fn ensure_image(
    cache: &Path,
    rootfs: &Path,
    progress: bool,
) -> Result<PathBuf, RuntimeError> {
    let path = image_path(cache, rootfs);
    if path.is_file() {
        return Ok(path);
    }
    if !rootfs.is_dir() {
        return Err(RuntimeError::RootfsMissing {
            path: rootfs.to_owned(),
        });
    }
    let dir = cache.join("images");
    create_dir_shared(cache)?;
    create_dir_shared(&dir)?;
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let _lock = lock(dir.join(format!(".{name}.lock"))).await?;
    if path.is_file() {
        return Ok(path);
    }
    // The scratch disk is mounted here in the guest; the directory must be
    // in the (read-only) image. Harmless for containers, which mount a
    // tmpfs on it.
    let workspace = rootfs.join(crownest_proto::WORKSPACE.trim_start_matches('/'));
    std::fs::create_dir_all(&workspace).map_err(io_error("cannot create", &workspace))?;
    let bar = spinner(progress, &format!("making the disk image {name}"));
    let size_mib = {
        let rootfs = rootfs.to_owned();
        let bytes = tokio::task::spawn_blocking(move || tree_size(&rootfs))
            .await
            .unwrap_or(0);
        bytes / (1 << 20) * 6 / 5 + IMAGE_SLACK_MIB
    };
    let temp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&temp);
    let result = run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
            .args(["-L", "crownest-root", "-d"])
            .arg(rootfs)
            .arg(&temp)
            .arg(format!("{size_mib}M")),
        "mke2fs -d (the rootfs image)",
    )
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        if let Some(bar) = bar {
            bar.abandon_with_message(format!("making {name} failed"));
        }
        return Err(e);
    }
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644))
        .map_err(io_error("cannot chmod", &temp))?;
    std::fs::rename(&temp, &path).map_err(io_error("cannot move into place", &path))?;
    if let Some(bar) = bar {
        bar.finish_with_message(format!("disk image {name} ({size_mib} MiB)"));
    }
    Ok(path)
}

/// Makes a sandbox's sparse scratch disk: an empty ext4 of `mib` MiB whose
/// root directory (the guest's /workspace) belongs to `owner`.
pub async fn make_scratch(path: &Path, mib: u64, owner: (u32, u32)) -> Result<(), RuntimeError> {
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-E",
            ])
            .arg(format!(
                "root_owner={}:{},lazy_itable_init=1",
                owner.0, owner.1
            ))
            .arg(path)
            .arg(format!("{}M", mib.max(16))),
        "mke2fs (the scratch disk)",
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of a newc archive: name, mode, rdev and data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads back the entries of a newc archive.
    fn parse_cpio(mut bytes: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let align = |n: usize| n.div_ceil(4) * 4;
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).expect("hex");
                u32::from_str_radix(text, 16).expect("hex")
            };
            let (mode, size, rmaj, rmin, name_size) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + name_size as usize;
            let name = String::from_utf8(bytes[110..name_end - 1].to_vec()).expect("utf8");
            let data_start = align(name_end);
            let data = bytes[data_start..data_start + size as usize].to_vec();
            bytes = &bytes[align(data_start + size as usize)..];
            if name == "TRAILER!!!" {
                return entries;
            }
            entries.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn a_cpio_archive_holds_dirs_files_and_the_console_node_in_newc_form() {
        let mut cpio = Cpio::default();
        cpio.dir("dev");
        cpio.char_device("dev/console", 0o600, 5, 1);
        cpio.file("init", 0o755, b"#!agent").expect("file");
        cpio.file("lib/x.ko", 0o644, b"12345").expect("file");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse_cpio(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "lib/x.ko"]);
        assert_eq!(entries[0].1, 0o040755);
        assert_eq!((entries[1].1, entries[1].2), (0o020600, (5, 1)));
        assert_eq!(
            (entries[2].1, entries[2].3.as_slice()),
            (0o100755, &b"#!agent"[..])
        );
        assert_eq!(entries[3].3, b"12345");
    }

    #[test]
    fn the_image_of_a_rootfs_is_named_by_its_cache_entry_and_format() {
        let path = image_path(Path::new("/c"), Path::new("/c/rootfs/python-abc123"));
        assert_eq!(
            path,
            Path::new(&format!("/c/images/python-abc123.v{IMAGE_FORMAT}.ext4"))
        );
    }

    #[test]
    fn a_kernel_whose_current_pointer_is_missing_or_escapes_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(current_kernel(dir.path()), None);
        std::fs::write(dir.path().join("current"), "../../etc\n").expect("write");
        assert_eq!(current_kernel(dir.path()), None);
        std::fs::create_dir_all(dir.path().join("6.1.0-1-cloud-amd64")).expect("mkdir");
        std::fs::write(dir.path().join("current"), "6.1.0-1-cloud-amd64\n").expect("write");
        assert_eq!(current_kernel(dir.path()), None, "no vmlinuz yet");
        std::fs::write(dir.path().join("6.1.0-1-cloud-amd64/vmlinuz"), b"bz").expect("write");
        let kernel = current_kernel(dir.path()).expect("kernel");
        assert_eq!(kernel.release, "6.1.0-1-cloud-amd64");
        assert!(kernel.modules().is_empty());
    }

    #[tokio::test]
    async fn a_scratch_disk_is_a_sparse_ext4_owned_by_the_sandbox_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scratch.img");
        make_scratch(&path, 64, (1000, 1000)).await.expect("mke2fs");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 8 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let out = std::process::Command::new("debugfs")
            .args(["-R", "stat /"])
            .arg(&path)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("User:  1000") && text.contains("Group:  1000"),
            "{text}"
        );
    }
}
