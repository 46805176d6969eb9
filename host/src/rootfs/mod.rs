//! The template rootfs cache: builds a template's root filesystem into
//! `<cache>/rootfs/<name>-<recipe hash>` and reuses it as long as the
//! recipe is unchanged.
//!
//! A build runs in stages ([`Template::stages`]): the source (mmdebstrap of
//! a Debian suite, an unpacked OCI image, or a copied directory, with the
//! default user and mount points added), then each layer (`pip`, `npm`,
//! `files`, `run`). Every stage but the last is kept under
//! `<cache>/stages/<key>`, so editing a later layer rebuilds from the stage
//! before it. Each stage goes into a temporary directory beside its final
//! one and is renamed into place only when it succeeded, so a half-built
//! tree is never used: "the directory exists" means "the stage finished".
//! A lock file per recipe (flock) makes concurrent builds of the same
//! recipe, from tasks or processes, wait for the first one and then reuse
//! its result. Every step's output goes to `<cache>/logs/<entry>.log`.
//! Once built, nothing here touches the network: sandboxes start offline.
//!
//! The rootfs is shared read-only by every sandbox of the template, whose
//! user namespace root is an unprivileged host uid, so the cache dir and
//! its parents must be searchable by others (see
//! `RuntimeError::RootfsUnreachable`). The agent and runners are not in it:
//! runtimes bind-mount (or, for microVMs, inject) them at start, so one
//! rootfs serves every host version.

pub mod layers;
pub mod oci;

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::templates::{RootfsSource, Template};

/// The program that builds Debian root filesystems.
const MMDEBSTRAP: &str = "mmdebstrap";
/// How many of a failed step's last output lines an error carries.
pub const ERROR_TAIL_LINES: usize = 50;

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
    #[error("cannot run {program} (is it installed?): {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "building template `{template}` failed at step {step} ({status}); last lines of its output:\n{output}\nfull log: {}",
        log.display()
    )]
    Build {
        template: String,
        step: String,
        status: String,
        output: String,
        log: PathBuf,
    },
    #[error("template `{template}`: {message}")]
    Source { template: String, message: String },
    #[error("rootfs build task failed: {0}")]
    Join(String),
}

