//! The ledger half of the store: idempotency records, audit events,
//! metering and quotas — what the host writes *about* requests and
//! sandboxes rather than the resources themselves. A supertrait of
//! [`Store`](super::Store), implemented for [`SqliteStore`].

use rusqlite::{OptionalExtension, Row, params};

use super::{SqliteStore, StoreError, codec};
use crate::clock::Millis;
use crate::model::{AuditAction, AuditActor, AuditDetails, AuditOutcome, ResourceKind};

/// A stored idempotency record: the request's fingerprint and, once the
/// first attempt finished, its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub org_id: String,
    /// The API key that sent the first attempt: only it can replay.
    pub key_id: String,
    pub key: String,
    /// SHA-256 over method, path, query and body.
    pub request_hash: Vec<u8>,
    pub created_at: Millis,
    /// `None` while the first attempt is in flight.
    pub response: Option<StoredResponse>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: Option<String>,
    /// Sealed by the core before it is stored (see `core::secrets`).
    pub body: Vec<u8>,
}

/// A mutating request that carries an idempotency key.
#[derive(Debug, Clone, Copy)]
pub struct IdempotentRequest<'a> {
    pub org_id: &'a str,
    pub key_id: &'a str,
    pub key: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// SHA-256 over method, path, query and body.
    pub request_hash: &'a [u8],
}

/// What [`LedgerStore::begin_idempotent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// No live record: one was inserted; the caller does the work.
    Started,
    /// A live record with this fingerprint exists.
    Existing(IdempotencyRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub at: Millis,
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub actor_key_id: Option<String>,
    pub actor: AuditActor,
    pub action: AuditAction,
    pub resource_type: Option<ResourceKind>,
    pub resource_id: Option<String>,
    pub outcome: AuditOutcome,
    /// HTTP status for API requests.
    pub status: Option<i64>,
    pub request_id: Option<String>,
    /// Context (error code, reason, path, …).
    pub details: AuditDetails,
}

/// Filters of an audit query; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub org_id: String,
    pub project_id: Option<String>,
    pub resource_id: Option<String>,
    pub action: Option<AuditAction>,
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    /// Continue after this `(at, id)`.
    pub after: Option<(Millis, String)>,
    pub limit: usize,
}

/// A sandbox's metered lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterRow {
    pub sandbox_id: String,
    pub project_id: Option<String>,
    pub vcpus: i64,
    pub pricing_version: String,
    pub started_at: Millis,
    /// The last second the host saw it alive (its end once destroyed).
    pub metered_until: Millis,
}

/// Egress usage is kept in hour buckets.
pub const HOUR_MS: Millis = 60 * 60 * 1000;

/// Egress bytes of one sandbox in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressUsageRow {
    pub sandbox_id: String,
    pub project_id: Option<String>,
    /// Start of the hour (ms since the epoch).
    pub hour: Millis,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// Per-org limits set by the operator; `None` means unlimited. An org the
/// operator never set a quota for gets [`Quota::default`], which is finite
/// where a tenant could otherwise exhaust the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub max_concurrent_sandboxes: Option<i64>,
    pub max_compute_unit_seconds: Option<i64>,
    pub max_artifact_bytes: Option<i64>,
    pub max_request_body_bytes: Option<i64>,
    pub max_command_output_bytes: Option<i64>,
    /// Commands running at once across the org's sandboxes.
    pub max_concurrent_commands: Option<i64>,
}

/// A [`MeterRow`] from the columns of [`METER_COLUMNS`].
fn meter_from_row(r: &Row<'_>) -> rusqlite::Result<MeterRow> {
    Ok(MeterRow {
        sandbox_id: r.get(0)?,
        project_id: r.get(1)?,
        vcpus: r.get(2)?,
        pricing_version: r.get(3)?,
        started_at: r.get(4)?,
        metered_until: r.get(5)?,
    })
}

/// The columns a [`MeterRow`] is read from, in its order.
const METER_COLUMNS: &str = "id, project_id, vcpus, pricing_version, created_at,
    COALESCE(metered_until, created_at) AS until";

/// The pricing version new sandboxes are metered under (the column's
/// default, migration 4).
pub const PRICING_VERSION: &str = "2026-11-01";

