//! The `oci` rootfs source: an OCI image from a local `oci-layout`
//! directory or an `oci-archive` / `docker-archive` tarball (`docker save`,
//! `podman save`), unpacked layer by layer with whiteouts applied. No
//! daemon and no registry: a registry reference would be one more
//! [`ImageSource`] that fetches into a layout first.
//!
//! Nothing in an image is trusted: every path an entry names is resolved
//! inside the target as if it were `/` (symlinks included), so a layer
//! cannot write outside the tree, and every blob is checked against its
//! digest before it is used.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// The annotation that names a manifest in an OCI index (`docker save`'s
/// and `skopeo copy`'s tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// How many symlinks one path may pass through (as Linux's MAXSYMLINKS).
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Image(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A directory with `oci-layout`, `index.json` and `blobs/`.
    Layout(PathBuf),
    /// A tarball: an `oci-archive` (a layout in a tar) or a `docker-archive`
    /// (`manifest.json` and layer tars).
    Archive(PathBuf),
}

impl ImageSource {
    pub fn of(path: &Path) -> Self {
        if path.is_dir() {
            Self::Layout(path.to_owned())
        } else {
            Self::Archive(path.to_owned())
        }
    }
}

/// The digest that identifies the image for the recipe hash: the chosen
/// manifest's digest for a layout (content-addressed, so it covers every
/// layer), the archive's own sha256 for a tarball.
pub fn image_digest(source: &ImageSource, reference: Option<&str>) -> Result<String, OciError> {
    match source {
        ImageSource::Layout(dir) => {
            let manifest = choose_manifest(dir, reference)?;
            Ok(format!("layout:{}", manifest.digest))
        }
        ImageSource::Archive(file) => {
            let digest = crate::templates::file_digest(file).map_err(io(file))?;
            Ok(format!(
                "archive:sha256:{digest}{}",
                reference.map(|r| format!(" ref={r}")).unwrap_or_default()
            ))
        }
    }
}

