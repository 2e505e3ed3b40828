//! The upgrade to the compact schema (v7): a v6 ledger's rows rewritten
//! with digests as raw bytes, states, kinds and statuses as small integers,
//! HEAD validators and op results in the core's compact form
//! ([`idem_core::codec`]), fingerprints and blob paths dropped (the spec
//! and the digest imply them), op owners and job hosts named by id, and URLs indexed by a hash.

use crate::open::map_err;
use crate::rows::url_hash;
use idem_core::ports::StoreError;
use idem_core::{codec, HeadInfo, OpKind, OpResult};
use rusqlite::{params, Connection};

/// Creates the new tables beside the old ones.
pub(crate) const CREATE: &str = r"
-- v7: the compact ledger. Codes: jobs.state finalized 0, skipped_duplicate
-- 1, failed 2, planned 3, leased 4, head_done 5, streaming 6; ops.kind head
-- 0, stream 1, finalize 2; ops.status started 0, committed 1, failed 2,
-- abandoned 3. Ops are keyed by (job, kind, epoch) with no rowid, name
-- their owner by id and record how long they took instead of when they
-- finished; counters.op_rows counts op rows ever written (rows may be
-- pruned).
CREATE TABLE owners (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
) STRICT;
CREATE TABLE hosts_v7 (
    id             INTEGER PRIMARY KEY,
    host           TEXT    NOT NULL UNIQUE,
    planned        INTEGER NOT NULL,
    cooldown_until INTEGER,
    paused         INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE jobs_v7 (
    id               INTEGER PRIMARY KEY,
    key              BLOB    NOT NULL UNIQUE CHECK (length(key) = 32),
    work_id          TEXT    NOT NULL,
    artifact_id      TEXT    NOT NULL,
    url              TEXT    NOT NULL,
    url_hash         INTEGER NOT NULL,
    expected_sha256  BLOB,
    expected_type    TEXT,
    state            INTEGER NOT NULL CHECK (state >= 0 AND state <= 6),
    lease_owner      TEXT,
    lease_epoch      INTEGER,
    lease_expires_at INTEGER,
    lease_isolated   INTEGER NOT NULL DEFAULT 0,
    epoch            INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    due_at           INTEGER,
    suspect_due_at   INTEGER,
    last_error       TEXT,
    head             BLOB,
    blob_sha256      BLOB,
    blob_size        INTEGER,
    blob_path        TEXT,
    duplicate_of     BLOB,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    first_leased_at  INTEGER,
    finished_at      INTEGER,
    holder_deaths    INTEGER NOT NULL DEFAULT 0,
    isolated_deaths  INTEGER NOT NULL DEFAULT 0,
    host_id          INTEGER NOT NULL,
    host_rank        INTEGER NOT NULL
) STRICT;
CREATE TABLE ops_v7 (
    job_id     INTEGER NOT NULL,
    kind       INTEGER NOT NULL CHECK (kind >= 0 AND kind <= 2),
    epoch      INTEGER NOT NULL,
    owner      INTEGER NOT NULL,
    status     INTEGER NOT NULL CHECK (status >= 0 AND status <= 3),
    result     BLOB,
    error      TEXT,
    runs       INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    took_ms    INTEGER,
    PRIMARY KEY (job_id, kind, epoch)
) STRICT, WITHOUT ROWID;
";

/// Copies what SQL can convert itself.
const COPY: &str = r"
INSERT INTO hosts_v7 (host, planned, cooldown_until, paused)
    SELECT host, planned, cooldown_until, paused FROM hosts ORDER BY host;
INSERT INTO hosts_v7 (host, planned)
    SELECT DISTINCT host, 0 FROM jobs WHERE host NOT IN (SELECT host FROM hosts_v7);
INSERT INTO jobs_v7 (id, key, work_id, artifact_id, url, url_hash, expected_sha256, expected_type,
    state, lease_owner, lease_epoch, lease_expires_at, lease_isolated, epoch, attempts, max_attempts,
    next_attempt_at, due_at, suspect_due_at, last_error, head, blob_sha256, blob_size, blob_path, duplicate_of,
    created_at, updated_at, first_leased_at, finished_at, holder_deaths, isolated_deaths, host_id, host_rank)
SELECT id, key, work_id, artifact_id, url, 0, unhex(expected_sha256), expected_type,
    CASE state WHEN 'finalized' THEN 0 WHEN 'skipped_duplicate' THEN 1 WHEN 'failed' THEN 2
        WHEN 'planned' THEN 3 WHEN 'leased' THEN 4 WHEN 'head_done' THEN 5 ELSE 6 END,
    lease_owner, lease_epoch, lease_expires_at, lease_isolated, epoch, attempts, max_attempts,
    next_attempt_at, due_at, suspect_due_at, last_error, CAST(head AS BLOB), unhex(blob_sha256), blob_size,
    CASE WHEN blob_path = 'blobs/sha256/' || substr(blob_sha256, 1, 2) || '/' || substr(blob_sha256, 3, 2)
        || '/' || blob_sha256 THEN NULL ELSE blob_path END,
    duplicate_of, created_at, updated_at, first_leased_at, finished_at, holder_deaths, isolated_deaths,
    (SELECT h.id FROM hosts_v7 h WHERE h.host = jobs.host), host_rank
FROM jobs ORDER BY id;
INSERT INTO owners (name) SELECT DISTINCT owner FROM ops ORDER BY owner;
INSERT INTO ops_v7 (job_id, kind, epoch, owner, status, result, error, runs, started_at, took_ms)
SELECT o.job_id, CASE o.kind WHEN 'head' THEN 0 WHEN 'stream' THEN 1 ELSE 2 END, o.epoch, w.id,
    CASE o.status WHEN 'started' THEN 0 WHEN 'committed' THEN 1 WHEN 'failed' THEN 2 ELSE 3 END,
    CAST(o.result AS BLOB), o.error, o.runs, o.started_at, o.finished_at - o.started_at
FROM ops o JOIN owners w ON w.name = o.owner ORDER BY o.job_id, o.kind, o.epoch;
INSERT INTO counters (name, value) SELECT 'op_rows', coalesce(max(id), 0) FROM ops;
";

/// Replaces the old tables with the new ones and indexes them.
const SWAP: &str = r"
DROP TABLE ops;
DROP TABLE jobs;
DROP TABLE hosts;
ALTER TABLE jobs_v7 RENAME TO jobs;
ALTER TABLE hosts_v7 RENAME TO hosts;
CREATE INDEX hosts_paused ON hosts (host) WHERE paused = 1;
ALTER TABLE ops_v7 RENAME TO ops;
CREATE INDEX jobs_due ON jobs (due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_finalized_url ON jobs (url_hash) WHERE state = 0;
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_suspect_due ON jobs (suspect_due_at, id) WHERE suspect_due_at IS NOT NULL;
CREATE INDEX jobs_rank_due ON jobs (host_rank, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX jobs_host_lease ON jobs (host_id, lease_expires_at) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX ops_started ON ops (status) WHERE status = 0;
";

fn bad(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "upgrading the ledger: a {what} that does not parse: {e}"
    ))
}

/// Rows converted per read: memory stays flat however big the ledger.
const PAGE_ROWS: i64 = 10_000;

/// Rewrites a v6 ledger's rows into the v7 tables, inside the migration's
/// transaction.
pub(crate) fn rewrite(c: &Connection) -> Result<(), StoreError> {
    c.execute_batch(COPY).map_err(map_err)?;
    // What only Rust can convert: URL hashes, and JSON into compact bytes.
    let mut read = c
        .prepare("SELECT id, url, head FROM jobs_v7 WHERE id > ?1 ORDER BY id LIMIT ?2")
        .map_err(map_err)?;
    let mut up = c
        .prepare("UPDATE jobs_v7 SET url_hash = ?2, head = ?3 WHERE id = ?1")
        .map_err(map_err)?;
    let mut after = i64::MIN;
    loop {
        let page: Vec<(i64, String, Option<Vec<u8>>)> = read
            .query_map(params![after, PAGE_ROWS], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(Iterator::collect)
            .map_err(map_err)?;
        let Some(last) = page.last().map(|r| r.0) else {
            break;
        };
        for (id, url, head) in page {
            let head = head
                .map(|h| serde_json::from_slice::<HeadInfo>(&h).map_err(|e| bad("HEAD record", e)))
                .transpose()?
                .map(|h| codec::encode_head(&h));
            up.execute(params![id, url_hash(&url), head])
                .map_err(map_err)?;
        }
        after = last;
    }
    let mut read = c
        .prepare(
            "SELECT job_id, kind, epoch, result FROM ops_v7 WHERE (job_id, kind, epoch) > (?1, ?2, ?3) \
             ORDER BY job_id, kind, epoch LIMIT ?4",
        )
        .map_err(map_err)?;
    let mut up = c
        .prepare("UPDATE ops_v7 SET result = ?4 WHERE job_id = ?1 AND kind = ?2 AND epoch = ?3")
        .map_err(map_err)?;
    let mut after = (i64::MIN, 0, 0);
    loop {
        let page: Vec<(i64, i64, i64, Option<Vec<u8>>)> = read
            .query_map(params![after.0, after.1, after.2, PAGE_ROWS], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .and_then(Iterator::collect)
            .map_err(map_err)?;
        let Some(last) = page.last().map(|r| (r.0, r.1, r.2)) else {
            break;
        };
        for (job_id, kind, epoch, json) in page {
            let Some(json) = json else { continue };
            let res: OpResult = serde_json::from_slice(&json).map_err(|e| bad("op result", e))?;
            let want = OpKind::ALL.get(usize::try_from(kind).unwrap_or(usize::MAX));
            if want != Some(&res.kind()) {
                return Err(bad(
                    "op result",
                    format!("{} under another kind", res.kind()),
                ));
            }
            up.execute(params![job_id, kind, epoch, codec::encode_result(&res)])
                .map_err(map_err)?;
        }
        after = last;
    }
    drop((read, up));
    c.execute_batch(SWAP).map_err(map_err)
}