/// Live sandboxes an org may have before the operator raises it.
pub const DEFAULT_MAX_CONCURRENT_SANDBOXES: i64 = 100;
/// Artifact bytes an org may store before the operator raises it.
pub const DEFAULT_MAX_ARTIFACT_BYTES: i64 = 10 * 1024 * 1024 * 1024;
/// Commands an org may run at once before the operator raises it.
pub const DEFAULT_MAX_CONCURRENT_COMMANDS: i64 = 512;

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_concurrent_sandboxes: Some(DEFAULT_MAX_CONCURRENT_SANDBOXES),
            max_compute_unit_seconds: None,
            max_artifact_bytes: Some(DEFAULT_MAX_ARTIFACT_BYTES),
            max_request_body_bytes: None,
            max_command_output_bytes: None,
            max_concurrent_commands: Some(DEFAULT_MAX_CONCURRENT_COMMANDS),
        }
    }
}

pub trait LedgerStore {
    /// Looks the key up; inserts an in-flight record when there is none or
    /// the one there was created before `expired_before` (then replaced).
    fn begin_idempotent(
        &self,
        request: &IdempotentRequest<'_>,
        now: Millis,
        expired_before: Millis,
    ) -> Result<IdempotencyBegin, StoreError>;
    fn complete_idempotent(
        &self,
        org_id: &str,
        key_id: &str,
        key: &str,
        response: &StoredResponse,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Forgets a record whose attempt must be retryable (server errors).
    fn abandon_idempotent(&self, org_id: &str, key_id: &str, key: &str) -> Result<(), StoreError>;
    fn get_idempotent(
        &self,
        org_id: &str,
        key_id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;
    /// Deletes records created before `before` and in-flight records left by
    /// a previous host process (created before `orphaned_before`).
    fn purge_idempotent(
        &self,
        before: Millis,
        orphaned_before: Option<Millis>,
    ) -> Result<usize, StoreError>;

    fn insert_audit(&self, event: &AuditRow) -> Result<(), StoreError>;
    fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError>;
    /// Deletes audit events older than `before` (retention).
    fn purge_audit(&self, before: Millis) -> Result<usize, StoreError>;

    /// Records that every sandbox not destroyed was alive at `now`.
    fn heartbeat_meters(&self, now: Millis) -> Result<(), StoreError>;
    /// One sandbox's metered lifetime.
    fn sandbox_meter(&self, id: &str) -> Result<Option<MeterRow>, StoreError>;
    /// Metered lifetimes of the org's sandboxes that overlap `[from, to)`.
    fn meters(
        &self,
        org_id: &str,
        project_id: Option<&str>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<MeterRow>, StoreError>;
    /// Egress bytes of the org's (or project's) sandboxes in the hours
    /// that start within `[from, to)` (`from` rounded down to its hour).
    fn egress_usage(
        &self,
        org_id: &str,
        project_id: Option<&str>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<EgressUsageRow>, StoreError>;
    fn live_sandbox_count(&self, org_id: &str) -> Result<i64, StoreError>;
    /// The org of a sandbox, whatever its state (for system audit events).
    fn sandbox_org(&self, id: &str) -> Result<Option<String>, StoreError>;

    fn get_quota(&self, org_id: &str) -> Result<Quota, StoreError>;
    fn set_quota(&self, org_id: &str, quota: &Quota) -> Result<(), StoreError>;
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<IdempotencyRecord> {
    let status: Option<i64> = row.get("status")?;
    Ok(IdempotencyRecord {
        org_id: row.get("org_id")?,
        key_id: row.get("key_id")?,
        key: row.get("key")?,
        request_hash: row.get("request_hash")?,
        created_at: row.get("created_at")?,
        response: match status {
            Some(status) => Some(StoredResponse {
                status: status as u16,
                content_type: row.get("content_type")?,
                body: row.get::<_, Option<Vec<u8>>>("body")?.unwrap_or_default(),
            }),
            None => None,
        },
    })
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: row.get("id")?,
        at: row.get("at")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        actor_key_id: row.get("actor_key_id")?,
        actor: row.get("actor")?,
        action: row.get("action")?,
        resource_type: row.get("resource_type")?,
        resource_id: row.get("resource_id")?,
        outcome: row.get("outcome")?,
        status: row.get("status")?,
        request_id: row.get("request_id")?,
        details: codec::details_from_sql(&row.get::<_, String>("details")?),
    })
}

impl LedgerStore for SqliteStore {
    fn begin_idempotent(
        &self,
        request: &IdempotentRequest<'_>,
        now: Millis,
        expired_before: Millis,
    ) -> Result<IdempotencyBegin, StoreError> {
        let IdempotentRequest {
            org_id,
            key_id,
            key,
            method,
            path,
            request_hash,
        } = *request;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing = tx
            .prepare_cached(
                "SELECT * FROM idempotency_records WHERE org_id = ?1 AND key_id = ?2 AND key = ?3",
            )?
            .query_row(params![org_id, key_id, key], record_from_row)
            .optional()?;
        if let Some(record) = existing {
            if record.created_at >= expired_before {
                return Ok(IdempotencyBegin::Existing(record));
            }
            tx.prepare_cached(
                "DELETE FROM idempotency_records WHERE org_id = ?1 AND key_id = ?2 AND key = ?3",
            )?
            .execute(params![org_id, key_id, key])?;
        }
        tx.prepare_cached(
            "INSERT INTO idempotency_records (org_id, key_id, key, method, path, request_hash,
                created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            org_id,
            key_id,
            key,
            method,
            path,
            request_hash,
            now
        ])?;
        tx.commit()?;
        Ok(IdempotencyBegin::Started)
    }

    fn complete_idempotent(
        &self,
        org_id: &str,
        key_id: &str,
        key: &str,
        response: &StoredResponse,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE idempotency_records
                 SET status = ?4, content_type = ?5, body = ?6, completed_at = ?7
                 WHERE org_id = ?1 AND key_id = ?2 AND key = ?3",
            )?
            .execute(params![
                org_id,
                key_id,
                key,
                i64::from(response.status),
                response.content_type,
                response.body,
                now
            ])?;
        Ok(())
    }

    fn abandon_idempotent(&self, org_id: &str, key_id: &str, key: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "DELETE FROM idempotency_records WHERE org_id = ?1 AND key_id = ?2 AND key = ?3",
            )?
            .execute(params![org_id, key_id, key])?;
        Ok(())
    }

