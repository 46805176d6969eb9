//! Files in a sandbox's /workspace: stat, list, streamed read and write,
//! move, mkdir, remove, and staged transfers (single-use, short-lived,
//! HMAC-signed URLs that need no API key).
//!
//! Paths are normalized here (relative to /workspace, or absolute under
//! it; `..` that would climb above it is refused), but that is only a
//! courtesy for early, clear errors: the agent resolves every path again
//! inside the sandbox with `openat2(RESOLVE_BENEATH)`, which is what stops
//! symlinks (planted or raced) from leading outside. Bytes stream in bounded
//! chunks in both directions; no whole file is held in host memory.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use bytes::Bytes;
use crownest_proto::{ExecUser, FileErrorKind, FileInfo, FileWriteRequest};
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::secrets::KeyUse;
use super::{CoreError, Host};
use crate::agent::AgentError;
use crate::auth::Principal;
use crate::clock::Millis;
use crate::store::{TransferRow, TransferTarget};

pub use crate::model::TransferKind;
use crownest_proto::WORKSPACE;

/// Longest path accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest path component, in bytes (Linux's `NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;

/// Most entries one listing returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// How long a staged transfer URL stays valid.
pub const TRANSFER_TTL_MS: Millis = 5 * 60 * 1000;

type HmacSha256 = Hmac<Sha256>;

/// Normalizes a client path to one relative to /workspace (`""` is the
/// workspace itself): `/workspace/...` or relative; `.` and empty components
/// dropped, `..` applied. Anything that leaves the workspace is refused.
pub fn normalize_path(path: &str) -> Result<String, CoreError> {
    let invalid = |message: &str| CoreError::File {
        kind: FileErrorKind::InvalidPath,
        path: path.chars().take(200).collect(),
        message: message.to_string(),
    };
    if path.contains('\0') {
        return Err(invalid("the path must not contain NUL"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid("the path is longer than 4096 bytes"));
    }
    let relative = if let Some(rest) = path.strip_prefix('/') {
        match rest.strip_prefix("workspace") {
            Some(tail) if tail.is_empty() || tail.starts_with('/') => tail,
            _ => return Err(outside(path)),
        }
    } else {
        path
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(outside(path));
                }
            }
            name if name.len() > MAX_NAME_BYTES => {
                return Err(invalid("a path component is longer than 255 bytes"));
            }
            name => parts.push(name),
        }
    }
    Ok(parts.join("/"))
}

/// The absolute path inside the sandbox of a normalized path.
pub fn display_path(normalized: &str) -> String {
    if normalized.is_empty() {
        String::from(WORKSPACE)
    } else {
        format!("{WORKSPACE}/{normalized}")
    }
}

fn outside(path: &str) -> CoreError {
    CoreError::File {
        kind: FileErrorKind::OutsideWorkspace,
        path: path.chars().take(200).collect(),
        message: String::from("the path resolves outside /workspace"),
    }
}

fn require_target(normalized: &str) -> Result<(), CoreError> {
    if normalized.is_empty() {
        return Err(CoreError::File {
            kind: FileErrorKind::InvalidPath,
            path: String::from(WORKSPACE),
            message: String::from("the workspace itself cannot be the target"),
        });
    }
    Ok(())
}

/// Maps an agent failure on `path`: refused file operations keep their kind.
fn file_error(path: &str) -> impl Fn(AgentError) -> CoreError + '_ {
    move |error| match error {
        AgentError::File { kind, message } => CoreError::File {
            kind,
            path: display_path(path),
            message: message.chars().take(500).collect(),
        },
        other => CoreError::Agent(other),
    }
}

/// Most file watches open at once on one sandbox.
pub const MAX_WATCHES_PER_SANDBOX: usize = 8;

/// An open file watch.
pub struct Watch {
    /// The watched directory, absolute.
    pub path: String,
    pub events: crate::agent::FileWatch,
    /// Cancelled when the sandbox is being destroyed.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Its places in the org's stream budget and the sandbox's watches.
    _places: (super::admission::StreamPlace, super::admission::StreamPlace),
}

/// One directory entry with its path.
#[derive(Debug, Clone)]
pub struct FileEntry {
    /// Absolute path inside the sandbox.
    pub path: String,
    pub info: FileInfo,
}