/// Unpacks the image into `target` (an empty directory). `scratch` is a
/// directory for extracting an archive (removed by the caller).
pub fn unpack(
    source: &ImageSource,
    reference: Option<&str>,
    target: &Path,
    scratch: &Path,
) -> Result<(), OciError> {
    let dir = match source {
        ImageSource::Layout(dir) => dir.clone(),
        ImageSource::Archive(file) => {
            std::fs::create_dir_all(scratch).map_err(io(scratch))?;
            let reader = std::fs::File::open(file).map_err(io(file))?;
            let mut archive = tar::Archive::new(reader);
            for entry in archive.entries().map_err(io(file))? {
                let mut entry = entry.map_err(io(file))?;
                let path = entry.path().map_err(io(file))?.into_owned();
                let Some(relative) = clean(&path) else {
                    continue;
                };
                let kind = entry.header().entry_type();
                let out = scratch.join(&relative);
                if kind.is_dir() {
                    std::fs::create_dir_all(&out).map_err(io(&out))?;
                } else if kind.is_file() {
                    if let Some(parent) = out.parent() {
                        std::fs::create_dir_all(parent).map_err(io(parent))?;
                    }
                    let mut f = std::fs::File::create(&out).map_err(io(&out))?;
                    std::io::copy(&mut entry, &mut f).map_err(io(&out))?;
                }
                // Links and the rest are not part of either archive format.
            }
            scratch.to_owned()
        }
    };
    let layers = if dir.join("index.json").is_file() {
        let manifest = choose_manifest(&dir, reference)?;
        let manifest: Manifest = read_blob_json(&dir, &manifest.digest)?;
        manifest
            .layers
            .into_iter()
            .map(|layer| {
                let path = blob_path(&dir, &layer.digest)?;
                Ok((path, Some(layer.digest), layer.media_type))
            })
            .collect::<Result<Vec<_>, OciError>>()?
    } else if dir.join("manifest.json").is_file() {
        docker_layers(&dir, reference)?
    } else {
        return Err(OciError::Image(String::from(
            "not an OCI image: no index.json (oci-layout, oci-archive) or manifest.json (docker-archive)",
        )));
    };
    for (path, digest, media_type) in layers {
        if let Some(digest) = &digest {
            verify(&path, digest)?;
        }
        apply_layer(&path, &media_type, target)?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// The manifest of a layout named by `reference` (its ref-name annotation),
/// or its only one; an index for several platforms resolves to linux/amd64.
fn choose_manifest(dir: &Path, reference: Option<&str>) -> Result<Descriptor, OciError> {
    let path = dir.join("index.json");
    let text = std::fs::read(&path).map_err(io(&path))?;
    let index: Index = serde_json::from_slice(&text)
        .map_err(|e| OciError::Image(format!("{}: {e}", path.display())))?;
    let names = || {
        index
            .manifests
            .iter()
            .filter_map(|m| m.annotations.get(REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut chosen = match reference {
        Some(name) => index
            .manifests
            .iter()
            .position(|m| {
                m.annotations.get(REF_NAME).is_some_and(|r| {
                    // `app:1.0` and a bare `1.0` (umoci's ref names) name
                    // the same image, written either way round.
                    r == name
                        || r.ends_with(&format!(":{name}"))
                        || name.ends_with(&format!(":{r}"))
                })
            })
            .ok_or_else(|| {
                OciError::Image(format!(
                    "the image has no manifest named `{name}`; it names: {}",
                    names()
                ))
            })?,
        None if index.manifests.len() == 1 => 0,
        None if index.manifests.is_empty() => {
            return Err(OciError::Image(String::from(
                "index.json lists no manifest",
            )));
        }
        None => {
            return Err(OciError::Image(format!(
                "index.json lists {} manifests; choose one with imageRef (names: {})",
                index.manifests.len(),
                names()
            )));
        }
    };
    let mut descriptor = index
        .manifests
        .into_iter()
        .nth(chosen)
        .ok_or_else(|| OciError::Image(String::from("index.json lists no manifest")))?;
    // A multi-platform index: take linux/amd64.
    for _ in 0..4 {
        if !is_index(&descriptor.media_type) {
            return Ok(descriptor);
        }
        let inner: Index = read_blob_json(dir, &descriptor.digest)?;
        chosen = inner
            .manifests
            .iter()
            .position(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                OciError::Image(String::from("the image has no linux/amd64 manifest"))
            })?;
        descriptor = inner.manifests.into_iter().nth(chosen).ok_or_else(|| {
            OciError::Image(String::from("the image has no linux/amd64 manifest"))
        })?;
    }
    Err(OciError::Image(String::from("image indexes nest too deep")))
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| OciError::Image(format!("`{digest}` is not a digest")))?;
    if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(OciError::Image(format!(
            "`{digest}` is not a sha256 digest (the only algorithm supported)"
        )));
    }
    Ok(dir.join("blobs").join(algorithm).join(hex))
}

fn read_blob_json<T: serde::de::DeserializeOwned>(dir: &Path, digest: &str) -> Result<T, OciError> {
    let path = blob_path(dir, digest)?;
    verify(&path, digest)?;
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Image(format!("blob {digest}: {e}")))
}

fn verify(path: &Path, digest: &str) -> Result<(), OciError> {
    let actual = crate::templates::file_digest(path).map_err(io(path))?;
    if digest.strip_prefix("sha256:") == Some(actual.as_str()) {
        Ok(())
    } else {
        Err(OciError::Image(format!(
            "blob {} does not match its digest {digest} (sha256:{actual}); the image is corrupt",
            path.display()
        )))
    }
}

fn docker_layers(
    dir: &Path,
    reference: Option<&str>,
) -> Result<Vec<(PathBuf, Option<String>, String)>, OciError> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let manifests: Vec<DockerManifest> = serde_json::from_slice(&bytes)
        .map_err(|e| OciError::Image(format!("manifest.json: {e}")))?;
    let chosen = match reference {
        Some(name) => manifests
            .into_iter()
            .find(|m| {
                m.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| t == name || t.ends_with(&format!(":{name}")))
            })
            .ok_or_else(|| OciError::Image(format!("the archive has no image tagged `{name}`")))?,
        None => {
            if manifests.len() != 1 {
                return Err(OciError::Image(format!(
                    "the archive holds {} images; choose one with imageRef",
                    manifests.len()
                )));
            }
            manifests
                .into_iter()
                .next()
                .ok_or_else(|| OciError::Image(String::from("manifest.json lists no image")))?
        }
    };
    chosen
        .layers
        .into_iter()
        .map(|layer| {
            let relative = clean(Path::new(&layer)).ok_or_else(|| {
                OciError::Image(format!("layer path `{layer}` is not inside the archive"))
            })?;
            Ok((dir.join(relative), None, String::new()))
        })
        .collect()
}

