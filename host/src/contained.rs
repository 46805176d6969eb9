//! Host file operations on names that come from outside the process.
//!
//! A name taken from a template, a store row or a request is opened
//! through a [`cap_std::fs::Dir`] on the directory it must stay inside, so
//! no `..`, absolute path or symlink in the name (or planted in the
//! directory) can reach a file elsewhere: the kernel resolves beneath the
//! directory (`openat2(RESOLVE_BENEATH)` where it exists; cap-std walks
//! component by component where not). This is an Architecture Invariant
//! (ARCHITECTURE.md); the tests below and `plugins::tests` prove it.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, File, Metadata};

/// Why a contained operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainedError {
    /// The name resolves outside its directory.
    #[error(
        "`{name}` leads outside {} (through `..`, an absolute path or a symlink); \
         files named here must stay inside that directory",
        dir.display()
    )]
    Escapes { dir: PathBuf, name: String },
    #[error("`{name}` in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("`{name}` in {} is larger than {limit} bytes", dir.display())]
    TooLarge {
        dir: PathBuf,
        name: String,
        limit: u64,
    },
}

impl ContainedError {
    /// Whether the name does not exist (as opposed to escaping or failing).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A directory names are resolved inside.
#[derive(Debug)]
pub struct Contained {
    dir: Dir,
    path: PathBuf,
}

impl Contained {
    /// Opens `path` (the operator's or the process's own directory, trusted
    /// as it is) as the place names resolve in.
    pub fn open(path: &Path) -> Result<Self, ContainedError> {
        let dir = Dir::open_ambient_dir(path, ambient_authority()).map_err(|source| {
            ContainedError::Io {
                dir: path.to_owned(),
                name: String::from("."),
                source,
            }
        })?;
        Ok(Self {
            dir,
            path: path.to_owned(),
        })
    }

    /// The directory, as given to [`Contained::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, name: &Path, source: io::Error) -> ContainedError {
        let name = name.display().to_string();
        // cap-std reports an escape as a permission error of its own (no
        // OS errno); `openat2(RESOLVE_BENEATH)` answers EXDEV.
        let escaped = (source.kind() == io::ErrorKind::PermissionDenied
            && source.raw_os_error().is_none())
            || source.raw_os_error() == Some(libc::EXDEV);
        if escaped {
            ContainedError::Escapes {
                dir: self.path.clone(),
                name,
            }
        } else {
            ContainedError::Io {
                dir: self.path.clone(),
                name,
                source,
            }
        }
    }

    /// Opens a file for reading.
    pub fn open_file(&self, name: impl AsRef<Path>) -> Result<std::fs::File, ContainedError> {
        let name = name.as_ref();
        self.dir
            .open(name)
            .map(File::into_std)
            .map_err(|e| self.error(name, e))
    }

    /// Metadata of a name, following symlinks that stay inside.
    pub fn metadata(&self, name: impl AsRef<Path>) -> Result<Metadata, ContainedError> {
        let name = name.as_ref();
        self.dir.metadata(name).map_err(|e| self.error(name, e))
    }

    /// The whole content of a file of at most `limit` bytes.
    pub fn read(&self, name: impl AsRef<Path>, limit: u64) -> Result<Vec<u8>, ContainedError> {
        let name = name.as_ref();
        let file = self.open_file(name)?;
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| self.error(name, e))?;
        if bytes.len() as u64 > limit {
            return Err(ContainedError::TooLarge {
                dir: self.path.clone(),
                name: name.display().to_string(),
                limit,
            });
        }
        Ok(bytes)
    }
}

/// Splits a file path into its directory and last component, for opening
/// the component inside the directory (a symlink there must stay inside).
pub fn split(path: &Path) -> Result<(&Path, &Path), ContainedError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Ok((parent, Path::new(name)))
        }
        _ => Err(ContainedError::Io {
            dir: path.to_owned(),
            name: path.display().to_string(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        }),
    }
}

/// Reads the file at `path` (at most `limit` bytes) inside its own
/// directory: the last component may not be a symlink that leaves it.
pub fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, ContainedError> {
    let (dir, name) = split(path)?;
    Contained::open(dir)?.read(name, limit)
}

/// Metadata of the file at `path`, resolved inside its own directory.
pub fn metadata(path: &Path) -> Result<Metadata, ContainedError> {
    let (dir, name) = split(path)?;
    Contained::open(dir)?.metadata(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let inside = root.path().join("inside");
        std::fs::create_dir(&inside).expect("mkdir");
        std::fs::write(root.path().join("secret"), "SECRET").expect("secret");
        std::fs::write(inside.join("ok.wasm"), "fine").expect("ok");
        std::fs::create_dir(inside.join("sub")).expect("sub");
        std::fs::write(inside.join("sub/deep"), "deep").expect("deep");
        (root, inside)
    }

    #[test]
    fn names_inside_are_read_and_symlinks_that_stay_inside_are_followed() {
        let (_root, inside) = scratch();
        std::os::unix::fs::symlink("sub/deep", inside.join("alias")).expect("symlink");
        let dir = Contained::open(&inside).expect("open");
        assert_eq!(dir.read("ok.wasm", 100).expect("read"), b"fine");
        assert_eq!(dir.read("alias", 100).expect("alias"), b"deep");
        assert!(dir.metadata("sub/deep").expect("meta").is_file());
        assert!(
            dir.read("missing", 100)
                .expect_err("missing")
                .is_not_found()
        );
    }

    #[test]
    fn dot_dot_absolute_names_and_symlinks_out_are_refused() {
        let (root, inside) = scratch();
        let secret = root.path().join("secret");
        std::os::unix::fs::symlink(&secret, inside.join("abs-link")).expect("symlink");
        std::os::unix::fs::symlink("../secret", inside.join("rel-link")).expect("symlink");
        std::os::unix::fs::symlink("/etc/shadow", inside.join("shadow.wasm")).expect("symlink");
        std::os::unix::fs::symlink("..", inside.join("up")).expect("symlink");
        let dir = Contained::open(&inside).expect("open");
        let absolute = secret.display().to_string();
        for name in [
            "../secret",
            "sub/../../secret",
            absolute.as_str(),
            "abs-link",
            "rel-link",
            "shadow.wasm",
            "up/secret",
        ] {
            let err = dir.read(name, 100).expect_err(name);
            assert!(
                matches!(err, ContainedError::Escapes { .. }),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains("leads outside"), "{err}");
            assert!(
                matches!(dir.metadata(name), Err(ContainedError::Escapes { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn a_file_path_is_read_inside_its_own_directory() {
        let (root, inside) = scratch();
        std::os::unix::fs::symlink(root.path().join("secret"), inside.join("out.wasm"))
            .expect("symlink");
        assert_eq!(
            read_file(&inside.join("ok.wasm"), 100).expect("ok"),
            b"fine"
        );
        assert!(matches!(
            read_file(&inside.join("out.wasm"), 100),
            Err(ContainedError::Escapes { .. })
        ));
        assert!(matches!(
            read_file(&inside.join("ok.wasm"), 3),
            Err(ContainedError::TooLarge { limit: 3, .. })
        ));
    }
}
