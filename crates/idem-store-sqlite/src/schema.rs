//! The schema, its migrations, row mapping, and each store call's SQL.
//!
//! Calls here run inside the transaction (and savepoint) the group commit
//! opened; they load rows, ask the core what to do, and write rows back.

use crate::cache::Cache;
use crate::{Durability, Options};
use idem_core::ledger::{self, OpStatus};
use idem_core::mem::{check_epoch_fence, check_op_fence, failure_reason};
use idem_core::ports::{Applied, LeaseRequest, StatusCounts, Step, StepOutput, StoreError};
use idem_core::{hosts, plan};
use idem_core::{
    transition, BlobInfo, CanonicalUrl, Command, Digest32, Epoch, Event, EventKind, HeadInfo, Job,
    JobError, JobKey, JobSpec, JobState, Lease, OpDecision, OpKey, OpKind, OpRecord, OpResult,
    PlanOutcome, Timestamp, TransitionError, WorkerId,
};
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};
use std::io::Read;
use std::path::Path;

/// Page cache per connection, in KiB (see `configure` for why no more).
const CACHE_KIB: u32 = 16 * 1024;

/// `PRAGMA application_id` of an idem ledger: "idem" in ASCII.
pub(crate) const APPLICATION_ID: i64 = 0x6964_656d;
/// The schema version this build writes.
pub(crate) const LATEST: i64 = 5;

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

pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    let text = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy(text),
        Some(ErrorCode::DiskFull) => StoreError::DiskFull(text),
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly(text),
        Some(ErrorCode::NotADatabase) => StoreError::NotALedger(text),
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt(text),
        Some(ErrorCode::CannotOpen) => StoreError::Backend(format!("cannot open: {text}")),
        _ => StoreError::Backend(text),
    }
}

/// Opens the writer and reader connections, after checking that the file is
/// an idem ledger (or absent/empty) and migrating it.
pub(crate) fn open(
    path: &Path,
    opts: &Options,
) -> Result<(Connection, Connection, std::fs::File), StoreError> {
    let shown = path.display();
    match std::fs::metadata(path) {
        // A device (`/dev/null`), a FIFO (whose open would block) or a
        // directory is never a ledger, and SQLite would make files beside it.
        Ok(m) if m.is_dir() => {
            return Err(StoreError::NotALedger(format!(
                "{shown} is a directory, not a ledger file"
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(StoreError::NotALedger(format!(
                "{shown} is not a regular file (a device, FIFO or socket); a ledger is a file; refusing to touch it"
            )))
        }
        Ok(_) => {
            let mut f = std::fs::File::open(path).map_err(|e| with_path(StoreError::Backend(e.to_string()), path))?;
            let mut magic = [0u8; 16];
            let n = f.read(&mut magic).unwrap_or(0);
            if n > 0 && (n < 16 || &magic != b"SQLite format 3\0") {
                return Err(StoreError::NotALedger(format!(
                    "{shown} is not an idem ledger (not a SQLite database); refusing to touch it"
                )));
            }
        }
        Err(_) => create_private(path)?,
    }
    let conn = Connection::open(path).map_err(|e| with_path(map_err(e), path))?;
    conn.busy_timeout(std::time::Duration::from_millis(opts.busy_timeout_ms))
        .map_err(map_err)?;
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| with_path(map_err(e), path))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(map_err)?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(StoreError::NotALedger(format!(
            "{shown} is a SQLite database but not an idem ledger; refusing to touch it"
        )));
    }
    if version > LATEST {
        return Err(StoreError::TooNew {
            found: version,
            supported: LATEST,
        });
    }
    configure(&conn, opts, path)?;
    migrate(&conn, path)?;
    if opts.durability == Durability::Full {
        // Migrations ran at FULL; from here on the group commit fsyncs the
        // log itself after each durable batch (see group.rs).
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(map_err)?;
    }
    let reader = Connection::open(path).map_err(map_err)?;
    reader
        .busy_timeout(std::time::Duration::from_millis(opts.busy_timeout_ms))
        .map_err(map_err)?;
    reader
        .execute_batch(&format!(
            "PRAGMA query_only = ON; PRAGMA cache_size = -{CACHE_KIB};"
        ))
        .map_err(map_err)?;
    reader.set_prepared_statement_cache_capacity(128);
    let lock = private_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(path))
        .map_err(|e| StoreError::Backend(format!("{}: {e}", lock_path(path).display())))?;
    Ok((conn, reader, lock))
}

/// Open options that create a file readable by its owner only: the ledger
/// holds URLs whole, secrets included. SQLite gives its `-wal` and `-shm`
/// files the ledger's own mode.
fn private_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Creates an empty ledger file, private to its owner (a ledger made by
/// another process meanwhile is left as it is).
fn create_private(path: &Path) -> Result<(), StoreError> {
    match private_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Backend(format!("{}: {e}", path.display()))),
    }
}

/// The writers' lock file beside the ledger (see `group.rs`).
pub(crate) fn lock_path(db: &Path) -> std::path::PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-writer.lock");
    std::path::PathBuf::from(s)
}

fn with_path(e: StoreError, path: &Path) -> StoreError {
    match e {
        StoreError::Backend(t) => StoreError::Backend(format!("{}: {t}", path.display())),
        StoreError::ReadOnly(t) => StoreError::ReadOnly(format!("{}: {t}", path.display())),
        StoreError::NotALedger(t) => StoreError::NotALedger(format!(
            "{} is not an idem ledger ({t}); refusing to touch it",
            path.display()
        )),
        other => other,
    }
}

fn configure(conn: &Connection, opts: &Options, path: &Path) -> Result<(), StoreError> {
    let sync = match opts.durability {
        Durability::Full | Durability::Strict => "FULL",
        Durability::Normal => "NORMAL",
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| with_path(map_err(e), path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "{}: could not enable WAL (journal_mode is {mode}); is the directory writable and on a local filesystem?",
            path.display()
        )));
    }
    // Every store call uses cached statements; the default cache (16) is
    // smaller than the set in use, and re-preparing costs more than running.
    conn.set_prepared_statement_cache_capacity(128);
    // 16 MiB of page cache, not more: SQLite's page cache scans its whole
    // hash table (one slot per cached page) at the end of every write
    // transaction that split a b-tree page (the split renumbers pages
    // through the lock-byte page, past the end of the file). With 64 MiB
    // that scan took 7% of a 16-worker run's CPU, inside the writer's
    // critical section; 16 MiB runs it 25% faster and plans as fast.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA cache_size = -{CACHE_KIB}; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(map_err)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    // Opening an up-to-date ledger must not queue behind other processes'
    // writers: check without a lock first.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    if version == LATEST {
        return Ok(());
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
        tx.execute_batch(&format!(
            "PRAGMA user_version = {}; PRAGMA application_id = {APPLICATION_ID};",
            i + 1
        ))
        .map_err(map_err)?;
    }
    tx.commit().map_err(map_err)
}