/// A tar path as a relative path with no `..`, or `None` for the root.
pub(crate) fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// `relative` resolved inside `root` as if `root` were `/`: symlinks in its
/// directories are followed (absolute ones from `root`), `..` stops at
/// `root`. The last component is not followed.
pub(crate) fn resolve_in(root: &Path, relative: &Path) -> Result<PathBuf, OciError> {
    let mut links = 0;
    let mut resolved = PathBuf::new();
    let mut pending: Vec<std::ffi::OsString> = relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        if pending.is_empty() {
            return Ok(root.join(candidate));
        }
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(OciError::Image(format!(
                        "too many symlinks resolving {}",
                        relative.display()
                    )));
                }
                let target = std::fs::read_link(&full).map_err(io(&full))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(p) => pending.push(p.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.to_owned())
}

fn remove_any(path: &Path) -> Result<(), OciError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).map_err(io(path)),
        Ok(_) => std::fs::remove_file(path).map_err(io(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

fn layer_reader(path: &Path, media_type: &str) -> Result<Box<dyn Read>, OciError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io(path))?;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io(path))?;
    if media_type.ends_with("+zstd") || (n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(OciError::Image(format!(
            "layer {} is zstd-compressed, which is not supported yet; re-export the image with gzip layers",
            path.display()
        )));
    }
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(file)))
    } else {
        Ok(Box::new(file))
    }
}

