//! Workspace Runs and their event logs. Every change of a run's state is
//! written with the event that reports it, in one transaction, so the log
//! and the row never disagree; `seq` is assigned here, 1, 2, 3, … per run.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Cursor, Scope, SqliteStore, StoreError, codec};
use crate::clock::Millis;
use crate::model::{CollectItem, Metadata, RunArtifact, RunEventBody, RunReason, RunStatus};

/// A Workspace Run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceRunRow {
    pub id: String,
    pub org_id: String,
    pub project_id: Option<String>,
    pub created_by_key: String,
    pub template: String,
    pub command: String,
    pub env: Vec<(String, String)>,
    pub archive_size: i64,
    /// Lower-case hex.
    pub archive_sha256: String,
    pub archive_uploaded: bool,
    pub artifacts: Vec<CollectItem>,
    pub collected: Vec<RunArtifact>,
    pub timeout_ms: i64,
    pub keep_sandbox: bool,
    pub metadata: Metadata,
    pub status: RunStatus,
    pub reason: Option<RunReason>,
    pub sandbox_id: Option<String>,
    pub command_id: Option<String>,
    /// The command log event its output was copied up to (a restarted
    /// host follows the command on from there).
    pub command_seq: i64,
    pub exit_code: Option<i64>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub evidence_ready: bool,
}

/// One event of a run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEventRow {
    pub seq: i64,
    pub at: Millis,
    pub body: RunEventBody,
}

/// What a list of runs is narrowed to.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// Each `(key, value)` must match the metadata's top-level key (a
    /// string equal to `value`, or a number or boolean spelled so).
    pub metadata: Vec<(String, String)>,
}

