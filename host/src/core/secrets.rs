//! The host's own secrets: random 32-byte keys in files under the data dir
//! (mode 0600), created on first use and kept for the process. They sign
//! staged transfer URLs and encrypt stored idempotent responses.

use std::path::{Path, PathBuf};

use super::{CoreError, Host};

/// What a server key is for; each has its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyUse {
    /// HMAC of staged transfer tokens.
    Transfers,
    /// AEAD of idempotent responses at rest (they can hold preview tokens
    /// and signed URLs).
    Idempotency,
    /// The ed25519 seed that signs Evidence Bundles.
    Evidence,
    /// AEAD of a sandbox's own environment at rest (values can be secrets).
    SandboxEnv,
}

impl KeyUse {
    fn file(self) -> &'static str {
        match self {
            KeyUse::Transfers => "transfer.key",
            KeyUse::Idempotency => "idempotency.key",
            KeyUse::Evidence => "evidence.key",
            KeyUse::SandboxEnv => "env.key",
        }
    }
}

/// The loaded keys of one host.
#[derive(Default)]
pub(crate) struct ServerKeys {
    transfers: tokio::sync::OnceCell<[u8; 32]>,
    idempotency: tokio::sync::OnceCell<[u8; 32]>,
    evidence: tokio::sync::OnceCell<[u8; 32]>,
    sandbox_env: tokio::sync::OnceCell<[u8; 32]>,
}

impl Host {
    pub(crate) async fn server_key(&self, usage: KeyUse) -> Result<[u8; 32], CoreError> {
        let cell = match usage {
            KeyUse::Transfers => &self.keys.transfers,
            KeyUse::Idempotency => &self.keys.idempotency,
            KeyUse::Evidence => &self.keys.evidence,
            KeyUse::SandboxEnv => &self.keys.sandbox_env,
        };
        let path = self.config.data_dir.join(usage.file());
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || load_or_create_key(&path))
                .await
                .map_err(|e| CoreError::ServerKey(e.to_string()))?
        })
        .await
        .copied()
    }
}

/// Reads a 32-byte key, or creates it (mode 0600) if there is none.
pub(crate) fn load_or_create_key(path: &Path) -> Result<[u8; 32], CoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| CoreError::ServerKey(format!("{}: {e}", path.display()));
    match std::fs::read(path) {
        Ok(bytes) => {
            return bytes
                .try_into()
                .map_err(|_| CoreError::ServerKey(format!("{} is not 32 bytes", path.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let key: [u8; 32] = rand::random();
    // Written whole under a temporary name, then linked into place: a
    // concurrent starter either wins or reads the winner's key.
    let temp: PathBuf = path.with_extension(format!("tmp{:016x}", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(failed)?;
    file.write_all(&key)
        .and_then(|()| file.sync_all())
        .map_err(failed)?;
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
        Err(e) => Err(failed(e)),
    }
}

/// Encrypts `plain` for storage, bound to `context` (ChaCha20-Poly1305,
/// random nonce first).
pub(crate) fn seal(key: &[u8; 32], context: &[u8], plain: &[u8]) -> Result<Vec<u8>, CoreError> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.into());
    let nonce: [u8; 12] = rand::random();
    let sealed = cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plain,
                aad: context,
            },
        )
        .map_err(|_| CoreError::ServerKey(String::from("encryption failed")))?;
    let mut out = nonce.to_vec();
    out.extend(sealed);
    Ok(out)
}

/// A response with its body sealed by [`seal`].
pub(crate) fn seal_response(
    key: &[u8; 32],
    context: &[u8],
    response: crate::store::StoredResponse,
) -> Result<crate::store::StoredResponse, CoreError> {
    let body = seal(key, context, &response.body)?;
    Ok(crate::store::StoredResponse { body, ..response })
}

/// Decrypts what [`seal`] wrote for the same `context`.
pub(crate) fn open(key: &[u8; 32], context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CoreError> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let (nonce, body) = sealed
        .split_first_chunk::<12>()
        .ok_or_else(|| CoreError::ServerKey(String::from("sealed data is too short")))?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(
            nonce.into(),
            Payload {
                msg: body,
                aad: context,
            },
        )
        .map_err(|_| CoreError::ServerKey(String::from("sealed data does not decrypt")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KeyUse::Transfers.file());
        let first = load_or_create_key(&path).expect("create");
        assert_eq!(load_or_create_key(&path).expect("load"), first);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sealed_data_opens_only_with_its_key_and_context() {
        let key = [1u8; 32];
        let sealed = seal(&key, b"org/key/k1", b"secret token").expect("seal");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            open(&key, b"org/key/k1", &sealed).expect("open"),
            b"secret token"
        );
        assert!(open(&key, b"org/key/k2", &sealed).is_err());
        assert!(open(&[2u8; 32], b"org/key/k1", &sealed).is_err());
        assert!(open(&key, b"org/key/k1", &sealed[..5]).is_err());
    }
}
