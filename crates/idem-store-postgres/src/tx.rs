//! The core's row port ([`Tx`]) in PostgreSQL, inside one transaction at
//! READ COMMITTED.
//!
//! Isolation comes from row locks, as the port asks: every job row read
//! for writing is locked (`FOR UPDATE`), due jobs are picked with `FOR
//! UPDATE SKIP LOCKED` so two leasers never take or wait on the same row,
//! and a host's row is locked while its live leases are counted, so the
//! fleet's host budget holds under concurrent leases. Job updates are also
//! guarded by the epoch read. A deadlock or serialization failure is a
//! [`StoreError::Conflict`]: the whole write rolls back and runs again.

use crate::error::map_err;
use crate::rows::{due_columns, i, job_of, op_of, result_json};
use idem_core::ports::StoreError;
use idem_core::tx::{Counter, Tx};
use idem_core::{Epoch, Fingerprint, Job, JobKey, OpKey, OpRecord, Timestamp, WorkerId};
use std::collections::HashMap;
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// Counter shards: enough that concurrent writers rarely share one.
const COUNTER_SHARDS: u8 = 16;

pub(crate) struct PgTx<'a> {
    /// A connection with a transaction open on it.
    tx: &'a deadpool_postgres::ClientWrapper,
    rt: &'static Runtime,
    /// Row ids of the jobs this transaction has seen.
    ids: HashMap<JobKey, i64>,
    /// Job rows this transaction has locked, as they now are: no one else
    /// can change them before it ends.
    rows: HashMap<JobKey, Job>,
    /// For a plan batch: the fingerprint of each key looked up at once
    /// (`None`: no such job when looked up).
    planned: HashMap<JobKey, Option<Vec<u8>>>,
    /// New jobs held back, to be inserted together.
    pending: Vec<Job>,
}

fn key_bytes(key: &JobKey) -> &[u8] {
    key.digest().as_bytes().as_slice()
}

impl<'a> PgTx<'a> {
    pub(crate) fn new(tx: &'a deadpool_postgres::ClientWrapper, rt: &'static Runtime) -> Self {
        Self {
            tx,
            rt,
            ids: HashMap::new(),
            rows: HashMap::new(),
            planned: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// Inserts the jobs held back, in one statement. A key another writer
    /// planned meanwhile makes the whole write a conflict, run again.
    fn send_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let jobs = std::mem::take(&mut self.pending);
        let col = |f: &dyn Fn(&Job) -> Option<String>| jobs.iter().map(f).collect::<Vec<_>>();
        let keys: Vec<&[u8]> = jobs.iter().map(|j| key_bytes(&j.key)).collect();
        let fps: Vec<&[u8]> = jobs
            .iter()
            .map(|j| j.fingerprint.digest().as_bytes().as_slice())
            .collect();
        let work = col(&|j| Some(j.spec.work_id.clone()));
        let art = col(&|j| Some(j.spec.artifact_id.clone()));
        let url = col(&|j| Some(j.spec.url.as_str().to_owned()));
        let sha = col(&|j| j.spec.sha256.map(|d| d.to_hex()));
        let ctype = col(&|j| j.spec.content_type.clone());
        let state = col(&|j| Some(j.state.as_str().to_owned()));
        let host = col(&|j| Some(j.spec.url.host()));
        let max: Vec<i64> = jobs.iter().map(|j| i64::from(j.max_attempts)).collect();
        let next: Vec<i64> = jobs.iter().map(|j| j.next_attempt_at.as_millis()).collect();
        let due: Vec<Option<i64>> = jobs.iter().map(|j| due_columns(j).0).collect();
        let created: Vec<i64> = jobs.iter().map(|j| j.created_at.as_millis()).collect();
        let rank: Vec<i64> = jobs.iter().map(|j| i(j.host_rank)).collect();
        let extra = col(&|j| idem_core::codec::encode_extra(&j.spec));
        let rows = self.query(
            "INSERT INTO jobs (key, fingerprint, work_id, artifact_id, url, expected_sha256, expected_type, state, \
             epoch, attempts, max_attempts, next_attempt_at, due_at, created_at, updated_at, host, host_rank, extra) \
             SELECT k, f, w, a, u, s, t, st, 0, 0, m, n, d, c, c, h, r, e FROM unnest($1::bytea[], $2::bytea[], \
             $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], \
             $11::bigint[], $12::bigint[], $13::text[], $14::bigint[], $15::text[]) AS x(k, f, w, a, u, s, t, st, m, n, d, c, h, r, e) \
             ON CONFLICT (key) DO NOTHING RETURNING key, id",
            &[
                &keys, &fps, &work, &art, &url, &sha, &ctype, &state, &max, &next, &due, &created,
                &host, &rank, &extra,
            ],
        )?;
        if rows.len() != jobs.len() {
            return Err(StoreError::Conflict(
                "another writer planned some of these jobs meanwhile".into(),
            ));
        }
        for r in &rows {
            let key = crate::rows::key_from(r.try_get::<_, &[u8]>(0).map_err(map_err)?)?;
            self.ids.insert(key, r.try_get(1).map_err(map_err)?);
        }
        Ok(())
    }

    /// Remembers locked rows `SELECT job_cols!() … FOR UPDATE` returned.
    fn locked(&mut self, rows: &[Row]) -> Result<Vec<Job>, StoreError> {
        rows.iter()
            .map(|r| {
                let (id, job) = job_of(r)?;
                self.ids.insert(job.key, id);
                self.rows.insert(job.key, job.clone());
                Ok(job)
            })
            .collect()
    }

    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        self.rt.block_on(async {
            let st = self.tx.prepare_cached(sql).await.map_err(map_err)?;
            self.tx.query(&st, params).await.map_err(map_err)
        })
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.rt.block_on(async {
            let st = self.tx.prepare_cached(sql).await.map_err(map_err)?;
            self.tx.execute(&st, params).await.map_err(map_err)
        })
    }