pub trait WorkspaceRunStore {
    /// Inserts a new run (`awaiting_archive`, no events yet).
    fn insert_run(&self, run: &WorkspaceRunRow) -> Result<(), StoreError>;
    fn get_run(&self, scope: &Scope, id: &str) -> Result<Option<WorkspaceRunRow>, StoreError>;
    /// A run whatever its org (for the host's own work on it).
    fn get_run_unscoped(&self, id: &str) -> Result<Option<WorkspaceRunRow>, StoreError>;
    /// Newest first.
    fn list_runs(
        &self,
        scope: &Scope,
        filter: &RunFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<WorkspaceRunRow>, StoreError>;
    /// Records that a verified archive is in place; false when the run is
    /// no longer `awaiting_archive`.
    fn mark_archive_uploaded(&self, id: &str) -> Result<bool, StoreError>;
    /// `awaiting_archive` with its archive uploaded -> `queued`, with its
    /// status event; false when the run was not in that state.
    fn start_run(&self, id: &str, now: Millis) -> Result<bool, StoreError>;
    /// Moves an unfinished run to `status` (not a terminal one), with its
    /// status event; false when the run is terminal already.
    fn advance_run(&self, id: &str, status: RunStatus, now: Millis) -> Result<bool, StoreError>;
    fn set_run_sandbox(&self, id: &str, sandbox_id: &str) -> Result<(), StoreError>;
    fn set_run_command(&self, id: &str, command_id: &str) -> Result<(), StoreError>;
    /// Appends events to an unfinished run's log (and, with
    /// `command_seq`, records how far the command's log was copied, in the
    /// same transaction); returns the last seq, or `None` when the run is
    /// terminal (nothing is appended after `terminal`).
    fn append_run_events(
        &self,
        id: &str,
        events: &[(Millis, RunEventBody)],
        command_seq: Option<i64>,
    ) -> Result<Option<i64>, StoreError>;
    /// Ends an unfinished run: its end state, what was collected, and the
    /// `terminal` event (built by `terminal` from the seq it will have),
    /// in one transaction. `None` when it had ended already.
    fn finish_run(&self, id: &str, end: &RunEnd) -> Result<Option<RunEventRow>, StoreError>;
    fn set_run_evidence(&self, id: &str, bundle: &[u8]) -> Result<(), StoreError>;
    /// The stored Evidence Bundle of a run the scope may see.
    fn run_evidence(&self, scope: &Scope, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Events with `seq > after`, in order, at most `limit`.
    fn run_events(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RunEventRow>, StoreError>;
    /// Runs a previous process left `queued`, `extracting` or `running`,
    /// and terminal runs whose evidence was never written.
    fn unfinished_runs(&self) -> Result<Vec<WorkspaceRunRow>, StoreError>;
}

/// How a run ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub reason: Option<RunReason>,
    pub exit_code: Option<i64>,
    pub ended_at: Millis,
    pub collected: Vec<RunArtifact>,
    pub terminal: RunEventBody,
}

const TERMINAL: &str = "('succeeded', 'failed', 'canceled')";

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<WorkspaceRunRow> {
    let corrupt = |e: StoreError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(WorkspaceRunRow {
        id: row.get("id")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        created_by_key: row.get("created_by_key")?,
        template: row.get("template")?,
        command: row.get("command")?,
        env: codec::env_from_sql(&row.get::<_, String>("env")?).map_err(corrupt)?,
        archive_size: row.get("archive_size")?,
        archive_sha256: row.get("archive_sha256")?,
        archive_uploaded: row.get("archive_uploaded")?,
        artifacts: codec::collect_from_sql(Some(row.get("artifacts")?)).map_err(corrupt)?,
        collected: codec::run_artifacts_from_sql(&row.get::<_, String>("collected")?)
            .map_err(corrupt)?,
        timeout_ms: row.get("timeout_ms")?,
        keep_sandbox: row.get("keep_sandbox")?,
        metadata: codec::metadata_from_sql(&row.get::<_, String>("metadata")?).map_err(corrupt)?,
        status: row.get("status")?,
        reason: row.get("reason")?,
        sandbox_id: row.get("sandbox_id")?,
        command_id: row.get("command_id")?,
        command_seq: row.get("command_seq")?,
        exit_code: row.get("exit_code")?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        ended_at: row.get("ended_at")?,
        evidence_ready: row.get("evidence_ready")?,
    })
}

const SELECT: &str = "SELECT id, org_id, project_id, created_by_key, template, command, env,
    archive_size, archive_sha256, archive_uploaded, artifacts, collected, timeout_ms,
    keep_sandbox, metadata, status, reason, sandbox_id, command_id, command_seq, exit_code,
    created_at,
    started_at, ended_at, evidence IS NOT NULL AS evidence_ready FROM workspace_runs";

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<RunEventRow> {
    let body: String = row.get("body")?;
    Ok(RunEventRow {
        seq: row.get("seq")?,
        at: row.get("at")?,
        body: codec::run_event_from_sql(&body).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
    })
}

fn next_seq(conn: &Connection, id: &str) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM workspace_run_events WHERE run_id = ?1",
        )?
        .query_row([id], |r| r.get(0))?)
}

fn append(conn: &Connection, id: &str, at: Millis, body: &RunEventBody) -> Result<i64, StoreError> {
    let seq = next_seq(conn, id)?;
    conn.prepare_cached(
        "INSERT INTO workspace_run_events (run_id, seq, at, body) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, seq, at, codec::run_event_to_sql(body)])?;
    Ok(seq)
}

fn is_unfinished(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT 1 FROM workspace_runs WHERE id = ?1 AND status NOT IN {TERMINAL}"
        ))?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

impl WorkspaceRunStore for SqliteStore {
    fn insert_run(&self, r: &WorkspaceRunRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO workspace_runs (id, org_id, project_id, created_by_key, template,
                command, env, archive_size, archive_sha256, archive_uploaded, artifacts,
                collected, timeout_ms, keep_sandbox, metadata, status, reason, sandbox_id,
                command_id, exit_code, created_at, started_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            params![
                r.id,
                r.org_id,
                r.project_id,
                r.created_by_key,
                r.template,
                r.command,
                codec::env_to_sql(&r.env),
                r.archive_size,
                r.archive_sha256,
                r.archive_uploaded,
                codec::collect_to_sql(&r.artifacts).unwrap_or_else(|| String::from("[]")),
                codec::run_artifacts_to_sql(&r.collected),
                r.timeout_ms,
                r.keep_sandbox,
                codec::metadata_to_sql(&r.metadata),
                r.status,
                r.reason,
                r.sandbox_id,
                r.command_id,
                r.exit_code,
                r.created_at,
                r.started_at,
                r.ended_at
            ],
        )?;
        Ok(())
    }

