//! Row mapping: a job or op as columns, and back.

use idem_core::ports::StoreError;
use idem_core::{
    BlobInfo, CanonicalUrl, Digest32, Epoch, HeadInfo, Job, JobKey, JobSpec, JobState, Lease,
    OpKey, OpKind, OpRecord, OpResult, OpStatus, Timestamp, WorkerId,
};
use rusqlite::types::Value;
use rusqlite::Row;

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

pub(crate) fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("ledger row has a bad {what}").into(),
    )
}

pub(crate) fn key_from(bytes: &[u8]) -> rusqlite::Result<JobKey> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| corrupt("job key"))?;
    Ok(JobKey::from_digest(Digest32::from_bytes(arr)))
}

pub(crate) fn row_to_job(r: &Row<'_>) -> rusqlite::Result<Job> {
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
pub(crate) fn due_at(job: &Job) -> Option<i64> {
    if job.is_suspect() {
        return None;
    }
    when_due(job)
}

pub(crate) fn suspect_due_at(job: &Job) -> Option<i64> {
    if !job.is_suspect() {
        return None;
    }
    when_due(job)
}

pub(crate) fn when_due(job: &Job) -> Option<i64> {
    if job.state.is_terminal() {
        return None;
    }
    let lease_end = job
        .lease
        .as_ref()
        .map_or(i64::MIN, |l| l.expires_at.as_millis());
    Some(job.next_attempt_at.as_millis().max(lease_end))
}

pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The mutable columns of a job row, in a fixed order.
pub(crate) fn mutable_columns(job: &Job) -> [(&'static str, Value); 22] {
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

/// A job row with its rowid, which the write path uses instead of the key
/// (an integer lookup instead of a 32-byte one, for the row and its ops).
pub(crate) fn row_to_job_id(r: &Row<'_>) -> rusqlite::Result<(i64, Job)> {
    Ok((r.get(JOB_ID_COL)?, row_to_job(r)?))
}

/// The column of `id` in `SELECT job_cols!(), id`.
pub(crate) const JOB_ID_COL: usize = 29;

/// An op row's columns; its job key comes from the query's parameter.
macro_rules! op_cols {
    () => {
        "kind, epoch, owner, status, result, error, runs, started_at, finished_at"
    };
}

pub(crate) fn row_to_op(job: JobKey, r: &Row<'_>) -> rusqlite::Result<OpRecord> {
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

/// An op's result as stored: JSON, never truncated.
pub(crate) fn result_json(rec: &OpRecord) -> Result<Option<String>, StoreError> {
    rec.result
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Backend(format!("serialising op result: {e}")))
}
