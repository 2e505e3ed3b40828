//! Row mapping: a job or op as columns, and back.

use idem_core::codec;
use idem_core::{
    BlobInfo, CanonicalUrl, Digest32, Epoch, Job, JobKey, JobSpec, JobState, Lease, OpKey, OpKind,
    OpRecord, OpStatus, Timestamp, WorkerId,
};
use rusqlite::types::Value;
use rusqlite::Row;

/// A job row's columns, in `row_to_job`'s order. A macro, so queries are
/// `concat!`ed at compile time instead of formatted on every call.
macro_rules! job_cols {
    () => {
        "key, work_id, artifact_id, url, expected_sha256, expected_type, state, \
         lease_owner, lease_epoch, lease_expires_at, epoch, attempts, max_attempts, next_attempt_at, last_error, \
         head, blob_sha256, blob_size, blob_path, duplicate_of, created_at, updated_at, first_leased_at, finished_at, \
         holder_deaths, isolated_deaths, lease_isolated, host_rank, extra, url_index"
    };
}

/// Job states as stored: the finished ones first, so a finished ledger's
/// rows hold 0, 1 or 2 (0 and 1 take no bytes in a record).
const STATES: [JobState; 7] = [
    JobState::Finalized,
    JobState::SkippedDuplicate,
    JobState::Failed,
    JobState::Planned,
    JobState::Leased,
    JobState::HeadDone,
    JobState::Streaming,
];

pub(crate) fn state_code(s: JobState) -> i64 {
    STATES.iter().position(|x| *x == s).map_or(-1, |i| i as i64)
}

pub(crate) fn state_of(code: i64) -> Option<JobState> {
    STATES.get(usize::try_from(code).ok()?).copied()
}

/// Op kinds as stored (the `ops.kind` column).
pub(crate) fn kind_code(k: OpKind) -> i64 {
    match k {
        OpKind::Head => 0,
        OpKind::Stream => 1,
        OpKind::Finalize => 2,
    }
}

fn kind_of(code: i64) -> Option<OpKind> {
    OpKind::ALL.get(usize::try_from(code).ok()?).copied()
}

const OP_STATUSES: [OpStatus; 4] = [
    OpStatus::Started,
    OpStatus::Committed,
    OpStatus::Failed,
    OpStatus::Abandoned,
];

/// Op statuses as stored (the `ops.status` column): started 0,
/// committed 1, failed 2, abandoned 3.
pub(crate) fn status_code(s: OpStatus) -> i64 {
    OP_STATUSES
        .iter()
        .position(|x| *x == s)
        .map_or(-1, |i| i as i64)
}

fn status_of(code: i64) -> Option<OpStatus> {
    OP_STATUSES.get(usize::try_from(code).ok()?).copied()
}

/// What the finalized-URL index holds: 47 bits of the URL's SHA-256 (six
/// bytes in a record), checked against the URL itself on lookup.
pub(crate) fn url_hash(url: &str) -> i64 {
    let d = Digest32::of(url.as_bytes());
    let b = d.as_bytes();
    i64::from_be_bytes([0, 0, b[0] & 0x7f, b[1], b[2], b[3], b[4], b[5]])
}

/// A digest as stored: 32 raw bytes.
pub(crate) fn digest_from(bytes: &[u8], what: &str) -> rusqlite::Result<Digest32> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| corrupt(what))?;
    Ok(Digest32::from_bytes(arr))
}