    fn get_run(&self, scope: &Scope, id: &str) -> Result<Option<WorkspaceRunRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(&format!(
                "{SELECT} WHERE id = ?1 AND org_id = ?2 AND (?3 IS NULL OR project_id = ?3)"
            ))?
            .query_row(params![id, scope.org_id, scope.project_id], run_from_row)
            .optional()?)
    }

    fn get_run_unscoped(&self, id: &str) -> Result<Option<WorkspaceRunRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
            .query_row(params![id], run_from_row)
            .optional()?)
    }

    fn list_runs(
        &self,
        scope: &Scope,
        filter: &RunFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<WorkspaceRunRow>, StoreError> {
        // The metadata filters are bound as parameters; only their count
        // shapes the SQL text.
        let mut sql = format!(
            "{SELECT} WHERE org_id = ?1 AND (?2 IS NULL OR project_id = ?2)
             AND (?3 IS NULL OR status = ?3)
             AND (?5 IS NULL OR created_at < ?4 OR (created_at = ?4 AND id < ?5))"
        );
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![
            Box::new(scope.org_id.clone()),
            Box::new(scope.project_id.clone()),
            Box::new(filter.status),
            Box::new(after.map(|c| c.created_at)),
            Box::new(after.map(|c| c.id.clone())),
            Box::new(limit as i64),
        ];
        for (key, value) in &filter.metadata {
            // A JSON path label cannot hold a double quote: no metadata
            // key that has one can match.
            if key.contains('"') {
                return Ok(Vec::new());
            }
            let path = values.len() + 1;
            sql.push_str(&format!(
                " AND CAST(json_extract(metadata, ?{path}) AS TEXT) = ?{}",
                path + 1
            ));
            values.push(Box::new(format!("$.\"{key}\"")));
            values.push(Box::new(value.clone()));
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?6");
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let params: Vec<&dyn rusqlite::ToSql> = values.iter().map(|v| v.as_ref()).collect();
        let rows = stmt.query_map(params.as_slice(), run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_archive_uploaded(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "UPDATE workspace_runs SET archive_uploaded = 1
                 WHERE id = ?1 AND status = 'awaiting_archive'",
            )?
            .execute([id])?
            == 1)
    }

    fn start_run(&self, id: &str, now: Millis) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx
            .prepare_cached(
                "UPDATE workspace_runs SET status = 'queued', started_at = ?2
                 WHERE id = ?1 AND status = 'awaiting_archive' AND archive_uploaded = 1",
            )?
            .execute(params![id, now])?;
        if changed != 1 {
            return Ok(false);
        }
        append(
            &tx,
            id,
            now,
            &RunEventBody::Status {
                status: RunStatus::Queued,
                reason: None,
            },
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn advance_run(&self, id: &str, status: RunStatus, now: Millis) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx
            .prepare_cached(&format!(
                "UPDATE workspace_runs SET status = ?2 WHERE id = ?1 AND status NOT IN {TERMINAL}"
            ))?
            .execute(params![id, status])?;
        if changed != 1 {
            return Ok(false);
        }
        append(
            &tx,
            id,
            now,
            &RunEventBody::Status {
                status,
                reason: None,
            },
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn set_run_sandbox(&self, id: &str, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE workspace_runs SET sandbox_id = ?2 WHERE id = ?1")?
            .execute(params![id, sandbox_id])?;
        Ok(())
    }

    fn set_run_command(&self, id: &str, command_id: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE workspace_runs SET command_id = ?2 WHERE id = ?1")?
            .execute(params![id, command_id])?;
        Ok(())
    }

    fn append_run_events(
        &self,
        id: &str,
        events: &[(Millis, RunEventBody)],
        command_seq: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if !is_unfinished(&tx, id)? {
            return Ok(None);
        }
        let mut last = next_seq(&tx, id)? - 1;
        for (at, body) in events {
            last = append(&tx, id, *at, body)?;
        }
        if let Some(seq) = command_seq {
            tx.prepare_cached("UPDATE workspace_runs SET command_seq = ?2 WHERE id = ?1")?
                .execute(params![id, seq])?;
        }
        tx.commit()?;
        Ok(Some(last))
    }

    fn finish_run(&self, id: &str, end: &RunEnd) -> Result<Option<RunEventRow>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx
            .prepare_cached(&format!(
                "UPDATE workspace_runs SET status = ?2, reason = ?3, exit_code = ?4,
                    ended_at = ?5, collected = ?6
                 WHERE id = ?1 AND status NOT IN {TERMINAL}"
            ))?
            .execute(params![
                id,
                end.status,
                end.reason,
                end.exit_code,
                end.ended_at,
                codec::run_artifacts_to_sql(&end.collected)
            ])?;
        if changed != 1 {
            return Ok(None);
        }
        let seq = append(&tx, id, end.ended_at, &end.terminal)?;
        tx.commit()?;
        Ok(Some(RunEventRow {
            seq,
            at: end.ended_at,
            body: end.terminal.clone(),
        }))
    }

    fn set_run_evidence(&self, id: &str, bundle: &[u8]) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE workspace_runs SET evidence = ?2 WHERE id = ?1")?
            .execute(params![id, bundle])?;
        Ok(())
    }

    fn run_evidence(&self, scope: &Scope, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT evidence FROM workspace_runs
                 WHERE id = ?1 AND org_id = ?2 AND (?3 IS NULL OR project_id = ?3)",
            )?
            .query_row(params![id, scope.org_id, scope.project_id], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()?
            .flatten())
    }

    fn run_events(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RunEventRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at, body FROM workspace_run_events
             WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![id, after, limit as i64], event_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn unfinished_runs(&self) -> Result<Vec<WorkspaceRunRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SELECT} WHERE status IN ('queued', 'extracting', 'running')
             OR (status IN {TERMINAL} AND evidence IS NULL)
             ORDER BY created_at"
        ))?;
        let rows = stmt.query_map([], run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn run(store: &SqliteStore, id: &str, at: Millis, metadata: serde_json::Value) -> Scope {
        let org = store.ensure_org("acme", 0).expect("org");
        let serde_json::Value::Object(metadata) = metadata else {
            panic!("object")
        };
        store
            .insert_run(&WorkspaceRunRow {
                id: id.to_string(),
                org_id: org.id.clone(),
                project_id: None,
                created_by_key: String::from("key_x"),
                template: String::from("python-node"),
                command: String::from("true"),
                env: vec![(String::from("CI"), String::from("1"))],
                archive_size: 10,
                archive_sha256: "0".repeat(64),
                archive_uploaded: false,
                artifacts: vec![CollectItem {
                    path: String::from("out.txt"),
                    name: None,
                }],
                collected: Vec::new(),
                timeout_ms: 1000,
                keep_sandbox: false,
                metadata,
                status: RunStatus::AwaitingArchive,
                reason: None,
                sandbox_id: None,
                command_id: None,
                command_seq: 0,
                exit_code: None,
                created_at: at,
                started_at: None,
                ended_at: None,
                evidence_ready: false,
            })
            .expect("insert");
        Scope {
            org_id: org.id,
            project_id: None,
        }
    }

    fn end() -> RunEnd {
        RunEnd {
            status: RunStatus::Succeeded,
            reason: None,
            exit_code: Some(0),
            ended_at: 9,
            collected: Vec::new(),
            terminal: RunEventBody::Terminal {
                status: RunStatus::Succeeded,
                reason: None,
                exit_code: Some(0),
                ended_at: String::from("t"),
            },
        }
    }

    #[test]
    fn a_run_starts_once_and_only_after_its_upload() {
        let store = SqliteStore::open_in_memory().expect("store");
        let scope = run(&store, "wsr_a", 1, serde_json::json!({}));
        assert!(!store.start_run("wsr_a", 2).expect("start"));
        assert!(store.mark_archive_uploaded("wsr_a").expect("upload"));
        assert!(store.start_run("wsr_a", 2).expect("start"));
        assert!(!store.start_run("wsr_a", 3).expect("second start"));
        assert!(!store.mark_archive_uploaded("wsr_a").expect("late upload"));
        let row = store.get_run(&scope, "wsr_a").expect("get").expect("row");
        assert_eq!(row.status, RunStatus::Queued);
        assert_eq!(row.started_at, Some(2));
    }

    #[test]
    fn events_are_numbered_without_gaps_and_stop_at_the_terminal_one() {
        let store = SqliteStore::open_in_memory().expect("store");
        run(&store, "wsr_a", 1, serde_json::json!({}));
        store.mark_archive_uploaded("wsr_a").expect("upload");
        store.start_run("wsr_a", 2).expect("start");
        assert!(
            store
                .advance_run("wsr_a", RunStatus::Running, 3)
                .expect("advance")
        );
        let out = |s: &str| {
            (
                4,
                RunEventBody::Stdout {
                    data: s.to_string(),
                },
            )
        };
        assert_eq!(
            store
                .append_run_events("wsr_a", &[out("a"), out("b")], Some(7))
                .expect("append"),
            Some(4)
        );
        let scope = Scope {
            org_id: store.find_org("acme").expect("org").expect("org").id,
            project_id: None,
        };
        let row = store.get_run(&scope, "wsr_a").expect("get").expect("row");
        assert_eq!(row.command_seq, 7);
        let terminal = store.finish_run("wsr_a", &end()).expect("finish");
        assert_eq!(terminal.map(|t| t.seq), Some(5));
        assert_eq!(store.finish_run("wsr_a", &end()).expect("again"), None);
        assert_eq!(
            store
                .append_run_events("wsr_a", &[out("late")], None)
                .expect("append"),
            None
        );
        assert!(
            !store
                .advance_run("wsr_a", RunStatus::Running, 5)
                .expect("advance")
        );
        let events = store.run_events("wsr_a", 0, 100).expect("events");
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(store.run_events("wsr_a", 3, 1).expect("window")[0].seq, 4);
        // Terminal without evidence: still unfinished business.
        assert_eq!(store.unfinished_runs().expect("unfinished").len(), 1);
        store.set_run_evidence("wsr_a", b"{}").expect("evidence");
        assert!(store.unfinished_runs().expect("unfinished").is_empty());
    }

    #[test]
    fn runs_filter_by_status_and_metadata() {
        let store = SqliteStore::open_in_memory().expect("store");
        let scope = run(
            &store,
            "wsr_a",
            1,
            serde_json::json!({"repo": "acme/app", "pr": 7}),
        );
        run(&store, "wsr_b", 2, serde_json::json!({"repo": "acme/web"}));
        let list = |filter: RunFilter| -> Vec<String> {
            store
                .list_runs(&scope, &filter, None, 10)
                .expect("list")
                .into_iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(list(RunFilter::default()), ["wsr_b", "wsr_a"]);
        let by = |k: &str, v: &str| RunFilter {
            status: None,
            metadata: vec![(k.to_string(), v.to_string())],
        };
        assert_eq!(list(by("repo", "acme/app")), ["wsr_a"]);
        assert_eq!(list(by("pr", "7")), ["wsr_a"]);
        assert!(list(by("repo", "nope")).is_empty());
        assert!(list(by("a\"b", "x")).is_empty());
        let queued = RunFilter {
            status: Some(RunStatus::Queued),
            metadata: Vec::new(),
        };
        assert!(list(queued).is_empty());
    }
}