pub(crate) fn bump_counter(c: &Connection, name: &str) -> Result<(), StoreError> {
    c.execute(
        "UPDATE counters SET value = value + 1 WHERE name = ?1",
        [name],
    )
    .map(|_| ())
    .map_err(map_err)
}

/// A job row's columns, in `row_to_job`'s order. A macro, so queries are
/// `concat!`ed at compile time instead of formatted on every call.
macro_rules! job_cols {
    () => {
        "key, fingerprint, work_id, artifact_id, url, expected_sha256, expected_type, state, \
         lease_owner, lease_epoch, lease_expires_at, epoch, attempts, max_attempts, next_attempt_at, last_error, \
         head, blob_sha256, blob_size, blob_path, duplicate_of, created_at, updated_at, first_leased_at, finished_at, \
         holder_deaths, isolated_deaths, lease_isolated, host_rank"
    };
}

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("ledger row has a bad {what}").into(),
    )
}

fn key_from(bytes: &[u8]) -> rusqlite::Result<JobKey> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| corrupt("job key"))?;
    Ok(JobKey::from_digest(Digest32::from_bytes(arr)))
}

fn row_to_job(r: &Row<'_>) -> rusqlite::Result<Job> {
    let key = key_from(&r.get::<_, Vec<u8>>(0)?)?;
    let fp: Vec<u8> = r.get(1)?;
    let fp: [u8; 32] = fp
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("fingerprint"))?;
    let url: String = r.get(4)?;
    let expected_sha: Option<String> = r.get(5)?;
    let state: String = r.get(7)?;
    let lease_owner: Option<String> = r.get(8)?;
    let lease_epoch: Option<i64> = r.get(9)?;
    let lease_expires: Option<i64> = r.get(10)?;
    let head: Option<String> = r.get(16)?;
    let blob_sha: Option<String> = r.get(17)?;
    let dup: Option<Vec<u8>> = r.get(20)?;
    let spec = JobSpec {
        work_id: r.get(2)?,
        artifact_id: r.get(3)?,
        url: serde_json::from_value::<CanonicalUrl>(serde_json::Value::String(url))
            .map_err(|_| corrupt("url"))?,
        sha256: expected_sha
            .map(|s| Digest32::parse_hex(&s))
            .transpose()
            .map_err(|_| corrupt("expected sha256"))?,
        content_type: r.get(6)?,
    };
    let lease = match (lease_owner, lease_epoch, lease_expires) {
        (Some(owner), Some(epoch), Some(exp)) => Some(Lease {
            owner: WorkerId(owner),
            epoch: Epoch(u64::try_from(epoch).map_err(|_| corrupt("lease epoch"))?),
            expires_at: Timestamp::from_millis(exp),
            isolated: r.get::<_, i64>(27)? != 0,
        }),
        _ => None,
    };
    let blob = match blob_sha {
        Some(s) => Some(BlobInfo {
            sha256: Digest32::parse_hex(&s).map_err(|_| corrupt("blob sha256"))?,
            size: u64::try_from(r.get::<_, i64>(18)?).map_err(|_| corrupt("blob size"))?,
            path: r.get(19)?,
        }),
        None => None,
    };
    Ok(Job {
        key,
        fingerprint: idem_core::Fingerprint::from_digest(Digest32::from_bytes(fp)),
        spec,
        state: JobState::parse(&state).ok_or_else(|| corrupt("state"))?,
        lease,
        epoch: Epoch(u64::try_from(r.get::<_, i64>(11)?).map_err(|_| corrupt("epoch"))?),
        attempts: u32::try_from(r.get::<_, i64>(12)?).map_err(|_| corrupt("attempts"))?,
        max_attempts: u32::try_from(r.get::<_, i64>(13)?).map_err(|_| corrupt("max_attempts"))?,
        next_attempt_at: Timestamp::from_millis(r.get(14)?),
        last_error: r.get(15)?,
        head: head
            .map(|h| serde_json::from_str::<HeadInfo>(&h))
            .transpose()
            .map_err(|_| corrupt("head"))?,
        blob,
        duplicate_of: dup.map(|d| key_from(&d)).transpose()?,
        created_at: Timestamp::from_millis(r.get(21)?),
        updated_at: Timestamp::from_millis(r.get(22)?),
        first_leased_at: r.get::<_, Option<i64>>(23)?.map(Timestamp::from_millis),
        finished_at: r.get::<_, Option<i64>>(24)?.map(Timestamp::from_millis),
        holder_deaths: u32::try_from(r.get::<_, i64>(25)?).map_err(|_| corrupt("holder_deaths"))?,
        isolated_deaths: u32::try_from(r.get::<_, i64>(26)?)
            .map_err(|_| corrupt("isolated_deaths"))?,
        host_rank: u64::try_from(r.get::<_, i64>(28)?).map_err(|_| corrupt("host_rank"))?,
    })
}

/// When the job may next be leased: NULL once terminal, else the later of
/// its backoff and its lease expiry. A suspect is due in its own column
/// (`suspect_due_at`), and never in this one.
fn due_at(job: &Job) -> Option<i64> {
    if job.is_suspect() {
        return None;
    }
    when_due(job)
}

fn suspect_due_at(job: &Job) -> Option<i64> {
    if !job.is_suspect() {
        return None;
    }
    when_due(job)
}