/// Applies one layer tar to `root`: whiteouts (`.wh.NAME` removes NAME,
/// `.wh..wh..opq` empties its directory of what lower layers put there),
/// then every entry with its mode and owner.
fn apply_layer(path: &Path, media_type: &str, root: &Path) -> Result<(), OciError> {
    let mut archive = tar::Archive::new(layer_reader(path, media_type)?);
    let mut added: HashSet<PathBuf> = HashSet::new();
    let bad = |e: std::io::Error| OciError::Image(format!("layer {}: {e}", path.display()));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.into_owned();
        let Some(relative) = clean(&name) else {
            continue;
        };
        let file_name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent_rel = relative.parent().unwrap_or(Path::new("")).to_owned();
        if file_name == ".wh..wh..opq" {
            let dir = resolve_in(root, &parent_rel.join("x"))?;
            let dir = dir.parent().unwrap_or(root).to_owned();
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent_rel.join(child.file_name());
                    if !added.contains(&child_rel) {
                        remove_any(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(OciError::Image(format!(
                    "layer {} has an invalid whiteout `{}`",
                    path.display(),
                    name.display()
                )));
            }
            let target = resolve_in(root, &parent_rel.join(hidden))?;
            remove_any(&target)?;
            continue;
        }
        let out = resolve_in(root, &relative)?;
        if out == root {
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        // Some writers leave the owner fields empty: root, as tar does.
        let (uid, gid) = (
            u32::try_from(header.uid().unwrap_or(0)).unwrap_or(0),
            u32::try_from(header.gid().unwrap_or(0)).unwrap_or(0),
        );
        let kind = header.entry_type();
        let existing = std::fs::symlink_metadata(&out).ok();
        if kind.is_dir() {
            if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                remove_any(&out)?;
            }
            if !out.is_dir() {
                std::fs::create_dir(&out).map_err(io(&out))?;
            }
        } else {
            if existing.is_some() {
                remove_any(&out)?;
            }
            if kind.is_file() {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&out)
                    .map_err(io(&out))?;
                std::io::copy(&mut entry, &mut file).map_err(io(&out))?;
            } else if kind.is_symlink() {
                let target = entry.link_name().map_err(bad)?.ok_or_else(|| {
                    OciError::Image(format!("symlink {} has no target", name.display()))
                })?;
                std::os::unix::fs::symlink(&target, &out).map_err(io(&out))?;
            } else if kind.is_hard_link() {
                let target = entry.link_name().map_err(bad)?.ok_or_else(|| {
                    OciError::Image(format!("hard link {} has no target", name.display()))
                })?;
                let target = clean(&target).ok_or_else(|| {
                    OciError::Image(format!("hard link {} points at the root", name.display()))
                })?;
                let source = resolve_in(root, &target)?;
                // Only a regular file: a link to a symlink would let the
                // chmod below follow it out of the tree.
                let is_file = std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file());
                if !is_file {
                    return Err(OciError::Image(format!(
                        "hard link {} does not point at a regular file of the image",
                        name.display()
                    )));
                }
                std::fs::hard_link(&source, &out).map_err(io(&out))?;
                // It shares the source's inode, owner and mode.
                added.insert(relative);
                continue;
            } else {
                // Devices and fifos: the sandbox gets its own /dev; skip.
                continue;
            }
        }
        added.insert(relative);
        std::os::unix::fs::lchown(&out, Some(uid), Some(gid)).map_err(io(&out))?;
        if !kind.is_symlink() {
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode))
                .map_err(io(&out))?;
        }
    }
    Ok(())
}

/// Test images written by hand: an OCI layout with the given layers.
pub mod testing {
    use std::path::Path;

    use sha2::{Digest, Sha256};