/// What a listing returned.
#[derive(Debug, Clone)]
pub struct FileListing {
    pub entries: Vec<FileEntry>,
    /// More than [`MAX_LIST_ENTRIES`] entries: the rest were left out.
    pub truncated: bool,
}

/// A created staged transfer: the token goes into the URL.
#[derive(Debug, Clone)]
pub struct TransferTicket {
    pub token: String,
    pub expires_at: Millis,
    /// Upload size limit.
    pub max_bytes: Option<u64>,
    /// Download size (at creation).
    pub size_bytes: Option<u64>,
}

/// A stream of file chunks.
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, CoreError>>;

/// The owner of what file operations create in a sandbox: its template's
/// user.
fn file_owner(live: &super::LiveSandbox) -> ExecUser {
    ExecUser {
        uid: live.template.user.uid,
        gid: live.template.user.gid,
    }
}

impl Host {
    /// Metadata of a file or directory (symlinks inside are followed).
    pub async fn stat_file(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<FileInfo, CoreError> {
        let path = normalize_path(path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        live.agent.file_stat(&path).await.map_err(file_error(&path))
    }

    /// Whether a path exists (a symlink inside is followed; one out of
    /// /workspace is an error, as for every file operation).
    pub async fn file_exists(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<bool, CoreError> {
        match self.stat_file(principal, sandbox_id, path).await {
            Ok(_) => Ok(true),
            Err(CoreError::File {
                kind: FileErrorKind::NotFound | FileErrorKind::NotADirectory,
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Starts watching a directory of /workspace (and those below it,
    /// `recursive`): answers once the watches are in place. The watch ends
    /// when it is dropped, or at `stopping` (the sandbox is going away).
    pub async fn watch_files(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Watch, CoreError> {
        let path = normalize_path(path)?;
        let (row, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let org_place = self.log_stream_place(&row.org_id)?;
        let sandbox_place = self.watch_place(&row.id)?;
        let events = live
            .agent
            .file_watch(&path, recursive)
            .await
            .map_err(file_error(&path))?;
        Ok(Watch {
            path: display_path(&path),
            events,
            stopping: live.stopping.clone(),
            _places: (org_place, sandbox_place),
        })
    }

    /// The entries of a directory, sorted by name.
    pub async fn list_files(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<FileListing, CoreError> {
        let path = normalize_path(path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let (mut infos, truncated) = live
            .agent
            .file_list(&path, MAX_LIST_ENTRIES)
            .await
            .map_err(file_error(&path))?;
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        let base = display_path(&path);
        let entries = infos
            .into_iter()
            .map(|info| FileEntry {
                path: format!("{base}/{}", info.name),
                info,
            })
            .collect();
        Ok(FileListing { entries, truncated })
    }

    /// Opens a regular file for streaming: its metadata (the stream yields
    /// exactly `size` bytes or ends with an error) and its chunks.
    pub async fn read_file_stream(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<
        (
            FileInfo,
            impl Stream<Item = Result<Bytes, CoreError>> + Send + 'static,
        ),
        CoreError,
    > {
        let path = normalize_path(path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        self.read_live(&live.agent, path).await
    }

    async fn read_live(
        &self,
        agent: &crate::agent::AgentClient,
        path: String,
    ) -> Result<(FileInfo, ByteStream), CoreError> {
        let (info, reader) = agent.file_read(&path).await.map_err(file_error(&path))?;
        let stream = futures::stream::unfold((reader, path), |(mut reader, path)| async move {
            let chunk = reader.next_chunk().await?;
            let item = chunk.map(Bytes::from).map_err(|e| file_error(&path)(e));
            Some((item, (reader, path)))
        });
        Ok((info, stream.boxed()))
    }

    /// Writes a file from a stream of chunks, creating missing parent
    /// directories; at most `max_bytes` (else `TooLarge` and nothing is
    /// left behind). The file appears whole or not at all.
    pub async fn write_file<S>(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        body: S,
        max_bytes: u64,
    ) -> Result<FileInfo, CoreError>
    where
        S: Stream<Item = Result<Bytes, CoreError>> + Send,
    {
        let path = normalize_path(path)?;
        require_target(&path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let owner = file_owner(&live);
        write_stream(&live.agent, path, owner, body, max_bytes).await
    }

    /// Renames a file or directory inside the workspace.
    pub async fn move_file(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileInfo, CoreError> {
        let (from, to) = (normalize_path(from)?, normalize_path(to)?);
        require_target(&from)?;
        require_target(&to)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        live.agent
            .file_move(&from, &to, overwrite)
            .await
            .map_err(|e| match &e {
                AgentError::File {
                    kind: FileErrorKind::AlreadyExists,
                    ..
                } => file_error(&to)(e),
                _ => file_error(&from)(e),
            })
    }

    /// Creates a directory owned by the sandbox's user.
    pub async fn make_dir(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        parents: bool,
    ) -> Result<FileInfo, CoreError> {
        let path = normalize_path(path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let owner = file_owner(&live);
        live.agent
            .file_mkdir(&path, parents, Some(owner))
            .await
            .map_err(file_error(&path))
    }

    /// Removes a file, a symlink (never its target) or a directory.
    pub async fn remove_file(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<(), CoreError> {
        let path = normalize_path(path)?;
        require_target(&path)?;
        let (_, live) = self.usable_sandbox(principal, sandbox_id).await?;
        live.agent
            .file_remove(&path, recursive)
            .await
            .map_err(file_error(&path))
    }

    /// Stages an upload: a token for one `PUT` of at most `size_bytes`
    /// (default and cap: the workspace size).
    pub async fn create_upload(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        size_bytes: Option<u64>,
    ) -> Result<TransferTicket, CoreError> {
        let path = normalize_path(path)?;
        require_target(&path)?;
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        // Refuse now what the upload would be refused for later.
        match live.agent.file_stat(&path).await {
            Ok(info) if info.kind == crownest_proto::FileKind::Dir => {
                return Err(CoreError::File {
                    kind: FileErrorKind::IsADirectory,
                    path: display_path(&path),
                    message: String::from("the target is a directory"),
                });
            }
            Ok(_) => {}
            Err(AgentError::File {
                kind: FileErrorKind::NotFound,
                ..
            }) => {}
            Err(e) => return Err(file_error(&path)(e)),
        }
        let disk = live.template.resources.disk_mib * 1024 * 1024;
        let max_bytes = size_bytes.unwrap_or(disk);
        if max_bytes > disk {
            return Err(CoreError::File {
                kind: FileErrorKind::TooLarge,
                path: display_path(&path),
                message: format!("sizeBytes exceeds the workspace size of {disk} bytes"),
            });
        }
        let (token, expires_at) = self
            .insert_transfer(
                TransferTarget::Sandbox(sandbox.id.clone()),
                &sandbox.org_id,
                TransferKind::Upload,
                &path,
                Some(max_bytes),
            )
            .await?;
        Ok(TransferTicket {
            token,
            expires_at,
            max_bytes: Some(max_bytes),
            size_bytes: None,
        })
    }

    /// Stages a download of an existing regular file.
    pub async fn create_download(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
    ) -> Result<TransferTicket, CoreError> {
        let path = normalize_path(path)?;
        let (sandbox, live) = self.usable_sandbox(principal, sandbox_id).await?;
        let info = live
            .agent
            .file_stat(&path)
            .await
            .map_err(file_error(&path))?;
        match info.kind {
            crownest_proto::FileKind::File => {}
            crownest_proto::FileKind::Dir => {
                return Err(CoreError::File {
                    kind: FileErrorKind::IsADirectory,
                    path: display_path(&path),
                    message: String::from("a directory cannot be downloaded"),
                });
            }
            _ => {
                return Err(CoreError::File {
                    kind: FileErrorKind::NotAFile,
                    path: display_path(&path),
                    message: String::from("not a regular file"),
                });
            }
        }
        let (token, expires_at) = self
            .insert_transfer(
                TransferTarget::Sandbox(sandbox.id.clone()),
                &sandbox.org_id,
                TransferKind::Download,
                &path,
                None,
            )
            .await?;
        Ok(TransferTicket {
            token,
            expires_at,
            max_bytes: None,
            size_bytes: Some(info.size),
        })
    }

    pub(crate) async fn insert_transfer(
        &self,
        target: TransferTarget,
        org_id: &str,
        kind: TransferKind,
        path: &str,
        max_bytes: Option<u64>,
    ) -> Result<(String, Millis), CoreError> {
        let key = self.server_key(KeyUse::Transfers).await?;
        let now = self.clock.now_ms();
        let row = TransferRow {
            id: format!("trf_{}", hex::encode(rand::random::<[u8; 16]>())),
            target,
            org_id: org_id.to_string(),
            kind,
            path: path.to_string(),
            max_bytes: max_bytes.map(|m| m as i64),
            created_at: now,
            expires_at: now + TRANSFER_TTL_MS,
            used_at: None,
        };
        let token = sign_token(&key, &row.id, row.expires_at)?;
        let expires_at = row.expires_at;
        self.store.call(move |s| s.insert_transfer(&row)).await?;
        Ok((token, expires_at))
    }

    /// Checks a token's signature (constant time, before any store access),
    /// then claims its transfer: single use, unexpired, of this `kind` (an
    /// `Upload` claim also takes an archive upload: both are a `PUT`).
    pub async fn claim_transfer(
        &self,
        token: &str,
        kind: TransferKind,
    ) -> Result<TransferRow, CoreError> {
        let key = self.server_key(KeyUse::Transfers).await?;
        let (id, expires_at) = verify_token(&key, token).ok_or(CoreError::TransferNotFound)?;
        let now = self.clock.now_ms();
        if expires_at <= now {
            return Err(CoreError::TransferExpired);
        }
        let lookup = id.clone();
        let row = self
            .store
            .call(move |s| s.get_transfer(&lookup))
            .await?
            .ok_or(CoreError::TransferNotFound)?;
        let same_method = row.kind == kind
            || (kind == TransferKind::Upload && row.kind == TransferKind::ArchiveUpload);
        if !same_method {
            return Err(CoreError::Invalid {
                field: "method",
                message: String::from(match row.kind {
                    TransferKind::Upload | TransferKind::ArchiveUpload => {
                        "this URL is for an upload; use PUT"
                    }
                    TransferKind::Download => "this URL is for a download; use GET",
                }),
            });
        }
        let claimed = self.store.call(move |s| s.claim_transfer(&id, now)).await?;
        match claimed {
            Some(row) => Ok(row),
            None if row.used_at.is_some() || row.expires_at > now => Err(CoreError::TransferUsed),
            None => Err(CoreError::TransferExpired),
        }
    }

    /// Streams a claimed upload into its file (at most its `max_bytes`).
    pub async fn upload_transfer<S>(
        &self,
        transfer: &TransferRow,
        body: S,
    ) -> Result<FileInfo, CoreError>
    where
        S: Stream<Item = Result<Bytes, CoreError>> + Send,
    {
        let principal = transfer_principal(transfer);
        let (_, live) = self
            .usable_sandbox(&principal, transfer_sandbox(transfer)?)
            .await?;
        let owner = file_owner(&live);
        let max_bytes = transfer.max_bytes.unwrap_or(0).max(0) as u64;
        write_stream(&live.agent, transfer.path.clone(), owner, body, max_bytes).await
    }

    /// Opens a claimed download for streaming.
    pub async fn download_transfer(
        &self,
        transfer: &TransferRow,
    ) -> Result<(FileInfo, ByteStream), CoreError> {
        let principal = transfer_principal(transfer);
        let (_, live) = self
            .usable_sandbox(&principal, transfer_sandbox(transfer)?)
            .await?;
        self.read_live(&live.agent, transfer.path.clone()).await
    }
}

/// The sandbox a file transfer is about.
fn transfer_sandbox(transfer: &TransferRow) -> Result<&str, CoreError> {
    match &transfer.target {
        TransferTarget::Sandbox(id) => Ok(id),
        TransferTarget::Run(_) => Err(CoreError::TransferNotFound),
    }
}

/// Transfers act for the org that created them, not for a key.
pub(super) fn transfer_principal(transfer: &TransferRow) -> Principal {
    Principal {
        key_id: format!("transfer:{}", transfer.id),
        org_id: transfer.org_id.clone(),
        project_id: None,
        scopes: Vec::new(),
    }
}

/// Feeds a body stream to the agent; stops at the first error (the agent
/// then discards the partial file).
async fn write_stream<S>(
    agent: &crate::agent::AgentClient,
    path: String,
    owner: ExecUser,
    body: S,
    max_bytes: u64,
) -> Result<FileInfo, CoreError>
where
    S: Stream<Item = Result<Bytes, CoreError>> + Send,
{
    let too_large = || CoreError::File {
        kind: FileErrorKind::TooLarge,
        path: display_path(&path),
        message: format!("the file is larger than the limit of {max_bytes} bytes"),
    };
    let mut writer = agent
        .file_write(FileWriteRequest {
            path: path.clone(),
            mode: None,
            parents: true,
            owner: Some(owner),
            max_bytes: Some(max_bytes),
        })
        .await
        .map_err(file_error(&path))?;
    let mut body = std::pin::pin!(body);
    let mut total: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        total += chunk.len() as u64;
        if total > max_bytes {
            return Err(too_large());
        }
        writer.send(&chunk).await.map_err(file_error(&path))?;
    }
    writer.finish().await.map_err(file_error(&path))
}

/// `base64url(id "." expires_at) "." base64url(HMAC-SHA256(key, first part))`.
fn sign_token(key: &[u8; 32], id: &str, expires_at: Millis) -> Result<String, CoreError> {
    let payload = B64URL.encode(format!("{id}.{expires_at}"));
    let mut mac =
        HmacSha256::new_from_slice(key).map_err(|e| CoreError::ServerKey(e.to_string()))?;
    mac.update(payload.as_bytes());
    let signature = B64URL.encode(mac.finalize().into_bytes());
    Ok(format!("{payload}.{signature}"))
}

/// The transfer id and expiry of a correctly signed token.
fn verify_token(key: &[u8; 32], token: &str) -> Option<(String, Millis)> {
    if token.len() > 512 {
        return None;
    }
    let (payload, signature) = token.split_once('.')?;
    let signature = B64URL.decode(signature).ok()?;
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    mac.update(payload.as_bytes());
    mac.verify_slice(&signature).ok()?;
    let decoded = String::from_utf8(B64URL.decode(payload).ok()?).ok()?;
    let (id, expires_at) = decoded.rsplit_once('.')?;
    Some((id.to_string(), expires_at.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(result: Result<String, CoreError>) -> FileErrorKind {
        match result {
            Err(CoreError::File { kind, .. }) => kind,
            other => panic!("expected a file error, got {other:?}"),
        }
    }

    #[test]
    fn paths_normalize_to_relative_under_the_workspace() {
        assert_eq!(normalize_path("a/b").expect("ok"), "a/b");
        assert_eq!(normalize_path("/workspace/a//./b/").expect("ok"), "a/b");
        assert_eq!(normalize_path("/workspace").expect("ok"), "");
        assert_eq!(normalize_path("a/../b").expect("ok"), "b");
        assert_eq!(normalize_path("").expect("ok"), "");
    }

    #[test]
    fn escaping_paths_are_outside_the_workspace() {
        for path in [
            "../../etc/passwd",
            "/etc/passwd",
            "/workspace/../etc",
            "/workspaces/x",
            "a/../../b",
        ] {
            assert_eq!(
                kind_of(normalize_path(path)),
                FileErrorKind::OutsideWorkspace,
                "{path}"
            );
        }
    }

    #[test]
    fn malformed_paths_are_invalid() {
        assert_eq!(kind_of(normalize_path("a\0b")), FileErrorKind::InvalidPath);
        assert_eq!(
            kind_of(normalize_path(&"a/".repeat(3000))),
            FileErrorKind::InvalidPath
        );
        assert_eq!(
            kind_of(normalize_path(&"x".repeat(256))),
            FileErrorKind::InvalidPath
        );
    }

    #[test]
    fn a_signed_token_verifies_and_a_tampered_one_does_not() {
        let key = [7u8; 32];
        let token = sign_token(&key, "trf_abc", 1234).expect("sign");
        assert_eq!(
            verify_token(&key, &token),
            Some((String::from("trf_abc"), 1234))
        );
        assert_eq!(verify_token(&[8u8; 32], &token), None);
        let forged_payload = B64URL.encode("trf_abc.999999999999");
        let (_, signature) = token.split_once('.').expect("dot");
        assert_eq!(
            verify_token(&key, &format!("{forged_payload}.{signature}")),
            None
        );
        assert_eq!(verify_token(&key, "garbage"), None);
    }
}
