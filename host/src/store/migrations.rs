//! Schema migrations: an append-only list, applied in one transaction each,
//! the applied count kept in `PRAGMA user_version`. Never edit a shipped
//! entry; add a new one.

use rusqlite::Connection;

use super::StoreError;

/// Every migration in order. Index + 1 is the schema version it produces.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenancy, keys, sandboxes, commands and command logs.
    r#"
    CREATE TABLE orgs (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE projects (
        id          TEXT PRIMARY KEY,
        org_id      TEXT NOT NULL REFERENCES orgs(id),
        name        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        UNIQUE (org_id, name)
    );
    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        org_id      TEXT NOT NULL REFERENCES orgs(id),
        project_id  TEXT REFERENCES projects(id),
        name        TEXT,
        prefix      TEXT NOT NULL,
        hash        BLOB NOT NULL UNIQUE,
        scopes      TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        revoked_at  INTEGER
    );
    CREATE TABLE sandboxes (
        id              TEXT PRIMARY KEY,
        org_id          TEXT NOT NULL REFERENCES orgs(id),
        project_id      TEXT REFERENCES projects(id),
        template        TEXT NOT NULL,
        template_hash   TEXT NOT NULL,
        status          TEXT NOT NULL,
        metadata        TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        expires_at      INTEGER NOT NULL,
        ended_at        INTEGER,
        end_reason      TEXT,
        uid_slot        INTEGER NOT NULL,
        vcpus           INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        created_by_key  TEXT NOT NULL
    );
    CREATE INDEX sandboxes_by_org ON sandboxes (org_id, created_at DESC, id DESC);
    CREATE UNIQUE INDEX sandboxes_live_slot ON sandboxes (uid_slot) WHERE status <> 'destroyed';
    CREATE TABLE commands (
        id                   TEXT PRIMARY KEY,
        sandbox_id           TEXT NOT NULL REFERENCES sandboxes(id),
        org_id               TEXT NOT NULL REFERENCES orgs(id),
        command              TEXT NOT NULL,
        cwd                  TEXT NOT NULL,
        env                  TEXT NOT NULL,
        background           INTEGER NOT NULL,
        status               TEXT NOT NULL,
        exit_code            INTEGER,
        signal               INTEGER,
        stdout               BLOB NOT NULL,
        stderr               BLOB NOT NULL,
        stdout_dropped       INTEGER NOT NULL DEFAULT 0,
        stderr_dropped       INTEGER NOT NULL DEFAULT 0,
        timeout_ms           INTEGER,
        created_at           INTEGER NOT NULL,
        started_at           INTEGER,
        ended_at             INTEGER,
        cancel_requested_at  INTEGER,
        error                TEXT,
        created_by_key       TEXT NOT NULL
    );
    CREATE INDEX commands_by_sandbox ON commands (sandbox_id, created_at DESC, id DESC);
    CREATE INDEX commands_running ON commands (status) WHERE status = 'running';
    CREATE TABLE command_events (
        command_id  TEXT NOT NULL REFERENCES commands(id),
        seq         INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        data        BLOB NOT NULL,
        at          INTEGER NOT NULL,
        PRIMARY KEY (command_id, seq)
    ) WITHOUT ROWID;
    "#,
    // 2: staged transfers, idempotency records, audit events, metering,
    // quotas and artifacts.
    r#"
    CREATE TABLE transfers (
        id          TEXT PRIMARY KEY,
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id),
        org_id      TEXT NOT NULL REFERENCES orgs(id),
        kind        TEXT NOT NULL,
        path        TEXT NOT NULL,
        max_bytes   INTEGER,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER
    );
    CREATE TABLE idempotency_records (
        org_id        TEXT NOT NULL,
        key           TEXT NOT NULL,
        method        TEXT NOT NULL,
        path          TEXT NOT NULL,
        request_hash  BLOB NOT NULL,
        status        INTEGER,
        content_type  TEXT,
        body          BLOB,
        created_at    INTEGER NOT NULL,
        completed_at  INTEGER,
        PRIMARY KEY (org_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_by_age ON idempotency_records (created_at);
    CREATE TABLE audit_events (
        id             TEXT PRIMARY KEY,
        at             INTEGER NOT NULL,
        org_id         TEXT,
        project_id     TEXT,
        actor_key_id   TEXT,
        actor          TEXT NOT NULL,
        action         TEXT NOT NULL,
        resource_type  TEXT,
        resource_id    TEXT,
        outcome        TEXT NOT NULL,
        status         INTEGER,
        request_id     TEXT,
        details        TEXT NOT NULL
    );
    CREATE INDEX audit_by_org ON audit_events (org_id, at DESC, id DESC);
    CREATE INDEX audit_by_resource ON audit_events (resource_id);
    ALTER TABLE sandboxes ADD COLUMN metered_until INTEGER;
    ALTER TABLE sandboxes ADD COLUMN pricing_version TEXT NOT NULL DEFAULT '2026-11-01';
    CREATE TABLE quotas (
        org_id                    TEXT PRIMARY KEY REFERENCES orgs(id),
        max_concurrent_sandboxes  INTEGER,
        max_compute_unit_seconds  INTEGER,
        max_artifact_bytes        INTEGER,
        max_request_body_bytes    INTEGER,
        max_command_output_bytes  INTEGER
    );
    CREATE TABLE artifacts (
        id              TEXT PRIMARY KEY,
        org_id          TEXT NOT NULL REFERENCES orgs(id),
        project_id      TEXT REFERENCES projects(id),
        sandbox_id      TEXT NOT NULL REFERENCES sandboxes(id),
        source_path     TEXT NOT NULL,
        name            TEXT NOT NULL,
        sha256          TEXT NOT NULL,
        size            INTEGER NOT NULL,
        mime            TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        created_by_key  TEXT NOT NULL
    );
    CREATE INDEX artifacts_by_org ON artifacts (org_id, created_at DESC, id DESC);
    CREATE INDEX artifacts_by_sandbox ON artifacts (sandbox_id, created_at DESC, id DESC);
    "#,
    // 3: a command's requested `collect` paths and their promotion results.
    r#"
    ALTER TABLE commands ADD COLUMN collect TEXT;
    ALTER TABLE commands ADD COLUMN collected TEXT;
    "#,
    // 4: previews (a sandbox port exposed as an authenticated URL).
    r#"
    CREATE TABLE previews (
        id TEXT PRIMARY KEY,
        org_id TEXT NOT NULL,
        project_id TEXT,
        sandbox_id TEXT NOT NULL,
        port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        status TEXT NOT NULL CHECK (status IN ('active', 'closed')),
        token_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        closed_at INTEGER,
        close_reason TEXT,
        created_by_key TEXT NOT NULL
    );
    CREATE UNIQUE INDEX previews_active_port ON previews (sandbox_id, port)
        WHERE status = 'active';
    CREATE INDEX previews_by_sandbox ON previews (org_id, sandbox_id, created_at, id);
    "#,
    // 5: idempotency records belong to the API key that sent them (a
    // replay is authorised like the first request); records of before are
    // dropped (they live 24 hours and could be replayed by any key).
    r#"
    DROP TABLE idempotency_records;
    CREATE TABLE idempotency_records (
        org_id        TEXT NOT NULL,
        key_id        TEXT NOT NULL,
        key           TEXT NOT NULL,
        method        TEXT NOT NULL,
        path          TEXT NOT NULL,
        request_hash  BLOB NOT NULL,
        status        INTEGER,
        content_type  TEXT,
        body          BLOB,
        created_at    INTEGER NOT NULL,
        completed_at  INTEGER,
        PRIMARY KEY (org_id, key_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_by_age ON idempotency_records (created_at);
    "#,
    // 6: a quota on commands running at once; retention purges of audit
    // events and of the logs of destroyed sandboxes' commands.
    r#"
    ALTER TABLE quotas ADD COLUMN max_concurrent_commands INTEGER;
    CREATE INDEX audit_by_age ON audit_events (at);
    CREATE INDEX sandboxes_by_end ON sandboxes (ended_at) WHERE ended_at IS NOT NULL;
    "#,
    // 7: sandboxes survive a host restart: which runtime runs each one;
    // how far each running command's output is recorded (the agent replays
    // from there) and whether its stdin is open; the code contexts of live
    // sandboxes.
    r#"
    ALTER TABLE sandboxes ADD COLUMN runtime TEXT NOT NULL DEFAULT 'oci';
    ALTER TABLE commands ADD COLUMN stdout_offset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE commands ADD COLUMN stderr_offset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE commands ADD COLUMN stdin INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE code_contexts (
        id              TEXT PRIMARY KEY,
        sandbox_id      TEXT NOT NULL REFERENCES sandboxes (id),
        language        TEXT NOT NULL,
        cwd             TEXT NOT NULL,
        implementation  TEXT NOT NULL,
        is_default      INTEGER NOT NULL,
        created_at      INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX code_contexts_by_sandbox ON code_contexts (sandbox_id);
    "#,
    // 8: Workspace Runs and their event logs; a staged transfer names either
    // a sandbox (a file) or a run (its archive).
    r#"
    CREATE TABLE workspace_runs (
        id                TEXT PRIMARY KEY,
        org_id            TEXT NOT NULL REFERENCES orgs (id),
        project_id        TEXT,
        created_by_key    TEXT NOT NULL,
        template          TEXT NOT NULL,
        command           TEXT NOT NULL,
        env               TEXT NOT NULL,
        archive_size      INTEGER NOT NULL,
        archive_sha256    TEXT NOT NULL,
        archive_uploaded  INTEGER NOT NULL DEFAULT 0,
        artifacts         TEXT NOT NULL,
        collected         TEXT NOT NULL DEFAULT '[]',
        timeout_ms        INTEGER NOT NULL,
        keep_sandbox      INTEGER NOT NULL,
        metadata          TEXT NOT NULL,
        status            TEXT NOT NULL,
        reason            TEXT,
        sandbox_id        TEXT,
        command_id        TEXT,
        command_seq       INTEGER NOT NULL DEFAULT 0,
        exit_code         INTEGER,
        created_at        INTEGER NOT NULL,
        started_at        INTEGER,
        ended_at          INTEGER,
        evidence          BLOB
    );
    CREATE INDEX workspace_runs_by_org ON workspace_runs (org_id, created_at DESC, id DESC);
    CREATE INDEX workspace_runs_unfinished ON workspace_runs (status)
        WHERE status IN ('queued', 'extracting', 'running');
    CREATE TABLE workspace_run_events (
        run_id  TEXT NOT NULL REFERENCES workspace_runs (id),
        seq     INTEGER NOT NULL,
        at      INTEGER NOT NULL,
        body    TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE transfers_v8 (
        id          TEXT PRIMARY KEY,
        sandbox_id  TEXT REFERENCES sandboxes (id),
        run_id      TEXT REFERENCES workspace_runs (id),
        org_id      TEXT NOT NULL REFERENCES orgs (id),
        kind        TEXT NOT NULL,
        path        TEXT NOT NULL,
        max_bytes   INTEGER,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER,
        CHECK ((sandbox_id IS NULL) <> (run_id IS NULL))
    );
    INSERT INTO transfers_v8 (id, sandbox_id, run_id, org_id, kind, path, max_bytes,
                              created_at, expires_at, used_at)
        SELECT id, sandbox_id, NULL, org_id, kind, path, max_bytes, created_at, expires_at, used_at
        FROM transfers;
    DROP TABLE transfers;
    ALTER TABLE transfers_v8 RENAME TO transfers;
    "#,
    // 9: egress policy per sandbox (JSON: mode, allow, deny), its meters,
    // and its bytes per hour for usage.
    r#"
    ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT '{"mode":"none","allow":[],"deny":[]}';
    ALTER TABLE sandboxes ADD COLUMN egress_bytes_in INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN egress_bytes_out INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE egress_usage (
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id),
        hour        INTEGER NOT NULL,
        bytes_in    INTEGER NOT NULL DEFAULT 0,
        bytes_out   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sandbox_id, hour)
    ) WITHOUT ROWID;
    "#,
    // 10: the VMM of a microvm sandbox (`qemu`, `crosvm`); NULL for others.
    r#"
    ALTER TABLE sandboxes ADD COLUMN vmm TEXT;
    "#,
    // 11: the sandbox's own environment (`env` at create), sealed with the
    // host's key: its values can be secrets.
    r#"
    ALTER TABLE sandboxes ADD COLUMN env_sealed BLOB;
    "#,
];

/// Brings the database to the newest schema. Each migration and its version
/// bump commit together, so a crash leaves a consistent version.
pub fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = index + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_to_an_empty_database_and_are_idempotent() {
        let mut conn = Connection::open_in_memory().expect("open");
        apply(&mut conn).expect("first apply");
        apply(&mut conn).expect("second apply is a no-op");
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn each_migration_is_valid_sql_on_its_predecessor() {
        let conn = Connection::open_in_memory().expect("open");
        for (index, sql) in MIGRATIONS.iter().enumerate() {
            conn.execute_batch(sql)
                .unwrap_or_else(|e| panic!("migration {} is invalid: {e}", index + 1));
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        conn.pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .expect("pragma");
        assert!(matches!(
            apply(&mut conn),
            Err(StoreError::SchemaTooNew { .. })
        ));
    }
}