fn when_due(job: &Job) -> Option<i64> {
    if job.state.is_terminal() {
        return None;
    }
    let lease_end = job
        .lease
        .as_ref()
        .map_or(i64::MIN, |l| l.expires_at.as_millis());
    Some(job.next_attempt_at.as_millis().max(lease_end))
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn insert_job(c: &Connection, job: &Job, host: &str) -> Result<bool, StoreError> {
    let mut st = c
        .prepare_cached(
            "INSERT INTO jobs (key, fingerprint, work_id, artifact_id, url, expected_sha256, expected_type, state, \
             epoch, attempts, max_attempts, next_attempt_at, due_at, created_at, updated_at, host, host_rank) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, 0, ?9, ?10, ?10, ?11, ?11, ?12, ?13) ON CONFLICT (key) DO NOTHING",
        )
        .map_err(map_err)?;
    let n = st
        .execute(params![
            job.key.digest().as_bytes().as_slice(),
            job.fingerprint.digest().as_bytes().as_slice(),
            job.spec.work_id,
            job.spec.artifact_id,
            job.spec.url.as_str(),
            job.spec.sha256.map(|d| d.to_hex()),
            job.spec.content_type,
            job.state.as_str(),
            job.max_attempts,
            job.next_attempt_at.as_millis(),
            job.created_at.as_millis(),
            host,
            i(job.host_rank),
        ])
        .map_err(map_err)?;
    Ok(n == 1)
}

/// The mutable columns of a job row, in a fixed order.
fn mutable_columns(job: &Job) -> [(&'static str, Value); 22] {
    let opt_i = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
    let opt_t = |v: Option<String>| v.map_or(Value::Null, Value::Text);
    [
        ("state", Value::Text(job.state.as_str().to_owned())),
        (
            "lease_owner",
            opt_t(job.lease.as_ref().map(|l| l.owner.as_str().to_owned())),
        ),
        (
            "lease_epoch",
            opt_i(job.lease.as_ref().map(|l| i(l.epoch.0))),
        ),
        (
            "lease_expires_at",
            opt_i(job.lease.as_ref().map(|l| l.expires_at.as_millis())),
        ),
        ("epoch", Value::Integer(i(job.epoch.0))),
        ("attempts", Value::Integer(i64::from(job.attempts))),
        ("max_attempts", Value::Integer(i64::from(job.max_attempts))),
        (
            "next_attempt_at",
            Value::Integer(job.next_attempt_at.as_millis()),
        ),
        ("due_at", opt_i(due_at(job))),
        ("last_error", opt_t(job.last_error.clone())),
        (
            "head",
            opt_t(
                job.head
                    .as_ref()
                    .map(|h| serde_json::to_string(h).unwrap_or_default()),
            ),
        ),
        (
            "blob_sha256",
            opt_t(job.blob.as_ref().map(|b| b.sha256.to_hex())),
        ),
        ("blob_size", opt_i(job.blob.as_ref().map(|b| i(b.size)))),
        (
            "blob_path",
            opt_t(job.blob.as_ref().map(|b| b.path.clone())),
        ),
        (
            "duplicate_of",
            job.duplicate_of
                .map_or(Value::Null, |k| Value::Blob(k.digest().as_bytes().to_vec())),
        ),
        ("updated_at", Value::Integer(job.updated_at.as_millis())),
        (
            "first_leased_at",
            opt_i(job.first_leased_at.map(Timestamp::as_millis)),
        ),
        (
            "finished_at",
            opt_i(job.finished_at.map(Timestamp::as_millis)),
        ),
        (
            "holder_deaths",
            Value::Integer(i64::from(job.holder_deaths)),
        ),
        (
            "isolated_deaths",
            Value::Integer(i64::from(job.isolated_deaths)),
        ),
        (
            "lease_isolated",
            Value::Integer(i64::from(job.lease.as_ref().is_some_and(|l| l.isolated))),
        ),
        ("suspect_due_at", opt_i(suspect_due_at(job))),
    ]
}

/// Writes the columns that differ between `old` (the row as loaded) and
/// `new`. Naming only changed columns matters: SQLite rewrites an index
/// entry for every indexed column an UPDATE names, changed or not, and a
/// job row has four indexes.
fn update_job(c: &Connection, id: i64, old: &Job, new: &Job) -> Result<(), StoreError> {
    let mut sql = String::from("UPDATE jobs SET ");
    let mut values: Vec<Value> = vec![Value::Integer(id)];
    for ((name, was), (_, now)) in mutable_columns(old).into_iter().zip(mutable_columns(new)) {
        if was != now {
            if values.len() > 1 {
                sql.push_str(", ");
            }
            values.push(now);
            sql.push_str(name);
            sql.push_str(" = ?");
            sql.push_str(&values.len().to_string());
        }
    }
    if values.len() == 1 {
        return Ok(());
    }
    sql.push_str(" WHERE id = ?1");
    let n = c
        .prepare_cached(&sql)
        .and_then(|mut st| st.execute(rusqlite::params_from_iter(values)))
        .map_err(map_err)?;
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::NotFound(new.key))
    }
}

pub(crate) fn load_job(c: &Connection, key: &JobKey) -> Result<Option<Job>, StoreError> {
    let mut st = c
        .prepare_cached(concat!("SELECT ", job_cols!(), " FROM jobs WHERE key = ?1"))
        .map_err(map_err)?;
    st.query_row([key.digest().as_bytes().as_slice()], row_to_job)
        .optional()
        .map_err(map_err)
}

/// A job row with its rowid, which the write path uses instead of the key
/// (an integer lookup instead of a 32-byte one, for the row and its ops).
fn row_to_job_id(r: &Row<'_>) -> rusqlite::Result<(i64, Job)> {
    Ok((r.get(JOB_ID_COL)?, row_to_job(r)?))
}

/// The column of `id` in `SELECT job_cols!(), id`.
const JOB_ID_COL: usize = 29;

fn must_job_id(c: &Connection, key: &JobKey) -> Result<(i64, Job), StoreError> {
    c.prepare_cached(concat!(
        "SELECT ",
        job_cols!(),
        ", id FROM jobs WHERE key = ?1"
    ))
    .map_err(map_err)?
    .query_row([key.digest().as_bytes().as_slice()], row_to_job_id)
    .optional()
    .map_err(map_err)?
    .ok_or(StoreError::NotFound(*key))
}

fn stamp(events: Vec<EventKind>, now: Timestamp) -> Vec<Event> {
    events.into_iter().map(|e| e.at(now)).collect()
}

fn refused(job: JobKey, error: TransitionError) -> StoreError {
    StoreError::Refused { job, error }
}

pub(crate) fn plan(
    c: &Connection,
    specs: &[JobSpec],
    max_attempts: u32,
    now: Timestamp,
) -> Result<Applied<Vec<PlanOutcome>>, StoreError> {
    let mut out = Vec::with_capacity(specs.len());
    let mut events = Vec::new();
    // Plans come in runs: a first plan inserts, a re-run finds every key
    // present. Whatever the last item found decides what to try first, so
    // either run costs one statement per item.
    let mut expect_existing = false;
    let mut ranks = HostRanks::default();
    for spec in specs {
        let key = spec.key();
        let fingerprint = spec.fingerprint();
        let same = if expect_existing {
            same_fingerprint(c, &key, &fingerprint)?
        } else {
            None
        };
        let same = match same {
            Some(same) => same,
            // The job row is built only when it may be new.
            None if {
                let host = spec.url.host();
                let mut job = Job::planned(spec.clone(), max_attempts, now);
                job.host_rank = ranks.peek(c, &host)?;
                let inserted = insert_job(c, &job, &host)?;
                if inserted {
                    ranks.take(&host);
                }
                inserted
            } =>
            {
                expect_existing = false;
                let (o, _, ev) = plan::decide(None, spec, max_attempts, now);
                events.extend(ev);
                out.push(o);
                continue;
            }
            None => {
                expect_existing = true;
                same_fingerprint(c, &key, &fingerprint)?
                    .ok_or_else(|| StoreError::Backend("a job vanished while planning".into()))?
            }
        };
        // Re-plans are mostly no-ops: the whole row is loaded only to
        // report a conflict.
        if same {
            out.push(PlanOutcome::Existing { job_key: key });
            continue;
        }
        let (_, existing) = must_job_id(c, &key)?;
        let (o, _, ev) = plan::decide(Some(&existing), spec, max_attempts, now);
        events.extend(ev);
        out.push(o);
    }
    ranks.save(c)?;
    Ok(Applied {
        value: out,
        events: stamp(events, now),
    })
}

