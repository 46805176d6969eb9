//! Preview rows: a port of a sandbox exposed as an authenticated URL. At
//! most one active preview per sandbox and port (a partial unique index);
//! closed previews stay as tombstones. A supertrait of [`Store`](super::Store).

use rusqlite::{OptionalExtension, Row, params};

use super::{Cursor, Scope, SqliteStore, StoreError};
use crate::clock::Millis;
use crate::model::{PreviewCloseReason, PreviewStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewRow {
    pub id: String,
    pub org_id: String,
    pub project_id: Option<String>,
    pub sandbox_id: String,
    pub port: u16,
    pub status: PreviewStatus,
    /// Hex SHA-256 of the preview's browser token; the token is shown once.
    pub token_hash: String,
    pub created_at: Millis,
    pub closed_at: Option<Millis>,
    /// Once closed: why.
    pub close_reason: Option<PreviewCloseReason>,
    pub created_by_key: String,
}

/// Why an insert did not happen.
#[derive(Debug)]
pub enum InsertPreview {
    Inserted,
    /// The sandbox already has an active preview of this port.
    PortTaken {
        existing_id: String,
    },
}

pub trait PreviewStore {
    fn insert_preview(&self, preview: &PreviewRow) -> Result<InsertPreview, StoreError>;
    fn get_preview(&self, scope: &Scope, id: &str) -> Result<Option<PreviewRow>, StoreError>;
    /// Whatever the caller: the proxy looks a preview up by id, then checks
    /// the credential against its org.
    fn find_preview(&self, id: &str) -> Result<Option<PreviewRow>, StoreError>;
    /// Newest first.
    fn list_previews(
        &self,
        scope: &Scope,
        sandbox_id: &str,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<PreviewRow>, StoreError>;
    /// How many previews of the sandbox are active.
    fn active_previews(&self, scope: &Scope, sandbox_id: &str) -> Result<usize, StoreError>;
    /// Closes an active preview; `false` when it was not active.
    fn close_preview(
        &self,
        id: &str,
        reason: PreviewCloseReason,
        now: Millis,
    ) -> Result<bool, StoreError>;
}

fn preview_from_row(row: &Row<'_>) -> rusqlite::Result<PreviewRow> {
    Ok(PreviewRow {
        id: row.get("id")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        sandbox_id: row.get("sandbox_id")?,
        port: row.get("port")?,
        status: row.get("status")?,
        token_hash: row.get("token_hash")?,
        created_at: row.get("created_at")?,
        closed_at: row.get("closed_at")?,
        close_reason: row.get("close_reason")?,
        created_by_key: row.get("created_by_key")?,
    })
}

impl PreviewStore for SqliteStore {
    fn insert_preview(&self, p: &PreviewRow) -> Result<InsertPreview, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT id FROM previews WHERE sandbox_id = ?1 AND port = ?2 AND status = 'active'",
                params![p.sandbox_id, p.port],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(existing_id) = existing {
            return Ok(InsertPreview::PortTaken { existing_id });
        }
        tx.execute(
            "INSERT INTO previews (id, org_id, project_id, sandbox_id, port, status, token_hash,
                created_at, closed_at, close_reason, created_by_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                p.id,
                p.org_id,
                p.project_id,
                p.sandbox_id,
                p.port,
                p.status,
                p.token_hash,
                p.created_at,
                p.closed_at,
                p.close_reason,
                p.created_by_key
            ],
        )?;
        tx.commit()?;
        Ok(InsertPreview::Inserted)
    }

    fn get_preview(&self, scope: &Scope, id: &str) -> Result<Option<PreviewRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM previews WHERE id = ?1 AND org_id = ?2
                 AND (?3 IS NULL OR project_id = ?3)",
                params![id, scope.org_id, scope.project_id],
                preview_from_row,
            )
            .optional()?)
    }

    fn find_preview(&self, id: &str) -> Result<Option<PreviewRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM previews WHERE id = ?1",
                [id],
                preview_from_row,
            )
            .optional()?)
    }

    fn list_previews(
        &self,
        scope: &Scope,
        sandbox_id: &str,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<PreviewRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM previews WHERE org_id = :o AND (:p IS NULL OR project_id = :p)
             AND sandbox_id = :s
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
            preview_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn active_previews(&self, scope: &Scope, sandbox_id: &str) -> Result<usize, StoreError> {
        let n: i64 = self.conn().prepare_cached(
            "SELECT COUNT(*) FROM previews WHERE org_id = ?1 AND sandbox_id = ?2 AND status = 'active'",
        )?
        .query_row(params![scope.org_id, sandbox_id], |r| r.get(0))?;
        Ok(n.max(0) as usize)
    }

    fn close_preview(
        &self,
        id: &str,
        reason: PreviewCloseReason,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE previews SET status = 'closed', closed_at = ?3, close_reason = ?2
             WHERE id = ?1 AND status = 'active'",
            params![id, reason, now],
        )?;
        Ok(changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndReason;
    use crate::store::Store;

    fn preview(id: &str, sandbox: &str, port: u16) -> PreviewRow {
        PreviewRow {
            id: id.into(),
            org_id: "org_a".into(),
            project_id: None,
            sandbox_id: sandbox.into(),
            port,
            status: PreviewStatus::Active,
            token_hash: "00".into(),
            created_at: 1,
            closed_at: None,
            close_reason: None,
            created_by_key: "key_a".into(),
        }
    }

    #[test]
    fn one_active_preview_per_sandbox_and_port_and_closing_frees_the_port() {
        let store = SqliteStore::open_in_memory().expect("store");
        let scope = Scope {
            org_id: "org_a".into(),
            project_id: None,
        };
        assert!(matches!(
            store.insert_preview(&preview("prv_1", "sbx_1", 8000)),
            Ok(InsertPreview::Inserted)
        ));
        match store.insert_preview(&preview("prv_2", "sbx_1", 8000)) {
            Ok(InsertPreview::PortTaken { existing_id }) => assert_eq!(existing_id, "prv_1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            store.insert_preview(&preview("prv_3", "sbx_1", 8001)),
            Ok(InsertPreview::Inserted)
        ));
        assert!(
            store
                .close_preview("prv_1", PreviewCloseReason::Deleted, 5)
                .expect("close")
        );
        assert!(
            !store
                .close_preview("prv_1", PreviewCloseReason::Deleted, 6)
                .expect("again")
        );
        assert!(matches!(
            store.insert_preview(&preview("prv_4", "sbx_1", 8000)),
            Ok(InsertPreview::Inserted)
        ));
        let closed = store
            .get_preview(&scope, "prv_1")
            .expect("get")
            .expect("row");
        assert_eq!(
            (closed.status, closed.closed_at),
            (PreviewStatus::Closed, Some(5))
        );
        let other = Scope {
            org_id: "org_b".into(),
            project_id: None,
        };
        assert!(store.get_preview(&other, "prv_1").expect("get").is_none());
        let listed = store
            .list_previews(&scope, "sbx_1", None, 10)
            .expect("list");
        assert_eq!(listed.len(), 3);
        // Destroying the sandbox closes what is still active.
        store
            .end_sandbox("sbx_1", EndReason::Killed, 9)
            .expect("end");
        let after = store
            .list_previews(&scope, "sbx_1", None, 10)
            .expect("list");
        assert!(
            after.iter().all(|p| p.status == PreviewStatus::Closed),
            "{after:?}"
        );
        assert_eq!(
            store
                .find_preview("prv_4")
                .expect("find")
                .and_then(|p| p.close_reason),
            Some(PreviewCloseReason::SandboxDestroyed)
        );
    }
}