/// How [`RootfsCache::build_with`] builds.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// A spinner per step on stderr.
    pub progress: bool,
    /// Rebuild every stage even if cached.
    pub force: bool,
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

    fn stages_dir(&self) -> PathBuf {
        self.dir.join("stages")
    }

    fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    fn entry_name(template: &Template) -> String {
        format!("{}-{}", template.name, template.recipe_hash())
    }

    /// Where a template's build log goes.
    pub fn log_path(&self, template: &Template) -> PathBuf {
        self.logs_dir()
            .join(format!("{}.log", Self::entry_name(template)))
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
    /// its path. With `progress`, shows a spinner per step on stderr.
    pub async fn build(&self, template: &Template, progress: bool) -> Result<PathBuf, RootfsError> {
        self.build_with(
            template,
            BuildOptions {
                progress,
                force: false,
            },
        )
        .await
    }

    /// [`Self::build`] with options.
    pub async fn build_with(
        &self,
        template: &Template,
        options: BuildOptions,
    ) -> Result<PathBuf, RootfsError> {
        let final_path = self.path_for(template);
        if final_path.is_dir() && !options.force {
            return Ok(final_path);
        }
        let final_path = self.rootfs_dir().join(Self::entry_name(template));
        let rootfs_dir = self.rootfs_dir();
        for dir in [&self.dir, &rootfs_dir, &self.stages_dir(), &self.logs_dir()] {
            create_dir_searchable(dir)?;
        }

        let entry = Self::entry_name(template);
        let lock_path = rootfs_dir.join(format!(".{entry}.lock"));
        let entry_lock = lock(lock_path).await?;

        // Another task or process may have finished the build while we waited.
        if final_path.is_dir() && !options.force {
            if options.progress {
                eprintln!("{}: already built", template.name);
            }
            drop(entry_lock);
            return Ok(final_path);
        }

        let log_path = self.log_path(template);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RootfsError::Io {
                action: "cannot open the build log",
                path: log_path.clone(),
                source: e,
            })?;
        let _ = writeln!(
            log,
            "=== build of template `{}` (recipe {}) ===",
            template.name,
            template.recipe_hash()
        );

        let stages = template.stages();
        let last = stages.len() - 1;
        let stage_path = |i: usize| {
            if i == last {
                final_path.clone()
            } else {
                self.stages_dir().join(&stages[i].key)
            }
        };
        // Start after the latest stage already built.
        let mut start = 0;
        if !options.force {
            for i in (0..last).rev() {
                if stage_path(i).is_dir() {
                    start = i + 1;
                    break;
                }
            }
        }
        let started = Instant::now();
        for i in start..=last {
            let out = stage_path(i);
            // A stage other templates share (the same source) may be built
            // by another build right now: one at a time, then reuse it.
            let _stage_lock = if i < last {
                let lock_path = self.stages_dir().join(format!(".{}.lock", stages[i].key));
                let held = lock(lock_path).await?;
                if out.is_dir() && !options.force {
                    let _ = writeln!(
                        log,
                        "--- step {}/{} {}: cached ---",
                        i + 1,
                        stages.len(),
                        stages[i].label
                    );
                    continue;
                }
                Some(held)
            } else {
                None
            };
            let tmp = out.with_file_name(format!(
                ".{}.tmp",
                out.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ));
            remove_if_exists(&tmp).await?;
            let step = format!("{}/{} {}", i + 1, stages.len(), stages[i].label);
            let bar = options.progress.then(|| spinner(&template.name, &step));
            if i > 0 {
                if let Some(bar) = &bar {
                    bar.set_message("copying the previous stage");
                }
                if let Err(e) = copy_tree(&stage_path(i - 1), &tmp).await {
                    let _ = remove_if_exists(&tmp).await;
                    return Err(self.failed(template, &step, "copy", e.to_string(), &log_path));
                }
            }
            let _ = writeln!(log, "--- step {step} ---");
            let ran = if i == 0 {
                self.build_source(template, &tmp, bar.as_ref(), &mut log, &step, &log_path)
                    .await
            } else {
                layers::apply(
                    template,
                    &template.rootfs.layers[i - 1],
                    &stages[i].canonical,
                    &tmp,
                    bar.as_ref(),
                    &mut log,
                )
                .await
                .map_err(|(status, output)| {
                    self.failed(template, &step, &status, output, &log_path)
                })
            };
            if let Err(e) = ran {
                if let Some(bar) = &bar {
                    bar.abandon_with_message("failed");
                }
                let _ = writeln!(log, "--- step {step} failed ---");
                let _ = remove_if_exists(&tmp).await;
                return Err(e);
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(
                |e| RootfsError::Io {
                    action: "cannot chmod",
                    path: tmp.clone(),
                    source: e,
                },
            )?;
            if options.force && out.is_dir() {
                // Live sandboxes may run on the old tree: it is moved aside,
                // not deleted (`template gc` removes it once none does).
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = out.with_file_name(format!(
                    ".{}.replaced-{now}",
                    out.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                ));
                if let Err(e) = std::fs::rename(&out, &aside) {
                    let _ = remove_if_exists(&tmp).await;
                    return Err(RootfsError::Io {
                        action: "cannot move the replaced stage aside to",
                        path: aside,
                        source: e,
                    });
                }
            }
            std::fs::rename(&tmp, &out).map_err(|e| RootfsError::Io {
                action: "cannot move the built stage to",
                path: out.clone(),
                source: e,
            })?;
            if let Some(bar) = &bar {
                bar.finish_with_message("done");
            }
        }
        if options.force {
            // A microVM image made from the old tree is stale now.
            if let Ok(images) = std::fs::read_dir(self.dir.join("images")) {
                for image in images.flatten() {
                    if image
                        .file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{entry}."))
                    {
                        let _ = std::fs::remove_file(image.path());
                    }
                }
            }
        }
        // For operators: what is in this cache entry. Not needed to use it.
        let _ = std::fs::write(
            rootfs_dir.join(format!("{entry}.recipe")),
            template.canonical_recipe(),
        );
        let _ = writeln!(log, "=== built in {:.1?} ===", started.elapsed());
        drop(entry_lock);
        if options.progress {
            eprintln!(
                "{}: built in {:.1}s",
                template.name,
                started.elapsed().as_secs_f64()
            );
        }
        tracing::info!(
            template = %template.name,
            path = %final_path.display(),
            seconds = started.elapsed().as_secs_f64(),
            "rootfs built"
        );
        Ok(final_path)
    }

    fn failed(
        &self,
        template: &Template,
        step: &str,
        status: &str,
        output: String,
        log: &Path,
    ) -> RootfsError {
        RootfsError::Build {
            template: template.name.clone(),
            step: step.to_string(),
            status: status.to_string(),
            output,
            log: log.to_owned(),
        }
    }

    fn changed(&self, template: &Template, step: &str, what: &Path, log: &Path) -> RootfsError {
        self.failed(template, step, "input changed", input_changed(what), log)
    }

    async fn build_source(
        &self,
        template: &Template,
        target: &Path,
        bar: Option<&indicatif::ProgressBar>,
        log: &mut std::fs::File,
        step: &str,
        log_path: &Path,
    ) -> Result<(), RootfsError> {
        match &template.rootfs.source {
            RootfsSource::Debian { .. } => run_mmdebstrap(template, target, bar, log)
                .await
                .map_err(|e| match e {
                    MmdebstrapError::Failed { status, output } => {
                        self.failed(template, step, &status, output, log_path)
                    }
                    MmdebstrapError::Other(e) => e,
                }),
            RootfsSource::Oci { image, reference } => {
                if let Some(bar) = bar {
                    bar.set_message(format!("unpacking {}", image.display()));
                }
                // The image must still be the one the recipe hash names.
                let source = oci::ImageSource::of(image);
                let digest = oci::image_digest(&source, reference.as_deref())
                    .map_err(|e| self.failed(template, step, "read", e.to_string(), log_path))?;
                if !template.stages()[0]
                    .canonical
                    .contains(&format!("image={digest}\n"))
                {
                    return Err(self.changed(template, step, image, log_path));
                }
                let (reference, target_owned) = (reference.clone(), target.to_owned());
                let scratch = target.with_extension("unpack");
                let scratch_owned = scratch.clone();
                let result = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&target_owned)?;
                    oci::unpack(&source, reference.as_deref(), &target_owned, &scratch_owned)
                        .map_err(std::io::Error::other)
                })
                .await
                .map_err(|e| RootfsError::Join(e.to_string()))?;
                let _ = remove_if_exists(&scratch).await;
                result.map_err(|e| {
                    let _ = writeln!(log, "{e}");
                    self.failed(template, step, "unpack", e.to_string(), log_path)
                })?;
                layers::prepare(template, target)
                    .map_err(|e| self.failed(template, step, "prepare", e, log_path))
            }
            RootfsSource::Dir { path } => {
                if let Some(bar) = bar {
                    bar.set_message(format!("copying {}", path.display()));
                }
                copy_tree(path, target)
                    .await
                    .map_err(|e| self.failed(template, step, "copy", e.to_string(), log_path))?;
                // What was copied must be the tree the recipe hash names.
                let copied = crate::templates::tree_digest(target)
                    .map_err(|e| self.failed(template, step, "read", e.to_string(), log_path))?;
                if !template.stages()[0]
                    .canonical
                    .contains(&format!("tree={copied}\n"))
                {
                    return Err(self.changed(template, step, path, log_path));
                }
                layers::prepare(template, target)
                    .map_err(|e| self.failed(template, step, "prepare", e, log_path))
            }
        }
    }

    /// Cache entries (rootfs trees, stages, microVM images, logs) no
    /// template in `keep` refers to, and no recipe hash in `in_use` (the
    /// live sandboxes'). With `dry_run`, only reports them.
    pub fn gc(
        &self,
        keep: &[&Template],
        in_use: &BTreeSet<String>,
        dry_run: bool,
    ) -> Result<GcReport, RootfsError> {
        let mut wanted: BTreeSet<String> = in_use.clone();
        for t in keep {
            for stage in t.stages() {
                wanted.insert(stage.key.clone());
            }
        }
        let mut report = GcReport::default();
        let hash_of = |name: &str| -> Option<String> {
            let stem = name.split('.').next().unwrap_or(name);
            let hash = stem.rsplit('-').next().unwrap_or(stem);
            (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| hash.to_string())
        };
        for dir in [
            self.rootfs_dir(),
            self.stages_dir(),
            self.logs_dir(),
            self.dir.join("images"),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".lock") {
                    continue;
                }
                // `.X.tmp`, `.X.unpack` (a build that died, or one running:
                // its lock says which) and `.X.replaced-T` (moved aside by
                // `--force`, kept while a live sandbox may run on it).
                let (base, leftover) = match name.strip_prefix('.') {
                    None => (name.as_str(), None),
                    Some(hidden) => {
                        let cut = [".tmp", ".unpack", ".replaced-"]
                            .iter()
                            .find_map(|suffix| hidden.find(suffix).map(|at| (at, *suffix)));
                        match cut {
                            Some((at, suffix)) => (&hidden[..at], Some(suffix)),
                            None => continue,
                        }
                    }
                };
                let Some(hash) = hash_of(base) else {
                    continue;
                };
                let keep = match leftover {
                    None => wanted.contains(&hash),
                    Some(".replaced-") => in_use.contains(&hash),
                    Some(_) => false,
                };
                if keep {
                    continue;
                }
                // Skip what a build holds right now.
                let held = try_lock(&dir.join(format!(".{base}.lock")));
                if held.is_none() && dir.join(format!(".{base}.lock")).exists() {
                    continue;
                }
                let path = entry.path();
                report.bytes += disk_usage(&path);
                report.removed.push(path.clone());
                if !dry_run {
                    let result = if path.is_dir() && !path.is_symlink() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    result.map_err(|e| RootfsError::Io {
                        action: "cannot remove",
                        path: path.clone(),
                        source: e,
                    })?;
                }
                drop(held);
            }
        }
        report.removed.sort();
        Ok(report)
    }

    /// Bytes the template's built rootfs takes on disk (0 when not built).
    pub fn size_of(&self, template: &Template) -> u64 {
        let path = self.path_for(template);
        if path.is_dir() { disk_usage(&path) } else { 0 }
    }
}