/// The next host rank of each host a plan batch touches, read from `hosts`
/// once and written back once per batch.
#[derive(Default)]
struct HostRanks(std::collections::HashMap<String, (i64, bool)>);

impl HostRanks {
    /// The rank the next job of `host` gets.
    fn peek(&mut self, c: &Connection, host: &str) -> Result<u64, StoreError> {
        if let Some((next, _)) = self.0.get(host) {
            return Ok(u64::try_from(*next).unwrap_or(0));
        }
        let next: i64 = c
            .prepare_cached("SELECT planned FROM hosts WHERE host = ?1")
            .map_err(map_err)?
            .query_row([host], |r| r.get(0))
            .optional()
            .map_err(map_err)?
            .unwrap_or(0);
        self.0.insert(host.to_owned(), (next, false));
        Ok(u64::try_from(next).unwrap_or(0))
    }

    /// Uses the rank `peek` gave.
    fn take(&mut self, host: &str) {
        if let Some((next, dirty)) = self.0.get_mut(host) {
            *next += 1;
            *dirty = true;
        }
    }

    fn save(&self, c: &Connection) -> Result<(), StoreError> {
        let mut st = c
            .prepare_cached(
                "INSERT INTO hosts (host, planned) VALUES (?1, ?2) ON CONFLICT (host) DO UPDATE SET planned = excluded.planned",
            )
            .map_err(map_err)?;
        for (host, (next, dirty)) in &self.0 {
            if *dirty {
                st.execute(params![host, next]).map_err(map_err)?;
            }
        }
        Ok(())
    }
}

/// Whether the stored job under `fresh`'s key has its fingerprint; `None`
/// when there is no such job.
fn same_fingerprint(
    c: &Connection,
    key: &JobKey,
    fingerprint: &idem_core::Fingerprint,
) -> Result<Option<bool>, StoreError> {
    c.prepare_cached("SELECT fingerprint = ?2 FROM jobs WHERE key = ?1")
        .map_err(map_err)?
        .query_row(
            params![
                key.digest().as_bytes().as_slice(),
                fingerprint.digest().as_bytes().as_slice()
            ],
            |r| r.get(0),
        )
        .optional()
        .map_err(map_err)
}

// Every `LIMIT ?n` in this file is written `LIMIT ?n + 0`: with a bare
// parameter, SQLite re-prepares the statement whenever any binding changes
// (the lease query was recompiled on every call, costing more than the
// query itself).
pub(crate) fn lease(
    c: &Connection,
    cache: &mut Cache,
    req: &LeaseRequest,
    now: Timestamp,
) -> Result<Applied<Vec<Job>>, StoreError> {
    let mut jobs = if req.isolated {
        // A suspect runs alone: one per isolated lease.
        let mut st = c
            .prepare_cached(concat!(
                "SELECT ",
                job_cols!(),
                ", id FROM jobs WHERE suspect_due_at <= ?1 ORDER BY suspect_due_at, id LIMIT 1"
            ))
            .map_err(map_err)?;
        let rows = st
            .query_map(params![now.as_millis()], row_to_job_id)
            .map_err(map_err)?;
        rows.collect::<rusqlite::Result<Vec<(i64, Job)>>>()
            .map_err(map_err)?
    } else {
        // Candidates in lease order (index only), a window at a time; a
        // host found full is left out of the next window, so a long queue
        // of one full host's jobs does not hide the others'.
        let mut room = hosts::HostRoom::new(req.per_host);
        let mut ids: Vec<i64> = Vec::new();
        let mut left_out: Vec<String> = Vec::new();
        let window = hosts::scan_for(req.limit);
        // Live leases on a host; a host cooling down counts as full.
        let mut live = c
            .prepare_cached(
                "SELECT CASE WHEN coalesce((SELECT cooldown_until FROM hosts WHERE host = ?1), 0) > ?2 THEN -1 \
                 ELSE (SELECT count(*) FROM jobs INDEXED BY jobs_host_lease WHERE host = ?1 AND lease_owner IS NOT NULL AND lease_expires_at > ?2) END",
            )
            .map_err(map_err)?;
        let mut scan = c
            .prepare_cached(
                "SELECT id, host FROM jobs INDEXED BY jobs_rank_due WHERE due_at IS NOT NULL AND due_at <= ?1 \
                 AND host NOT IN (SELECT value FROM json_each(?3)) ORDER BY host_rank, due_at, id LIMIT ?2",
            )
            .map_err(map_err)?;
        loop {
            let excluded =
                serde_json::to_string(&left_out).map_err(|e| StoreError::Backend(e.to_string()))?;
            let candidates: Vec<(i64, String)> = scan
                .query_map(params![now.as_millis(), i(window as u64), excluded], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(map_err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(map_err)?;
            let seen = candidates.len();
            let picked = hosts::pick_by_host_room(
                candidates.into_iter().filter(|(id, _)| !ids.contains(id)),
                req.limit - ids.len(),
                &mut room,
                |host| {
                    live.query_row(params![host, now.as_millis()], |r| r.get::<_, i64>(0))
                        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                        .map_err(map_err)
                },
            )?;
            ids.extend(picked);
            let full = room.full();
            if ids.len() >= req.limit || seen < window || full.len() == left_out.len() {
                break;
            }
            left_out = full;
        }
        let mut st = c
            .prepare_cached(concat!(
                "SELECT ",
                job_cols!(),
                ", id FROM jobs WHERE id = ?1"
            ))
            .map_err(map_err)?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            jobs.push(st.query_row([id], row_to_job_id).map_err(map_err)?);
        }
        jobs
    };
    if jobs.len() < req.limit && !req.dead_owners.is_empty() && !req.isolated {
        let mut st = c
            .prepare_cached(concat!("SELECT ", job_cols!(), ", id FROM jobs WHERE lease_owner = ?1 AND due_at IS NOT NULL AND next_attempt_at <= ?2 ORDER BY id"))
            .map_err(map_err)?;
        for owner in &req.dead_owners {
            let rows = st
                .query_map(params![owner.as_str(), now.as_millis()], row_to_job_id)
                .map_err(map_err)?;
            for j in rows {
                let (id, mut j) = j.map_err(map_err)?;
                if jobs.len() >= req.limit || jobs.iter().any(|(_, x)| x.key == j.key) {
                    continue;
                }
                // Its holder is gone: treat the lease as expired now.
                if let Some(l) = j.lease.as_mut() {
                    l.expires_at = l.expires_at.min(now);
                }
                jobs.push((id, j));
            }
        }
    }
    let mut leased = Vec::with_capacity(jobs.len());
    let mut events = Vec::new();
    for (id, job) in jobs {
        let t = transition(
            &job,
            Command::Acquire {
                owner: req.owner.clone(),
                ttl_ms: req.ttl_ms,
                isolated: req.isolated,
            },
            now,
        )
        .map_err(|e| refused(job.key, e))?;
        update_job(c, id, &job, &t.job)?;
        cache.put_row(id, t.job.clone());
        events.extend(t.events);
        if let Some(l) = &t.job.lease {
            // The previous holders' unfinished ops died with their epochs
            // (a first lease has no previous holder).
            let n = if l.epoch.0 <= 1 {
                0
            } else {
                c
                .prepare_cached(
                    "UPDATE ops SET status = 'abandoned', finished_at = ?3 WHERE job_id = ?1 AND status = 'started' AND epoch < ?2",
                )
                .map_err(map_err)?
                .execute(params![id, i(l.epoch.0), now.as_millis()])
                .map_err(map_err)? as u64
            };
            if n > 0 {
                cache.forget_ops_of(id);
            }
            events.extend(ledger::abandoned_event(Some(t.job.key), n));
            leased.push(t.job);
        }
    }
    Ok(Applied {
        value: leased,
        events: stamp(events, now),
    })
}

/// The job rows one request reads and changes, each written back once, at
/// the end, with only its changed columns: a request that moves a job
/// through several steps reads and writes its row once.
struct Jobs<'a> {
    /// What the writer already knows; written through at `flush`.
    cache: &'a mut Cache,
    /// (rowid, as loaded, current)
    rows: Vec<(i64, Job, Job)>,
    /// Rows whose lease epoch alone was read: (key, rowid, lease epoch).
    fences: Vec<(JobKey, i64, Option<Epoch>)>,
}

