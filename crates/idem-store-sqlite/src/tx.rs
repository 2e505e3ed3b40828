//! The core's row port ([`Tx`]) in SQL, inside the group commit's
//! transaction.
//!
//! Every write runs under `BEGIN IMMEDIATE` with the cross-process writer
//! lock held, so no other writer can change a row between its read and its
//! write: the isolation the port asks for. Job rows are addressed by rowid
//! once known (an integer lookup instead of a 32-byte key's), and what the
//! writer wrote is read back from its cache (see `cache.rs`).

use crate::cache::{Cache, Names};
use crate::open::map_err;
use crate::rows::{
    digest_from, i, kind_code, mutable_columns, result_bytes, row_to_job_id, row_to_op, state_code,
    status_code, took_ms, url_hash,
};
use idem_core::ports::StoreError;
use idem_core::tx::{Counter, Tx};
use idem_core::{
    fingerprint_of, Epoch, Fingerprint, Job, JobKey, OpKey, OpRecord, Timestamp, WorkerId,
};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension};

pub(crate) struct SqliteTx<'a> {
    pub(crate) c: &'a Connection,
    pub(crate) cache: &'a mut Cache,
}

/// A job's payload columns: URL, expected digest, expected type, extra.
type PayloadRow = (String, Option<Vec<u8>>, Option<String>, Option<String>);

fn key_bytes(key: &JobKey) -> &[u8] {
    key.digest().as_bytes().as_slice()
}

fn conflict(key: &JobKey) -> StoreError {
    StoreError::Conflict(format!("job {key} changed since it was read"))
}