    fn id(&mut self, key: &JobKey) -> Result<Option<i64>, StoreError> {
        if let Some(id) = self.ids.get(key) {
            return Ok(Some(*id));
        }
        let rows = self.query("SELECT id FROM jobs WHERE key = $1", &[&key_bytes(key)])?;
        let id = rows
            .first()
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()
            .map_err(map_err)?;
        if let Some(id) = id {
            self.ids.insert(*key, id);
        }
        Ok(id)
    }

    /// Runs `sql` with an op row's ten columns as $1..$10; rows changed.
    fn write_op(&self, sql: &str, job_id: i64, rec: &OpRecord) -> Result<u64, StoreError> {
        self.execute(
            sql,
            &[
                &job_id,
                &rec.key.kind.as_str(),
                &i(rec.key.epoch.0),
                &rec.owner.as_str(),
                &rec.status.as_str(),
                &result_json(rec)?,
                &rec.error,
                &i64::from(rec.runs),
                &rec.started_at.as_millis(),
                &rec.finished_at.map(Timestamp::as_millis),
            ],
        )
    }

    fn must_id(&mut self, key: &JobKey) -> Result<i64, StoreError> {
        self.id(key)?.ok_or(StoreError::NotFound(*key))
    }
}

impl Tx for PgTx<'_> {
    fn job(&mut self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE key = $1 FOR UPDATE"
            ),
            &[&key_bytes(key)],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let (id, job) = job_of(r)?;
        self.ids.insert(*key, id);
        Ok(Some(job))
    }

    fn lease_epoch(&mut self, key: &JobKey) -> Result<Option<Option<Epoch>>, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            "SELECT id, lease_epoch FROM jobs WHERE key = $1 FOR UPDATE",
            &[&key_bytes(key)],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        self.ids.insert(*key, r.try_get(0).map_err(map_err)?);
        let e: Option<i64> = r.try_get(1).map_err(map_err)?;
        Ok(Some(e.and_then(|e| u64::try_from(e).ok()).map(Epoch)))
    }

    fn same_fingerprint(
        &mut self,
        key: &JobKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<bool>, StoreError> {
        let mine = fingerprint.digest().as_bytes().as_slice();
        if let Some(j) = self.pending.iter().find(|j| j.key == *key) {
            return Ok(Some(j.fingerprint == *fingerprint));
        }
        if let Some(known) = self.planned.get(key) {
            return Ok(known.as_deref().map(|fp| fp == mine));
        }
        let rows = self.query(
            "SELECT fingerprint = $2 FROM jobs WHERE key = $1",
            &[&key_bytes(key), &fingerprint.digest().as_bytes().as_slice()],
        )?;
        rows.first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(map_err)
    }

    fn insert_job(&mut self, job: &Job) -> Result<bool, StoreError> {
        // A plan batch's new jobs go together, at the end of the write.
        if let Some(known) = self.planned.get(&job.key) {
            if known.is_some() || self.pending.iter().any(|j| j.key == job.key) {
                return Ok(false);
            }
            self.pending.push(job.clone());
            return Ok(true);
        }
        let (due_at, _) = due_columns(job);
        let rows = self.query(
            "INSERT INTO jobs (key, fingerprint, work_id, artifact_id, url, expected_sha256, expected_type, state, \
             epoch, attempts, max_attempts, next_attempt_at, due_at, created_at, updated_at, host, host_rank, extra) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, $9, $10, $11, $12, $12, $13, $14, $15) \
             ON CONFLICT (key) DO NOTHING RETURNING id",
            &[
                &key_bytes(&job.key),
                &job.fingerprint.digest().as_bytes().as_slice(),
                &job.spec.work_id,
                &job.spec.artifact_id,
                &job.spec.url.as_str(),
                &job.spec.sha256.map(|d| d.to_hex()),
                &job.spec.content_type,
                &job.state.as_str(),
                &i64::from(job.max_attempts),
                &job.next_attempt_at.as_millis(),
                &due_at,
                &job.created_at.as_millis(),
                &job.spec.url.host(),
                &i(job.host_rank),
                &idem_core::codec::encode_extra(&job.spec),
            ],
        )?;
        let Some(r) = rows.first() else {
            return Ok(false);
        };
        self.ids.insert(job.key, r.try_get(0).map_err(map_err)?);
        Ok(true)
    }

    fn update_job(&mut self, old: &Job, new: &Job) -> Result<(), StoreError> {
        self.send_pending()?;
        let id = self.must_id(&old.key)?;
        let (due_at, suspect_due_at) = due_columns(new);
        let lease = new.lease.as_ref();
        let n = self.execute(
            "UPDATE jobs SET state = $3, lease_owner = $4, lease_epoch = $5, lease_expires_at = $6, lease_isolated = $7, \
             epoch = $8, attempts = $9, max_attempts = $10, next_attempt_at = $11, due_at = $12, suspect_due_at = $13, \
             last_error = $14, head = $15, blob_sha256 = $16, blob_size = $17, blob_path = $18, duplicate_of = $19, \
             updated_at = $20, first_leased_at = $21, finished_at = $22, holder_deaths = $23, isolated_deaths = $24, \
             url_index = $25 WHERE id = $1 AND epoch = $2",
            &[
                &id,
                &i(old.epoch.0),
                &new.state.as_str(),
                &lease.map(|l| l.owner.as_str()),
                &lease.map(|l| i(l.epoch.0)),
                &lease.map(|l| l.expires_at.as_millis()),
                &lease.is_some_and(|l| l.isolated),
                &i(new.epoch.0),
                &i64::from(new.attempts),
                &i64::from(new.max_attempts),
                &new.next_attempt_at.as_millis(),
                &due_at,
                &suspect_due_at,
                &new.last_error,
                &new
                    .head
                    .as_ref()
                    .map(|h| serde_json::to_string(h).unwrap_or_default()),
                &new.blob.as_ref().map(|b| b.sha256.to_hex()),
                &new.blob.as_ref().map(|b| i(b.size)),
                &new.blob.as_ref().map(|b| b.path.as_str()),
                &new.duplicate_of.as_ref().map(key_bytes),
                &new.updated_at.as_millis(),
                &new.first_leased_at.map(Timestamp::as_millis),
                &new.finished_at.map(Timestamp::as_millis),
                &i64::from(new.holder_deaths),
                &i64::from(new.isolated_deaths),
                &i64::from(new.url_index),
            ],
        )?;
        if n == 1 {
            self.rows.insert(new.key, new.clone());
            Ok(())
        } else {
            Err(StoreError::Conflict(format!(
                "job {} changed since it was read",
                old.key
            )))
        }
    }

    fn op(&mut self, key: &OpKey) -> Result<Option<OpRecord>, StoreError> {
        self.send_pending()?;
        let Some(job_id) = self.id(&key.job)? else {
            return Ok(None);
        };
        let rows = self.query(
            concat!(
                "SELECT ",
                op_cols!(),
                " FROM ops WHERE job_id = $1 AND kind = $2 AND epoch = $3"
            ),
            &[&job_id, &key.kind.as_str(), &i(key.epoch.0)],
        )?;
        rows.first().map(|r| op_of(key.job, r)).transpose()
    }

    fn insert_op(&mut self, rec: &OpRecord) -> Result<bool, StoreError> {
        self.send_pending()?;
        let job_id = self.must_id(&rec.key.job)?;
        let n = self.write_op(
            "INSERT INTO ops (job_id, kind, epoch, owner, status, result, error, runs, started_at, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (job_id, kind, epoch) DO NOTHING",
            job_id,
            rec,
        )?;
        Ok(n == 1)
    }

    fn update_op(&mut self, rec: &OpRecord) -> Result<(), StoreError> {
        self.send_pending()?;
        let job_id = self.must_id(&rec.key.job)?;
        let n = self.write_op(
            "UPDATE ops SET owner = $4, status = $5, result = $6, error = $7, runs = $8, started_at = $9, finished_at = $10 \
             WHERE job_id = $1 AND kind = $2 AND epoch = $3",
            job_id,
            rec,
        )?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::OpNotStarted(rec.key.to_string()))
        }
    }

    fn abandon_ops_before(
        &mut self,
        job: &JobKey,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.send_pending()?;
        let id = self.must_id(job)?;
        self.execute(
            "UPDATE ops SET status = 'abandoned', finished_at = $3 WHERE job_id = $1 AND status = 'started' AND epoch < $2",
            &[&id, &i(epoch.0), &now.as_millis()],
        )
    }

    fn abandon_dead_ops(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        self.send_pending()?;
        self.execute(
            "UPDATE ops SET status = 'abandoned', finished_at = $1 WHERE status = 'started' AND NOT EXISTS ( \
               SELECT 1 FROM jobs j WHERE j.id = ops.job_id AND j.lease_epoch = ops.epoch AND j.lease_expires_at > $1)",
            &[&now.as_millis()],
        )
    }

    fn host_planned(&mut self, host: &str) -> Result<u64, StoreError> {
        let rows = self.query(
            "SELECT planned FROM hosts WHERE host = $1 FOR UPDATE",
            &[&host],
        )?;
        let n: Option<i64> = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(map_err)?;
        Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn set_host_planned(&mut self, host: &str, planned: u64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO hosts (host, planned) VALUES ($1, $2) \
             ON CONFLICT (host) DO UPDATE SET planned = GREATEST(hosts.planned, excluded.planned)",
            &[&host, &i(planned)],
        )
        .map(|_| ())
    }

    fn due(
        &mut self,
        now: Timestamp,
        limit: usize,
        skip: &[String],
    ) -> Result<Vec<(JobKey, String)>, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE due_at IS NOT NULL AND due_at <= $1 AND NOT (host = ANY($3)) \
                 ORDER BY host_rank, due_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            &[&now.as_millis(), &i(limit as u64), &skip],
        )?;
        Ok(self
            .locked(&rows)?
            .into_iter()
            .map(|j| (j.key, j.spec.url.host()))
            .collect())
    }

    fn due_suspect(&mut self, now: Timestamp) -> Result<Option<JobKey>, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE suspect_due_at <= $1 ORDER BY suspect_due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
            ),
            &[&now.as_millis()],
        )?;
        Ok(self.locked(&rows)?.pop().map(|j| j.key))
    }

    fn live_on_host(&mut self, host: &str, now: Timestamp) -> Result<usize, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            "SELECT count(*) FROM jobs WHERE host = $1 AND lease_owner IS NOT NULL AND lease_expires_at > $2",
            &[&host, &now.as_millis()],
        )?;
        let n: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(map_err)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Locks the host's row too: every leaser counting a host's live
    /// leases does so in turn.
    fn cooldown(&mut self, host: &str) -> Result<Option<Timestamp>, StoreError> {
        // Planning made the row: every job's host has one.
        let rows = self.query(
            "SELECT cooldown_until FROM hosts WHERE host = $1 FOR UPDATE",
            &[&host],
        )?;
        let until: Option<i64> = rows
            .first()
            .map_or(Ok(None), |r| r.try_get(0))
            .map_err(map_err)?;
        Ok(until.map(Timestamp::from_millis))
    }

    fn extend_cooldown(&mut self, host: &str, until: Timestamp) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO hosts (host, planned, cooldown_until) VALUES ($1, 0, $2) \
             ON CONFLICT (host) DO UPDATE SET cooldown_until = GREATEST(coalesce(hosts.cooldown_until, 0), excluded.cooldown_until)",
            &[&host, &until.as_millis()],
        )
        .map(|_| ())
    }

    fn paused(&mut self, host: &str) -> Result<bool, StoreError> {
        let rows = self.query("SELECT 1 FROM hosts WHERE host = $1 AND paused", &[&host])?;
        Ok(!rows.is_empty())
    }

    fn set_paused(&mut self, host: &str, paused: bool) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO hosts (host, planned, paused) VALUES ($1, 0, $2) \
             ON CONFLICT (host) DO UPDATE SET paused = excluded.paused",
            &[&host, &paused],
        )
        .map(|_| ())
    }

    /// Positions are job ids; deleted rows are counted (`ops_pruned`), so
    /// the ops started that status reports stay whole.
    fn prune_ops(
        &mut self,
        finished_before: Timestamp,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Option<u64>), StoreError> {
        self.send_pending()?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let ids = self.query(
            "SELECT DISTINCT job_id FROM ops WHERE job_id > $1 ORDER BY job_id LIMIT $2",
            &[&after, &limit],
        )?;
        let Some(last) = ids.last() else {
            return Ok((0, None));
        };
        let last: i64 = last.try_get(0).map_err(map_err)?;
        let n = self.execute(
            "DELETE FROM ops WHERE job_id > $1 AND job_id <= $2 AND job_id IN ( \
               SELECT id FROM jobs WHERE id > $1 AND id <= $2 \
               AND state IN ('finalized', 'skipped_duplicate', 'failed') AND finished_at < $3)",
            &[&after, &last, &finished_before.as_millis()],
        )?;
        if n > 0 {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.execute(
                "INSERT INTO counters (name, shard, value) VALUES ('ops_pruned', 0, $1) \
                 ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
                &[&n],
            )?;
        }
        let next = (ids.len() as i64 == limit).then(|| u64::try_from(last).unwrap_or(0));
        Ok((n, next))
    }

    fn held_by(&mut self, owner: &WorkerId, now: Timestamp) -> Result<Vec<JobKey>, StoreError> {
        self.send_pending()?;
        let rows = self.query(
            concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE lease_owner = $1 AND due_at IS NOT NULL AND next_attempt_at <= $2 \
                 ORDER BY id FOR UPDATE SKIP LOCKED"
            ),
            &[&owner.as_str(), &now.as_millis()],
        )?;
        Ok(self.locked(&rows)?.into_iter().map(|j| j.key).collect())
    }

    fn will_plan(&mut self, keys: &[JobKey]) -> Result<(), StoreError> {
        let wanted: Vec<&[u8]> = keys.iter().map(key_bytes).collect();
        let rows = self.query(
            "SELECT key, fingerprint FROM jobs WHERE key = ANY($1)",
            &[&wanted],
        )?;
        for k in keys {
            self.planned.insert(*k, None);
        }
        for r in &rows {
            let key = crate::rows::key_from(r.try_get::<_, &[u8]>(0).map_err(map_err)?)?;
            let fp: Vec<u8> = r.try_get(1).map_err(map_err)?;
            self.planned.insert(key, Some(fp));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.send_pending()
    }

    fn bump(&mut self, counter: Counter, job: &JobKey) -> Result<(), StoreError> {
        let shard = i32::from(job.digest().as_bytes()[0] % COUNTER_SHARDS);
        self.execute(
            "INSERT INTO counters (name, shard, value) VALUES ($1, $2, 1) \
             ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + 1",
            &[&counter.as_str(), &shard],
        )
        .map(|_| ())
    }
}
