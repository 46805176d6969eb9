//! The template rootfs cache: builds a template's root filesystem with
//! mmdebstrap into `<cache>/rootfs/<name>-<recipe hash>` and reuses it as
//! long as the recipe is unchanged.
//!
//! A build goes into a temporary directory beside the final one and is
//! renamed into place only when mmdebstrap succeeded, so a half-built rootfs
//! is never used: "the directory exists" means "the build finished". A lock
//! file per recipe (flock) makes concurrent builds of the same recipe, from
//! tasks or processes, wait for the first one and then reuse its result.
//! Once built, nothing here touches the network: sandboxes start offline.
//!
//! The rootfs is shared read-only by every sandbox of the template, whose
//! user namespace root is an unprivileged host uid, so the cache dir and
//! its parents must be searchable by others (see
//! `RuntimeError::RootfsUnreachable`).

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::templates::Template;

/// The program that builds root filesystems.
const MMDEBSTRAP: &str = "mmdebstrap";
/// How many of mmdebstrap's last output lines an error carries.
const ERROR_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot run mmdebstrap (is it installed?): {0}")]
    Spawn(std::io::Error),
    #[error("building the rootfs of template `{template}` failed ({status}): {output}")]
    Build {
        template: String,
        status: String,
        output: String,
    },
    #[error("rootfs build task failed: {0}")]
    Join(String),
}

/// The on-disk cache of built template rootfs trees.
#[derive(Debug, Clone)]
pub struct RootfsCache {
    dir: PathBuf,
}

impl RootfsCache {
    /// A cache rooted at `cache_dir` (rootfs trees go to `<cache_dir>/rootfs`).
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: cache_dir.into(),
        }
    }

    /// A cache at `CROWNEST_CACHE_DIR`, else `~/.cache/crownest`.
    pub fn from_env() -> Self {
        Self::new(crate::config::default_cache_dir())
    }

    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }

    fn rootfs_dir(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn entry_name(template: &Template) -> String {
        format!("{}-{}", template.name, template.recipe_hash())
    }

    /// `<cache>/rootfs/<name>-<recipe hash>`; when that is not built but
    /// another template with the same recipe is (`python-gvisor` shares
    /// `python`'s), that one's tree: the recipe hash says they are equal.
    pub fn path_for(&self, template: &Template) -> PathBuf {
        let own = self.rootfs_dir().join(Self::entry_name(template));
        if own.is_dir() {
            return own;
        }
        let suffix = format!("-{}", template.recipe_hash());
        let mut twins: Vec<PathBuf> = std::fs::read_dir(self.rootfs_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && name.ends_with(&suffix)
            })
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        twins.sort();
        twins.into_iter().next().unwrap_or(own)
    }

    /// Whether the template's current recipe has been built.
    pub fn is_built(&self, template: &Template) -> bool {
        self.path_for(template).is_dir()
    }

    /// Builds the template's rootfs unless it is already built, and returns
    /// its path. With `progress`, shows a spinner with mmdebstrap's current
    /// step on stderr.
    pub async fn build(&self, template: &Template, progress: bool) -> Result<PathBuf, RootfsError> {
        let final_path = self.path_for(template);
        if final_path.is_dir() {
            return Ok(final_path);
        }
        let rootfs_dir = self.rootfs_dir();
        create_dir_searchable(&self.dir)?;
        create_dir_searchable(&rootfs_dir)?;

        let entry = Self::entry_name(template);
        let lock_path = rootfs_dir.join(format!(".{entry}.lock"));
        let bar = progress.then(|| spinner(&template.name));
        if let Some(bar) = &bar {
            bar.set_message("waiting for the build lock");
        }
        let lock = lock(lock_path).await?;

        // Another task or process may have finished the build while we waited.
        if final_path.is_dir() {
            if let Some(bar) = &bar {
                bar.finish_with_message("already built");
            }
            drop(lock);
            return Ok(final_path);
        }

        // We hold the lock, so a temporary dir left here is from a build
        // that died: start over.
        let tmp = rootfs_dir.join(format!(".{entry}.tmp"));
        remove_if_exists(&tmp).await?;

        let started = Instant::now();
        let result = run_mmdebstrap(template, &tmp, bar.as_ref()).await;
        if let Err(e) = result {
            if let Some(bar) = &bar {
                bar.abandon_with_message("failed");
            }
            let _ = remove_if_exists(&tmp).await;
            return Err(e);
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(|e| {
            RootfsError::Io {
                action: "cannot chmod",
                path: tmp.clone(),
                source: e,
            }
        })?;
        std::fs::rename(&tmp, &final_path).map_err(|e| RootfsError::Io {
            action: "cannot move the built rootfs to",
            path: final_path.clone(),
            source: e,
        })?;
        // For operators: what is in this cache entry. Not needed to use it.
        let _ = std::fs::write(
            rootfs_dir.join(format!("{entry}.recipe")),
            template.canonical_recipe(),
        );
        drop(lock);
        if let Some(bar) = &bar {
            bar.finish_with_message(format!(
                "built in {:.0?}",
                Duration::from_secs(started.elapsed().as_secs())
            ));
        }
        tracing::info!(
            template = %template.name,
            path = %final_path.display(),
            seconds = started.elapsed().as_secs_f64(),
            "rootfs built"
        );
        Ok(final_path)
    }
}

