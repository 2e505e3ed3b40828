//! Row mapping: a job or op as PostgreSQL columns, and back.

use idem_core::ports::StoreError;
use idem_core::{
    BlobInfo, CanonicalUrl, Digest32, Epoch, Fingerprint, HeadInfo, Job, JobKey, JobSpec, JobState,
    Lease, OpKey, OpKind, OpRecord, OpResult, OpStatus, Timestamp, WorkerId,
};
use tokio_postgres::Row;

/// A job row's columns, in `job_of`'s order.
macro_rules! job_cols {
    () => {
        "key, fingerprint, work_id, artifact_id, url, expected_sha256, expected_type, state, \
         lease_owner, lease_epoch, lease_expires_at, epoch, attempts, max_attempts, next_attempt_at, last_error, \
         head, blob_sha256, blob_size, blob_path, duplicate_of, created_at, updated_at, first_leased_at, finished_at, \
         holder_deaths, isolated_deaths, lease_isolated, host_rank, id, extra, url_index"
    };
}

/// An op row's columns, in `op_of`'s order; its job key comes from the
/// query's parameter.
macro_rules! op_cols {
    () => {
        "kind, epoch, owner, status, result, error, runs, started_at, finished_at"
    };
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("ledger row has a bad {what}"))
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, StoreError> {
    r.try_get(i).map_err(crate::error::map_err)
}

fn u(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(what))
}

fn u32_of(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(what))
}

pub(crate) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn key_from(bytes: &[u8]) -> Result<JobKey, StoreError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| corrupt("job key"))?;
    Ok(JobKey::from_digest(Digest32::from_bytes(arr)))
}

/// A job and its row id from `SELECT job_cols!()`.
pub(crate) fn job_of(r: &Row) -> Result<(i64, Job), StoreError> {
    let key = key_from(get::<&[u8]>(r, 0)?)?;
    let fp: [u8; 32] = get::<&[u8]>(r, 1)?
        .try_into()
        .map_err(|_| corrupt("fingerprint"))?;
    let url: String = get(r, 4)?;
    let expected_sha: Option<String> = get(r, 5)?;
    let state: String = get(r, 7)?;
    let lease_owner: Option<String> = get(r, 8)?;
    let lease_epoch: Option<i64> = get(r, 9)?;
    let lease_expires: Option<i64> = get(r, 10)?;
    let head: Option<String> = get(r, 16)?;
    let blob_sha: Option<String> = get(r, 17)?;
    let dup: Option<&[u8]> = get(r, 20)?;
    let mut spec = JobSpec {
        work_id: get(r, 2)?,
        artifact_id: get(r, 3)?,
        url: serde_json::from_value::<CanonicalUrl>(serde_json::Value::String(url))
            .map_err(|_| corrupt("url"))?,
        sha256: expected_sha
            .map(|s| Digest32::parse_hex(&s))
            .transpose()
            .map_err(|_| corrupt("expected sha256"))?,
        content_type: get(r, 6)?,
        mirrors: Vec::new(),
        headers: Vec::new(),
    };
    if let Some(extra) = get::<Option<String>>(r, 30)? {
        idem_core::codec::decode_extra(&mut spec, &extra)
            .ok_or_else(|| corrupt("mirrors or headers"))?;
    }
    let lease = match (lease_owner, lease_epoch, lease_expires) {
        (Some(owner), Some(epoch), Some(exp)) => Some(Lease {
            owner: WorkerId(owner),
            epoch: Epoch(u(epoch, "lease epoch")?),
            expires_at: Timestamp::from_millis(exp),
            isolated: get(r, 27)?,
        }),
        _ => None,
    };
    let blob = match blob_sha {
        Some(s) => Some(BlobInfo {
            sha256: Digest32::parse_hex(&s).map_err(|_| corrupt("blob sha256"))?,
            size: u(get(r, 18)?, "blob size")?,
            path: get(r, 19)?,
        }),
        None => None,
    };
    let job = Job {
        key,
        fingerprint: Fingerprint::from_digest(Digest32::from_bytes(fp)),
        spec,
        state: JobState::parse(&state).ok_or_else(|| corrupt("state"))?,
        lease,
        epoch: Epoch(u(get(r, 11)?, "epoch")?),
        attempts: u32_of(get(r, 12)?, "attempts")?,
        max_attempts: u32_of(get(r, 13)?, "max_attempts")?,
        next_attempt_at: Timestamp::from_millis(get(r, 14)?),
        last_error: get(r, 15)?,
        head: head
            .map(|h| serde_json::from_str::<HeadInfo>(&h))
            .transpose()
            .map_err(|_| corrupt("head"))?,
        blob,
        duplicate_of: dup.map(key_from).transpose()?,
        created_at: Timestamp::from_millis(get(r, 21)?),
        updated_at: Timestamp::from_millis(get(r, 22)?),
        first_leased_at: get::<Option<i64>>(r, 23)?.map(Timestamp::from_millis),
        finished_at: get::<Option<i64>>(r, 24)?.map(Timestamp::from_millis),
        holder_deaths: u32_of(get(r, 25)?, "holder_deaths")?,
        isolated_deaths: u32_of(get(r, 26)?, "isolated_deaths")?,
        host_rank: u(get(r, 28)?, "host_rank")?,
        url_index: u32_of(get(r, 31)?, "url_index")?,
    };
    Ok((get(r, 29)?, job))
}

/// When a job is due in the lease order's column (`due_at`) and in the
/// suspects' (`suspect_due_at`): a suspect is due only in its own.
pub(crate) fn due_columns(job: &Job) -> (Option<i64>, Option<i64>) {
    let due = job.due_at().map(Timestamp::as_millis);
    if job.is_suspect() {
        (None, due)
    } else {
        (due, None)
    }
}

pub(crate) fn op_of(job: JobKey, r: &Row) -> Result<OpRecord, StoreError> {
    let kind: String = get(r, 0)?;
    let status: String = get(r, 3)?;
    let result: Option<String> = get(r, 4)?;
    Ok(OpRecord {
        key: OpKey {
            job,
            kind: OpKind::parse(&kind).ok_or_else(|| corrupt("op kind"))?,
            epoch: Epoch(u(get(r, 1)?, "op epoch")?),
        },
        owner: WorkerId(get(r, 2)?),
        status: OpStatus::parse(&status).ok_or_else(|| corrupt("op status"))?,
        result: result
            .map(|s| serde_json::from_str::<OpResult>(&s))
            .transpose()
            .map_err(|_| corrupt("op result"))?,
        error: get(r, 5)?,
        runs: u32_of(get(r, 6)?, "op runs")?,
        started_at: Timestamp::from_millis(get(r, 7)?),
        finished_at: get::<Option<i64>>(r, 8)?.map(Timestamp::from_millis),
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