    /// One entry of a test layer.
    #[derive(Debug, Clone, Copy)]
    pub enum Entry<'a> {
        Dir,
        /// Contents and permission bits.
        File(&'a [u8], u32),
        /// A symlink to this target.
        Link(&'a str),
    }

    /// One layer's entries, in tar order.
    pub type Layer<'a> = &'a [(&'a str, Entry<'a>)];

    fn blob(dir: &Path, bytes: &[u8]) -> String {
        let hex = hex::encode(Sha256::digest(bytes));
        let path = dir.join("blobs/sha256").join(&hex);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("blobs dir");
        std::fs::write(path, bytes).expect("blob");
        format!("sha256:{hex}")
    }

    /// A layer tar (gzip-compressed when asked), with fixed times and root
    /// ownership so the same entries always give the same digest.
    pub fn layer_tar(entries: Layer<'_>, gzip: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, entry) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match entry {
                Entry::File(bytes, mode) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(bytes.len() as u64);
                    header.set_mode(*mode);
                    builder
                        .append_data(&mut header, path, *bytes)
                        .expect("file entry");
                }
                Entry::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder
                        .append_data(&mut header, path, std::io::empty())
                        .expect("dir entry");
                }
                Entry::Link(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    header.set_mode(0o777);
                    builder
                        .append_link(&mut header, path, target)
                        .expect("link entry");
                }
            }
        }
        let tar = builder.into_inner().expect("tar");
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).expect("gzip");
        gz.finish().expect("gzip")
    }

    /// Writes an `oci-layout` at `dir` whose one manifest (tagged `tag`)
    /// has these layers, the first gzip-compressed, the rest plain.
    pub fn write_layout(dir: &Path, tag: &str, layers: &[Layer<'_>]) {
        std::fs::create_dir_all(dir).expect("layout dir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let config = blob(
            dir,
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#,
        );
        let descriptors: Vec<serde_json::Value> = layers
            .iter()
            .enumerate()
            .map(|(i, entries)| {
                let bytes = layer_tar(entries, i == 0);
                let media_type = if i == 0 {
                    "application/vnd.oci.image.layer.v1.tar+gzip"
                } else {
                    "application/vnd.oci.image.layer.v1.tar"
                };
                serde_json::json!({"mediaType": media_type, "digest": blob(dir, &bytes), "size": bytes.len()})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 0},
            "layers": descriptors,
        });
        let manifest = serde_json::to_vec(&manifest).expect("manifest");
        let digest = blob(dir, &manifest);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": manifest.len(),
                "annotations": {super::REF_NAME: tag},
            }],
        });
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&index).expect("index"),
        )
        .expect("index.json");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Entry, write_layout};
    use super::*;

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = dir.path().join("layout");
        write_layout(
            &layout,
            "v1",
            &[
                &[
                    ("etc", Entry::Dir),
                    ("etc/keep", Entry::File(b"keep", 0o644)),
                    ("etc/gone", Entry::File(b"gone", 0o644)),
                    ("opq", Entry::Dir),
                    ("opq/old", Entry::File(b"old", 0o644)),
                ],
                &[
                    ("etc/.wh.gone", Entry::File(b"", 0o644)),
                    ("opq/.wh..wh..opq", Entry::File(b"", 0o644)),
                    ("opq/new", Entry::File(b"new", 0o644)),
                    ("etc/keep", Entry::File(b"kept", 0o644)),
                ],
            ],
        );
        let target = dir.path().join("root");
        std::fs::create_dir(&target).expect("root");
        let source = ImageSource::of(&layout);
        unpack(&source, Some("v1"), &target, &dir.path().join("scratch")).expect("unpack");
        assert_eq!(
            std::fs::read(target.join("etc/keep")).expect("keep"),
            b"kept"
        );
        assert!(!target.join("etc/gone").exists());
        assert!(!target.join("opq/old").exists());
        assert_eq!(std::fs::read(target.join("opq/new")).expect("new"), b"new");
        assert!(!target.join("etc/.wh.gone").exists());
        assert!(
            image_digest(&source, Some("v1"))
                .expect("digest")
                .starts_with("layout:sha256:")
        );
        let err = image_digest(&source, Some("v2"))
            .expect_err("no v2")
            .to_string();
        assert!(err.contains("v1"), "{err}");
    }

    #[test]
    fn an_entry_cannot_write_outside_the_tree_through_a_symlink_or_dotdot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("abs link");
        std::os::unix::fs::symlink("../../..", root.join("up")).expect("rel link");
        let resolved = resolve_in(&root, Path::new("escape/file")).expect("resolve");
        assert!(resolved.starts_with(&root), "{}", resolved.display());
        let resolved = resolve_in(&root, Path::new("up/etc/passwd")).expect("resolve");
        assert_eq!(resolved, root.join("etc/passwd"));
        assert_eq!(
            clean(Path::new("../../etc/x")),
            Some(PathBuf::from("etc/x"))
        );
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = dir.path().join("layout");
        write_layout(&layout, "v1", &[&[("a", Entry::File(b"a", 0o644))]]);
        let manifest = choose_manifest(&layout, None).expect("manifest");
        let m: Manifest = read_blob_json(&layout, &manifest.digest).expect("read");
        let blob = blob_path(&layout, &m.layers[0].digest).expect("path");
        std::fs::write(&blob, b"tampered").expect("tamper");
        let target = dir.path().join("root");
        std::fs::create_dir(&target).expect("root");
        let err = unpack(
            &ImageSource::of(&layout),
            None,
            &target,
            &dir.path().join("s"),
        )
        .expect_err("corrupt")
        .to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    fn tar_dir(dir: &Path, out: &Path) {
        let file = std::fs::File::create(out).expect("archive");
        let mut builder = tar::Builder::new(file);
        builder.append_dir_all(".", dir).expect("append");
        builder.finish().expect("finish");
    }

    #[test]
    fn oci_and_docker_archives_unpack_like_a_layout() {
        use super::testing::layer_tar;
        let dir = tempfile::tempdir().expect("tempdir");
        let layers: [super::testing::Layer<'_>; 2] = [
            &[
                ("a", Entry::File(b"one", 0o644)),
                ("b", Entry::File(b"b", 0o600)),
            ],
            &[(".wh.b", Entry::File(b"", 0o644)), ("c", Entry::Link("a"))],
        ];
        // oci-archive: a layout in a tar.
        let layout = dir.path().join("layout");
        write_layout(&layout, "app:1", &layers);
        let oci_archive = dir.path().join("oci.tar");
        tar_dir(&layout, &oci_archive);
        // docker-archive: manifest.json naming layer tars.
        let docker = dir.path().join("docker");
        std::fs::create_dir_all(docker.join("l1")).expect("l1");
        std::fs::create_dir_all(docker.join("l2")).expect("l2");
        std::fs::write(docker.join("l1/layer.tar"), layer_tar(layers[0], false)).expect("l1");
        std::fs::write(docker.join("l2/layer.tar"), layer_tar(layers[1], true)).expect("l2");
        std::fs::write(
            docker.join("manifest.json"),
            r#"[{"Config":"c.json","RepoTags":["app:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        )
        .expect("manifest");
        let docker_archive = dir.path().join("docker.tar");
        tar_dir(&docker, &docker_archive);

        for (i, archive) in [oci_archive, docker_archive].iter().enumerate() {
            let target = dir.path().join(format!("root{i}"));
            std::fs::create_dir(&target).expect("root");
            let source = ImageSource::of(archive);
            assert!(matches!(source, ImageSource::Archive(_)));
            unpack(
                &source,
                Some("app:1"),
                &target,
                &dir.path().join(format!("s{i}")),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", archive.display()));
            assert_eq!(std::fs::read(target.join("a")).expect("a"), b"one");
            assert!(!target.join("b").exists());
            assert_eq!(
                std::fs::read_link(target.join("c")).expect("c"),
                Path::new("a")
            );
            let digest = image_digest(&source, Some("app:1")).expect("digest");
            assert!(digest.starts_with("archive:sha256:"), "{digest}");
        }
    }

    #[test]
    fn a_hard_link_to_a_symlink_or_a_dotdot_whiteout_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("host-file");
        std::fs::write(&outside, "host").expect("host file");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // A layer: evil -> <host file>, then a hard link to evil, mode 4755.
        let mut builder = tar::Builder::new(Vec::new());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "evil", &outside)
            .expect("symlink");
        let mut hard = tar::Header::new_gnu();
        hard.set_entry_type(tar::EntryType::Link);
        hard.set_size(0);
        hard.set_mode(0o4755);
        builder
            .append_link(&mut hard, "h", "evil")
            .expect("hard link");
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, builder.into_inner().expect("tar")).expect("layer");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("root");
        let err = apply_layer(&layer, "", &root)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("regular file"), "{err}");
        let mode = std::fs::metadata(&outside)
            .expect("meta")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o600, "the host file's mode changed");

        let whiteout = dir.path().join("wh.tar");
        std::fs::write(
            &whiteout,
            super::testing::layer_tar(&[(".wh..", Entry::File(b"", 0o644))], false),
        )
        .expect("layer");
        std::fs::write(root.join("keep"), "x").expect("keep");
        assert!(apply_layer(&whiteout, "", &root).is_err());
        assert!(root.join("keep").exists());
    }
}
