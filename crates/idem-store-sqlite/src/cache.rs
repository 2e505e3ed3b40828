//! The writer's memory of the rows it wrote, so a job's next step skips the
//! reads that would fetch them back.
//!
//! A job's life on the write path is: leased (its row read, then written),
//! then three ops begun and finished, each reading back the job row, its
//! lease fence and the op that this same connection wrote moments before.
//! Those reads were a third of the writer's work per job. Here the writer
//! keeps what it wrote and trusts it while nothing else has written:
//!
//! - a job's rowid never changes and no job is ever deleted, so the map
//!   from key to rowid stays valid while nothing is rolled back (a
//!   rolled-back plan can free a rowid for another job, so a rollback
//!   forgets it too, and a row is only returned under the key it holds);
//! - job rows and op records are valid only while no other connection has
//!   committed since this one last did. `PRAGMA data_version` changes
//!   exactly when another connection commits; it is read after every
//!   `BEGIN IMMEDIATE` (the write lock is then ours, so nobody can commit
//!   behind our back until we do), and any change forgets everything;
//! - every write through this connection goes through the cache (it is
//!   write-through: the SQL always runs), or forgets what it may have
//!   changed; a transaction or savepoint rolled back forgets everything.
//!
//! So a cached row is always the row on disk as this transaction sees it,
//! and fencing decisions made from it are the ones the database would give.
//! The maps are bounded: a full map is emptied, which costs only reads.

use idem_core::{Job, JobKey, OpKey, OpKind, OpRecord};
use rusqlite::Connection;
use std::collections::HashMap;

/// Most entries per map: far more than the jobs in flight in one process.
const CAP: usize = 16_384;

#[derive(Default)]
pub(crate) struct Cache {
    /// `PRAGMA data_version` when the rows below were last known valid.
    data_version: Option<i64>,
    ids: HashMap<JobKey, i64>,
    rows: HashMap<i64, Job>,
    ops: HashMap<(i64, OpKind, u64), OpRecord>,
    /// Worker and host names and their ids in `owners` and `hosts` (a
    /// rolled-back insert may have freed one, so these are forgotten with
    /// the rest).
    names: [HashMap<String, i64>; 2],
}

/// The tables that give names an id.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Names {
    Owners = 0,
    Hosts = 1,
}

impl Cache {
    /// Forgets everything if another connection committed since our last
    /// transaction. Call with the write lock held (after `BEGIN IMMEDIATE`).
    pub(crate) fn validate(&mut self, c: &Connection) -> rusqlite::Result<()> {
        let v: i64 = c
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if self.data_version != Some(v) {
            self.forget();
            self.data_version = Some(v);
        }
        Ok(())
    }

    /// Forgets everything (after a rollback, or a commit by another
    /// connection).
    pub(crate) fn forget(&mut self) {
        self.ids.clear();
        self.rows.clear();
        self.ops.clear();
        self.names.iter_mut().for_each(HashMap::clear);
    }

    pub(crate) fn name(&self, names: Names, name: &str) -> Option<i64> {
        self.names[names as usize].get(name).copied()
    }

    pub(crate) fn put_name(&mut self, names: Names, name: &str, id: i64) {
        let map = &mut self.names[names as usize];
        if map.len() >= CAP {
            map.clear();
        }
        map.insert(name.to_owned(), id);
    }

    pub(crate) fn id(&self, key: &JobKey) -> Option<i64> {
        self.ids.get(key).copied()
    }

    pub(crate) fn row(&self, key: &JobKey) -> Option<(i64, &Job)> {
        let id = self.id(key)?;
        self.rows
            .get(&id)
            .filter(|j| j.key == *key)
            .map(|j| (id, j))
    }

    pub(crate) fn put_id(&mut self, key: JobKey, id: i64) {
        if self.ids.len() >= CAP {
            self.ids.clear();
        }
        self.ids.insert(key, id);
    }

    /// Records `job` as the row `id` now holds.
    pub(crate) fn put_row(&mut self, id: i64, job: Job) {
        self.put_id(job.key, id);
        if self.rows.len() >= CAP {
            self.rows.clear();
        }
        self.rows.insert(id, job);
    }

    pub(crate) fn op(&self, job_id: i64, op: &OpKey) -> Option<&OpRecord> {
        self.ops.get(&(job_id, op.kind, op.epoch.0))
    }

    /// Records `rec` as the op row of job `job_id` now holds.
    pub(crate) fn put_op(&mut self, job_id: i64, rec: OpRecord) {
        if self.ops.len() >= CAP {
            self.ops.clear();
        }
        self.ops
            .insert((job_id, rec.key.kind, rec.key.epoch.0), rec);
    }

    /// Forgets the ops of one job (a bulk update changed some of them).
    pub(crate) fn forget_ops_of(&mut self, job_id: i64) {
        self.ops.retain(|k, _| k.0 != job_id);
    }

    /// Forgets every op (a bulk update over all jobs).
    pub(crate) fn forget_ops(&mut self) {
        self.ops.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{JobSpec, Timestamp};

    fn job(a: &str) -> Job {
        let spec = JobSpec::new("w", a, &format!("http://h/{a}"), None, None).unwrap();
        Job::planned(spec, 3, Timestamp::from_millis(0))
    }

    /// A rowid the map still gives for one key while another job holds it
    /// (a rolled-back plan freed it) must not hand that other job's row
    /// over: fencing would read the wrong lease.
    #[test]
    fn a_row_is_only_returned_under_its_own_key() {
        let (a, b) = (job("a"), job("b"));
        let mut c = Cache::default();
        c.put_id(a.key, 7);
        c.put_row(7, b.clone());
        assert!(c.row(&a.key).is_none());
        assert_eq!(c.row(&b.key).map(|(id, j)| (id, j.key)), Some((7, b.key)));
        c.forget();
        assert!(c.row(&b.key).is_none());
    }
}
