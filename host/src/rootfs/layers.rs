//! Build steps on a rootfs tree: the default user and mount points for
//! sources that are not built by mmdebstrap, and the `pip`, `npm`, `files`
//! and `run` layers.
//!
//! `pip`, `npm` and `run` steps run inside the tree with `chroot`, in a
//! private mount and pid namespace (`unshare`) with their own `/proc`, a
//! minimal `/dev` and a fresh `/tmp`, all of which vanish with the
//! namespace. They use the host's network, as mmdebstrap does: package
//! indexes are reached at build time, never at sandbox start. The host's
//! `PIP_*`, `NPM_CONFIG_*` and proxy variables are passed through, so an
//! operator points the build at a mirror without editing the template.
//!
//! Files the host itself writes into the tree are reached through
//! [`resolve_full`], which resolves symlinks inside the tree: an image
//! cannot turn `/etc/passwd` into a link to the host's.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use super::ERROR_TAIL_LINES;
use super::oci::{clean, resolve_in};
use crate::templates::{FileCopy, Layer, Template};

/// PATH of build steps inside the tree.
const BUILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host variables a build step inherits: where the package indexes are.
const PASSED_THROUGH: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Runs in the new namespaces: mounts `/proc`, a minimal `/dev`, a fresh
/// `/tmp` and the host's resolv.conf, then runs the step in the chroot.
const WRAPPER: &str = r#"set -e
root="$1"; shift
mount --make-rprivate /
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
for d in null zero full random urandom tty; do
  : > "$root/dev/$d"; mount --bind "/dev/$d" "$root/dev/$d"
done
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"; ln -s /proc/self/fd/1 "$root/dev/stdout"; ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777 tmp "$root/tmp"
created=
if [ -f /etc/resolv.conf ] && [ ! -L "$root/etc/resolv.conf" ]; then
  if [ ! -e "$root/etc/resolv.conf" ]; then : > "$root/etc/resolv.conf"; created=1; fi
  mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
fi
set +e
chroot "$root" "$@"
rc=$?
if [ -n "$created" ]; then umount "$root/etc/resolv.conf"; rm -f "$root/etc/resolv.conf"; fi
exit $rc
"#;

/// `path` (absolute or relative, inside `root`) with every symlink
/// resolved inside the tree, the last component too; `None` past
/// [`MAX_LINKS`] links.
pub fn resolve_full(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut relative = clean(path).unwrap_or_default();
    for _ in 0..40 {
        let resolved = resolve_in(root, &relative).ok()?;
        match std::fs::read_link(&resolved) {
            Ok(target) => {
                let here = resolved.strip_prefix(root).ok()?.to_owned();
                relative = if target.is_absolute() {
                    clean(&target).unwrap_or_default()
                } else {
                    here.parent().unwrap_or(Path::new("")).join(target)
                };
            }
            Err(_) => return Some(resolved),
        }
    }
    None
}

