//! The store's reads: a job, its ops, pages of jobs, and the counts. Each
//! runs on a pooled connection outside any write transaction.

use crate::error::map_err;
use crate::rows::{i, job_of, op_of};
use idem_core::ports::{StatusCounts, StoreError};
use idem_core::tx::Counter;
use idem_core::{failure_reason, HostLoad, Job, JobKey, JobState, OpRecord, Timestamp, WorkerId};
use tokio_postgres::Client;

fn jobs(rows: &[tokio_postgres::Row]) -> Result<Vec<Job>, StoreError> {
    rows.iter().map(|r| job_of(r).map(|(_, j)| j)).collect()
}

fn n(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) async fn job(c: &Client, key: &JobKey) -> Result<Option<Job>, StoreError> {
    let rows = c
        .query(
            concat!("SELECT ", job_cols!(), " FROM jobs WHERE key = $1"),
            &[&key.digest().as_bytes().as_slice()],
        )
        .await
        .map_err(map_err)?;
    Ok(jobs(&rows)?.pop())
}

pub(crate) async fn ops(c: &Client, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                op_cols!(),
                " FROM ops WHERE job_id = (SELECT id FROM jobs WHERE key = $1) ORDER BY id"
            ),
            &[&key.digest().as_bytes().as_slice()],
        )
        .await
        .map_err(map_err)?;
    rows.iter().map(|r| op_of(*key, r)).collect()
}

pub(crate) async fn scan(
    c: &Client,
    state: Option<JobState>,
    after: Option<&JobKey>,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let after = after.map_or_else(Vec::new, |k| k.digest().as_bytes().to_vec());
    let rows = c
        .query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE key > $1 AND ($2::text IS NULL OR state = $2) ORDER BY key LIMIT $3"
            ),
            &[&after, &state.map(JobState::as_str), &i(limit as u64)],
        )
        .await
        .map_err(map_err)?;
    jobs(&rows)
}

pub(crate) async fn finalized_by_url(c: &Client, url: &str) -> Result<Option<Job>, StoreError> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE url = $1 AND state = 'finalized' LIMIT 1"
            ),
            &[&url],
        )
        .await
        .map_err(map_err)?;
    Ok(jobs(&rows)?.pop())
}

pub(crate) async fn expired_leases(
    c: &Client,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE lease_owner IS NOT NULL AND lease_expires_at <= $1 ORDER BY id LIMIT $2"
            ),
            &[&now.as_millis(), &i(limit as u64)],
        )
        .await
        .map_err(map_err)?;
    jobs(&rows)
}

pub(crate) async fn lease_owners(c: &Client, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
    let rows = c
        .query(
            "SELECT DISTINCT lease_owner COLLATE \"C\" FROM jobs WHERE lease_owner IS NOT NULL AND lease_expires_at > $1 ORDER BY 1",
            &[&now.as_millis()],
        )
        .await
        .map_err(map_err)?;
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map(WorkerId).map_err(map_err))
        .collect()
}

