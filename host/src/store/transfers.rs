//! Staged file transfers: the rows behind signed upload and download URLs,
//! and their single-use claim.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::StoreError;
use crate::clock::Millis;
use crate::model::TransferKind;

/// A staged transfer. The URL's token names `id`; the row says what it may
/// do, until when, and whether it was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub id: String,
    pub target: TransferTarget,
    pub org_id: String,
    pub kind: TransferKind,
    /// Relative to /workspace, already normalized.
    pub path: String,
    /// Upload size limit.
    pub max_bytes: Option<i64>,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub used_at: Option<Millis>,
}

/// What a transfer moves bytes into or out of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferTarget {
    /// A file of this sandbox.
    Sandbox(String),
    /// The archive of this Workspace Run.
    Run(String),
}

const COLUMNS: &str =
    "id, sandbox_id, run_id, org_id, kind, path, max_bytes, created_at, expires_at, used_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<TransferRow> {
    let sandbox: Option<String> = row.get("sandbox_id")?;
    let run: Option<String> = row.get("run_id")?;
    let target = match (sandbox, run) {
        (Some(sandbox), _) => TransferTarget::Sandbox(sandbox),
        (None, Some(run)) => TransferTarget::Run(run),
        (None, None) => {
            return Err(rusqlite::Error::InvalidColumnType(
                1,
                String::from("run_id"),
                rusqlite::types::Type::Null,
            ));
        }
    };
    Ok(TransferRow {
        id: row.get("id")?,
        target,
        org_id: row.get("org_id")?,
        kind: row.get("kind")?,
        path: row.get("path")?,
        max_bytes: row.get("max_bytes")?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        used_at: row.get("used_at")?,
    })
}

pub(super) fn insert(conn: &Connection, t: &TransferRow) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT INTO transfers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?
    .execute(params![
        t.id,
        match &t.target {
            TransferTarget::Sandbox(id) => Some(id),
            TransferTarget::Run(_) => None,
        },
        match &t.target {
            TransferTarget::Run(id) => Some(id),
            TransferTarget::Sandbox(_) => None,
        },
        t.org_id,
        t.kind,
        t.path,
        t.max_bytes,
        t.created_at,
        t.expires_at,
        t.used_at
    ])?;
    Ok(())
}

pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<TransferRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM transfers WHERE id = ?1"),
            params![id],
            from_row,
        )
        .optional()?)
}

/// One statement, so two concurrent claims cannot both win.
pub(super) fn claim(
    conn: &Connection,
    id: &str,
    now: Millis,
) -> Result<Option<TransferRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!(
                "UPDATE transfers SET used_at = ?2
                 WHERE id = ?1 AND used_at IS NULL AND expires_at > ?2
                 RETURNING {COLUMNS}"
            ),
            params![id, now],
            from_row,
        )
        .optional()?)
}

/// Drops transfers that expired before `before`; returns how many.
pub(super) fn purge(conn: &Connection, before: Millis) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM transfers WHERE expires_at < ?1")?
        .execute([before])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SandboxStatus;
    use crate::store::{SandboxRow, SqliteStore, Store};

    fn store_with_sandbox() -> SqliteStore {
        let store = SqliteStore::open_in_memory().expect("store");
        let org = store.ensure_org("acme", 0).expect("org");
        store
            .insert_sandbox(&SandboxRow {
                id: String::from("sbx_00000000000000000000"),
                org_id: org.id,
                project_id: None,
                template: String::from("python"),
                template_hash: String::from("h"),
                status: SandboxStatus::Running,
                metadata: Default::default(),
                created_at: 0,
                expires_at: 1_000_000,
                ended_at: None,
                end_reason: None,
                uid_slot: 0,
                vcpus: 1,
                memory_mib: 512,
                created_by_key: String::from("key_x"),
                runtime: String::from("oci"),
                vmm: None,
                network: crate::egress::Policy::none(),
                egress_bytes_in: 0,
                egress_bytes_out: 0,
                env_sealed: None,
            })
            .expect("sandbox");
        store
    }

    #[test]
    fn a_transfer_is_claimed_once_and_never_after_expiry() {
        let store = store_with_sandbox();
        let org = store.find_org("acme").expect("find").expect("org");
        let row = TransferRow {
            id: String::from("trf_1"),
            target: TransferTarget::Sandbox(String::from("sbx_00000000000000000000")),
            org_id: org.id,
            kind: TransferKind::Upload,
            path: String::from("a"),
            max_bytes: Some(10),
            created_at: 0,
            expires_at: 100,
            used_at: None,
        };
        store.insert_transfer(&row).expect("insert");
        let mut late = row.clone();
        late.id = String::from("trf_2");
        store.insert_transfer(&late).expect("insert");

        let claimed = store.claim_transfer("trf_1", 50).expect("claim");
        assert_eq!(claimed.map(|t| t.used_at), Some(Some(50)));
        assert_eq!(store.claim_transfer("trf_1", 51).expect("claim"), None);
        assert_eq!(store.claim_transfer("trf_2", 100).expect("claim"), None);
        assert_eq!(
            store.get_transfer("trf_2").expect("get").map(|t| t.used_at),
            Some(None)
        );
        assert_eq!(store.claim_transfer("nope", 1).expect("claim"), None);

        // Expired rows go at the purge; others stay.
        let mut fresh = row.clone();
        fresh.id = String::from("trf_3");
        fresh.expires_at = 1_000;
        store.insert_transfer(&fresh).expect("insert");
        assert_eq!(store.purge_transfers(500).expect("purge"), 2);
        assert!(store.get_transfer("trf_1").expect("get").is_none());
        assert!(store.get_transfer("trf_3").expect("get").is_some());
    }
}