/// A directory the build needs, as a real directory (not a symlink).
fn ensure_dir(root: &Path, name: &str, mode: u32) -> Result<PathBuf, String> {
    let path = root.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "/{name} in the rootfs is not a directory; the build needs a real /{name}"
            ));
        }
        Err(_) => std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?,
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Adds what mmdebstrap's customize hook adds for a Debian source: the
/// default user (in passwd, group and shadow) with its home, and the mount
/// points the read-only rootfs needs.
pub fn prepare(template: &Template, root: &Path) -> Result<(), String> {
    let (name, uid, gid) = (&template.user_name, template.user.uid, template.user.gid);
    for (dir, mode) in [
        ("workspace", 0o755),
        ("tmp", 0o1777),
        ("run", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
    ] {
        ensure_dir(root, dir, mode)?;
    }
    let home = root.join("home").join(name);
    if std::fs::symlink_metadata(&home).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    }
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    std::os::unix::fs::chown(&home, Some(uid), Some(gid))
        .map_err(|e| format!("{}: {e}", home.display()))?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", home.display()))?;
    let lines = [
        ("etc/group", format!("{name}:x:{gid}:"), true),
        (
            "etc/passwd",
            format!("{name}:x:{uid}:{gid}:CrowNest sandbox user:/home/{name}:/bin/sh"),
            true,
        ),
        ("etc/shadow", format!("{name}:*:19000:0:99999:7:::"), false),
    ];
    for (file, line, create) in lines {
        let path = resolve_full(root, Path::new(file))
            .ok_or_else(|| format!("/{file} in the rootfs is a symlink loop"))?;
        let existing = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(_) if !create => continue,
            Err(_) => String::new(),
        };
        if existing
            .lines()
            .any(|l| l.split(':').next() == Some(name.as_str()))
        {
            continue;
        }
        let mut text = existing;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Applies one layer to the tree at `root`. An error is (what failed, the
/// last lines of its output).
pub async fn apply(
    template: &Template,
    layer: &Layer,
    canonical: &str,
    root: &Path,
    bar: Option<&indicatif::ProgressBar>,
    log: &mut std::fs::File,
) -> Result<(), (String, String)> {
    match layer {
        Layer::Files(files) => {
            for file in files {
                if let Some(bar) = bar {
                    bar.set_message(format!("{} -> {}", file.src.display(), file.dest));
                }
                let _ = writeln!(log, "copy {} -> {}", file.src.display(), file.dest);
                // The source must still be what the recipe hash names.
                let digest = crate::templates::tree_digest(&file.src)
                    .map_err(|e| (String::from("copy"), format!("{}: {e}", file.src.display())))?;
                if !canonical.contains(&format!(" {digest}\n")) {
                    return Err((
                        String::from("input changed"),
                        super::input_changed(&file.src),
                    ));
                }
                copy_in(root, file).map_err(|e| {
                    let _ = writeln!(log, "{e}");
                    (String::from("copy"), e)
                })?;
            }
            Ok(())
        }
        Layer::Pip(packages) => {
            let mut argv = vec!["python3", "-m", "pip", "install"];
            argv.extend(packages.iter().map(String::as_str));
            run_step(template, root, &argv, bar, log).await
        }
        Layer::Npm(packages) => {
            let mut argv = vec![
                "npm",
                "install",
                "-g",
                "--no-fund",
                "--no-audit",
                "--no-update-notifier",
            ];
            argv.extend(packages.iter().map(String::as_str));
            run_step(template, root, &argv, bar, log).await
        }
        Layer::Run(steps) => {
            for step in steps {
                run_step(template, root, &["/bin/sh", "-c", step], bar, log).await?;
            }
            Ok(())
        }
    }
}

/// Runs `argv` inside the tree (see the module docs).
async fn run_step(
    template: &Template,
    root: &Path,
    argv: &[&str],
    bar: Option<&indicatif::ProgressBar>,
    log: &mut std::fs::File,
) -> Result<(), (String, String)> {
    let shown = argv.join(" ");
    let _ = writeln!(log, "$ {shown}");
    for (dir, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("etc", 0o755),
    ] {
        ensure_dir(root, dir, mode).map_err(|e| (shown.clone(), e))?;
    }
    if resolve_full(root, Path::new("bin/sh")).is_none_or(|p| !p.exists()) {
        return Err((
            shown,
            String::from(
                "the rootfs has no /bin/sh; pip, npm and run layers need a shell in the image",
            ),
        ));
    }
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "/bin/sh",
            "-c",
            WRAPPER,
            "sh",
        ])
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", BUILD_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .env("PIP_NO_CACHE_DIR", "1")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("npm_config_cache", "/tmp/.npm")
        .env("npm_config_update_notifier", "false")
        .env("CROWNEST_TEMPLATE", &template.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in std::env::vars() {
        let upper = key.to_ascii_uppercase();
        if PASSED_THROUGH.contains(&key.as_str())
            || upper.starts_with("PIP_")
            || upper.starts_with("NPM_CONFIG_")
        {
            command.env(key, value);
        }
    }
    let mut child = command.spawn().map_err(|e| {
        (
            shown.clone(),
            format!("cannot run unshare (util-linux): {e}"),
        )
    })?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    fn forward(
        stream: Option<impl AsyncRead + Unpin + Send + 'static>,
        tx: tokio::sync::mpsc::Sender<String>,
    ) {
        if let Some(stream) = stream {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    forward(child.stdout.take(), tx.clone());
    forward(child.stderr.take(), tx);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(ERROR_TAIL_LINES);
    while let Some(line) = rx.recv().await {
        let _ = writeln!(log, "{line}");
        if let Some(bar) = bar {
            bar.set_message(line.chars().take(120).collect::<String>());
        }
        if tail.len() == ERROR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| (shown.clone(), e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        let _ = writeln!(log, "(exited: {status})");
        Err((format!("`{shown}` {status}"), Vec::from(tail).join("\n")))
    }
}

/// Copies one `files` entry into the tree, owned by root.
fn copy_in(root: &Path, file: &FileCopy) -> Result<(), String> {
    let dest = resolve_in(root, Path::new(&file.dest)).map_err(|e| e.to_string())?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    copy_entry(&file.src, &dest, file.mode)
}

fn copy_entry(src: &Path, dest: &Path, mode: Option<u32>) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if let Ok(existing) = std::fs::symlink_metadata(dest)
        && !(existing.is_dir() && meta.is_dir())
    {
        let removed = if existing.is_dir() {
            std::fs::remove_dir_all(dest)
        } else {
            std::fs::remove_file(dest)
        };
        removed.map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(|e| format!("{}: {e}", src.display()))?;
        std::os::unix::fs::symlink(target, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        return Ok(());
    }
    if meta.is_dir() {
        std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        std::fs::set_permissions(
            dest,
            std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        )
        .map_err(|e| format!("{}: {e}", dest.display()))?;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(|e| format!("{}: {e}", src.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            copy_entry(&src.join(&name), &dest.join(&name), mode)?;
        }
    } else if meta.is_file() {
        std::fs::copy(src, dest)
            .map_err(|e| format!("{} -> {}: {e}", src.display(), dest.display()))?;
        let bits = mode.unwrap_or(meta.permissions().mode() & 0o7777);
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(bits))
            .map_err(|e| format!("{}: {e}", dest.display()))?;
    } else {
        return Err(format!(
            "{} is not a file, directory or symlink",
            src.display()
        ));
    }
    std::os::unix::fs::lchown(dest, Some(0), Some(0))
        .map_err(|e| format!("{}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_full_follows_links_inside_the_tree_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::write(root.join("usr/bin/python3.12"), "").expect("write");
        std::os::unix::fs::symlink("python3.12", root.join("usr/bin/python3")).expect("rel");
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).expect("bin");
        std::os::unix::fs::symlink("/etc/shadow", root.join("usr/bin/evil")).expect("abs");
        assert_eq!(
            resolve_full(root, Path::new("/bin/python3")),
            Some(root.join("usr/bin/python3.12"))
        );
        assert_eq!(
            resolve_full(root, Path::new("/usr/bin/evil")),
            Some(root.join("etc/shadow"))
        );
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("loop");
        assert_eq!(resolve_full(root, Path::new("/loop")), None);
    }
}