impl SqliteTx<'_> {
    /// The job's rowid, `None` when there is no such job.
    fn id(&mut self, key: &JobKey) -> Result<Option<i64>, StoreError> {
        if let Some(id) = self.cache.id(key) {
            return Ok(Some(id));
        }
        let id: Option<i64> = self
            .c
            .prepare_cached("SELECT id FROM jobs WHERE key = ?1")
            .map_err(map_err)?
            .query_row([key_bytes(key)], |r| r.get(0))
            .optional()
            .map_err(map_err)?;
        if let Some(id) = id {
            self.cache.put_id(*key, id);
        }
        Ok(id)
    }

    /// The id a name has in `owners` (op rows name their owner by it) or
    /// `hosts` (job rows name their host by it), added on first use.
    fn name_id(&mut self, names: Names, name: &str) -> Result<i64, StoreError> {
        if let Some(id) = self.cache.name(names, name) {
            return Ok(id);
        }
        let (find, add) = match names {
            Names::Owners => (
                "SELECT id FROM owners WHERE name = ?1",
                "INSERT INTO owners (name) VALUES (?1) RETURNING id",
            ),
            Names::Hosts => (
                "SELECT id FROM hosts WHERE host = ?1",
                "INSERT INTO hosts (host, planned) VALUES (?1, 0) RETURNING id",
            ),
        };
        let found: Option<i64> = self
            .c
            .prepare_cached(find)
            .and_then(|mut st| st.query_row([name], |r| r.get(0)).optional())
            .map_err(map_err)?;
        let id = match found {
            Some(id) => id,
            None => self
                .c
                .prepare_cached(add)
                .and_then(|mut st| st.query_row([name], |r| r.get(0)))
                .map_err(map_err)?,
        };
        self.cache.put_name(names, name, id);
        Ok(id)
    }

    /// Runs `sql` with an op row's ten columns as ?1..?10; rows changed.
    fn write_op(&mut self, sql: &str, job_id: i64, rec: &OpRecord) -> Result<usize, StoreError> {
        let owner = self.name_id(Names::Owners, rec.owner.as_str())?;
        self.c
            .prepare_cached(sql)
            .and_then(|mut st| {
                st.execute(params![
                    job_id,
                    kind_code(rec.key.kind),
                    i(rec.key.epoch.0),
                    owner,
                    status_code(rec.status),
                    result_bytes(rec),
                    rec.error,
                    rec.runs,
                    rec.started_at.as_millis(),
                    took_ms(rec),
                ])
            })
            .map_err(map_err)
    }

    fn must_id(&mut self, key: &JobKey) -> Result<i64, StoreError> {
        self.id(key)?.ok_or(StoreError::NotFound(*key))
    }

    /// Keys (and rowids, remembered) of the rows a query returns as
    /// `(key, id)`.
    fn keys_of(
        &mut self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<JobKey>, StoreError> {
        let rows: Vec<(Vec<u8>, i64)> = self
            .c
            .prepare_cached(sql)
            .map_err(map_err)?
            .query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(map_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(map_err)?;
        rows.into_iter()
            .map(|(k, id)| {
                let key = crate::rows::key_from(&k).map_err(map_err)?;
                self.cache.put_id(key, id);
                Ok(key)
            })
            .collect()
    }
}

impl Tx for SqliteTx<'_> {
    fn job(&mut self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        if let Some((_, j)) = self.cache.row(key) {
            return Ok(Some(j.clone()));
        }
        let row = match self.cache.id(key) {
            Some(id) => self
                .c
                .prepare_cached(concat!(
                    "SELECT ",
                    job_cols!(),
                    ", id FROM jobs WHERE id = ?1"
                ))
                .map_err(map_err)?
                .query_row([id], row_to_job_id)
                .optional(),
            None => self
                .c
                .prepare_cached(concat!(
                    "SELECT ",
                    job_cols!(),
                    ", id FROM jobs WHERE key = ?1"
                ))
                .map_err(map_err)?
                .query_row([key_bytes(key)], row_to_job_id)
                .optional(),
        }
        .map_err(map_err)?;
        Ok(row.map(|(id, j)| {
            self.cache.put_row(id, j.clone());
            j
        }))
    }

    fn lease_epoch(&mut self, key: &JobKey) -> Result<Option<Option<Epoch>>, StoreError> {
        if let Some((_, j)) = self.cache.row(key) {
            return Ok(Some(j.lease.as_ref().map(|l| l.epoch)));
        }
        let row: Option<(i64, Option<i64>)> = self
            .c
            .prepare_cached("SELECT id, lease_epoch FROM jobs WHERE key = ?1")
            .map_err(map_err)?
            .query_row([key_bytes(key)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(map_err)?;
        Ok(row.map(|(id, epoch)| {
            self.cache.put_id(*key, id);
            epoch.and_then(|e| u64::try_from(e).ok()).map(Epoch)
        }))
    }

    /// The fingerprint is not stored: it is derived from the payload the
    /// row keeps.
    fn same_fingerprint(
        &mut self,
        key: &JobKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<bool>, StoreError> {
        let row: Option<PayloadRow> = self
            .c
            .prepare_cached(
                "SELECT url, expected_sha256, expected_type, extra FROM jobs WHERE key = ?1",
            )
            .map_err(map_err)?
            .query_row([key_bytes(key)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(map_err)?;
        row.map(|(url, sha, ct, extra)| {
            let sha = sha
                .map(|b| digest_from(&b, "expected sha256"))
                .transpose()
                .map_err(map_err)?;
            let mirrors = match extra {
                Some(text) => idem_core::codec::decode_mirrors(&text)
                    .ok_or_else(|| map_err(crate::rows::corrupt("mirrors")))?,
                None => Vec::new(),
            };
            Ok(fingerprint_of(&url, sha.as_ref(), ct.as_deref(), &mirrors) == *fingerprint)
        })
        .transpose()
    }

    fn insert_job(&mut self, job: &Job) -> Result<bool, StoreError> {
        debug_assert_eq!(job.url_index, 0, "a job is planned at its first URL");
        let host_id = self.name_id(Names::Hosts, &job.spec.url.host())?;
        let mut st = self
            .c
            .prepare_cached(
                "INSERT INTO jobs (key, work_id, artifact_id, url, url_hash, expected_sha256, expected_type, state, \
                 epoch, attempts, max_attempts, next_attempt_at, due_at, created_at, updated_at, host_id, host_rank, extra) \
                 VALUES (?1, ?3, ?4, ?5, ?2, ?6, ?7, ?8, 0, 0, ?9, ?10, ?10, ?11, ?11, ?12, ?13, ?14) ON CONFLICT (key) DO NOTHING",
            )
            .map_err(map_err)?;
        let n = st
            .execute(params![
                key_bytes(&job.key),
                url_hash(job.spec.url.as_str()),
                job.spec.work_id,
                job.spec.artifact_id,
                job.spec.url.as_str(),
                job.spec.sha256.map(|d| d.as_bytes().to_vec()),
                job.spec.content_type,
                state_code(job.state),
                job.max_attempts,
                job.next_attempt_at.as_millis(),
                job.created_at.as_millis(),
                host_id,
                i(job.host_rank),
                idem_core::codec::encode_extra(&job.spec),
            ])
            .map_err(map_err)?;
        Ok(n == 1)
    }

    /// Writes the columns that differ between `old` and `new`. Naming only
    /// changed columns matters: SQLite rewrites an index entry for every
    /// indexed column an UPDATE names, changed or not, and a job row has
    /// several indexes.
    fn update_job(&mut self, old: &Job, new: &Job) -> Result<(), StoreError> {
        let id = self.must_id(&old.key)?;
        let mut sql = String::from("UPDATE jobs SET ");
        let mut values: Vec<Value> = vec![Value::Integer(id), Value::Integer(i(old.epoch.0))];
        for ((name, was), (_, now)) in mutable_columns(old).into_iter().zip(mutable_columns(new)) {
            if was != now {
                if values.len() > 2 {
                    sql.push_str(", ");
                }
                values.push(now);
                sql.push_str(name);
                sql.push_str(" = ?");
                sql.push_str(&values.len().to_string());
            }
        }
        if values.len() == 2 {
            return Ok(());
        }
        sql.push_str(" WHERE id = ?1 AND epoch = ?2");
        let n = self
            .c
            .prepare_cached(&sql)
            .and_then(|mut st| st.execute(rusqlite::params_from_iter(values)))
            .map_err(map_err)?;
        if n != 1 {
            return Err(conflict(&old.key));
        }
        self.cache.put_row(id, new.clone());
        Ok(())
    }

    fn op(&mut self, key: &OpKey) -> Result<Option<OpRecord>, StoreError> {
        let Some(job_id) = self.id(&key.job)? else {
            return Ok(None);
        };
        if let Some(rec) = self.cache.op(job_id, key) {
            return Ok(Some(rec.clone()));
        }
        let rec = self
            .c
            .prepare_cached(concat!(
                "SELECT ",
                op_cols!(),
                " FROM ops o WHERE job_id = ?1 AND kind = ?2 AND epoch = ?3"
            ))
            .map_err(map_err)?
            .query_row(params![job_id, kind_code(key.kind), i(key.epoch.0)], |r| {
                row_to_op(key.job, r)
            })
            .optional()
            .map_err(map_err)?;
        if let Some(rec) = &rec {
            self.cache.put_op(job_id, rec.clone());
        }
        Ok(rec)
    }

    fn insert_op(&mut self, rec: &OpRecord) -> Result<bool, StoreError> {
        let job_id = self.must_id(&rec.key.job)?;
        let n = self.write_op(
            "INSERT INTO ops (job_id, kind, epoch, owner, status, result, error, runs, started_at, took_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (job_id, kind, epoch) DO NOTHING",
            job_id,
            rec,
        )?;
        if n == 1 {
            // Op rows may be pruned; the count of first starts is kept.
            self.c
                .prepare_cached("UPDATE counters SET value = value + 1 WHERE name = 'op_rows'")
                .and_then(|mut st| st.execute([]))
                .map_err(map_err)?;
            self.cache.put_op(job_id, rec.clone());
        }
        Ok(n == 1)
    }

    fn update_op(&mut self, rec: &OpRecord) -> Result<(), StoreError> {
        let job_id = self.must_id(&rec.key.job)?;
        let n = self.write_op(
            "UPDATE ops SET owner = ?4, status = ?5, result = ?6, error = ?7, runs = ?8, started_at = ?9, took_ms = ?10 \
             WHERE job_id = ?1 AND kind = ?2 AND epoch = ?3",
            job_id,
            rec,
        )?;
        if n != 1 {
            return Err(StoreError::OpNotStarted(rec.key.to_string()));
        }
        self.cache.put_op(job_id, rec.clone());
        Ok(())
    }

    fn abandon_ops_before(
        &mut self,
        job: &JobKey,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let id = self.must_id(job)?;
        let n = self
            .c
            .prepare_cached(
                "UPDATE ops SET status = 3, took_ms = ?3 - started_at WHERE job_id = ?1 AND status = 0 AND epoch < ?2",
            )
            .map_err(map_err)?
            .execute(params![id, i(epoch.0), now.as_millis()])
            .map_err(map_err)? as u64;
        if n > 0 {
            self.cache.forget_ops_of(id);
        }
        Ok(n)
    }

    fn abandon_dead_ops(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        // A started op is dead when its job's live lease (if any) has
        // another epoch.
        let n = self
            .c
            .execute(
                "UPDATE ops SET status = 3, took_ms = ?1 - started_at WHERE status = 0 AND NOT EXISTS ( \
                   SELECT 1 FROM jobs j WHERE j.id = ops.job_id AND j.lease_epoch = ops.epoch AND j.lease_expires_at > ?1)",
                [now.as_millis()],
            )
            .map_err(map_err)? as u64;
        if n > 0 {
            self.cache.forget_ops();
        }
        Ok(n)
    }

    fn host_planned(&mut self, host: &str) -> Result<u64, StoreError> {
        let n: Option<i64> = self
            .c
            .prepare_cached("SELECT planned FROM hosts WHERE host = ?1")
            .map_err(map_err)?
            .query_row([host], |r| r.get(0))
            .optional()
            .map_err(map_err)?;
        Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn set_host_planned(&mut self, host: &str, planned: u64) -> Result<(), StoreError> {
        self.c
            .prepare_cached(
                "INSERT INTO hosts (host, planned) VALUES (?1, ?2) ON CONFLICT (host) DO UPDATE SET planned = excluded.planned",
            )
            .map_err(map_err)?
            .execute(params![host, i(planned)])
            .map(|_| ())
            .map_err(map_err)
    }

    // Every `LIMIT ?n` here is written `LIMIT ?n + 0`: with a bare
    // parameter, SQLite re-prepares the statement whenever any binding
    // changes (the lease query was recompiled on every call, costing more
    // than the query itself).
    fn due(
        &mut self,
        now: Timestamp,
        limit: usize,
        skip: &[String],
    ) -> Result<Vec<(JobKey, String)>, StoreError> {
        let skip = serde_json::to_string(skip).map_err(|e| StoreError::Backend(e.to_string()))?;
        let rows: Vec<(Vec<u8>, String, i64)> = self
            .c
            .prepare_cached(
                "SELECT key, (SELECT host FROM hosts WHERE id = host_id), id FROM jobs INDEXED BY jobs_rank_due \
                 WHERE due_at IS NOT NULL AND due_at <= ?1 \
                 AND host_id NOT IN (SELECT id FROM hosts WHERE host IN (SELECT value FROM json_each(?3))) \
                 ORDER BY host_rank, due_at, id LIMIT ?2 + 0",
            )
            .map_err(map_err)?
            .query_map(params![now.as_millis(), i(limit as u64), skip], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(map_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(map_err)?;
        rows.into_iter()
            .map(|(k, host, id)| {
                let key = crate::rows::key_from(&k).map_err(map_err)?;
                self.cache.put_id(key, id);
                Ok((key, host))
            })
            .collect()
    }

    fn due_suspect(&mut self, now: Timestamp) -> Result<Option<JobKey>, StoreError> {
        Ok(self
            .keys_of(
                "SELECT key, id FROM jobs WHERE suspect_due_at <= ?1 ORDER BY suspect_due_at, id LIMIT 1",
                [now.as_millis()],
            )?
            .pop())
    }

    fn live_on_host(&mut self, host: &str, now: Timestamp) -> Result<usize, StoreError> {
        let n: i64 = self
            .c
            .prepare_cached(
                "SELECT count(*) FROM jobs INDEXED BY jobs_host_lease WHERE host_id = (SELECT id FROM hosts WHERE host = ?1) \
                 AND lease_owner IS NOT NULL AND lease_expires_at > ?2",
            )
            .map_err(map_err)?
            .query_row(params![host, now.as_millis()], |r| r.get(0))
            .map_err(map_err)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn cooldown(&mut self, host: &str) -> Result<Option<Timestamp>, StoreError> {
        let until: Option<Option<i64>> = self
            .c
            .prepare_cached("SELECT cooldown_until FROM hosts WHERE host = ?1")
            .map_err(map_err)?
            .query_row([host], |r| r.get(0))
            .optional()
            .map_err(map_err)?;
        Ok(until.flatten().map(Timestamp::from_millis))
    }

    fn extend_cooldown(&mut self, host: &str, until: Timestamp) -> Result<(), StoreError> {
        self.c
            .prepare_cached(
                "INSERT INTO hosts (host, planned, cooldown_until) VALUES (?1, 0, ?2) \
                 ON CONFLICT (host) DO UPDATE SET cooldown_until = max(coalesce(cooldown_until, 0), excluded.cooldown_until)",
            )
            .and_then(|mut st| st.execute(params![host, until.as_millis()]))
            .map(|_| ())
            .map_err(map_err)
    }

    fn paused(&mut self, host: &str) -> Result<bool, StoreError> {
        self.c
            .prepare_cached("SELECT 1 FROM hosts WHERE host = ?1 AND paused = 1")
            .map_err(map_err)?
            .exists([host])
            .map_err(map_err)
    }

    fn set_paused(&mut self, host: &str, paused: bool) -> Result<(), StoreError> {
        self.c
            .prepare_cached(
                "INSERT INTO hosts (host, planned, paused) VALUES (?1, 0, ?2) \
                 ON CONFLICT (host) DO UPDATE SET paused = excluded.paused",
            )
            .and_then(|mut st| st.execute(params![host, i64::from(paused)]))
            .map(|_| ())
            .map_err(map_err)
    }

    /// Positions are job rowids; the freed pages go back to the file
    /// system in the same transaction (incremental auto-vacuum).
    fn prune_ops(
        &mut self,
        finished_before: Timestamp,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Option<u64>), StoreError> {
        let ids: Vec<i64> = self
            .c
            .prepare_cached(
                "SELECT DISTINCT job_id FROM ops WHERE job_id > ?1 ORDER BY job_id LIMIT ?2 + 0",
            )
            .map_err(map_err)?
            .query_map(params![i(after), i(limit as u64)], |r| r.get(0))
            .map_err(map_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(map_err)?;
        let Some(&last) = ids.last() else {
            return Ok((0, None));
        };
        // States 0, 1 and 2 are the finished ones (see `rows::STATES`).
        let n = self
            .c
            .prepare_cached(
                "DELETE FROM ops WHERE job_id > ?1 AND job_id <= ?2 AND job_id IN ( \
                   SELECT id FROM jobs WHERE id > ?1 AND id <= ?2 AND state <= 2 AND finished_at < ?3)",
            )
            .map_err(map_err)?
            .execute(params![i(after), last, finished_before.as_millis()])
            .map_err(map_err)? as u64;
        if n > 0 {
            self.cache.forget_ops();
            // The pragma frees a page per step: run it to the end.
            let mut st = self
                .c
                .prepare_cached("PRAGMA incremental_vacuum")
                .map_err(map_err)?;
            let mut rows = st.query([]).map_err(map_err)?;
            while rows.next().map_err(map_err)?.is_some() {}
        }
        let next = (ids.len() == limit).then(|| u64::try_from(last).unwrap_or(0));
        Ok((n, next))
    }

    fn held_by(&mut self, owner: &WorkerId, now: Timestamp) -> Result<Vec<JobKey>, StoreError> {
        self.keys_of(
            "SELECT key, id FROM jobs WHERE lease_owner = ?1 AND due_at IS NOT NULL AND next_attempt_at <= ?2 ORDER BY id",
            params![owner.as_str(), now.as_millis()],
        )
    }

    fn bump(&mut self, counter: Counter, _job: &JobKey) -> Result<(), StoreError> {
        // One writer at a time: one row per counter never queues anyone.
        self.c
            .prepare_cached(
                "INSERT INTO counters (name, value) VALUES (?1, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1",
            )
            .map_err(map_err)?
            .execute([counter.as_str()])
            .map(|_| ())
            .map_err(map_err)
    }
}
