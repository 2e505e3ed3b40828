//! The row port: what a store does inside one transaction, as rows in and
//! rows out. Every decision about those rows is [`crate::exec`]'s.
//!
//! # Isolation
//!
//! [`crate::exec::run`] reads rows, decides, and writes them back within one
//! [`Tx`]. A store must make that safe against every other writer, on this
//! host and others:
//!
//! - **A row read for writing stays as read until the transaction ends.**
//!   A store either serializes its writers (SQLite: one `BEGIN IMMEDIATE`
//!   writer at a time) or locks each job row [`Tx::job`] returns and each
//!   row [`Tx::due`] picks (a server database: `SELECT … FOR UPDATE`, and
//!   `FOR UPDATE SKIP LOCKED` for leasing, so two leasers never take the
//!   same row and never queue on each other's).
//! - **A write that lost a race is refused, never applied.**
//!   [`Tx::update_job`] writes only over the row's epoch as it was read
//!   (`WHERE … AND epoch = old.epoch`); a row found changed is
//!   [`StoreError::Conflict`], and so are a server's serialization failures
//!   and deadlocks. The whole transaction then rolls back; the caller may
//!   run it again, which decides again on the rows as they are then.
//! - **All or nothing.** A transaction that returns an error leaves the
//!   ledger as it was.
//! - **Counters never queue writers on one row.** [`Tx::bump`] names the
//!   job whose write moved the counter, so a server store can spread each
//!   counter over shards; the total is their sum.

use crate::job::{Epoch, Job, WorkerId};
use crate::ledger::{OpKey, OpRecord};
use crate::ports::StoreError;
use crate::spec::{Fingerprint, JobKey};
use crate::time::Timestamp;

/// The ledger-wide counters the core moves.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A write refused because its epoch was not the job's live lease.
    FencedWrites,
    /// A committed op answered from the ledger instead of run.
    Replays,
    /// An op started again under the same key (a failed op run again).
    OpRestarts,
}

impl Counter {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FencedWrites => "fenced_writes",
            Self::Replays => "replays",
            Self::OpRestarts => "op_restarts",
        }
    }
}

/// One store transaction, as rows. See the module docs for the isolation
/// it must give.
pub trait Tx {
    /// The job under `key`, as this transaction will write it.
    fn job(&mut self, key: &JobKey) -> Result<Option<Job>, StoreError>;

    /// The epoch of the job's current lease: `None` when there is no such
    /// job, `Some(None)` when it is not held. A store may read just that.
    fn lease_epoch(&mut self, key: &JobKey) -> Result<Option<Option<Epoch>>, StoreError> {
        Ok(self.job(key)?.map(|j| j.lease.as_ref().map(|l| l.epoch)))
    }

    /// Whether the job under `key` has this fingerprint (`None`: no job).
    /// A store may compare without loading the row.
    fn same_fingerprint(
        &mut self,
        key: &JobKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<bool>, StoreError> {
        Ok(self.job(key)?.map(|j| j.fingerprint == *fingerprint))
    }

    /// Inserts a newly planned job (its host rank set); `false`, with
    /// nothing written, when its key is taken.
    fn insert_job(&mut self, job: &Job) -> Result<bool, StoreError>;

    /// Writes `new` over `old`, the row as this transaction read it.
    /// [`StoreError::Conflict`] when the stored row's epoch is no longer
    /// `old`'s.
    fn update_job(&mut self, old: &Job, new: &Job) -> Result<(), StoreError>;

    /// The op under `key`.
    fn op(&mut self, key: &OpKey) -> Result<Option<OpRecord>, StoreError>;

    /// Inserts an op record; `false`, with nothing written, when its key is
    /// taken.
    fn insert_op(&mut self, rec: &OpRecord) -> Result<bool, StoreError>;

    /// Writes an existing op record (every field).
    fn update_op(&mut self, rec: &OpRecord) -> Result<(), StoreError>;

    /// Marks the job's `started` ops of epochs before `epoch` `abandoned`
    /// (finished at `now`); returns how many.
    fn abandon_ops_before(
        &mut self,
        job: &JobKey,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<u64, StoreError>;

    /// Marks every `started` op that [`crate::ledger::is_dead`] (its epoch is
    /// not its job's live lease at `now`) `abandoned`; returns how many.
    fn abandon_dead_ops(&mut self, now: Timestamp) -> Result<u64, StoreError>;

    /// Jobs planned so far on `host`: the rank the next one gets.
    fn host_planned(&mut self, host: &str) -> Result<u64, StoreError>;

    /// Records that `host` has had `planned` jobs planned.
    fn set_host_planned(&mut self, host: &str, planned: u64) -> Result<(), StoreError>;

    /// Up to `limit` due jobs that are not suspects ([`Job::is_acquirable`]
    /// at `now`), as (key, host), in lease order: host rank, then due time
    /// ([`Job::due_at`]), then plan order; jobs of the hosts in `skip` left
    /// out.
    fn due(
        &mut self,
        now: Timestamp,
        limit: usize,
        skip: &[String],
    ) -> Result<Vec<(JobKey, String)>, StoreError>;

    /// The suspect due first at `now`, if any.
    fn due_suspect(&mut self, now: Timestamp) -> Result<Option<JobKey>, StoreError>;

    /// Live leases on `host` at `now`.
    fn live_on_host(&mut self, host: &str, now: Timestamp) -> Result<usize, StoreError>;

    /// Until when `host` cools down, if it does.
    fn cooldown(&mut self, host: &str) -> Result<Option<Timestamp>, StoreError>;

    /// Makes `host` cool down until `until`, or later if it already does.
    fn extend_cooldown(&mut self, host: &str, until: Timestamp) -> Result<(), StoreError>;

    /// Whether the operator paused `host` ([`crate::hosts::ALL_HOSTS`]:
    /// everything).
    fn paused(&mut self, host: &str) -> Result<bool, StoreError>;

    /// Pauses or resumes `host` ([`crate::hosts::ALL_HOSTS`]: everything).
    fn set_paused(&mut self, host: &str, paused: bool) -> Result<(), StoreError>;

    /// Deletes the op rows of the finished jobs (finalized, skipped as
    /// duplicates, failed) whose `finished_at` is before `finished_before`,
    /// among the next `limit` jobs that have op rows, in the store's own
    /// order, after position `after` (0 to start). Returns the rows deleted
    /// and the position to go on from, `None` when no job is left. The
    /// counts `status` reports (ops started among them) are kept.
    fn prune_ops(
        &mut self,
        finished_before: Timestamp,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Option<u64>), StoreError>;

    /// Unfinished jobs that are not suspects, leased to `owner`, past their
    /// backoff at `now`, in plan order.
    fn held_by(&mut self, owner: &WorkerId, now: Timestamp) -> Result<Vec<JobKey>, StoreError>;

    /// Adds one to `counter`, moved by a write to `job`.
    fn bump(&mut self, counter: Counter, job: &JobKey) -> Result<(), StoreError>;

    /// A hint that a plan batch is about to look up, and perhaps insert,
    /// the jobs under `keys`: a store may read them all at once.
    fn will_plan(&mut self, _keys: &[JobKey]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Called after a write's last row call, before the store commits: a
    /// store that held rows back (to send them together) sends them now,
    /// and refuses with [`StoreError::Conflict`] if they no longer fit.
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}