impl Jobs<'_> {
    fn get(&mut self, c: &Connection, key: &JobKey) -> Result<(i64, &mut Job), StoreError> {
        let i = match self.rows.iter().position(|(_, j, _)| j.key == *key) {
            Some(i) => i,
            None => {
                let (id, j) = match self.cache.row(key) {
                    Some((id, j)) => (id, j.clone()),
                    None => {
                        let (id, j) = must_job_id(c, key)?;
                        self.cache.put_row(id, j.clone());
                        (id, j)
                    }
                };
                self.rows.push((id, j.clone(), j));
                self.rows.len() - 1
            }
        };
        let (id, _, j) = &mut self.rows[i];
        Ok((*id, j))
    }

    /// The job's rowid and live lease epoch (`None` when unleased); reads
    /// two columns when the row is not loaded yet.
    fn fence(&mut self, c: &Connection, key: &JobKey) -> Result<(i64, Option<Epoch>), StoreError> {
        if let Some((id, _, j)) = self.rows.iter().find(|(_, j, _)| j.key == *key) {
            return Ok((*id, j.lease.as_ref().map(|l| l.epoch)));
        }
        if let Some((_, id, e)) = self.fences.iter().find(|(k, _, _)| k == key) {
            return Ok((*id, *e));
        }
        if let Some((id, j)) = self.cache.row(key) {
            return Ok((id, j.lease.as_ref().map(|l| l.epoch)));
        }
        let row: Option<(i64, Option<i64>)> = c
            .prepare_cached("SELECT id, lease_epoch FROM jobs WHERE key = ?1")
            .map_err(map_err)?
            .query_row([key.digest().as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(map_err)?;
        let Some((id, epoch)) = row else {
            return Err(StoreError::NotFound(*key));
        };
        let epoch = epoch.and_then(|e| u64::try_from(e).ok()).map(Epoch);
        self.cache.put_id(*key, id);
        self.fences.push((*key, id, epoch));
        Ok((id, epoch))
    }

    fn flush(self, c: &Connection) -> Result<(), StoreError> {
        for (id, old, new) in self.rows {
            update_job(c, id, &old, &new)?;
            self.cache.put_row(id, new);
        }
        Ok(())
    }
}

/// Runs `f` with the request's rows and writes them back after it.
fn with_jobs<T>(
    c: &Connection,
    cache: &mut Cache,
    f: impl FnOnce(&mut Jobs<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut jobs = Jobs {
        cache,
        rows: Vec::new(),
        fences: Vec::new(),
    };
    let v = f(&mut jobs)?;
    jobs.flush(c)?;
    Ok(v)
}

pub(crate) fn apply(
    c: &Connection,
    cache: &mut Cache,
    key: &JobKey,
    cmd: Command,
    now: Timestamp,
) -> Result<Applied<Job>, StoreError> {
    with_jobs(c, cache, |jobs| apply_in(c, jobs, key, cmd, now))
}

fn apply_in(
    c: &Connection,
    jobs: &mut Jobs<'_>,
    key: &JobKey,
    cmd: Command,
    now: Timestamp,
) -> Result<Applied<Job>, StoreError> {
    let (_, job) = jobs.get(c, key)?;
    let t = transition(job, cmd, now).map_err(|e| refused(*key, e))?;
    job.clone_from(&t.job);
    Ok(Applied {
        value: t.job,
        events: stamp(t.events, now),
    })
}

/// An op row's columns; its job key comes from the query's parameter.
macro_rules! op_cols {
    () => {
        "kind, epoch, owner, status, result, error, runs, started_at, finished_at"
    };
}

fn row_to_op(job: JobKey, r: &Row<'_>) -> rusqlite::Result<OpRecord> {
    let kind: String = r.get(0)?;
    let status: String = r.get(3)?;
    let result: Option<String> = r.get(4)?;
    Ok(OpRecord {
        key: OpKey {
            job,
            kind: OpKind::parse(&kind).ok_or_else(|| corrupt("op kind"))?,
            epoch: Epoch(u64::try_from(r.get::<_, i64>(1)?).map_err(|_| corrupt("op epoch"))?),
        },
        owner: WorkerId(r.get(2)?),
        status: OpStatus::parse(&status).ok_or_else(|| corrupt("op status"))?,
        result: result
            .map(|s| serde_json::from_str::<OpResult>(&s))
            .transpose()
            .map_err(|_| corrupt("op result"))?,
        error: r.get(5)?,
        runs: u32::try_from(r.get::<_, i64>(6)?).map_err(|_| corrupt("op runs"))?,
        started_at: Timestamp::from_millis(r.get(7)?),
        finished_at: r.get::<_, Option<i64>>(8)?.map(Timestamp::from_millis),
    })
}

fn load_op(
    c: &Connection,
    cache: &mut Cache,
    job_id: i64,
    op: &OpKey,
) -> Result<Option<OpRecord>, StoreError> {
    if let Some(rec) = cache.op(job_id, op) {
        return Ok(Some(rec.clone()));
    }
    let mut st = c
        .prepare_cached(concat!(
            "SELECT ",
            op_cols!(),
            " FROM ops WHERE job_id = ?1 AND kind = ?2 AND epoch = ?3"
        ))
        .map_err(map_err)?;
    let rec = st
        .query_row(params![job_id, op.kind.as_str(), i(op.epoch.0)], |r| {
            row_to_op(op.job, r)
        })
        .optional()
        .map_err(map_err)?;
    if let Some(rec) = &rec {
        cache.put_op(job_id, rec.clone());
    }
    Ok(rec)
}

/// Inserts a new op row (started, or already finished); false when the op
/// has a row already.
fn insert_op(
    c: &Connection,
    cache: &mut Cache,
    job_id: i64,
    rec: &OpRecord,
) -> Result<bool, StoreError> {
    let result = result_json(rec)?;
    let n = c
        .prepare_cached(
            "INSERT INTO ops (job_id, kind, epoch, owner, status, result, error, runs, started_at, finished_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (job_id, kind, epoch) DO NOTHING",
        )
        .and_then(|mut st| {
            st.execute(params![
                job_id,
                rec.key.kind.as_str(),
                i(rec.key.epoch.0),
                rec.owner.as_str(),
                rec.status.as_str(),
                result,
                rec.error,
                rec.runs,
                rec.started_at.as_millis(),
                rec.finished_at.map(Timestamp::as_millis),
            ])
        })
        .map_err(map_err)?;
    if n == 1 {
        cache.put_op(job_id, rec.clone());
    }
    Ok(n == 1)
}

fn save_op(
    c: &Connection,
    cache: &mut Cache,
    job_id: i64,
    rec: &OpRecord,
) -> Result<(), StoreError> {
    let mut st = c
        .prepare_cached(
            "INSERT INTO ops (job_id, kind, epoch, owner, status, result, error, runs, started_at, finished_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (job_id, kind, epoch) DO UPDATE SET owner = excluded.owner, status = excluded.status, \
             result = excluded.result, error = excluded.error, runs = excluded.runs, \
             started_at = excluded.started_at, finished_at = excluded.finished_at",
        )
        .map_err(map_err)?;
    let result = result_json(rec)?;
    st.execute(params![
        job_id,
        rec.key.kind.as_str(),
        i(rec.key.epoch.0),
        rec.owner.as_str(),
        rec.status.as_str(),
        result,
        rec.error,
        rec.runs,
        rec.started_at.as_millis(),
        rec.finished_at.map(Timestamp::as_millis),
    ])
    .map_err(map_err)?;
    cache.put_op(job_id, rec.clone());
    Ok(())
}

/// An op's result as stored: JSON, never truncated.
fn result_json(rec: &OpRecord) -> Result<Option<String>, StoreError> {
    rec.result
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Backend(format!("serialising op result: {e}")))
}

/// Records a finished op's outcome on its existing row.
fn save_op_outcome(
    c: &Connection,
    cache: &mut Cache,
    job_id: i64,
    rec: OpRecord,
) -> Result<(), StoreError> {
    let result = result_json(&rec)?;
    let n = c
        .prepare_cached(
            "UPDATE ops SET status = ?4, result = ?5, error = ?6, finished_at = ?7 \
             WHERE job_id = ?1 AND kind = ?2 AND epoch = ?3",
        )
        .and_then(|mut st| {
            st.execute(params![
                job_id,
                rec.key.kind.as_str(),
                i(rec.key.epoch.0),
                rec.status.as_str(),
                result,
                rec.error,
                rec.finished_at.map(Timestamp::as_millis),
            ])
        })
        .map_err(map_err)?;
    if n == 1 {
        cache.put_op(job_id, rec);
        Ok(())
    } else {
        Err(StoreError::OpNotStarted(rec.key.to_string()))
    }
}

pub(crate) fn begin_op(
    c: &Connection,
    cache: &mut Cache,
    op: &OpKey,
    owner: &WorkerId,
    now: Timestamp,
) -> Result<Applied<OpDecision>, StoreError> {
    with_jobs(c, cache, |jobs| begin_op_in(c, jobs, op, owner, now))
}

fn begin_op_in(
    c: &Connection,
    jobs: &mut Jobs<'_>,
    op: &OpKey,
    owner: &WorkerId,
    now: Timestamp,
) -> Result<Applied<OpDecision>, StoreError> {
    // Only the fence (and the rowid) is needed here, not the whole row.
    let (id, epoch) = jobs.fence(c, &op.job)?;
    check_epoch_fence(op.job, epoch, op)?;
    // A first start (the common case) is one insert; only an op that has
    // a row already needs reading.
    let fresh = ledger::started(*op, owner.clone(), None, now);
    let decision = if insert_op(c, jobs.cache, id, &fresh)? {
        ledger::begin_op(None)
    } else {
        let existing = load_op(c, jobs.cache, id, op)?;
        let decision = ledger::begin_op(existing.as_ref());
        match &decision {
            OpDecision::Run => save_op(
                c,
                jobs.cache,
                id,
                &ledger::started(*op, owner.clone(), existing.as_ref(), now),
            )?,
            OpDecision::Replay { .. } => bump_counter(c, "replays")?,
        }
        decision
    };
    let ev = ledger::begin_event(op, &decision);
    Ok(Applied {
        value: decision,
        events: vec![ev.at(now)],
    })
}

pub(crate) fn finish_op(
    c: &Connection,
    cache: &mut Cache,
    op: &OpKey,
    outcome: Result<OpResult, JobError>,
    then: Option<Command>,
    now: Timestamp,
) -> Result<Applied<Job>, StoreError> {
    with_jobs(c, cache, |jobs| {
        finish_op_in(c, jobs, op, outcome, then, now)
    })
}

fn finish_op_in(
    c: &Connection,
    jobs: &mut Jobs<'_>,
    op: &OpKey,
    outcome: Result<OpResult, JobError>,
    then: Option<Command>,
    now: Timestamp,
) -> Result<Applied<Job>, StoreError> {
    let (id, job) = jobs.get(c, &op.job)?;
    check_op_fence(job, op)?;
    let rec = match load_op(c, jobs.cache, id, op)? {
        Some(r) if r.status == OpStatus::Started => r,
        _ => return Err(StoreError::OpNotStarted(op.to_string())),
    };
    // The row is the request's already: this finds it again, no SQL.
    let (_, job) = jobs.get(c, &op.job)?;
    let mut events = Vec::new();
    if let Some(cmd) = then {
        let t = transition(job, cmd, now).map_err(|e| refused(op.job, e))?;
        *job = t.job;
        events = t.events;
    }
    let value = job.clone();
    let (rec, completed) = ledger::finished(rec, outcome, now);
    events.insert(0, completed);
    save_op_outcome(c, jobs.cache, id, rec)?;
    Ok(Applied {
        value,
        events: stamp(events, now),
    })
}

/// An op begun and finished in one request: an effect with nothing to
/// fence beforehand (HEAD changes nothing anywhere) recorded once it is
/// done. One insert of the finished row, where the two steps would insert a
/// started row and then update it. `None` (nothing written) when the op has
/// a row already: the caller then runs the two steps, which decide about it.
fn record_op_in(
    c: &Connection,
    jobs: &mut Jobs<'_>,
    op: &OpKey,
    owner: &WorkerId,
    outcome: &Result<OpResult, JobError>,
    then: Option<&Command>,
    now: Timestamp,
) -> Result<Option<Applied<[StepOutput; 2]>>, StoreError> {
    let (id, job) = jobs.get(c, &op.job)?;
    check_op_fence(job, op)?;
    let started = ledger::started(*op, owner.clone(), None, now);
    let (rec, completed) = ledger::finished(started, outcome.clone(), now);
    if !insert_op(c, jobs.cache, id, &rec)? {
        return Ok(None);
    }
    let mut events = vec![ledger::begin_event(op, &OpDecision::Run), completed];
    // The row is the request's already: this finds it again, no SQL.
    let (_, job) = jobs.get(c, &op.job)?;
    if let Some(cmd) = then {
        // A refusal fails the request, which rolls the insert back with it.
        let t = transition(job, cmd.clone(), now).map_err(|e| refused(op.job, e))?;
        *job = t.job;
        events.extend(t.events);
    }
    Ok(Some(Applied {
        value: [
            StepOutput::Decision(OpDecision::Run),
            StepOutput::Job(Box::new(job.clone())),
        ],
        events: stamp(events, now),
    }))
}

pub(crate) fn load_ops(c: &Connection, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
    let mut st = c
        .prepare_cached(concat!(
            "SELECT ",
            op_cols!(),
            " FROM ops WHERE job_id = (SELECT id FROM jobs WHERE key = ?1) ORDER BY id"
        ))
        .map_err(map_err)?;
    let rows = st
        .query_map([key.digest().as_bytes().as_slice()], |r| row_to_op(*key, r))
        .map_err(map_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
}

pub(crate) fn scan(
    c: &Connection,
    state: Option<JobState>,
    after: Option<&JobKey>,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let after = after.map_or_else(Vec::new, |k| k.digest().as_bytes().to_vec());
    let mut st = c
        .prepare_cached(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE key > ?1 AND (?2 IS NULL OR state = ?2) ORDER BY key LIMIT ?3 + 0"
        ))
        .map_err(map_err)?;
    let rows = st
        .query_map(
            params![after, state.map(JobState::as_str), i(limit as u64)],
            row_to_job,
        )
        .map_err(map_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
}

pub(crate) fn busiest_hosts(
    c: &Connection,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<idem_core::HostLoad>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT j.host, j.in_flight, j.due, j.unfinished, \
               (SELECT cooldown_until FROM hosts h WHERE h.host = j.host AND h.cooldown_until > ?1) \
             FROM (SELECT host, \
               coalesce(sum(lease_owner IS NOT NULL AND lease_expires_at > ?1), 0) AS in_flight, \
               coalesce(sum(due_at <= ?1), 0) AS due, count(*) AS unfinished \
             FROM jobs WHERE due_at IS NOT NULL OR suspect_due_at IS NOT NULL \
             GROUP BY host ORDER BY in_flight DESC, due DESC, unfinished DESC, host LIMIT ?2) j \
             ORDER BY j.in_flight DESC, j.due DESC, j.unfinished DESC, j.host",
        )
        .map_err(map_err)?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let rows = st
        .query_map(params![now.as_millis(), i(limit as u64)], |r| {
            Ok(idem_core::HostLoad {
                host: r.get(0)?,
                in_flight: n(r.get(1)?),
                due: n(r.get(2)?),
                unfinished: n(r.get(3)?),
                cooling_down_until: r.get::<_, Option<i64>>(4)?.map(Timestamp::from_millis),
            })
        })
        .map_err(map_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(map_err)
}

pub(crate) fn check_integrity(c: &Connection, thorough: bool) -> Result<Vec<String>, StoreError> {
    let sql = if thorough {
        "PRAGMA integrity_check(100)"
    } else {
        "PRAGMA quick_check(100)"
    };
    let mut st = c.prepare(sql).map_err(map_err)?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(map_err)?;
    let found: Vec<String> = rows.collect::<Result<_, _>>().map_err(map_err)?;
    Ok(found.into_iter().filter(|r| r != "ok").collect())
}

pub(crate) fn finalized_by_url(c: &Connection, url: &str) -> Result<Option<Job>, StoreError> {
    let mut st = c
        .prepare_cached(concat!("SELECT ", job_cols!(), " FROM jobs INDEXED BY jobs_finalized_url WHERE url = ?1 AND state = 'finalized' LIMIT 1"))
        .map_err(map_err)?;
    st.query_row([url], row_to_job).optional().map_err(map_err)
}

pub(crate) fn expired_leases(
    c: &Connection,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let mut st = c
        .prepare_cached(concat!("SELECT ", job_cols!(), " FROM jobs INDEXED BY jobs_lease_owner WHERE lease_owner IS NOT NULL AND lease_expires_at <= ?1 LIMIT ?2 + 0"))
        .map_err(map_err)?;
    let rows = st
        .query_map(params![now.as_millis(), i(limit as u64)], row_to_job)
        .map_err(map_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
}

pub(crate) fn lease_owners(c: &Connection, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
    let mut st = c
        .prepare_cached(
            "SELECT DISTINCT lease_owner FROM jobs WHERE lease_owner IS NOT NULL AND lease_expires_at > ?1 ORDER BY 1",
        )
        .map_err(map_err)?;
    let rows = st
        .query_map([now.as_millis()], |r| r.get::<_, String>(0))
        .map_err(map_err)?;
    rows.map(|r| r.map(WorkerId).map_err(map_err)).collect()
}

pub(crate) fn abandon_dead_ops(
    c: &Connection,
    cache: &mut Cache,
    now: Timestamp,
) -> Result<Applied<u64>, StoreError> {
    // A started op is dead when its job's live lease (if any) has another epoch.
    let n = c
        .execute(
            "UPDATE ops SET status = 'abandoned', finished_at = ?1 WHERE status = 'started' AND NOT EXISTS ( \
               SELECT 1 FROM jobs j WHERE j.id = ops.job_id AND j.lease_epoch = ops.epoch AND j.lease_expires_at > ?1)",
            [now.as_millis()],
        )
        .map_err(map_err)? as u64;
    if n > 0 {
        cache.forget_ops();
    }
    let events = ledger::abandoned_event(None, n)
        .map(|e| e.at(now))
        .into_iter()
        .collect();
    Ok(Applied { value: n, events })
}

pub(crate) fn status(c: &Connection, now: Timestamp) -> Result<StatusCounts, StoreError> {
    let mut s = StatusCounts::default();
    for st in JobState::ALL {
        s.by_state.insert(st, 0);
    }
    {
        let mut q = c
            .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")
            .map_err(map_err)?;
        let rows = q
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(map_err)?;
        for row in rows {
            let (state, n) = row.map_err(map_err)?;
            let st = JobState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state:?}")))?;
            let n = u64::try_from(n).unwrap_or(0);
            s.by_state.insert(st, n);
            s.total += n;
        }
    }
    let now_ms = now.as_millis();
    let (live, expired): (i64, i64) = c
        .query_row(
            "SELECT coalesce(sum(lease_expires_at > ?1), 0), coalesce(sum(lease_expires_at <= ?1), 0) FROM jobs WHERE lease_owner IS NOT NULL",
            [now_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(map_err)?;
    s.live_leases = u64::try_from(live).unwrap_or(0);
    s.expired_leases = u64::try_from(expired).unwrap_or(0);
    let (due, oldest): (i64, Option<i64>) = c
        .query_row(
            "SELECT count(*), min(due_at) FROM jobs WHERE due_at <= ?1",
            [now_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(map_err)?;
    s.due_now = u64::try_from(due).unwrap_or(0);
    let suspects: i64 = c
        .query_row(
            "SELECT count(*) FROM jobs WHERE suspect_due_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .map_err(map_err)?;
    s.suspects = u64::try_from(suspects).unwrap_or(0);
    s.oldest_due_age_ms = oldest.map(|t| now.millis_since(Timestamp::from_millis(t)));
    {
        let mut q = c
            .prepare_cached("SELECT last_error FROM jobs WHERE state = 'failed'")
            .map_err(map_err)?;
        let rows = q
            .query_map([], |r| r.get::<_, Option<String>>(0))
            .map_err(map_err)?;
        for row in rows {
            let e = row.map_err(map_err)?;
            *s.failures_by_reason
                .entry(failure_reason(e.as_deref()))
                .or_default() += 1;
        }
    }
    s.replays = c
        .query_row(
            "SELECT value FROM counters WHERE name = 'replays'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(map_err)?
        .map_or(0, |v| u64::try_from(v).unwrap_or(0));
    // Op rows are never deleted, so the largest rowid counts them in O(1)
    // (restarts of an op under the same lease are not counted).
    s.ops_started = c
        .query_row("SELECT coalesce(max(id), 0) FROM ops", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|v| u64::try_from(v).unwrap_or(0))
        .map_err(map_err)?;
    s.fenced_writes = c
        .query_row(
            "SELECT value FROM counters WHERE name = 'fenced_writes'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| u64::try_from(v).unwrap_or(0))
        .map_err(map_err)?;
    Ok(s)
}

/// Runs steps in order inside the caller's savepoint: the group commit rolls
/// the whole request back if any step fails. The steps between two lease
/// steps share their rows, written back before a lease reads the table.
pub(crate) fn run_steps(
    c: &Connection,
    cache: &mut Cache,
    steps: &[Step],
    now: Timestamp,
) -> Result<Applied<Vec<StepOutput>>, StoreError> {
    let mut out = Vec::with_capacity(steps.len());
    let mut events = Vec::new();
    let mut rest = steps;
    loop {
        let cut = rest
            .iter()
            .position(|s| matches!(s, Step::Lease(_)))
            .unwrap_or(rest.len());
        let (segment, tail) = rest.split_at(cut);
        if !segment.is_empty() {
            with_jobs(c, cache, |jobs| {
                run_segment(c, jobs, segment, now, &mut out, &mut events)
            })?;
        }
        match tail.split_first() {
            Some((Step::Lease(req), more)) => {
                let a = lease(c, cache, req, now)?;
                events.extend(a.events);
                out.push(StepOutput::Leased(a.value));
                rest = more;
            }
            _ => return Ok(Applied { value: out, events }),
        }
    }
}

/// Steps without a lease among them, against one set of rows.
fn run_segment(
    c: &Connection,
    jobs: &mut Jobs<'_>,
    steps: &[Step],
    now: Timestamp,
    out: &mut Vec<StepOutput>,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let mut i = 0;
    while i < steps.len() {
        let step = &steps[i];
        i += 1;
        if let (
            Step::BeginOp { op, owner },
            Some(Step::FinishOp {
                op: fop,
                outcome,
                then,
            }),
        ) = (step, steps.get(i))
        {
            if op == fop {
                if let Some(a) = record_op_in(c, jobs, op, owner, outcome, then.as_ref(), now)? {
                    i += 1;
                    events.extend(a.events);
                    out.extend(a.value);
                    continue;
                }
            }
        }
        match step {
            Step::Apply { key, cmd } => {
                let a = apply_in(c, jobs, key, cmd.clone(), now)?;
                events.extend(a.events);
                out.push(StepOutput::Job(Box::new(a.value)));
            }
            Step::BeginOp { op, owner } => {
                let a = begin_op_in(c, jobs, op, owner, now)?;
                events.extend(a.events);
                out.push(StepOutput::Decision(a.value));
            }
            Step::FinishOp { op, outcome, then } => {
                let a = finish_op_in(c, jobs, op, outcome.clone(), then.clone(), now)?;
                events.extend(a.events);
                out.push(StepOutput::Job(Box::new(a.value)));
            }
            Step::Lease(_) => {
                return Err(StoreError::Backend("a lease step inside a segment".into()))
            }
            Step::HostCooldown { host, until } => {
                c.prepare_cached(
                    "INSERT INTO hosts (host, planned, cooldown_until) VALUES (?1, 0, ?2) \
                     ON CONFLICT (host) DO UPDATE SET cooldown_until = max(coalesce(cooldown_until, 0), excluded.cooldown_until)",
                )
                .and_then(|mut st| st.execute(params![host, until.as_millis()]))
                .map_err(map_err)?;
            }
        }
    }
    Ok(())
}