/// The mmdebstrap hook that prepares the tree for CrowNest: the default
/// user (written to passwd/group/shadow directly, so it works for every
/// variant, even those without `useradd`) and the mount points the runtime
/// needs, because the rootfs is read-only in sandboxes. (`/run/crownest`
/// and `/run/crownest-agent` live on the `/run` tmpfs, created by runc, and
/// mmdebstrap empties `/run` at the end anyway.)
fn customize_script(template: &Template) -> String {
    let (name, uid, gid) = (&template.user_name, template.user.uid, template.user.gid);
    format!(
        r#"set -e
root="$1"
mkdir -p "$root/workspace" "$root/tmp" "$root/run" "$root/home/{name}"
chmod 1777 "$root/tmp"
grep -q "^{name}:" "$root/etc/group" || echo "{name}:x:{gid}:" >> "$root/etc/group"
grep -q "^{name}:" "$root/etc/passwd" || echo "{name}:x:{uid}:{gid}:CrowNest sandbox user:/home/{name}:/bin/bash" >> "$root/etc/passwd"
if [ -f "$root/etc/shadow" ]; then grep -q "^{name}:" "$root/etc/shadow" || echo "{name}:*:19000:0:99999:7:::" >> "$root/etc/shadow"; fi
chown {uid}:{gid} "$root/home/{name}"
chmod 0755 "$root/home/{name}"
"#
    )
}

/// The mmdebstrap command line (without the program name).
fn mmdebstrap_args(template: &Template, target: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        format!("--variant={}", template.rootfs.variant).into(),
        "--format=directory".into(),
    ];
    if !template.rootfs.packages.is_empty() {
        args.push(format!("--include={}", template.rootfs.packages.join(",")).into());
    }
    args.push(format!("--customize-hook={}", customize_script(template)).into());
    args.push(template.rootfs.suite.clone().into());
    args.push(target.into());
    args
}

async fn run_mmdebstrap(
    template: &Template,
    target: &Path,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), RootfsError> {
    let mut child = Command::new(MMDEBSTRAP)
        .args(mmdebstrap_args(template, target))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(RootfsError::Spawn)?;

    let mut tail: VecDeque<String> = VecDeque::with_capacity(ERROR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(template = %template.name, "mmdebstrap: {line}");
            if let Some(bar) = bar {
                let step = line.strip_prefix("I: ").unwrap_or(&line);
                bar.set_message(step.to_owned());
            }
            if tail.len() == ERROR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().await.map_err(RootfsError::Spawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(RootfsError::Build {
            template: template.name.clone(),
            status: status.to_string(),
            output: Vec::from(tail).join("\n"),
        })
    }
}

fn spinner(name: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {prefix}: {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(format!("building {name}"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Takes the exclusive build lock (blocking in a worker thread).
async fn lock(path: PathBuf) -> Result<nix::fcntl::Flock<std::fs::File>, RootfsError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RootfsError::Io {
                action: "cannot open",
                path: path.clone(),
                source: e,
            })?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
            RootfsError::Lock {
                path,
                source: errno,
            }
        })
    })
    .await
    .map_err(|e| RootfsError::Join(e.to_string()))?
}

