//! Content digests of what a template's rootfs is built from (files it
//! copies in, a `dir` source, an OCI image), so the recipe hash changes
//! exactly when one of them does.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Hex sha256 of a file's bytes.
pub fn file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 over a file or directory tree: every entry's relative path,
/// type, permission bits, owner, and its content or link target, in sorted
/// order. Symlinks are not followed.
pub fn tree(root: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    walk(root, Path::new(""), &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn walk(root: &Path, relative: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let path = if relative.as_os_str().is_empty() {
        root.to_owned()
    } else {
        root.join(relative)
    };
    let meta = std::fs::symlink_metadata(&path)?;
    let kind = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    hasher.update(format!(
        "{}\0{mode:o}\0{}:{}\0",
        relative.display(),
        meta.uid(),
        meta.gid()
    ));
    if kind.is_symlink() {
        hasher.update(b"l\0");
        hasher.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
    } else if kind.is_dir() {
        hasher.update(b"d\0");
        let mut names: Vec<_> = std::fs::read_dir(&path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            walk(root, &relative.join(name), hasher)?;
        }
    } else if kind.is_file() {
        hasher.update(b"f\0");
        hasher.update(file(&path)?);
    } else {
        // Devices, fifos, sockets: their identity is their type and number.
        hasher.update(format!("o{}\0", meta.rdev()));
    }
    hasher.update(b"\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_digest_changes_with_content_mode_and_names_and_not_with_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/a"), "one").expect("write");
        let first = tree(dir.path()).expect("digest");
        filetime_touch(&dir.path().join("sub/a"));
        assert_eq!(tree(dir.path()).expect("digest"), first);
        std::fs::write(dir.path().join("sub/a"), "two").expect("write");
        let content = tree(dir.path()).expect("digest");
        assert_ne!(content, first);
        std::fs::set_permissions(
            dir.path().join("sub/a"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        let mode = tree(dir.path()).expect("digest");
        assert_ne!(mode, content);
        std::fs::rename(dir.path().join("sub/a"), dir.path().join("sub/b")).expect("mv");
        assert_ne!(tree(dir.path()).expect("digest"), mode);
    }

    fn filetime_touch(path: &Path) {
        let text = std::fs::read(path).expect("read");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(path, text).expect("rewrite");
    }
}
