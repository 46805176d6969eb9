//! Artifact rows: durable outputs promoted from a sandbox, pointing at a
//! content-addressed blob. A supertrait of [`Store`](super::Store).

use rusqlite::{OptionalExtension, Row, params};

use super::{Cursor, Scope, SqliteStore, StoreError};
use crate::clock::Millis;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    pub id: String,
    pub org_id: String,
    pub project_id: Option<String>,
    pub sandbox_id: String,
    /// Path inside the sandbox it was promoted from.
    pub source_path: String,
    pub name: String,
    /// Hex SHA-256 of the content; the blob's address.
    pub sha256: String,
    pub size: i64,
    pub mime: String,
    pub created_at: Millis,
    pub created_by_key: String,
}

pub trait ArtifactStore {
    fn insert_artifact(&self, artifact: &ArtifactRow) -> Result<(), StoreError>;
    fn get_artifact(&self, scope: &Scope, id: &str) -> Result<Option<ArtifactRow>, StoreError>;
    /// Newest first; only one sandbox's when `sandbox_id` is given.
    fn list_artifacts(
        &self,
        scope: &Scope,
        sandbox_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<ArtifactRow>, StoreError>;
    /// Bytes of artifacts an org stores (for its quota).
    fn artifact_bytes(&self, org_id: &str) -> Result<i64, StoreError>;
}

fn artifact_from_row(row: &Row<'_>) -> rusqlite::Result<ArtifactRow> {
    Ok(ArtifactRow {
        id: row.get("id")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        sandbox_id: row.get("sandbox_id")?,
        source_path: row.get("source_path")?,
        name: row.get("name")?,
        sha256: row.get("sha256")?,
        size: row.get("size")?,
        mime: row.get("mime")?,
        created_at: row.get("created_at")?,
        created_by_key: row.get("created_by_key")?,
    })
}

impl ArtifactStore for SqliteStore {
    fn insert_artifact(&self, a: &ArtifactRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO artifacts (id, org_id, project_id, sandbox_id, source_path, name, sha256,
                size, mime, created_at, created_by_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                a.id,
                a.org_id,
                a.project_id,
                a.sandbox_id,
                a.source_path,
                a.name,
                a.sha256,
                a.size,
                a.mime,
                a.created_at,
                a.created_by_key
            ],
        )?;
        Ok(())
    }

    fn get_artifact(&self, scope: &Scope, id: &str) -> Result<Option<ArtifactRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM artifacts WHERE id = ?1 AND org_id = ?2
                 AND (?3 IS NULL OR project_id = ?3)",
                params![id, scope.org_id, scope.project_id],
                artifact_from_row,
            )
            .optional()?)
    }

    fn list_artifacts(
        &self,
        scope: &Scope,
        sandbox_id: Option<&str>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<ArtifactRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM artifacts WHERE org_id = :o AND (:p IS NULL OR project_id = :p)
             AND (:s IS NULL OR sandbox_id = :s)
             AND (:c2 IS NULL OR created_at < :c1 OR (created_at = :c1 AND id < :c2))
             ORDER BY created_at DESC, id DESC LIMIT :l",
        )?;
        let rows = stmt.query_map(
            rusqlite::named_params! {
                ":o": scope.org_id,
                ":p": scope.project_id,
                ":s": sandbox_id,
                ":c1": after.map(|c| c.created_at),
                ":c2": after.map(|c| c.id.as_str()),
                ":l": limit as i64,
            },
            artifact_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn artifact_bytes(&self, org_id: &str) -> Result<i64, StoreError> {
        Ok(self.conn().query_row(
            "SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE org_id = ?1",
            [org_id],
            |r| r.get(0),
        )?)
    }
}
