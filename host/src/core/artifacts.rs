//! Artifacts: files promoted out of a sandbox into durable,
//! content-addressed storage that outlives it. The blob is written (and
//! fsynced) before its row, so a crash never leaves a row without content.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Mutex as AsyncMutex;

use super::{CoreError, Host};
use crate::auth::Principal;
use crate::blobs::BlobError;
use crate::ids;
use crate::store::{ArtifactRow, Cursor};

/// Largest single artifact, whatever the quota.
pub const MAX_ARTIFACT_BYTES: u64 = 8 * 1024 * 1024 * 1024;
const MAX_NAME_LEN: usize = 255;

pub use crate::model::{CollectItem, Collected};

fn default_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("artifact")
        .to_string()
}

fn validate_name(name: &str) -> Result<(), CoreError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(CoreError::invalid(
            "name",
            format!("name must be 1 to {MAX_NAME_LEN} bytes without `/` or NUL"),
        ));
    }
    Ok(())
}

/// Artifact bytes of an org promised to one promotion in flight. Release
/// it with [`Reservation::release`] once the artifact's row is written (or
/// the promotion failed); dropping it releases it in the background.
pub(crate) struct Reservation {
    map: Arc<AsyncMutex<HashMap<String, i64>>>,
    org_id: String,
    bytes: i64,
    released: bool,
}

impl Reservation {
    pub(crate) async fn release(mut self) {
        self.released = true;
        release(&self.map, &self.org_id, self.bytes).await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (map, org, bytes) = (self.map.clone(), self.org_id.clone(), self.bytes);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { release(&map, &org, bytes).await });
        }
    }
}

async fn release(map: &AsyncMutex<HashMap<String, i64>>, org_id: &str, bytes: i64) {
    let mut map = map.lock().await;
    if let Some(reserved) = map.get_mut(org_id) {
        *reserved -= bytes;
        if *reserved <= 0 {
            map.remove(org_id);
        }
    }
}

impl Host {
    /// Takes `bytes` of the org's artifact quota before the blob is written,
    /// atomically with every other promotion in flight: the stored total is
    /// read under the same lock the reservations are kept under.
    pub(crate) async fn reserve_artifact_bytes(
        &self,
        org_id: &str,
        bytes: u64,
    ) -> Result<Reservation, CoreError> {
        let quota = self.quota(org_id).await?;
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut map = self.artifact_reservations.lock().await;
        if let Some(max) = quota.max_artifact_bytes {
            let org = org_id.to_string();
            let used = self.store.call(move |s| s.artifact_bytes(&org)).await?;
            let reserved = map.get(org_id).copied().unwrap_or(0);
            let wanted = used.saturating_add(reserved).saturating_add(bytes);
            if wanted > max {
                return Err(CoreError::QuotaExceeded {
                    limit: "maxArtifactBytes",
                    max,
                    current: wanted,
                });
            }
        }
        *map.entry(org_id.to_string()).or_default() += bytes;
        Ok(Reservation {
            map: self.artifact_reservations.clone(),
            org_id: org_id.to_string(),
            bytes,
            released: false,
        })
    }

