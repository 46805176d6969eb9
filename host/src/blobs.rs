//! Content-addressed blob storage for artifacts: `<data>/blobs/sha256/ab/
//! abcdef…`. A blob is streamed into a temp file while hashing, fsynced,
//! then renamed into place and its directory fsynced, so a blob path
//! either holds the complete content or does not exist; a crash mid-write
//! leaves only a temp file, removed at the next start. The store row that
//! names a blob is written only after `put` returned.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the content is larger than the {limit} bytes allowed")]
    TooLarge { limit: u64 },
    #[error("reading the content failed: {0}")]
    Source(String),
    #[error("blob task failed: {0}")]
    Task(String),
}

/// A blob that is durably stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl BlobStore {
    /// Opens the blob directory, creating it, and removes temp files left
    /// by an interrupted write.
    pub fn open(dir: PathBuf) -> Result<Self, BlobError> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        std::fs::create_dir_all(dir.join("sha256")).map_err(io(&dir))?;
        Ok(Self { dir })
    }

    /// Where the blob with this digest lives. `sha256` must be 64 hex
    /// characters (callers pass digests from the store).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.dir.join("sha256").join(prefix).join(sha256)
    }

    /// Opens the blob with this digest for reading. The digest comes from
    /// a store row: anything but 64 lower-case hex characters names no
    /// blob, and the file is opened inside the blob directory (through
    /// `crate::contained`), so no row can point a download elsewhere.
    pub fn open_blob(&self, sha256: &str) -> Result<std::fs::File, BlobError> {
        let root = self.dir.join("sha256");
        let valid = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(BlobError::Io {
                path: root,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("`{}` is not a SHA-256 digest", sha256.escape_debug()),
                ),
            });
        }
        let contained = crate::contained::Contained::open(&root).map_err(|e| BlobError::Io {
            path: root.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        contained
            .open_file(format!("{}/{sha256}", &sha256[..2]))
            .map_err(|e| BlobError::Io {
                path: self.path_of(sha256),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// Streams `content` into the store, refusing more than `limit` bytes.
    /// Hashing, writing and syncing run on the blocking pool; the caller's
    /// task only forwards chunks (at most a few in flight).
    pub async fn put<S, E>(&self, mut content: S, limit: u64) -> Result<StoredBlob, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let tmp_path = self
            .dir
            .join("tmp")
            .join(format!("{:016x}", rand::random::<u64>()));
        let final_dir = self.dir.clone();
        // `None` tells the writer the source failed: it must not publish.
        let (tx, rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(4);
        let writer = {
            let tmp_path = tmp_path.clone();
            tokio::task::spawn_blocking(move || write_blob(rx, &tmp_path, &final_dir, limit))
        };
        let mut source_error = None;
        while let Some(chunk) = content.next().await {
            let item = match chunk {
                Ok(chunk) => Some(chunk),
                Err(e) => {
                    source_error = Some(BlobError::Source(e.to_string()));
                    None
                }
            };
            let last = item.is_none();
            // A closed channel means the writer stopped (too large, i/o):
            // its result says why.
            if tx.send(item).await.is_err() || last {
                break;
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| BlobError::Task(e.to_string()))?;
        match source_error {
            Some(e) => Err(e),
            None => written,
        }
    }
}

/// The blocking half of [`BlobStore::put`]: hashes and writes chunks to a
/// temp file, fsyncs it and publishes it under its digest.
fn write_blob(
    mut rx: tokio::sync::mpsc::Receiver<Option<Bytes>>,
    tmp_path: &Path,
    dir: &Path,
    limit: u64,
) -> Result<StoredBlob, BlobError> {
    let result = (|| {
        let file = std::fs::File::create(tmp_path).map_err(io(tmp_path))?;
        let mut writer = std::io::BufWriter::with_capacity(256 * 1024, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            let Some(chunk) = chunk else {
                return Err(BlobError::Source(String::from("the content stream failed")));
            };
            size += chunk.len() as u64;
            if size > limit {
                return Err(BlobError::TooLarge { limit });
            }
            hasher.update(&chunk);
            writer.write_all(&chunk).map_err(io(tmp_path))?;
        }
        let file = writer.into_inner().map_err(|e| BlobError::Io {
            path: tmp_path.to_path_buf(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(tmp_path))?;
        Ok(StoredBlob {
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    })();
    let blob = match result {
        Ok(blob) => blob,
        Err(e) => {
            let _ = std::fs::remove_file(tmp_path);
            return Err(e);
        }
    };
    let prefix = blob.sha256.get(..2).unwrap_or("00");
    let final_path = dir.join("sha256").join(prefix).join(&blob.sha256);
    match publish(tmp_path, &final_path) {
        Ok(()) => Ok(blob),
        Err(e) => {
            let _ = std::fs::remove_file(tmp_path);
            Err(e)
        }
    }
}

/// Moves a complete, fsynced temp file to its content address and makes
/// the rename durable. Content-addressed: if the blob exists, it is the
/// same bytes, and the temp file is dropped.
fn publish(tmp: &Path, target: &Path) -> Result<(), BlobError> {
    let parent = target.parent().unwrap_or(target);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    if target.exists() {
        std::fs::remove_file(tmp).map_err(io(tmp))?;
        return Ok(());
    }
    std::fs::rename(tmp, target).map_err(io(target))?;
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn put_stores_content_under_its_sha256() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = BlobStore::open(dir.path().join("blobs")).expect("open");
        let blob = blobs
            .put(chunks(&[b"hello ", b"world"]), 1024)
            .await
            .expect("put");
        assert_eq!(blob.size, 11);
        assert_eq!(
            blob.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(
            std::fs::read(blobs.path_of(&blob.sha256)).expect("read"),
            b"hello world"
        );
        // Storing the same content again is a no-op.
        assert_eq!(
            blobs
                .put(chunks(&[b"hello world"]), 1024)
                .await
                .expect("again"),
            blob
        );
    }

    #[tokio::test]
    async fn a_crafted_digest_or_a_planted_symlink_opens_nothing_outside_the_store() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = BlobStore::open(dir.path().join("blobs")).expect("open");
        let blob = blobs.put(chunks(&[b"content"]), 1024).await.expect("put");
        let mut read = String::new();
        std::io::Read::read_to_string(&mut blobs.open_blob(&blob.sha256).expect("open"), &mut read)
            .expect("read");
        assert_eq!(read, "content");
        std::fs::write(dir.path().join("secret"), "SECRET").expect("secret");
        for crafted in [
            "../../secret",
            "/etc/shadow",
            "ab/../../../secret",
            "",
            "AB",
        ] {
            assert!(blobs.open_blob(crafted).is_err(), "{crafted}");
        }
        // A row naming a well-formed digest whose file was replaced by a
        // symlink out of the store (a tampered data dir) opens nothing.
        let planted = "ab".repeat(32);
        let place = blobs.path_of(&planted);
        std::fs::create_dir_all(place.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("secret"), &place).expect("symlink");
        let err = blobs.open_blob(&planted).expect_err("symlink out");
        assert!(err.to_string().contains("leads outside"), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_or_failing_stream_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("blobs");
        let blobs = BlobStore::open(root.clone()).expect("open");
        assert!(matches!(
            blobs.put(chunks(&[b"0123456789", b"x"]), 10).await,
            Err(BlobError::TooLarge { limit: 10 })
        ));
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"part")),
            Err("agent went away".to_string()),
        ]);
        assert!(matches!(
            blobs.put(failing, 100).await,
            Err(BlobError::Source(_))
        ));
        assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0);
        assert_eq!(
            std::fs::read_dir(root.join("sha256")).expect("sha").count(),
            0
        );
    }

    #[test]
    fn open_removes_temp_files_of_an_interrupted_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("blobs");
        BlobStore::open(root.clone()).expect("open");
        std::fs::write(root.join("tmp").join("partial"), b"half").expect("write");
        BlobStore::open(root.clone()).expect("reopen");
        assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0);
    }
}
