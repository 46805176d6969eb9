//! The SQLite implementation of [`Store`]: one connection in WAL mode behind
//! a mutex. Writes are short single statements or one transaction, so one
//! connection keeps up with the host's rate and gives a total order.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::codec::{self, LOG_EXIT, SqlText};
use super::{
    CommandEnd, CommandEventRow, CommandRow, ContextRow, Cursor, KeyListing, KeyRow, LogBody,
    OrgRow, OutputProgress, ProjectRow, SandboxFilter, SandboxRow, Scope, Store, StoreError,
    migrations,
};
use crate::clock::Millis;
use crate::ids;
use crate::model::{EndReason, OutputStream, SandboxStatus};

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store for unit tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        // WAL with synchronous=NORMAL: a commit is in the WAL before the
        // call returns, so a crash of the host process loses nothing
        // committed; only an OS crash or power loss can drop the last
        // transactions (the WAL is fsynced at checkpoints). FULL would fsync
        // every commit and cost milliseconds per API call.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement is prepared once and cached (parsing one costs
        // more than running it); room for all of them.
        conn.set_prepared_statement_cache_capacity(128);
        migrations::apply(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A column whose structured content does not decode.
pub(super) fn corrupt(column: usize, error: StoreError) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        Box::new(std::io::Error::other(error.to_string())),
    )
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| String::from("[]"))
}

fn org_from_row(r: &Row<'_>) -> rusqlite::Result<OrgRow> {
    Ok(OrgRow {
        id: r.get("id")?,
        name: r.get("name")?,
        created_at: r.get("created_at")?,
    })
}

fn project_from_row(r: &Row<'_>) -> rusqlite::Result<ProjectRow> {
    Ok(ProjectRow {
        id: r.get("id")?,
        org_id: r.get("org_id")?,
        name: r.get("name")?,
        created_at: r.get("created_at")?,
    })
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRow> {
    let scopes: String = row.get("scopes")?;
    Ok(KeyRow {
        id: row.get("id")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        name: row.get("name")?,
        prefix: row.get("prefix")?,
        hash: row.get("hash")?,
        scopes: serde_json::from_str(&scopes).unwrap_or_default(),
        created_at: row.get("created_at")?,
        revoked_at: row.get("revoked_at")?,
    })
}

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        id: row.get("id")?,
        org_id: row.get("org_id")?,
        project_id: row.get("project_id")?,
        template: row.get("template")?,
        template_hash: row.get("template_hash")?,
        status: row.get("status")?,
        metadata: codec::metadata_from_sql(&row.get::<_, String>("metadata")?)
            .map_err(|e| corrupt(0, e))?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        ended_at: row.get("ended_at")?,
        end_reason: row.get("end_reason")?,
        uid_slot: row.get("uid_slot")?,
        vcpus: row.get("vcpus")?,
        memory_mib: row.get("memory_mib")?,
        created_by_key: row.get("created_by_key")?,
        runtime: row.get("runtime")?,
        vmm: row.get("vmm")?,
        network: codec::network_from_sql(&row.get::<_, String>("network")?)
            .map_err(|e| corrupt(0, e))?,
        egress_bytes_in: row.get("egress_bytes_in")?,
        egress_bytes_out: row.get("egress_bytes_out")?,
        env_sealed: row.get("env_sealed")?,
    })
}

