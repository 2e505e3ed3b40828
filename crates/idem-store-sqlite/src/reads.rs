//! The store's reads: a job, its ops, pages of jobs, and the counts.

use crate::open::map_err;
use crate::rows::{i, row_to_job, row_to_op, state_code, state_of, url_hash};
use idem_core::ports::{StatusCounts, StoreError};
use idem_core::tx::Counter;
use idem_core::{failure_reason, Job, JobKey, JobState, OpRecord, Timestamp, WorkerId};
use rusqlite::{params, Connection, OptionalExtension};

pub(crate) fn load_job(c: &Connection, key: &JobKey) -> Result<Option<Job>, StoreError> {
    let mut st = c
        .prepare_cached(concat!("SELECT ", job_cols!(), " FROM jobs WHERE key = ?1"))
        .map_err(map_err)?;
    st.query_row([key.digest().as_bytes().as_slice()], row_to_job)
        .optional()
        .map_err(map_err)
}

pub(crate) fn load_ops(c: &Connection, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
    let mut st = c
        .prepare_cached(concat!(
            "SELECT ",
            op_cols!(),
            " FROM ops o WHERE job_id = (SELECT id FROM jobs WHERE key = ?1) ORDER BY epoch, kind"
        ))
        .map_err(map_err)?;
    let rows = st
        .query_map([key.digest().as_bytes().as_slice()], |r| row_to_op(*key, r))
        .map_err(map_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
}

/// All jobs in key order; one state's in plan (rowid) order, through the
/// state index, so a page costs its own rows however many jobs are in
/// other states (a key order would sort every job of the state per page).
pub(crate) fn scan(
    c: &Connection,
    state: Option<JobState>,
    after: Option<&JobKey>,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let after = after.map_or_else(Vec::new, |k| k.digest().as_bytes().to_vec());
    let mut st = match state {
        None => c.prepare_cached(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE key > ?1 AND ?2 IS NULL ORDER BY key LIMIT ?3 + 0"
        )),
        // The job after which to go on keeps its rowid whatever its state
        // now; no such job (or none given) starts from the first.
        Some(_) => c.prepare_cached(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs INDEXED BY jobs_state WHERE state = ?2 \
               AND id > coalesce((SELECT id FROM jobs WHERE key = ?1), 0) ORDER BY id LIMIT ?3 + 0"
        )),
    }
    .map_err(map_err)?;
    let rows = st
        .query_map(
            params![after, state.map(state_code), i(limit as u64)],
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
            "SELECT h.host, j.in_flight, j.due, j.unfinished, \
               CASE WHEN h.cooldown_until > ?1 THEN h.cooldown_until END \
             FROM (SELECT host_id, \
               coalesce(sum(lease_owner IS NOT NULL AND lease_expires_at > ?1), 0) AS in_flight, \
               coalesce(sum(due_at <= ?1), 0) AS due, count(*) AS unfinished \
             FROM jobs WHERE due_at IS NOT NULL OR suspect_due_at IS NOT NULL \
             GROUP BY host_id) j JOIN hosts h ON h.id = j.host_id \
             ORDER BY j.in_flight DESC, j.due DESC, j.unfinished DESC, h.host LIMIT ?2",
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

pub(crate) fn finalized_by_url(c: &Connection, url: &str) -> Result<Option<Job>, StoreError> {
    let mut st = c
        .prepare_cached(concat!("SELECT ", job_cols!(), " FROM jobs INDEXED BY jobs_finalized_url WHERE url_hash = ?1 AND state = 0 AND url = ?2 LIMIT 1"))
        .map_err(map_err)?;
    st.query_row(params![url_hash(url), url], row_to_job)
        .optional()
        .map_err(map_err)
}

/// Through the finish-time index: the rows of the window, not the ledger.
pub(crate) fn each_finished_since(
    c: &Connection,
    since: Timestamp,
    f: &mut dyn FnMut(&Job),
) -> Result<(), StoreError> {
    let mut st = c
        .prepare_cached(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs INDEXED BY jobs_finished WHERE finished_at >= ?1"
        ))
        .map_err(map_err)?;
    let mut rows = st.query([since.as_millis()]).map_err(map_err)?;
    while let Some(r) = rows.next().map_err(map_err)? {
        f(&row_to_job(r).map_err(map_err)?);
    }
    Ok(())
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
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(map_err)?;
        for row in rows {
            let (state, n) = row.map_err(map_err)?;
            let st = state_of(state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown state code {state}")))?;
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
            .prepare_cached("SELECT host FROM hosts WHERE paused = 1 ORDER BY host")
            .map_err(map_err)?;
        let rows = q
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(map_err)?;
        s.paused = rows.collect::<rusqlite::Result<_>>().map_err(map_err)?;
    }
    {
        let mut q = c
            .prepare_cached("SELECT last_error FROM jobs WHERE state = 2")
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
    let counter = |name: &str| {
        c.prepare_cached("SELECT value FROM counters WHERE name = ?1")
            .and_then(|mut st| st.query_row([name], |r| r.get::<_, i64>(0)).optional())
            .map(|v| v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
            .map_err(map_err)
    };
    s.dead_ops = c
        .query_row(
            "SELECT count(*) FROM ops o INDEXED BY ops_started WHERE status = 0 AND NOT EXISTS ( \
               SELECT 1 FROM jobs j WHERE j.id = o.job_id AND j.lease_epoch = o.epoch AND j.lease_expires_at > ?1)",
            [now_ms],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(map_err)?;
    s.replays = counter(Counter::Replays.as_str())?;
    s.fenced_writes = counter(Counter::FencedWrites.as_str())?;
    // Op rows may be pruned: first starts are counted as they are inserted,
    // starts again under the same key as they happen.
    s.ops_started = counter("op_rows")? + counter(Counter::OpRestarts.as_str())?;
    Ok(s)
}