pub(crate) async fn busiest_hosts(
    c: &Client,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<HostLoad>, StoreError> {
    let rows = c
        .query(
            "SELECT j.host, j.in_flight, j.due, j.unfinished, \
               (SELECT cooldown_until FROM hosts h WHERE h.host = j.host AND h.cooldown_until > $1) \
             FROM (SELECT host, \
               count(*) FILTER (WHERE lease_owner IS NOT NULL AND lease_expires_at > $1) AS in_flight, \
               count(*) FILTER (WHERE due_at <= $1) AS due, count(*) AS unfinished \
             FROM jobs WHERE due_at IS NOT NULL OR suspect_due_at IS NOT NULL \
             GROUP BY host) j \
             ORDER BY j.in_flight DESC, j.due DESC, j.unfinished DESC, j.host COLLATE \"C\" LIMIT $2",
            &[&now.as_millis(), &i(limit as u64)],
        )
        .await
        .map_err(map_err)?;
    rows.iter()
        .map(|r| {
            Ok(HostLoad {
                host: r.try_get(0).map_err(map_err)?,
                in_flight: n(r.try_get(1).map_err(map_err)?),
                due: n(r.try_get(2).map_err(map_err)?),
                unfinished: n(r.try_get(3).map_err(map_err)?),
                cooling_down_until: r
                    .try_get::<_, Option<i64>>(4)
                    .map_err(map_err)?
                    .map(Timestamp::from_millis),
            })
        })
        .collect()
}

pub(crate) async fn status(c: &Client, now: Timestamp) -> Result<StatusCounts, StoreError> {
    let mut s = StatusCounts::default();
    for st in JobState::ALL {
        s.by_state.insert(st, 0);
    }
    let now_ms = now.as_millis();
    for r in c
        .query("SELECT state, count(*) FROM jobs GROUP BY state", &[])
        .await
        .map_err(map_err)?
    {
        let state: String = r.try_get(0).map_err(map_err)?;
        let st = JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state:?}")))?;
        let count = n(r.try_get(1).map_err(map_err)?);
        s.by_state.insert(st, count);
        s.total += count;
    }
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE lease_expires_at > $1), count(*) FILTER (WHERE lease_expires_at <= $1), \
               (SELECT count(*) FROM jobs WHERE due_at <= $1), (SELECT min(due_at) FROM jobs WHERE due_at <= $1), \
               (SELECT count(*) FROM jobs WHERE suspect_due_at IS NOT NULL), \
               (SELECT count(*) FROM ops), \
               (SELECT count(*) FROM ops o WHERE o.status = 'started' AND NOT EXISTS ( \
                 SELECT 1 FROM jobs j WHERE j.id = o.job_id AND j.lease_epoch = o.epoch AND j.lease_expires_at > $1)) \
             FROM jobs WHERE lease_owner IS NOT NULL",
            &[&now_ms],
        )
        .await
        .map_err(map_err)?;
    s.live_leases = n(r.try_get(0).map_err(map_err)?);
    s.expired_leases = n(r.try_get(1).map_err(map_err)?);
    s.due_now = n(r.try_get(2).map_err(map_err)?);
    s.oldest_due_age_ms = r
        .try_get::<_, Option<i64>>(3)
        .map_err(map_err)?
        .map(|t| now.millis_since(Timestamp::from_millis(t)));
    s.suspects = n(r.try_get(4).map_err(map_err)?);
    let op_rows = n(r.try_get(5).map_err(map_err)?);
    s.dead_ops = n(r.try_get(6).map_err(map_err)?);
    for r in c
        .query("SELECT host FROM hosts WHERE paused ORDER BY host", &[])
        .await
        .map_err(map_err)?
    {
        s.paused.push(r.try_get(0).map_err(map_err)?);
    }
    for r in c
        .query("SELECT last_error FROM jobs WHERE state = 'failed'", &[])
        .await
        .map_err(map_err)?
    {
        let e: Option<String> = r.try_get(0).map_err(map_err)?;
        *s.failures_by_reason
            .entry(failure_reason(e.as_deref()))
            .or_default() += 1;
    }
    let counter = |rows: &[tokio_postgres::Row], name: &str| -> Result<u64, StoreError> {
        for r in rows {
            if r.try_get::<_, String>(0).map_err(map_err)? == name {
                return Ok(n(r.try_get(1).map_err(map_err)?));
            }
        }
        Ok(0)
    };
    let sums = c
        .query(
            "SELECT name, sum(value)::bigint FROM counters GROUP BY name",
            &[],
        )
        .await
        .map_err(map_err)?;
    s.replays = counter(&sums, Counter::Replays.as_str())?;
    s.fenced_writes = counter(&sums, Counter::FencedWrites.as_str())?;
    s.ops_started =
        op_rows + counter(&sums, "ops_pruned")? + counter(&sums, Counter::OpRestarts.as_str())?;
    Ok(s)
}