fn command_from_row(row: &Row<'_>) -> rusqlite::Result<CommandRow> {
    Ok(CommandRow {
        id: row.get("id")?,
        sandbox_id: row.get("sandbox_id")?,
        org_id: row.get("org_id")?,
        command: row.get("command")?,
        cwd: row.get("cwd")?,
        env: codec::env_from_sql(&row.get::<_, String>("env")?).map_err(|e| corrupt(0, e))?,
        background: row.get("background")?,
        status: row.get("status")?,
        exit_code: row.get("exit_code")?,
        signal: row.get("signal")?,
        stdout: row.get("stdout")?,
        stderr: row.get("stderr")?,
        stdout_dropped: row.get("stdout_dropped")?,
        stderr_dropped: row.get("stderr_dropped")?,
        timeout_ms: row.get("timeout_ms")?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        ended_at: row.get("ended_at")?,
        cancel_requested_at: row.get("cancel_requested_at")?,
        error: row.get("error")?,
        created_by_key: row.get("created_by_key")?,
        collect: codec::collect_from_sql(row.get("collect")?).map_err(|e| corrupt(0, e))?,
        collected: codec::collected_from_sql(row.get("collected")?).map_err(|e| corrupt(0, e))?,
        stdin: row.get("stdin")?,
        stdout_offset: row.get("stdout_offset")?,
        stderr_offset: row.get("stderr_offset")?,
    })
}