    fn get_idempotent(
        &self,
        org_id: &str,
        key_id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT * FROM idempotency_records WHERE org_id = ?1 AND key_id = ?2 AND key = ?3",
            )?
            .query_row(params![org_id, key_id, key], record_from_row)
            .optional()?)
    }

    fn purge_idempotent(
        &self,
        before: Millis,
        orphaned_before: Option<Millis>,
    ) -> Result<usize, StoreError> {
        let conn = self.conn();
        let mut purged = conn
            .prepare_cached("DELETE FROM idempotency_records WHERE created_at < ?1")?
            .execute([before])?;
        if let Some(orphaned) = orphaned_before {
            purged += conn
                .prepare_cached(
                    "DELETE FROM idempotency_records WHERE status IS NULL AND created_at < ?1",
                )?
                .execute([orphaned])?;
        }
        Ok(purged)
    }

    fn insert_audit(&self, e: &AuditRow) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO audit_events (id, at, org_id, project_id, actor_key_id, actor, action,
                resource_type, resource_id, outcome, status, request_id, details)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                e.id,
                e.at,
                e.org_id,
                e.project_id,
                e.actor_key_id,
                e.actor,
                e.action,
                e.resource_type,
                e.resource_id,
                e.outcome,
                e.status,
                e.request_id,
                codec::details_to_sql(&e.details)
            ])?;
        Ok(())
    }

    fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM audit_events
             WHERE org_id = :org
               AND (:project IS NULL OR project_id = :project)
               AND (:resource IS NULL OR resource_id = :resource)
               AND (:action IS NULL OR action = :action)
               AND (:from IS NULL OR at >= :from)
               AND (:to IS NULL OR at < :to)
               AND (:after_id IS NULL OR at < :after_at OR (at = :after_at AND id < :after_id))
             ORDER BY at DESC, id DESC LIMIT :limit",
        )?;
        let rows = stmt.query_map(
            rusqlite::named_params! {
                ":org": f.org_id,
                ":project": f.project_id,
                ":resource": f.resource_id,
                ":action": f.action,
                ":from": f.from,
                ":to": f.to,
                ":after_at": f.after.as_ref().map(|a| a.0),
                ":after_id": f.after.as_ref().map(|a| a.1.as_str()),
                ":limit": f.limit as i64,
            },
            audit_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn purge_audit(&self, before: Millis) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("DELETE FROM audit_events WHERE at < ?1")?
            .execute([before])?)
    }

    fn heartbeat_meters(&self, now: Millis) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE sandboxes SET metered_until = ?1 WHERE status <> 'destroyed'")?
            .execute([now])?;
        Ok(())
    }

    fn meters(
        &self,
        org_id: &str,
        project_id: Option<&str>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<MeterRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {METER_COLUMNS}
             FROM sandboxes
             WHERE org_id = ?1 AND (?2 IS NULL OR project_id = ?2)
               AND created_at < ?4 AND COALESCE(metered_until, created_at) > ?3
             ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map(params![org_id, project_id, from, to], meter_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn sandbox_meter(&self, id: &str) -> Result<Option<MeterRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(&format!(
                "SELECT {METER_COLUMNS} FROM sandboxes WHERE id = ?1"
            ))?
            .query_row([id], meter_from_row)
            .optional()?)
    }

    fn egress_usage(
        &self,
        org_id: &str,
        project_id: Option<&str>,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<EgressUsageRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT u.sandbox_id, s.project_id, u.hour, u.bytes_in, u.bytes_out
             FROM egress_usage u JOIN sandboxes s ON s.id = u.sandbox_id
             WHERE s.org_id = ?1 AND (?2 IS NULL OR s.project_id = ?2)
               AND u.hour >= ?3 AND u.hour < ?4
             ORDER BY u.hour, u.sandbox_id",
        )?;
        let from_hour = from.div_euclid(HOUR_MS) * HOUR_MS;
        let rows = stmt.query_map(params![org_id, project_id, from_hour, to], |row| {
            Ok(EgressUsageRow {
                sandbox_id: row.get(0)?,
                project_id: row.get(1)?,
                hour: row.get(2)?,
                bytes_in: row.get(3)?,
                bytes_out: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn live_sandbox_count(&self, org_id: &str) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT COUNT(*) FROM sandboxes WHERE org_id = ?1 AND status <> 'destroyed'",
            )?
            .query_row([org_id], |r| r.get(0))?)
    }

    fn sandbox_org(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT org_id FROM sandboxes WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    fn get_quota(&self, org_id: &str) -> Result<Quota, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT max_concurrent_sandboxes, max_compute_unit_seconds, max_artifact_bytes,
                        max_request_body_bytes, max_command_output_bytes,
                        max_concurrent_commands
                 FROM quotas WHERE org_id = ?1",
            )?
            .query_row([org_id], |r| {
                Ok(Quota {
                    max_concurrent_sandboxes: r.get(0)?,
                    max_compute_unit_seconds: r.get(1)?,
                    max_artifact_bytes: r.get(2)?,
                    max_request_body_bytes: r.get(3)?,
                    max_command_output_bytes: r.get(4)?,
                    max_concurrent_commands: r.get(5)?,
                })
            })
            .optional()?
            .unwrap_or_default())
    }

    fn set_quota(&self, org_id: &str, q: &Quota) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO quotas (org_id, max_concurrent_sandboxes, max_compute_unit_seconds,
                max_artifact_bytes, max_request_body_bytes, max_command_output_bytes,
                max_concurrent_commands)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (org_id) DO UPDATE SET
                max_concurrent_sandboxes = excluded.max_concurrent_sandboxes,
                max_compute_unit_seconds = excluded.max_compute_unit_seconds,
                max_artifact_bytes = excluded.max_artifact_bytes,
                max_request_body_bytes = excluded.max_request_body_bytes,
                max_command_output_bytes = excluded.max_command_output_bytes,
                max_concurrent_commands = excluded.max_concurrent_commands",
            )?
            .execute(params![
                org_id,
                q.max_concurrent_sandboxes,
                q.max_compute_unit_seconds,
                q.max_artifact_bytes,
                q.max_request_body_bytes,
                q.max_command_output_bytes,
                q.max_concurrent_commands
            ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn store() -> (SqliteStore, String) {
        let store = SqliteStore::open_in_memory().expect("store");
        let org = store.ensure_org("acme", 0).expect("org").id;
        (store, org)
    }

    fn req<'a>(org: &'a str, key: &'a str) -> IdempotentRequest<'a> {
        IdempotentRequest {
            org_id: org,
            key_id: "key_a",
            key,
            method: "POST",
            path: "/x",
            request_hash: b"h",
        }
    }

    fn response(status: u16) -> StoredResponse {
        StoredResponse {
            status,
            content_type: Some("application/json".into()),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_second_begin_sees_the_first_record_until_it_expires() {
        let (s, org) = store();
        let begin = |now, expired| s.begin_idempotent(&req(&org, "k"), now, expired);
        assert_eq!(begin(10, 0).expect("begin"), IdempotencyBegin::Started);
        let IdempotencyBegin::Existing(record) = begin(20, 0).expect("begin") else {
            panic!("expected the in-flight record");
        };
        assert!(record.response.is_none());
        s.complete_idempotent(&org, "key_a", "k", &response(201), 30)
            .expect("complete");
        let IdempotencyBegin::Existing(record) = begin(40, 0).expect("begin") else {
            panic!("expected the completed record");
        };
        assert_eq!(record.response, Some(response(201)));
        // Created at 10; anything created before 11 has expired.
        assert_eq!(begin(50, 11).expect("begin"), IdempotencyBegin::Started);
    }

    #[test]
    fn idempotency_keys_are_scoped_to_the_api_key() {
        let (s, org) = store();
        assert_eq!(
            s.begin_idempotent(&req(&org, "k"), 1, 0).expect("begin"),
            IdempotencyBegin::Started
        );
        let other_key = IdempotentRequest {
            key_id: "key_b",
            ..req(&org, "k")
        };
        assert_eq!(
            s.begin_idempotent(&other_key, 1, 0).expect("begin"),
            IdempotencyBegin::Started
        );
    }

    #[test]
    fn idempotency_keys_are_scoped_to_the_org() {
        let (s, org) = store();
        let other = s.ensure_org("other", 0).expect("org").id;
        assert_eq!(
            s.begin_idempotent(&req(&org, "k"), 1, 0).expect("begin"),
            IdempotencyBegin::Started
        );
        assert_eq!(
            s.begin_idempotent(&req(&other, "k"), 1, 0).expect("begin"),
            IdempotencyBegin::Started
        );
    }

    #[test]
    fn purge_drops_old_records_and_orphaned_in_flight_ones() {
        let (s, org) = store();
        s.begin_idempotent(&req(&org, "old"), 1, 0).expect("begin");
        s.begin_idempotent(&req(&org, "orphan"), 100, 0)
            .expect("begin");
        s.begin_idempotent(&req(&org, "done"), 100, 0)
            .expect("begin");
        s.complete_idempotent(&org, "key_a", "done", &response(200), 101)
            .expect("complete");
        assert_eq!(s.purge_idempotent(50, Some(200)).expect("purge"), 2);
        assert!(
            s.get_idempotent(&org, "key_a", "done")
                .expect("get")
                .is_some()
        );
    }

    #[test]
    fn quotas_default_to_finite_limits_and_round_trip() {
        let (s, org) = store();
        let default = s.get_quota(&org).expect("quota");
        assert_eq!(default, Quota::default());
        assert!(default.max_concurrent_sandboxes.is_some());
        assert!(default.max_artifact_bytes.is_some());
        assert!(default.max_concurrent_commands.is_some());
        let quota = Quota {
            max_concurrent_sandboxes: Some(2),
            max_artifact_bytes: Some(1 << 20),
            max_concurrent_commands: None,
            ..Quota::default()
        };
        s.set_quota(&org, &quota).expect("set");
        assert_eq!(s.get_quota(&org).expect("quota"), quota);
    }
}
