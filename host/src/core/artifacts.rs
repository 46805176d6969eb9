//! Artifacts: files promoted out of a sandbox into durable,
//! content-addressed storage that outlives it. The blob is written (and
//! fsynced) before its row, so a crash never leaves a row without content.

use futures::StreamExt;

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

impl Host {
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
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let quota = self.quota(&principal.org_id).await?;
        let limit = match quota.max_artifact_bytes {
            Some(max) => {
                let org = principal.org_id.clone();
                let used = self.store.call(move |s| s.artifact_bytes(&org)).await?;
                (max - used).max(0) as u64
            }
            None => MAX_ARTIFACT_BYTES,
        };
        let (info, content) = self.read_file_stream(principal, sandbox_id, path).await?;
        if info.size > limit {
            return Err(self.artifact_quota_error(principal, info.size).await);
        }
        let blob = match self
            .blobs
            .put(
                Box::pin(content.map(|r| r.map_err(|e| e.to_string()))),
                limit,
            )
            .await
        {
            Ok(blob) => blob,
            Err(BlobError::TooLarge { .. }) => {
                return Err(self.artifact_quota_error(principal, limit + 1).await);
            }
            Err(e) => return Err(CoreError::Blob(e)),
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
        self.store.call(move |s| s.insert_artifact(&stored)).await?;
        Ok(row)
    }

    async fn artifact_quota_error(&self, principal: &Principal, wanted: u64) -> CoreError {
        let quota = self.quota(&principal.org_id).await.unwrap_or_default();
        let org = principal.org_id.clone();
        let used = self
            .store
            .call(move |s| s.artifact_bytes(&org))
            .await
            .unwrap_or_default();
        match quota.max_artifact_bytes {
            Some(max) => CoreError::QuotaExceeded {
                limit: "maxArtifactBytes",
                max,
                current: used + wanted as i64,
            },
            None => CoreError::invalid(
                "path",
                format!(
                    "the file is larger than the {MAX_ARTIFACT_BYTES} bytes an artifact may hold"
                ),
            ),
        }
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

    /// The file holding an artifact's content.
    pub fn artifact_path(&self, artifact: &ArtifactRow) -> std::path::PathBuf {
        self.blobs.path_of(&artifact.sha256)
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
