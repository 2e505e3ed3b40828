//! The schema and its forward-only migrations. A database (schema) that
//! holds other tables but no idem ledger, or a ledger written by a newer
//! idem, is refused before anything is written to it.

use crate::error::map_err;
use idem_core::ports::StoreError;

/// The schema version this build writes.
pub(crate) const LATEST: i64 = 3;

/// Forward-only migrations; entry `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE idem_ledger (
    application    TEXT    NOT NULL CHECK (application = 'idem'),
    schema_version BIGINT  NOT NULL
);
INSERT INTO idem_ledger (application, schema_version) VALUES ('idem', 0);
CREATE TABLE jobs (
    id               BIGSERIAL PRIMARY KEY,
    key              BYTEA   NOT NULL UNIQUE CHECK (length(key) = 32),
    fingerprint      BYTEA   NOT NULL,
    work_id          TEXT    NOT NULL,
    artifact_id      TEXT    NOT NULL,
    url              TEXT    NOT NULL,
    expected_sha256  TEXT,
    expected_type    TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('planned', 'leased', 'head_done', 'streaming', 'finalized', 'skipped_duplicate', 'failed')),
    lease_owner      TEXT,
    lease_epoch      BIGINT,
    lease_expires_at BIGINT,
    lease_isolated   BOOLEAN NOT NULL DEFAULT false,
    epoch            BIGINT  NOT NULL,
    attempts         BIGINT  NOT NULL,
    max_attempts     BIGINT  NOT NULL,
    next_attempt_at  BIGINT  NOT NULL,
    due_at           BIGINT,
    suspect_due_at   BIGINT,
    last_error       TEXT,
    head             TEXT,
    blob_sha256      TEXT,
    blob_size        BIGINT,
    blob_path        TEXT,
    duplicate_of     BYTEA,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    first_leased_at  BIGINT,
    finished_at      BIGINT,
    holder_deaths    BIGINT  NOT NULL DEFAULT 0,
    isolated_deaths  BIGINT  NOT NULL DEFAULT 0,
    host             TEXT    NOT NULL,
    host_rank        BIGINT  NOT NULL
);
CREATE INDEX jobs_rank_due ON jobs (host_rank, due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX jobs_suspect_due ON jobs (suspect_due_at, id) WHERE suspect_due_at IS NOT NULL;
CREATE INDEX jobs_host_lease ON jobs (host, lease_expires_at) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX jobs_finalized_url ON jobs (url) WHERE state = 'finalized';
CREATE INDEX jobs_state ON jobs (state);
CREATE TABLE ops (
    id          BIGSERIAL PRIMARY KEY,
    job_id      BIGINT  NOT NULL REFERENCES jobs (id),
    kind        TEXT    NOT NULL CHECK (kind IN ('head', 'stream', 'finalize')),
    epoch       BIGINT  NOT NULL,
    owner       TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('started', 'committed', 'failed', 'abandoned')),
    result      TEXT,
    error       TEXT,
    runs        BIGINT  NOT NULL,
    started_at  BIGINT  NOT NULL,
    finished_at BIGINT,
    UNIQUE (job_id, kind, epoch)
);
CREATE INDEX ops_started ON ops (job_id) WHERE status = 'started';
CREATE TABLE hosts (
    host           TEXT PRIMARY KEY,
    planned        BIGINT NOT NULL,
    cooldown_until BIGINT
);
-- Counters are spread over shards (by the job whose write moved them), so
-- concurrent writers never queue on one row; a count is the shards' sum.
CREATE TABLE counters (
    name  TEXT   NOT NULL,
    shard INT    NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name, shard)
);
",
    r"
-- v2: the operator pauses a host (or every host, as '*'): no lease takes
-- its jobs until it is resumed.
ALTER TABLE hosts ADD COLUMN paused BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX hosts_paused ON hosts (host) WHERE paused;
",
    r"
-- v3: an artifact's further URLs (mirrors) and a job's request headers,
-- as JSON (NULL for the many jobs that have neither), and which URL a job
-- fetches now.
ALTER TABLE jobs ADD COLUMN extra TEXT;
ALTER TABLE jobs ADD COLUMN url_index BIGINT NOT NULL DEFAULT 0;
",
];

/// A lock key for migrations (an advisory lock, so two processes opening a
/// new ledger at once migrate it once).
const MIGRATION_LOCK: i64 = 0x6964_656d;

/// Checks the database is an idem ledger (or empty) of a version this
/// build reads, and migrates it.
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(map_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(map_err)?;
    let marked: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'idem_ledger')",
            &[],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(map_err)?;
    let version = if marked {
        tx.query_one("SELECT schema_version FROM idem_ledger", &[])
            .await
            .and_then(|r| r.try_get::<_, i64>(0))
            .map_err(|e| {
                StoreError::NotALedger(format!("its idem_ledger table is unreadable: {e}"))
            })?
    } else {
        let (schema, tables): (Option<String>, i64) = tx
            .query_one(
                "SELECT current_schema(), (SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema())",
                &[],
            )
            .await
            .and_then(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .map_err(map_err)?;
        let Some(schema) = schema else {
            return Err(StoreError::NotALedger(
                "the connection has no current schema to hold a ledger (check search_path)".into(),
            ));
        };
        if tables > 0 {
            return Err(StoreError::NotALedger(format!(
                "schema {schema} holds {tables} tables but no idem ledger; refusing to touch it"
            )));
        }
        0
    };
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
        tx.batch_execute(sql).await.map_err(map_err)?;
        let to = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute("UPDATE idem_ledger SET schema_version = $1", &[&to])
            .await
            .map_err(map_err)?;
    }
    tx.commit().await.map_err(map_err)
}