fn context_from_row(row: &Row<'_>) -> rusqlite::Result<ContextRow> {
    Ok(ContextRow {
        id: row.get("id")?,
        sandbox_id: row.get("sandbox_id")?,
        language: row.get("language")?,
        cwd: row.get("cwd")?,
        implementation: row.get("implementation")?,
        is_default: row.get("is_default")?,
        created_at: row.get("created_at")?,
    })
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<CommandEventRow> {
    let kind: String = row.get("kind")?;
    let data: Vec<u8> = row.get("data")?;
    let body = if kind == LOG_EXIT {
        LogBody::Exit(codec::exit_from_sql(&data).map_err(|e| corrupt(0, e))?)
    } else {
        let stream = OutputStream::from_sql_text(&kind).ok_or_else(|| {
            corrupt(
                0,
                StoreError::Corrupt(format!("command event kind `{kind}`")),
            )
        })?;
        LogBody::Output { stream, data }
    };
    Ok(CommandEventRow {
        command_id: row.get("command_id")?,
        seq: row.get("seq")?,
        body,
        at: row.get("at")?,
    })
}

fn insert_events(conn: &Connection, events: &[CommandEventRow]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO command_events (command_id, seq, kind, data, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for event in events {
        let (kind, data) = match &event.body {
            LogBody::Output { stream, data } => (stream.sql(), std::borrow::Cow::Borrowed(data)),
            LogBody::Exit(exit) => (LOG_EXIT, std::borrow::Cow::Owned(codec::exit_to_sql(exit))),
        };
        stmt.execute(params![
            event.command_id,
            event.seq,
            kind,
            data.as_slice(),
            event.at
        ])?;
    }
    Ok(())
}

/// `(created_at, id) < cursor` in `(created_at DESC, id DESC)` order.
const BEFORE_CURSOR: &str = "(created_at < :c1 OR (created_at = :c1 AND id < :c2))";

impl Store for SqliteStore {
    fn ensure_org(&self, name: &str, now: Millis) -> Result<OrgRow, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING",
        )?
        .execute(params![ids::new(ids::Kind::Org), name, now])?;
        Ok(conn
            .prepare_cached("SELECT id, name, created_at FROM orgs WHERE name = ?1")?
            .query_row([name], org_from_row)?)
    }

    fn find_org(&self, name: &str) -> Result<Option<OrgRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, name, created_at FROM orgs WHERE name = ?1")?
            .query_row([name], org_from_row)
            .optional()?)
    }

    fn ensure_project(
        &self,
        org_id: &str,
        name: &str,
        now: Millis,
    ) -> Result<ProjectRow, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO projects (id, org_id, name, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (org_id, name) DO NOTHING",
        )?
        .execute(params![ids::new(ids::Kind::Project), org_id, name, now])?;
        Ok(conn
            .prepare_cached(
                "SELECT id, org_id, name, created_at FROM projects WHERE org_id = ?1 AND name = ?2",
            )?
            .query_row([org_id, name], project_from_row)?)
    }

    fn get_project(&self, id: &str) -> Result<Option<ProjectRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, org_id, name, created_at FROM projects WHERE id = ?1")?
            .query_row([id], project_from_row)
            .optional()?)
    }

    fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO api_keys (id, org_id, project_id, name, prefix, hash, scopes,
                    created_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                key.id,
                key.org_id,
                key.project_id,
                key.name,
                key.prefix,
                key.hash,
                json_list(&key.scopes),
                key.created_at,
                key.revoked_at
            ])?;
        Ok(())
    }

    fn find_key_by_hash(&self, hash: &[u8]) -> Result<Option<KeyRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT * FROM api_keys WHERE hash = ?1")?;
        Ok(stmt.query_row([hash], key_from_row).optional()?)
    }

    fn get_key(&self, id: &str) -> Result<Option<KeyRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT * FROM api_keys WHERE id = ?1")?;
        Ok(stmt.query_row([id], key_from_row).optional()?)
    }

    fn list_keys(&self) -> Result<Vec<KeyListing>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT k.*, o.name AS org_name, p.name AS project_name
             FROM api_keys k JOIN orgs o ON o.id = k.org_id
             LEFT JOIN projects p ON p.id = k.project_id
             ORDER BY k.created_at, k.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(KeyListing {
                key: key_from_row(r)?,
                org_name: r.get("org_name")?,
                project_name: r.get("project_name")?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_key(&self, id: &str, now: Millis) -> Result<bool, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        )?
        .execute(params![id, now])?;
        let exists: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM api_keys WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(exists.is_some())
    }

    fn insert_sandbox(&self, s: &SandboxRow) -> Result<(), StoreError> {
        let result = self
            .conn()
            .prepare_cached(
                "INSERT INTO sandboxes (id, org_id, project_id, template, template_hash, status,
                    metadata, created_at, expires_at, ended_at, end_reason, uid_slot, vcpus,
                    memory_mib, created_by_key, runtime, network, vmm, env_sealed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            )?
            .execute(params![
                s.id,
                s.org_id,
                s.project_id,
                s.template,
                s.template_hash,
                s.status,
                codec::metadata_to_sql(&s.metadata),
                s.created_at,
                s.expires_at,
                s.ended_at,
                s.end_reason,
                s.uid_slot,
                s.vcpus,
                s.memory_mib,
                s.created_by_key,
                s.runtime,
                codec::network_to_sql(&s.network),
                s.vmm,
                s.env_sealed,
            ]);
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!("uid slot {}", s.uid_slot)))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn get_sandbox(&self, scope: &Scope, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM sandboxes WHERE id = ?1 AND org_id = ?2
             AND (?3 IS NULL OR project_id = ?3)",
        )?;
        Ok(stmt
            .query_row(
                params![id, scope.org_id, scope.project_id],
                sandbox_from_row,
            )
            .optional()?)
    }

    fn list_sandboxes(
        &self,
        scope: &Scope,
        filter: &SandboxFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<SandboxRow>, StoreError> {
        use rusqlite::types::Value;
        let mut sql = String::from(
            "SELECT * FROM sandboxes WHERE org_id = ?1 AND (?2 IS NULL OR project_id = ?2)",
        );
        let mut values: Vec<Value> = vec![
            Value::Text(scope.org_id.clone()),
            scope.project_id.clone().map_or(Value::Null, Value::Text),
        ];
        let mut bind = |sql: &mut String, clause: &str, params: Vec<Value>| {
            let mut clause = clause.to_string();
            for (i, value) in params.into_iter().enumerate() {
                values.push(value);
                clause = clause.replace(&format!("${}", i + 1), &format!("?{}", values.len()));
            }
            sql.push_str(" AND ");
            sql.push_str(&clause);
        };
        if let Some(status) = filter.status {
            bind(
                &mut sql,
                "status = $1",
                vec![Value::Text(status.sql().into())],
            );
        }
        if let Some(template) = &filter.template {
            bind(
                &mut sql,
                "template = $1",
                vec![Value::Text(template.clone())],
            );
        }
        for (key, value) in &filter.metadata {
            // A scalar's text: strings as they are, numbers, booleans and
            // null as JSON writes them. Objects and arrays never match.
            bind(
                &mut sql,
                "EXISTS (SELECT 1 FROM json_each(sandboxes.metadata) j WHERE j.key = $1
                    AND CASE j.type WHEN 'text' THEN j.value
                        WHEN 'integer' THEN CAST(j.value AS TEXT)
                        WHEN 'real' THEN CAST(j.value AS TEXT)
                        WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
                        WHEN 'null' THEN 'null' END = $2)",
                vec![Value::Text(key.clone()), Value::Text(value.clone())],
            );
        }
        if let Some(t) = filter.created_after {
            bind(&mut sql, "created_at > $1", vec![Value::Integer(t)]);
        }
        if let Some(t) = filter.created_before {
            bind(&mut sql, "created_at < $1", vec![Value::Integer(t)]);
        }
        if let Some(c) = after {
            bind(
                &mut sql,
                "(created_at < $1 OR (created_at = $1 AND id < $2))",
                vec![Value::Integer(c.created_at), Value::Text(c.id.clone())],
            );
        }
        values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(
            " ORDER BY created_at DESC, id DESC LIMIT ?{}",
            values.len()
        ));
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(values), sandbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_sandbox_expiry(&self, id: &str, expires_at: Millis) -> Result<bool, StoreError> {
        let changed = self
            .conn()
            .prepare_cached(
                "UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1 AND status <> 'destroyed'",
            )?
            .execute(params![id, expires_at])?;
        Ok(changed == 1)
    }

    fn set_sandbox_status(&self, id: &str, status: SandboxStatus) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE sandboxes SET status = ?2 WHERE id = ?1 AND status <> 'destroyed'",
            )?
            .execute(params![id, status])?;
        Ok(())
    }

    fn set_sandbox_network(
        &self,
        id: &str,
        policy: &crate::egress::Policy,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE sandboxes SET network = ?2 WHERE id = ?1")?
            .execute(params![id, codec::network_to_sql(policy)])?;
        Ok(())
    }

    fn add_egress_bytes(
        &self,
        id: &str,
        bytes_in: u64,
        bytes_out: u64,
        now: Millis,
    ) -> Result<(), StoreError> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (bytes_in, bytes_out) = (clamp(bytes_in), clamp(bytes_out));
        let hour = now.div_euclid(crate::store::ledger::HOUR_MS) * crate::store::ledger::HOUR_MS;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE sandboxes SET egress_bytes_in = egress_bytes_in + ?2,
                egress_bytes_out = egress_bytes_out + ?3 WHERE id = ?1",
            params![id, bytes_in, bytes_out],
        )?;
        tx.execute(
            "INSERT INTO egress_usage (sandbox_id, hour, bytes_in, bytes_out)
                SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)
             ON CONFLICT (sandbox_id, hour) DO UPDATE SET
                bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out",
            params![id, hour, bytes_in, bytes_out],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn end_sandbox(&self, id: &str, reason: EndReason, now: Millis) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            // Metering runs to the end, except for a sandbox that died with
            // a previous host process: it is metered to its last heartbeat.
            "UPDATE sandboxes SET status = 'destroyed', ended_at = ?3, end_reason = ?2,
                metered_until = CASE WHEN ?2 = 'host_restart'
                                     THEN COALESCE(metered_until, created_at) ELSE ?3 END
             WHERE id = ?1 AND status <> 'destroyed'",
            params![id, reason, now],
        )?;
        // Its code contexts died with it.
        tx.prepare_cached("DELETE FROM code_contexts WHERE sandbox_id = ?1")?
            .execute([id])?;
        // Its previews end with it (they stay readable as closed).
        tx.prepare_cached(
            "UPDATE previews SET status = 'closed', closed_at = ?2,
                close_reason = 'sandbox_destroyed'
             WHERE sandbox_id = ?1 AND status = 'active'",
        )?
        .execute(params![id, now])?;
        tx.commit()?;
        Ok(())
    }

    fn sandbox_runtime(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT runtime FROM sandboxes WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    fn live_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM sandboxes WHERE status <> 'destroyed'")?;
        let rows = stmt.query_map([], sandbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn used_uid_slots(&self) -> Result<Vec<i64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT uid_slot FROM sandboxes WHERE status <> 'destroyed' ORDER BY uid_slot",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn live_template_hashes(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT template_hash FROM sandboxes WHERE status <> 'destroyed' ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_command(&self, c: &CommandRow) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO commands (id, sandbox_id, org_id, command, cwd, env, background,
                    status, exit_code, signal, stdout, stderr, stdout_dropped, stderr_dropped,
                    timeout_ms, created_at, started_at, ended_at, cancel_requested_at, error,
                    created_by_key, collect, stdin, stdout_offset, stderr_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
            )?
            .execute(params![
                c.id,
                c.sandbox_id,
                c.org_id,
                c.command,
                c.cwd,
                codec::env_to_sql(&c.env),
                c.background,
                c.status,
                c.exit_code,
                c.signal,
                c.stdout,
                c.stderr,
                c.stdout_dropped,
                c.stderr_dropped,
                c.timeout_ms,
                c.created_at,
                c.started_at,
                c.ended_at,
                c.cancel_requested_at,
                c.error,
                c.created_by_key,
                codec::collect_to_sql(&c.collect),
                c.stdin,
                c.stdout_offset,
                c.stderr_offset
            ])?;
        Ok(())
    }

    fn get_command(&self, sandbox_id: &str, id: &str) -> Result<Option<CommandRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT * FROM commands WHERE id = ?1 AND sandbox_id = ?2")?;
        Ok(stmt
            .query_row([id, sandbox_id], command_from_row)
            .optional()?)
    }

    fn list_commands(
        &self,
        sandbox_id: &str,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT * FROM commands WHERE sandbox_id = :s AND (:c2 IS NULL OR {BEFORE_CURSOR})
             ORDER BY created_at DESC, id DESC LIMIT :l"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            rusqlite::named_params! {
                ":s": sandbox_id,
                ":c1": after.map(|c| c.created_at),
                ":c2": after.map(|c| c.id.as_str()),
                ":l": limit as i64,
            },
            command_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_command_started(&self, id: &str, now: Millis) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE commands SET started_at = ?2 WHERE id = ?1 AND started_at IS NULL",
            )?
            .execute(params![id, now])?;
        Ok(())
    }

    fn request_command_cancel(&self, id: &str, now: Millis) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE commands SET cancel_requested_at = ?2
             WHERE id = ?1 AND cancel_requested_at IS NULL",
            )?
            .execute(params![id, now])?;
        Ok(())
    }

    fn finish_command(
        &self,
        id: &str,
        end: &CommandEnd,
        events: &[CommandEventRow],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_events(&tx, events)?;
        tx.prepare_cached(
            "UPDATE commands SET status = ?2, exit_code = ?3, signal = ?4, stdout = ?5,
                stderr = ?6, stdout_dropped = ?7, stderr_dropped = ?8, ended_at = ?9,
                error = ?10, collected = ?11, started_at = COALESCE(started_at, ?12)
             WHERE id = ?1",
        )?
        .execute(params![
            id,
            end.status,
            end.exit_code,
            end.signal,
            end.stdout,
            end.stderr,
            end.stdout_dropped,
            end.stderr_dropped,
            end.ended_at,
            end.error,
            codec::collected_to_sql(end.collected.as_deref()),
            end.started_at
        ])?;
        tx.commit()?;
        Ok(())
    }

    fn append_command_events(&self, events: &[CommandEventRow]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_events(&tx, events)?;
        tx.commit()?;
        Ok(())
    }

    fn record_command_output(
        &self,
        command_id: &str,
        events: &[CommandEventRow],
        progress: OutputProgress,
        keep_from: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_events(&tx, events)?;
        tx.prepare_cached(
            "UPDATE commands SET stdout_offset = ?2, stderr_offset = ?3 WHERE id = ?1",
        )?
        .execute(params![
            command_id,
            progress.stdout_offset,
            progress.stderr_offset
        ])?;
        if let Some(keep_from) = keep_from {
            tx.prepare_cached("DELETE FROM command_events WHERE command_id = ?1 AND seq < ?2")?
                .execute(params![command_id, keep_from])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn last_command_event_seq(&self, command_id: &str) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "SELECT COALESCE(MAX(seq), 0) FROM command_events WHERE command_id = ?1",
            )?
            .query_row([command_id], |r| r.get(0))?)
    }

    fn running_commands(&self, sandbox_id: &str) -> Result<Vec<CommandRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM commands WHERE sandbox_id = ?1 AND status = 'running'
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([sandbox_id], command_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_context(&self, c: &ContextRow) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO code_contexts (id, sandbox_id, language, cwd, implementation,
                    is_default, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                c.id,
                c.sandbox_id,
                c.language,
                c.cwd,
                c.implementation,
                c.is_default,
                c.created_at
            ])?;
        Ok(())
    }

    fn delete_context(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("DELETE FROM code_contexts WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    fn contexts_of(&self, sandbox_id: &str) -> Result<Vec<ContextRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM code_contexts WHERE sandbox_id = ?1 ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([sandbox_id], context_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn command_events(
        &self,
        command_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<CommandEventRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM command_events WHERE command_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![command_id, after, limit as i64], event_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn trim_command_events(&self, command_id: &str, keep_from: i64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("DELETE FROM command_events WHERE command_id = ?1 AND seq < ?2")?
            .execute(params![command_id, keep_from])?;
        Ok(())
    }

    fn purge_logs_of_destroyed(&self, before: Millis) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "DELETE FROM command_events WHERE command_id IN (
                    SELECT c.id FROM commands c JOIN sandboxes s ON s.id = c.sandbox_id
                    WHERE s.ended_at IS NOT NULL AND s.ended_at < ?1)",
            )?
            .execute([before])?)
    }

    fn fail_running_commands(
        &self,
        sandbox_id: &str,
        error: &str,
        now: Millis,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Close each log with an exit event, so a log reader sees the end.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO command_events (command_id, seq, kind, data, at)
                 SELECT c.id,
                     COALESCE((SELECT MAX(e.seq) FROM command_events e
                               WHERE e.command_id = c.id), 0) + 1,
                     'exit',
                     CAST(json_object('status', 'failed', 'exitCode', NULL, 'signal', NULL,
                                      'error', ?2) AS BLOB),
                     ?3
                 FROM commands c WHERE c.sandbox_id = ?1 AND c.status = 'running'",
        )?
        .execute(params![sandbox_id, error, now])?;
        let changed = tx
            .prepare_cached(
                "UPDATE commands SET status = 'failed', error = ?2, ended_at = ?3
             WHERE sandbox_id = ?1 AND status = 'running'",
            )?
            .execute(params![sandbox_id, error, now])?;
        tx.commit()?;
        Ok(changed)
    }

    fn insert_transfer(&self, transfer: &super::TransferRow) -> Result<(), StoreError> {
        super::transfers::insert(&self.conn(), transfer)
    }

    fn get_transfer(&self, id: &str) -> Result<Option<super::TransferRow>, StoreError> {
        super::transfers::get(&self.conn(), id)
    }

    fn claim_transfer(
        &self,
        id: &str,
        now: Millis,
    ) -> Result<Option<super::TransferRow>, StoreError> {
        super::transfers::claim(&self.conn(), id, now)
    }

    fn purge_transfers(&self, before: Millis) -> Result<usize, StoreError> {
        super::transfers::purge(&self.conn(), before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SqliteStore {
        SqliteStore::open_in_memory().expect("store")
    }

    fn sandbox(
        org: &str,
        project: Option<&str>,
        id: &str,
        created_at: Millis,
        slot: i64,
    ) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            org_id: org.into(),
            project_id: project.map(Into::into),
            template: "python".into(),
            template_hash: "h".into(),
            status: SandboxStatus::Running,
            metadata: Default::default(),
            created_at,
            expires_at: created_at + 1000,
            ended_at: None,
            end_reason: None,
            uid_slot: slot,
            vcpus: 1,
            memory_mib: 512,
            created_by_key: "key_x".into(),
            runtime: "oci".into(),
            vmm: None,
            network: crate::egress::Policy::none(),
            egress_bytes_in: 0,
            egress_bytes_out: 0,
            env_sealed: None,
        }
    }

    #[test]
    fn ensure_org_is_idempotent_by_name() {
        let s = store();
        let a = s.ensure_org("acme", 1).expect("org");
        let b = s.ensure_org("acme", 2).expect("org");
        assert_eq!(a, b);
    }

    #[test]
    fn list_sandboxes_applies_every_filter_and_pages_within_it() {
        let s = store();
        let org = s.ensure_org("acme", 0).expect("org");
        let scope = Scope {
            org_id: org.id.clone(),
            project_id: None,
        };
        for (i, (job, template, n)) in [
            ("demo", "python", serde_json::json!(1)),
            ("demo", "node", serde_json::json!(2.5)),
            ("other", "python", serde_json::json!(true)),
            ("demo", "python", serde_json::json!(null)),
        ]
        .into_iter()
        .enumerate()
        {
            let mut row = sandbox(&org.id, None, &format!("sbx_{i}"), 10 * i as i64, i as i64);
            row.template = template.into();
            row.metadata.insert("job".into(), job.into());
            row.metadata.insert("n".into(), n);
            row.metadata
                .insert("nested".into(), serde_json::json!({"a": 1}));
            s.insert_sandbox(&row).expect("insert");
        }
        s.end_sandbox("sbx_3", EndReason::Killed, 50).expect("end");
        let ids = |filter: SandboxFilter| -> Vec<String> {
            s.list_sandboxes(&scope, &filter, None, 10)
                .expect("list")
                .into_iter()
                .map(|r| r.id)
                .collect()
        };
        let meta = |pairs: &[(&str, &str)]| SandboxFilter {
            metadata: pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        };
        assert_eq!(ids(meta(&[("job", "demo")])), ["sbx_3", "sbx_1", "sbx_0"]);
        assert_eq!(ids(meta(&[("job", "demo"), ("n", "1")])), ["sbx_0"]);
        assert_eq!(ids(meta(&[("n", "2.5")])), ["sbx_1"]);
        assert_eq!(ids(meta(&[("n", "true")])), ["sbx_2"]);
        assert_eq!(ids(meta(&[("n", "null")])), ["sbx_3"]);
        assert!(ids(meta(&[("nested", "{\"a\":1}")])).is_empty());
        assert!(ids(meta(&[("job", "demo'; --")])).is_empty());
        assert!(ids(meta(&[("missing", "demo")])).is_empty());
        let running = SandboxFilter {
            status: Some(SandboxStatus::Running),
            template: Some("python".into()),
            ..Default::default()
        };
        assert_eq!(ids(running), ["sbx_2", "sbx_0"]);
        let window = SandboxFilter {
            created_after: Some(0),
            created_before: Some(30),
            ..Default::default()
        };
        assert_eq!(ids(window), ["sbx_2", "sbx_1"]);
        // A cursor pages within the filter.
        let filter = meta(&[("job", "demo")]);
        let first = s.list_sandboxes(&scope, &filter, None, 2).expect("page");
        let last = first.last().expect("row");
        let cursor = Cursor {
            created_at: last.created_at,
            id: last.id.clone(),
        };
        let rest = s
            .list_sandboxes(&scope, &filter, Some(&cursor), 2)
            .expect("page");
        assert_eq!(
            rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["sbx_0"]
        );
    }

    #[test]
    fn set_sandbox_expiry_moves_a_live_sandbox_only() {
        let s = store();
        let org = s.ensure_org("acme", 0).expect("org");
        s.insert_sandbox(&sandbox(&org.id, None, "sbx_a", 1, 0))
            .expect("insert");
        assert!(s.set_sandbox_expiry("sbx_a", 99_000).expect("set"));
        let scope = Scope {
            org_id: org.id,
            project_id: None,
        };
        let row = s.get_sandbox(&scope, "sbx_a").expect("get").expect("row");
        assert_eq!(row.expires_at, 99_000);
        s.end_sandbox("sbx_a", EndReason::Killed, 5).expect("end");
        assert!(!s.set_sandbox_expiry("sbx_a", 1).expect("set"));
        assert!(!s.set_sandbox_expiry("sbx_missing", 1).expect("set"));
    }

    #[test]
    fn get_sandbox_of_another_org_returns_none() {
        let s = store();
        let a = s.ensure_org("a", 0).expect("org");
        let b = s.ensure_org("b", 0).expect("org");
        s.insert_sandbox(&sandbox(&a.id, None, "sbx_1", 1, 0))
            .expect("insert");
        let scope_b = Scope {
            org_id: b.id,
            project_id: None,
        };
        assert!(s.get_sandbox(&scope_b, "sbx_1").expect("get").is_none());
    }

    #[test]
    fn project_restricted_scope_sees_only_its_project() {
        let s = store();
        let org = s.ensure_org("a", 0).expect("org");
        let p1 = s.ensure_project(&org.id, "one", 0).expect("p");
        let p2 = s.ensure_project(&org.id, "two", 0).expect("p");
        s.insert_sandbox(&sandbox(&org.id, Some(&p1.id), "sbx_1", 1, 0))
            .expect("insert");
        s.insert_sandbox(&sandbox(&org.id, Some(&p2.id), "sbx_2", 2, 1))
            .expect("insert");
        let scope = Scope {
            org_id: org.id.clone(),
            project_id: Some(p1.id),
        };
        assert!(s.get_sandbox(&scope, "sbx_2").expect("get").is_none());
        let listed = s
            .list_sandboxes(&scope, &SandboxFilter::default(), None, 10)
            .expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, "sbx_1");
    }

    #[test]
    fn list_sandboxes_pages_by_cursor_without_gaps_or_repeats() {
        let s = store();
        let org = s.ensure_org("a", 0).expect("org");
        for i in 0..5 {
            // Two share a timestamp to exercise the id tie-break.
            s.insert_sandbox(&sandbox(&org.id, None, &format!("sbx_{i}"), i / 2, i))
                .expect("insert");
        }
        let scope = Scope {
            org_id: org.id,
            project_id: None,
        };
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s
                .list_sandboxes(&scope, &SandboxFilter::default(), cursor.as_ref(), 2)
                .expect("page");
            if page.is_empty() {
                break;
            }
            let last = page.last().expect("last");
            cursor = Some(Cursor {
                created_at: last.created_at,
                id: last.id.clone(),
            });
            seen.extend(page.into_iter().map(|r| r.id));
        }
        assert_eq!(seen, ["sbx_4", "sbx_3", "sbx_2", "sbx_1", "sbx_0"]);
    }

    #[test]
    fn a_live_uid_slot_cannot_be_taken_twice_but_is_freed_by_end() {
        let s = store();
        let org = s.ensure_org("a", 0).expect("org");
        s.insert_sandbox(&sandbox(&org.id, None, "sbx_1", 1, 7))
            .expect("insert");
        assert!(matches!(
            s.insert_sandbox(&sandbox(&org.id, None, "sbx_2", 1, 7)),
            Err(StoreError::Conflict(_))
        ));
        s.end_sandbox("sbx_1", EndReason::Killed, 5).expect("end");
        s.insert_sandbox(&sandbox(&org.id, None, "sbx_2", 1, 7))
            .expect("slot reused");
        assert_eq!(s.used_uid_slots().expect("slots"), vec![7]);
    }

    #[test]
    fn revoke_key_reports_unknown_ids() {
        let s = store();
        assert!(!s.revoke_key("key_nope", 1).expect("revoke"));
    }
}
