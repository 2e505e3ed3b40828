//! The schema: its tables and indexes, and the forward-only migrations
//! that bring an older ledger up to date in place.

use crate::open::{map_err, with_path};
use idem_core::ports::StoreError;
use rusqlite::{params, Connection};
use std::path::Path;

/// `PRAGMA application_id` of an idem ledger: "idem" in ASCII.
pub(crate) const APPLICATION_ID: i64 = 0x6964_656d;
/// The schema version this build writes.
pub(crate) const LATEST: i64 = 8;

/// Forward-only migrations; entry `i` takes version `i` to `i + 1`.
///
/// CHECK constraints spell value lists as `x = 'a' OR x = 'b'`: SQLite
/// compiles `x IN ('a', 'b')` into an ephemeral table built on every row
/// written, which cost more than the rest of the write.
pub(crate) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    key              BLOB    NOT NULL UNIQUE CHECK (length(key) = 32),
    fingerprint      BLOB    NOT NULL,
    work_id          TEXT    NOT NULL,
    artifact_id      TEXT    NOT NULL,
    url              TEXT    NOT NULL,
    expected_sha256  TEXT,
    expected_type    TEXT,
    state            TEXT    NOT NULL CHECK (state = 'planned' OR state = 'leased' OR state = 'head_done' OR state = 'streaming' OR state = 'finalized' OR state = 'skipped_duplicate' OR state = 'failed'),
    lease_owner      TEXT,
    lease_epoch      INTEGER,
    lease_expires_at INTEGER,
    epoch            INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    due_at           INTEGER,
    last_error       TEXT,
    head             TEXT,
    blob_sha256      TEXT,
    blob_size        INTEGER,
    blob_path        TEXT,
    duplicate_of     BLOB,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    first_leased_at  INTEGER,
    finished_at      INTEGER
) STRICT;
CREATE INDEX jobs_due ON jobs (due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_finalized_url ON jobs (url) WHERE state = 'finalized';
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE ops (
    id          INTEGER PRIMARY KEY,
    job_key     BLOB    NOT NULL REFERENCES jobs (key),
    kind        TEXT    NOT NULL CHECK (kind = 'head' OR kind = 'stream' OR kind = 'finalize'),
    epoch       INTEGER NOT NULL,
    owner       TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status = 'started' OR status = 'committed' OR status = 'failed' OR status = 'abandoned'),
    result      TEXT,
    error       TEXT,
    runs        INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    UNIQUE (job_key, kind, epoch)
) STRICT;
CREATE INDEX ops_started ON ops (job_key) WHERE status = 'started';

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
INSERT INTO counters (name, value) VALUES ('fenced_writes', 0), ('replays', 0);
",
    r"
-- v2: ops point at their job by rowid, not by its 32-byte random key. Jobs
-- are leased roughly in rowid order, so a batch's op inserts land on a few
-- neighbouring index pages instead of one random page each, and the index
-- entries are a third of the size. Started ops are indexed by op id (new
-- ops append at the index's right edge) for the same reason.
CREATE TABLE ops_v2 (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    kind        TEXT    NOT NULL CHECK (kind = 'head' OR kind = 'stream' OR kind = 'finalize'),
    epoch       INTEGER NOT NULL,
    owner       TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status = 'started' OR status = 'committed' OR status = 'failed' OR status = 'abandoned'),
    result      TEXT,
    error       TEXT,
    runs        INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    UNIQUE (job_id, kind, epoch)
) STRICT;
INSERT INTO ops_v2 (id, job_id, kind, epoch, owner, status, result, error, runs, started_at, finished_at)
    SELECT o.id, j.id, o.kind, o.epoch, o.owner, o.status, o.result, o.error, o.runs, o.started_at, o.finished_at
    FROM ops o JOIN jobs j ON j.key = o.job_key ORDER BY o.id;
DROP TABLE ops;
ALTER TABLE ops_v2 RENAME TO ops;
CREATE INDEX ops_started ON ops (status) WHERE status = 'started';
",
    r"
-- v3: holder deaths. A job whose holders keep dying is a suspect: it leaves
-- the due index (due_at NULL) for its own (suspect_due_at), from which only
-- a worker that runs it alone leases it.
ALTER TABLE jobs ADD COLUMN holder_deaths INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN isolated_deaths INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_isolated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN suspect_due_at INTEGER;
CREATE INDEX jobs_suspect_due ON jobs (suspect_due_at, id) WHERE suspect_due_at IS NOT NULL;
",
    r"