    /// Promotes a file of a live sandbox to an artifact.
    pub async fn create_artifact(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        path: &str,
        name: Option<String>,
    ) -> Result<ArtifactRow, CoreError> {
        let name = name.unwrap_or_else(|| default_name(path));
        validate_name(&name)?;
        if !principal.has_scope("artifacts:create") {
            return Err(CoreError::MissingScope("artifacts:create"));
        }
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let (info, content) = self.read_file_stream(principal, sandbox_id, path).await?;
        // A file cannot hold more data than the workspace it is in; a
        // larger size is a sparse file, refused rather than inflated.
        let workspace = self
            .template_of(&sandbox)
            .map(|t| t.resources.disk_mib.saturating_mul(1024 * 1024))
            .unwrap_or(MAX_ARTIFACT_BYTES)
            .min(MAX_ARTIFACT_BYTES);
        if info.size > workspace {
            return Err(CoreError::invalid(
                "path",
                format!(
                    "the file's size ({} bytes) exceeds its sandbox's workspace ({workspace} bytes): a sparse file cannot be promoted",
                    info.size
                ),
            ));
        }
        let reservation = self
            .reserve_artifact_bytes(&sandbox.org_id, info.size)
            .await?;
        let blob = self
            .blobs
            .put(
                Box::pin(content.map(|r| r.map_err(|e| e.to_string()))),
                info.size,
            )
            .await;
        let blob = match blob {
            Ok(blob) => blob,
            Err(BlobError::TooLarge { .. }) => {
                reservation.release().await;
                return Err(CoreError::invalid(
                    "path",
                    "the file grew while it was promoted; promote it again",
                ));
            }
            Err(e) => {
                reservation.release().await;
                return Err(CoreError::Blob(e));
            }
        };
        let row = ArtifactRow {
            id: ids::new(ids::Kind::Artifact),
            org_id: sandbox.org_id.clone(),
            project_id: sandbox.project_id.clone(),
            sandbox_id: sandbox.id.clone(),
            source_path: path.to_string(),
            mime: mime_guess::from_path(&name)
                .first_or_octet_stream()
                .essence_str()
                .to_string(),
            name,
            sha256: blob.sha256,
            size: blob.size as i64,
            created_at: self.clock.now_ms(),
            created_by_key: principal.key_id.clone(),
        };
        let stored = row.clone();
        let inserted = self.store.call(move |s| s.insert_artifact(&stored)).await;
        reservation.release().await;
        inserted?;
        Ok(row)
    }

    /// Promotes each item; a failure is reported for that item only.
    pub(crate) async fn collect_artifacts(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        items: &[CollectItem],
    ) -> Vec<Collected> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let name = item
                .name
                .clone()
                .unwrap_or_else(|| default_name(&item.path));
            let outcome = self
                .create_artifact(principal, sandbox_id, &item.path, Some(name.clone()))
                .await;
            results.push(match outcome {
                Ok(artifact) => Collected {
                    path: item.path.clone(),
                    name,
                    artifact_id: Some(artifact.id),
                    error: None,
                },
                Err(e) => Collected {
                    path: item.path.clone(),
                    name,
                    artifact_id: None,
                    error: Some(e.to_string()),
                },
            });
        }
        results
    }

    pub async fn get_artifact(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<ArtifactRow, CoreError> {
        let not_found = || CoreError::NotFound {
            kind: "artifact",
            id: id.to_string(),
        };
        if !ids::is_valid(ids::Kind::Artifact, id) {
            return Err(not_found());
        }
        let (scope, key) = (principal.scope(), id.to_string());
        self.store
            .call(move |s| s.get_artifact(&scope, &key))
            .await?
            .ok_or_else(not_found)
    }

    /// Artifacts of the caller, or of one of its sandboxes (destroyed ones
    /// included: artifacts outlive their sandbox).
    pub async fn list_artifacts(
        &self,
        principal: &Principal,
        sandbox_id: Option<&str>,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<ArtifactRow>, CoreError> {
        let sandbox = match sandbox_id {
            Some(id) => Some(self.get_sandbox(principal, id).await?.id),
            None => None,
        };
        let scope = principal.scope();
        Ok(self
            .store
            .call(move |s| s.list_artifacts(&scope, sandbox.as_deref(), after.as_ref(), limit))
            .await?)
    }

    /// The file holding an artifact's content, open for reading.
    pub async fn artifact_file(&self, artifact: &ArtifactRow) -> Result<std::fs::File, CoreError> {
        let (blobs, sha256) = (self.blobs.clone(), artifact.sha256.clone());
        tokio::task::spawn_blocking(move || blobs.open_blob(&sha256))
            .await
            .map_err(|e| CoreError::Blob(crate::blobs::BlobError::Task(e.to_string())))?
            .map_err(CoreError::Blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_last_path_component() {
        assert_eq!(default_name("/workspace/out/report.html"), "report.html");
        assert_eq!(default_name("primes.txt"), "primes.txt");
        assert_eq!(default_name("dir/"), "dir");
        assert_eq!(default_name("/"), "artifact");
    }

    #[test]
    fn names_with_separators_are_refused() {
        assert!(validate_name("ok.txt").is_ok());
        for bad in ["", "a/b", "..", "a\0b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(256)).is_err());
    }
}