/// What [`RootfsCache::gc`] removed.
#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<PathBuf>,
    pub bytes: u64,
}

/// Why a build input is refused: it is no longer what the recipe hash
/// (computed when the templates were loaded) names.
pub(crate) fn input_changed(what: &Path) -> String {
    format!(
        "{} changed after the template was loaded, so it is not what the recipe hash names; reload the templates (SIGHUP, or run the command again) and build again",
        what.display()
    )
}

/// Allocated bytes under `path` (hard links counted once).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Whether `path` (absolute inside the rootfs) names something there,
/// following symlinks as the sandbox would (inside the tree).
pub fn exists_in(root: &Path, path: &Path) -> bool {
    layers::resolve_full(root, path).is_some_and(|p| p.exists())
}

/// Whether `path` (absolute inside the rootfs) is a directory there.
pub fn is_dir_in(root: &Path, path: &Path) -> bool {
    layers::resolve_full(root, path).is_some_and(|p| p.is_dir())
}

/// `cp -a` of a tree (reflinks where the filesystem has them).
async fn copy_tree(from: &Path, to: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(to).map_err(|e| RootfsError::Io {
        action: "cannot create",
        path: to.to_owned(),
        source: e,
    })?;
    let output = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(from.join("."))
        .arg(to)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| RootfsError::Spawn {
            program: String::from("cp"),
            source: e,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RootfsError::Io {
            action: "cannot copy into",
            path: to.to_owned(),
            source: std::io::Error::other(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ),
        })
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
    let RootfsSource::Debian {
        suite,
        variant,
        packages,
    } = &template.rootfs.source
    else {
        return Vec::new();
    };
    let mut args: Vec<std::ffi::OsString> = vec![
        format!("--variant={variant}").into(),
        "--format=directory".into(),
    ];
    if !packages.is_empty() {
        args.push(format!("--include={}", packages.join(",")).into());
    }
    args.push(format!("--customize-hook={}", customize_script(template)).into());
    args.push(suite.clone().into());
    args.push(target.into());
    args
}