fn create_dir_searchable(dir: &Path) -> Result<(), RootfsError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| RootfsError::Io {
        action: "cannot create",
        path: dir.to_owned(),
        source: e,
    })?;
    // Sandboxes (unprivileged host uids) must be able to walk to the rootfs.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| {
        RootfsError::Io {
            action: "cannot chmod",
            path: dir.to_owned(),
            source: e,
        }
    })
}

async fn remove_if_exists(path: &Path) -> Result<(), RootfsError> {
    let owned = path.to_owned();
    let result = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&owned))
        .await
        .map_err(|e| RootfsError::Join(e.to_string()))?;
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RootfsError::Io {
            action: "cannot remove",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Templates and caches for tests of the real parts (the tiny rootfs that
/// runtime and end-to-end tests build once and share).
pub mod testing {
    use super::RootfsCache;
    use crate::templates::{Template, TemplateSource};

    /// The smallest useful template: bookworm's Essential packages only
    /// (about 12 s to build here), for tests that need a real rootfs.
    pub fn tiny_template() -> Template {
        let text = r#"
name = "tiny"
[rootfs]
suite = "bookworm"
variant = "essential"
[runtime]
kind = "oci"
[resources]
vcpus = 1
memoryMiB = 128
pids = 64
diskMiB = 64
[network]
mode = "none"
[user]
uid = 1000
gid = 1000
name = "user"
"#;
        Template::parse(text, TemplateSource::Builtin("tiny.toml"), None).expect("tiny template")
    }

    /// A cache shared by test runs (built on first use, reused afterwards),
    /// in a world-searchable place so sandboxes can reach it.
    pub fn test_cache() -> RootfsCache {
        RootfsCache::new(std::env::temp_dir().join("crownest-test-cache"))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::tiny_template;
    use super::*;

    #[test]
    fn path_is_name_dash_recipe_hash_under_rootfs() {
        let cache = RootfsCache::new("/c");
        let t = tiny_template();
        assert_eq!(
            cache.path_for(&t),
            PathBuf::from(format!("/c/rootfs/tiny-{}", t.recipe_hash()))
        );
        assert!(!cache.is_built(&t));
    }

    #[test]
    fn a_template_with_the_same_recipe_uses_the_built_twin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = RootfsCache::new(dir.path());
        let t = tiny_template();
        let twin = dir
            .path()
            .join("rootfs")
            .join(format!("other-{}", t.recipe_hash()));
        std::fs::create_dir_all(&twin).expect("twin");
        std::fs::create_dir_all(
            dir.path()
                .join("rootfs")
                .join(format!(".tiny-{}.tmp", t.recipe_hash())),
        )
        .expect("tmp");
        assert_eq!(cache.path_for(&t), twin);
        assert!(cache.is_built(&t));
    }

    #[test]
    fn mmdebstrap_command_has_variant_packages_hook_suite_and_target() {
        let set = crate::templates::TemplateSet::load(None).expect("templates");
        let t = set.get("python").expect("python");
        let args: Vec<String> = mmdebstrap_args(t, Path::new("/x/.tmp"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "--variant=minbase");
        assert!(
            args.iter()
                .any(|a| a.starts_with("--include=") && a.contains("python-is-python3"))
        );
        let hook = args
            .iter()
            .find(|a| a.starts_with("--customize-hook="))
            .expect("hook");
        assert!(hook.contains("user:x:1000:1000:") && hook.contains("/workspace"));
        assert_eq!(&args[args.len() - 2..], ["bookworm", "/x/.tmp"]);
    }
}