/// A blob's path as stored: NULL when it is the one its digest implies.
pub(crate) fn own_path(b: &BlobInfo) -> Option<String> {
    (b.path != BlobInfo::path_for(&b.sha256)).then(|| b.path.clone())
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
    let url: String = r.get(3)?;
    let expected_sha: Option<Vec<u8>> = r.get(4)?;
    let state: i64 = r.get(6)?;
    let lease_owner: Option<String> = r.get(7)?;
    let lease_epoch: Option<i64> = r.get(8)?;
    let lease_expires: Option<i64> = r.get(9)?;
    let head: Option<Vec<u8>> = r.get(15)?;
    let blob_sha: Option<Vec<u8>> = r.get(16)?;
    let dup: Option<Vec<u8>> = r.get(19)?;
    let mut spec = JobSpec {
        work_id: r.get(1)?,
        artifact_id: r.get(2)?,
        url: serde_json::from_value::<CanonicalUrl>(serde_json::Value::String(url))
            .map_err(|_| corrupt("url"))?,
        sha256: expected_sha
            .map(|s| digest_from(&s, "expected sha256"))
            .transpose()?,
        content_type: r.get(5)?,
        mirrors: Vec::new(),
        headers: Vec::new(),
    };
    if let Some(extra) = r.get::<_, Option<String>>(28)? {
        codec::decode_extra(&mut spec, &extra).ok_or_else(|| corrupt("mirrors or headers"))?;
    }
    let lease = match (lease_owner, lease_epoch, lease_expires) {
        (Some(owner), Some(epoch), Some(exp)) => Some(Lease {
            owner: WorkerId(owner),
            epoch: Epoch(u64::try_from(epoch).map_err(|_| corrupt("lease epoch"))?),
            expires_at: Timestamp::from_millis(exp),
            isolated: r.get::<_, i64>(26)? != 0,
        }),
        _ => None,
    };
    let blob = match blob_sha {
        Some(s) => {
            let sha256 = digest_from(&s, "blob sha256")?;
            Some(BlobInfo {
                size: u64::try_from(r.get::<_, i64>(17)?).map_err(|_| corrupt("blob size"))?,
                path: r
                    .get::<_, Option<String>>(18)?
                    .unwrap_or_else(|| BlobInfo::path_for(&sha256)),
                sha256,
            })
        }
        None => None,
    };
    Ok(Job {
        key,
        fingerprint: spec.fingerprint(),
        spec,
        state: state_of(state).ok_or_else(|| corrupt("state"))?,
        lease,
        epoch: Epoch(u64::try_from(r.get::<_, i64>(10)?).map_err(|_| corrupt("epoch"))?),
        attempts: u32::try_from(r.get::<_, i64>(11)?).map_err(|_| corrupt("attempts"))?,
        max_attempts: u32::try_from(r.get::<_, i64>(12)?).map_err(|_| corrupt("max_attempts"))?,
        next_attempt_at: Timestamp::from_millis(r.get(13)?),
        last_error: r.get(14)?,
        head: head
            .map(|h| codec::decode_head(&h).ok_or_else(|| corrupt("head")))
            .transpose()?,
        blob,
        duplicate_of: dup.map(|d| key_from(&d)).transpose()?,
        created_at: Timestamp::from_millis(r.get(20)?),
        updated_at: Timestamp::from_millis(r.get(21)?),
        first_leased_at: r.get::<_, Option<i64>>(22)?.map(Timestamp::from_millis),
        finished_at: r.get::<_, Option<i64>>(23)?.map(Timestamp::from_millis),
        holder_deaths: u32::try_from(r.get::<_, i64>(24)?).map_err(|_| corrupt("holder_deaths"))?,
        isolated_deaths: u32::try_from(r.get::<_, i64>(25)?)
            .map_err(|_| corrupt("isolated_deaths"))?,
        host_rank: u64::try_from(r.get::<_, i64>(27)?).map_err(|_| corrupt("host_rank"))?,
        url_index: u32::try_from(r.get::<_, i64>(29)?).map_err(|_| corrupt("url_index"))?,
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
pub(crate) fn mutable_columns(job: &Job) -> [(&'static str, Value); 23] {
    let opt_i = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
    let opt_t = |v: Option<String>| v.map_or(Value::Null, Value::Text);
    let opt_b = |v: Option<Vec<u8>>| v.map_or(Value::Null, Value::Blob);
    [
        ("state", Value::Integer(state_code(job.state))),
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
        ("head", opt_b(job.head.as_ref().map(codec::encode_head))),
        (
            "blob_sha256",
            opt_b(job.blob.as_ref().map(|b| b.sha256.as_bytes().to_vec())),
        ),
        ("blob_size", opt_i(job.blob.as_ref().map(|b| i(b.size)))),
        ("blob_path", opt_t(job.blob.as_ref().and_then(own_path))),
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
        ("url_index", Value::Integer(i64::from(job.url_index))),
    ]
}

/// A job row with its rowid, which the write path uses instead of the key
/// (an integer lookup instead of a 32-byte one, for the row and its ops).
pub(crate) fn row_to_job_id(r: &Row<'_>) -> rusqlite::Result<(i64, Job)> {
    Ok((r.get(JOB_ID_COL)?, row_to_job(r)?))
}

/// The column of `id` in `SELECT job_cols!(), id`.
pub(crate) const JOB_ID_COL: usize = 30;

/// An op row's columns (the owner's name joined from `owners`); its job
/// key comes from the query's parameter.
macro_rules! op_cols {
    () => {
        "o.kind, o.epoch, (SELECT name FROM owners WHERE id = o.owner), o.status, o.result, o.error, o.runs, \
         o.started_at, o.took_ms"
    };
}

pub(crate) fn row_to_op(job: JobKey, r: &Row<'_>) -> rusqlite::Result<OpRecord> {
    let kind = kind_of(r.get(0)?).ok_or_else(|| corrupt("op kind"))?;
    let result: Option<Vec<u8>> = r.get(4)?;
    let started_at: i64 = r.get(7)?;
    Ok(OpRecord {
        key: OpKey {
            job,
            kind,
            epoch: Epoch(u64::try_from(r.get::<_, i64>(1)?).map_err(|_| corrupt("op epoch"))?),
        },
        owner: WorkerId(
            r.get::<_, Option<String>>(2)?
                .ok_or_else(|| corrupt("op owner"))?,
        ),
        status: status_of(r.get(3)?).ok_or_else(|| corrupt("op status"))?,
        result: result
            .map(|b| codec::decode_result(kind, &b).ok_or_else(|| corrupt("op result")))
            .transpose()?,
        error: r.get(5)?,
        runs: u32::try_from(r.get::<_, i64>(6)?).map_err(|_| corrupt("op runs"))?,
        started_at: Timestamp::from_millis(started_at),
        finished_at: r
            .get::<_, Option<i64>>(8)?
            .map(|took| Timestamp::from_millis(started_at.saturating_add(took))),
    })
}

/// An op's result as stored: its compact form, never truncated.
pub(crate) fn result_bytes(rec: &OpRecord) -> Option<Vec<u8>> {
    rec.result.as_ref().map(codec::encode_result)
}

/// An op's finish as stored: milliseconds after its start.
pub(crate) fn took_ms(rec: &OpRecord) -> Option<i64> {
    rec.finished_at
        .map(|f| f.as_millis().saturating_sub(rec.started_at.as_millis()))
}