-- v4: hosts. Leases go by (host rank, due time) over the jobs that are due,
-- so the queue interleaves hosts, and skip hosts that already have their
-- budget of live leases (counted by host). The rows already here get their
-- host and rank from `backfill_hosts`, in the same transaction.
ALTER TABLE jobs ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN host_rank INTEGER NOT NULL DEFAULT 0;
CREATE TABLE hosts (
    host    TEXT PRIMARY KEY,
    planned INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX jobs_rank_due ON jobs (host_rank, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX jobs_host_lease ON jobs (host, lease_expires_at) WHERE lease_owner IS NOT NULL;
",
    r"
-- v5: a host that answers 429 or 503 with Retry-After cools down for every
-- worker: no lease takes its jobs before cooldown_until.
ALTER TABLE hosts ADD COLUMN cooldown_until INTEGER;
",
    r"
-- v6: the operator pauses a host (or every host, as '*'): no lease takes
-- its jobs until it is resumed.
ALTER TABLE hosts ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
CREATE INDEX hosts_paused ON hosts (host) WHERE paused = 1;
",
    crate::compact::CREATE,
    r"
-- v8: an artifact's further URLs (mirrors) and a job's request headers,
-- as JSON (NULL for the many jobs that have neither), and which URL a job
-- fetches now.
ALTER TABLE jobs ADD COLUMN extra TEXT;
ALTER TABLE jobs ADD COLUMN url_index INTEGER NOT NULL DEFAULT 0;
",
];

/// Gives the rows of a ledger older than v4 their host and host rank, in
/// plan order, and records each host's count.
fn backfill_hosts(c: &Connection) -> Result<(), StoreError> {
    let mut ranks: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let rows: Vec<(i64, String)> = {
        let mut st = c
            .prepare("SELECT id, url FROM jobs ORDER BY id")
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(map_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(map_err)?
    };
    let mut up = c
        .prepare("UPDATE jobs SET host = ?2, host_rank = ?3 WHERE id = ?1")
        .map_err(map_err)?;
    for (id, url) in rows {
        let host = idem_core::spec::host_of(&url);
        let rank = ranks.entry(host.clone()).or_default();
        up.execute(params![id, host, *rank]).map_err(map_err)?;
        *rank += 1;
    }
    let mut ins = c
        .prepare("INSERT INTO hosts (host, planned) VALUES (?1, ?2)")
        .map_err(map_err)?;
    for (host, n) in ranks {
        ins.execute(params![host, n]).map_err(map_err)?;
    }
    Ok(())
}

/// Brings the ledger to [`LATEST`]; a ledger that predates the compact
/// schema is then rewritten whole (`VACUUM`) in incremental auto-vacuum
/// mode, which gives back the space the conversion freed and lets
/// `prune` give back what it frees.
pub(crate) fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // A rewrite's sorts and the VACUUM's copy are as large as the ledger:
    // they go to temporary files, not to memory.
    conn.execute_batch("PRAGMA temp_store = FILE;")
        .map_err(map_err)?;
    let migrated = upgrade(conn, path).and_then(|from| {
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .map_err(map_err)?;
        if from.is_some_and(|v| v > 0 && v < 7) && mode != 2 {
            conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
                .map_err(|e| with_path(map_err(e), path))?;
        }
        Ok(())
    });
    conn.execute_batch("PRAGMA temp_store = MEMORY;")
        .map_err(map_err)?;
    migrated
}

/// Runs the migrations a ledger needs; the version it had, if it needed
/// any.
fn upgrade(conn: &Connection, path: &Path) -> Result<Option<i64>, StoreError> {
    // Opening an up-to-date ledger must not queue behind other processes'
    // writers: check without a lock first.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    if version == LATEST {
        return Ok(None);
    }
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| with_path(map_err(e), path))?;
    // Re-read under the write lock: another process may have migrated.
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    if version > LATEST {
        return Err(StoreError::TooNew {
            found: version,
            supported: LATEST,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(sql).map_err(map_err)?;
        if i + 1 == 4 {
            backfill_hosts(&tx)?;
        }
        if i + 1 == 7 {
            crate::compact::rewrite(&tx)?;
        }
        tx.execute_batch(&format!(
            "PRAGMA user_version = {}; PRAGMA application_id = {APPLICATION_ID};",
            i + 1
        ))
        .map_err(map_err)?;
    }
    tx.commit().map_err(map_err)?;
    Ok(Some(version))
}