enum MmdebstrapError {
    Failed { status: String, output: String },
    Other(RootfsError),
}

async fn run_mmdebstrap(
    template: &Template,
    target: &Path,
    bar: Option<&indicatif::ProgressBar>,
    log: &mut std::fs::File,
) -> Result<(), MmdebstrapError> {
    let mut child = Command::new(MMDEBSTRAP)
        .args(mmdebstrap_args(template, target))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            MmdebstrapError::Other(RootfsError::Spawn {
                program: String::from(MMDEBSTRAP),
                source: e,
            })
        })?;

    let mut tail: VecDeque<String> = VecDeque::with_capacity(ERROR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(template = %template.name, "mmdebstrap: {line}");
            let _ = writeln!(log, "{line}");
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
    let status = child.wait().await.map_err(|e| {
        MmdebstrapError::Other(RootfsError::Spawn {
            program: String::from(MMDEBSTRAP),
            source: e,
        })
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(MmdebstrapError::Failed {
            status: status.to_string(),
            output: Vec::from(tail).join("\n"),
        })
    }
}

fn spinner(name: &str, step: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {prefix}: {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(format!("{name} [{step}]"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The build lock at `path` if nobody holds it (`None` when it is held or
/// cannot be opened).
fn try_lock(path: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new().write(true).open(path).ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
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

    #[test]
    fn gc_removes_what_no_template_or_live_sandbox_uses_and_counts_the_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = RootfsCache::new(dir.path());
        let t = tiny_template();
        let keep = t.recipe_hash();
        let stale = "a".repeat(64);
        let live = "b".repeat(64);
        for name in [
            format!("rootfs/tiny-{keep}"),
            format!("rootfs/tiny-{stale}"),
            format!("rootfs/other-{live}"),
            format!("stages/{stale}"),
        ] {
            std::fs::create_dir_all(dir.path().join(&name)).expect("entry");
            std::fs::write(dir.path().join(&name).join("f"), vec![1u8; 8192]).expect("file");
        }
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
        std::fs::write(dir.path().join(format!("logs/tiny-{stale}.log")), "log").expect("log");
        std::fs::write(dir.path().join(format!("rootfs/.tiny-{stale}.lock")), "").expect("lock");
        // A dead build's temporary tree goes; one whose lock is held stays;
        // a tree `--force` moved aside stays while a live sandbox uses it.
        std::fs::create_dir_all(dir.path().join(format!("rootfs/.tiny-{stale}.tmp"))).expect("tmp");
        let busy = "c".repeat(64);
        std::fs::create_dir_all(dir.path().join(format!("stages/.{busy}.tmp"))).expect("busy tmp");
        std::fs::write(dir.path().join(format!("stages/.{busy}.lock")), "").expect("busy lock");
        let held = try_lock(&dir.path().join(format!("stages/.{busy}.lock"))).expect("hold");
        std::fs::create_dir_all(dir.path().join(format!("rootfs/.other-{live}.replaced-1")))
            .expect("aside");
        let in_use = BTreeSet::from([live.clone()]);

        let dry = cache.gc(&[&t], &in_use, true).expect("dry run");
        assert_eq!(dry.removed.len(), 4, "{:?}", dry.removed);
        assert!(dir.path().join(format!("rootfs/tiny-{stale}")).is_dir());

        let report = cache.gc(&[&t], &in_use, false).expect("gc");
        assert_eq!(report.removed.len(), 4, "{:?}", report.removed);
        assert!(
            !dir.path()
                .join(format!("rootfs/.tiny-{stale}.tmp"))
                .exists()
        );
        assert!(dir.path().join(format!("stages/.{busy}.tmp")).exists());
        assert!(
            dir.path()
                .join(format!("rootfs/.other-{live}.replaced-1"))
                .exists()
        );
        drop(held);
        assert!(report.bytes >= 2 * 8192, "{}", report.bytes);
        assert!(dir.path().join(format!("rootfs/tiny-{keep}")).is_dir());
        assert!(dir.path().join(format!("rootfs/other-{live}")).is_dir());
        assert!(!dir.path().join(format!("rootfs/tiny-{stale}")).exists());
        assert!(!dir.path().join(format!("stages/{stale}")).exists());
        assert!(!dir.path().join(format!("logs/tiny-{stale}.log")).exists());
    }

    #[tokio::test]
    async fn a_dir_source_that_changed_after_loading_fails_the_build_instead_of_caching_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).expect("tree");
        std::fs::write(tree.join("etc/motd"), "one").expect("motd");
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "name = \"t\"\n[rootfs]\nsource = \"dir\"\npath = \"tree\"\n",
        )
        .expect("toml");
        let template = crate::templates::TemplateSet::read_file(&file, None).expect("valid");
        std::fs::write(tree.join("etc/motd"), "two").expect("edit");
        let cache = RootfsCache::new(dir.path().join("cache"));
        let err = cache
            .build(&template, false)
            .await
            .expect_err("changed")
            .to_string();
        assert!(
            err.contains("input changed") && err.contains("full log"),
            "{err}"
        );
        assert!(!cache.is_built(&template));

        // Loaded again, it builds, and a second build is a cache hit.
        let template = crate::templates::TemplateSet::read_file(&file, None).expect("valid");
        let built = cache.build(&template, false).await.expect("build");
        assert_eq!(
            std::fs::read_to_string(built.join("etc/motd")).expect("motd"),
            "two"
        );
        assert!(built.join("etc/passwd").is_file() && built.join("workspace").is_dir());
        assert_eq!(cache.build(&template, false).await.expect("cached"), built);
    }
}
