//! `MemStore`: the reference implementation of the [`Store`] port, in memory.
//!
//! It defines what every store must do in the simplest possible terms (a
//! mutex around a few maps, each transaction run on a copy that replaces
//! them only if every step passed), so the conformance suite can be checked
//! against it, and scenarios and simulations can run without a database.
//! Not durable, by design.

use crate::exec::{self, Write, Written};
use crate::job::{Epoch, Job, JobState, WorkerId};
use crate::ledger::{self, OpKey, OpRecord, OpStatus};
use crate::ports::{Applied, Commit, StatusCounts, Store, StoreError};
use crate::spec::{Fingerprint, JobKey};
use crate::time::Timestamp;
use crate::tx::{Counter, Tx};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Clone, Default)]
struct Inner {
    jobs: BTreeMap<JobKey, Job>,
    ops: BTreeMap<OpKey, OpRecord>,
    /// Start order of ops, for `ops()`.
    op_seq: Vec<OpKey>,
    counters: HashMap<Counter, u64>,
    /// Jobs planned per host: the next job's host rank.
    host_ranks: HashMap<String, u64>,
    /// Plan order, which breaks ties in the lease order.
    planned_seq: BTreeMap<JobKey, u64>,
    /// Hosts cooling down, and until when.
    cooldowns: HashMap<String, Timestamp>,
    paused: std::collections::BTreeSet<String>,
    /// Op rows pruned, still counted as started.
    pruned_ops: u64,
}

/// An in-memory store. See the module docs.
#[derive(Default)]
pub struct MemStore(Mutex<Inner>);

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves data that was consistent
        // before the panicking call (every call mutates only on success).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    fn counter(&self, c: Counter) -> u64 {
        self.counters.get(&c).copied().unwrap_or(0)
    }

    fn seq(&self, key: &JobKey) -> u64 {
        self.planned_seq.get(key).copied().unwrap_or(u64::MAX)
    }
}

impl Tx for Inner {
    fn job(&mut self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        Ok(self.jobs.get(key).cloned())
    }

    fn same_fingerprint(
        &mut self,
        key: &JobKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<bool>, StoreError> {
        Ok(self.jobs.get(key).map(|j| j.fingerprint == *fingerprint))
    }

    fn insert_job(&mut self, job: &Job) -> Result<bool, StoreError> {
        if self.jobs.contains_key(&job.key) {
            return Ok(false);
        }
        let seq = self.planned_seq.len() as u64;
        self.planned_seq.insert(job.key, seq);
        self.jobs.insert(job.key, job.clone());
        Ok(true)
    }

    fn update_job(&mut self, old: &Job, new: &Job) -> Result<(), StoreError> {
        match self.jobs.get(&old.key) {
            None => Err(StoreError::NotFound(old.key)),
            Some(j) if j.epoch != old.epoch => Err(StoreError::Conflict(format!(
                "job {} is at epoch {}, not {}",
                old.key, j.epoch, old.epoch
            ))),
            Some(_) => {
                self.jobs.insert(new.key, new.clone());
                Ok(())
            }
        }
    }

    fn op(&mut self, key: &OpKey) -> Result<Option<OpRecord>, StoreError> {
        Ok(self.ops.get(key).cloned())
    }

    fn insert_op(&mut self, rec: &OpRecord) -> Result<bool, StoreError> {
        if self.ops.contains_key(&rec.key) {
            return Ok(false);
        }
        self.op_seq.push(rec.key);
        self.ops.insert(rec.key, rec.clone());
        Ok(true)
    }

    fn update_op(&mut self, rec: &OpRecord) -> Result<(), StoreError> {
        match self.ops.get_mut(&rec.key) {
            Some(r) => {
                r.clone_from(rec);
                Ok(())
            }
            None => Err(StoreError::OpNotStarted(rec.key.to_string())),
        }
    }

    fn abandon_ops_before(
        &mut self,
        job: &JobKey,
        epoch: Epoch,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        for rec in self.ops.values_mut() {
            if rec.key.job == *job && rec.status == OpStatus::Started && rec.key.epoch < epoch {
                rec.status = OpStatus::Abandoned;
                rec.finished_at = Some(now);
                n += 1;
            }
        }
        Ok(n)
    }

    fn abandon_dead_ops(&mut self, now: Timestamp) -> Result<u64, StoreError> {
        let live: BTreeMap<JobKey, Option<Epoch>> = self
            .jobs
            .values()
            .map(|j| {
                (
                    j.key,
                    j.lease.as_ref().filter(|l| l.is_live(now)).map(|l| l.epoch),
                )
            })
            .collect();
        let mut n = 0;
        for rec in self.ops.values_mut() {
            if ledger::is_dead(rec, live.get(&rec.key.job).copied().flatten()) {
                rec.status = OpStatus::Abandoned;
                rec.finished_at = Some(now);
                n += 1;
            }
        }
        Ok(n)
    }

    fn host_planned(&mut self, host: &str) -> Result<u64, StoreError> {
        Ok(self.host_ranks.get(host).copied().unwrap_or(0))
    }

    fn set_host_planned(&mut self, host: &str, planned: u64) -> Result<(), StoreError> {
        self.host_ranks.insert(host.to_owned(), planned);
        Ok(())
    }

    fn due(
        &mut self,
        now: Timestamp,
        limit: usize,
        skip: &[String],
    ) -> Result<Vec<(JobKey, String)>, StoreError> {
        let mut due: Vec<(&Job, String)> = self
            .jobs
            .values()
            .filter(|j| !j.is_suspect() && j.is_acquirable(now))
            .map(|j| (j, j.spec.url.host()))
            .filter(|(_, h)| !skip.contains(h))
            .collect();
        due.sort_by_key(|(j, _)| (j.host_rank, j.due_at(), self.seq(&j.key)));
        Ok(due
            .into_iter()
            .take(limit)
            .map(|(j, h)| (j.key, h))
            .collect())
    }

    fn due_suspect(&mut self, now: Timestamp) -> Result<Option<JobKey>, StoreError> {
        Ok(self
            .jobs
            .values()
            .filter(|j| j.is_suspect() && j.is_acquirable(now))
            .min_by_key(|j| (j.due_at(), self.seq(&j.key)))
            .map(|j| j.key))
    }

    fn live_on_host(&mut self, host: &str, now: Timestamp) -> Result<usize, StoreError> {
        Ok(self
            .jobs
            .values()
            .filter(|j| j.lease.as_ref().is_some_and(|l| l.is_live(now)))
            .filter(|j| j.spec.url.host() == host)
            .count())
    }

    fn cooldown(&mut self, host: &str) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.cooldowns.get(host).copied())
    }

    fn extend_cooldown(&mut self, host: &str, until: Timestamp) -> Result<(), StoreError> {
        let e = self.cooldowns.entry(host.to_owned()).or_insert(until);
        *e = (*e).max(until);
        Ok(())
    }

    fn paused(&mut self, host: &str) -> Result<bool, StoreError> {
        Ok(self.paused.contains(host))
    }

    fn set_paused(&mut self, host: &str, paused: bool) -> Result<(), StoreError> {
        if paused {
            self.paused.insert(host.to_owned());
        } else {
            self.paused.remove(host);
        }
        Ok(())
    }

    /// Positions are plan order, from 1.
    fn prune_ops(
        &mut self,
        finished_before: Timestamp,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Option<u64>), StoreError> {
        let mut with_ops: Vec<(u64, JobKey)> = self
            .ops
            .keys()
            .map(|k| (self.seq(&k.job).saturating_add(1), k.job))
            .filter(|(pos, _)| *pos > after)
            .collect();
        with_ops.sort_unstable();
        with_ops.dedup();
        with_ops.truncate(limit);
        let next = (with_ops.len() == limit)
            .then(|| with_ops.last().map(|(p, _)| *p))
            .flatten();
        let gone: std::collections::BTreeSet<JobKey> = with_ops
            .into_iter()
            .map(|(_, k)| k)
            .filter(|k| {
                self.jobs.get(k).is_some_and(|j| {
                    j.state.is_terminal() && j.finished_at.is_some_and(|t| t < finished_before)
                })
            })
            .collect();
        let before = self.ops.len();
        self.ops.retain(|k, _| !gone.contains(&k.job));
        self.op_seq.retain(|k| !gone.contains(&k.job));
        let n = (before - self.ops.len()) as u64;
        self.pruned_ops += n;
        Ok((n, next))
    }

    fn held_by(&mut self, owner: &WorkerId, now: Timestamp) -> Result<Vec<JobKey>, StoreError> {
        let mut held: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| {
                !j.state.is_terminal()
                    && !j.is_suspect()
                    && j.next_attempt_at <= now
                    && j.lease.as_ref().is_some_and(|l| l.owner == *owner)
            })
            .collect();
        held.sort_by_key(|j| self.seq(&j.key));
        Ok(held.into_iter().map(|j| j.key).collect())
    }

    fn bump(&mut self, counter: Counter, _job: &JobKey) -> Result<(), StoreError> {
        *self.counters.entry(counter).or_default() += 1;
        Ok(())
    }
}

impl Store for MemStore {
    fn transact(
        &self,
        write: Write<'_>,
        now: Timestamp,
        _commit: Commit,
    ) -> Result<Applied<Written>, StoreError> {
        // Memory has no stable storage: every commit is as durable as any.
        let mut g = self.lock();
        // All or nothing: work on a copy, keep it only if the write passed.
        let mut copy = g.clone();
        let r = exec::run(&mut copy, write, now);
        match &r {
            Ok(_) => *g = copy,
            Err(e) => exec::count_refusal(&mut *g, e)?,
        }
        r
    }

    fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        Ok(self.lock().jobs.get(key).cloned())
    }

    fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
        let g = self.lock();
        Ok(g.op_seq
            .iter()
            .filter(|k| k.job == *key)
            .filter_map(|k| g.ops.get(k).cloned())
            .collect())
    }

    fn scan(
        &self,
        state: Option<JobState>,
        after: Option<&JobKey>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let g = self.lock();
        Ok(g.jobs
            .values()
            .filter(|j| after.is_none_or(|a| j.key > *a))
            .filter(|j| state.is_none_or(|s| j.state == s))
            .take(limit)
            .cloned()
            .collect())
    }

    fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError> {
        Ok(self
            .lock()
            .jobs
            .values()
            .find(|j| j.state == JobState::Finalized && j.spec.url.as_str() == url)
            .cloned())
    }

    fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .lock()
            .jobs
            .values()
            .filter(|j| j.lease.as_ref().is_some_and(|l| !l.is_live(now)))
            .take(limit)
            .cloned()
            .collect())
    }

    fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
        let g = self.lock();
        let set: std::collections::BTreeSet<WorkerId> = g
            .jobs
            .values()
            .filter_map(|j| {
                j.lease
                    .as_ref()
                    .filter(|l| l.is_live(now))
                    .map(|l| l.owner.clone())
            })
            .collect();
        Ok(set.into_iter().collect())
    }

    fn busiest_hosts(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::HostLoad>, StoreError> {
        let g = self.lock();
        let mut by_host: BTreeMap<String, crate::HostLoad> = BTreeMap::new();
        for j in g.jobs.values().filter(|j| !j.state.is_terminal()) {
            let host = j.spec.url.host();
            let cooling = g.cooldowns.get(&host).copied().filter(|t| *t > now);
            let e = by_host.entry(host.clone()).or_insert(crate::HostLoad {
                host,
                due: 0,
                in_flight: 0,
                unfinished: 0,
                cooling_down_until: cooling,
            });
            e.unfinished += 1;
            if j.lease.as_ref().is_some_and(|l| l.is_live(now)) {
                e.in_flight += 1;
            } else if j.is_acquirable(now) && !j.is_suspect() {
                e.due += 1;
            }
        }
        let mut all: Vec<_> = by_host.into_values().collect();
        all.sort_by(|a, b| {
            (b.in_flight, b.due, b.unfinished, &a.host).cmp(&(
                a.in_flight,
                a.due,
                a.unfinished,
                &b.host,
            ))
        });
        all.truncate(limit);
        Ok(all)
    }

    fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError> {
        let g = self.lock();
        let mut c = StatusCounts {
            fenced_writes: g.counter(Counter::FencedWrites),
            replays: g.counter(Counter::Replays),
            ops_started: g.ops.len() as u64 + g.pruned_ops + g.counter(Counter::OpRestarts),
            paused: g.paused.iter().cloned().collect(),
            ..StatusCounts::default()
        };
        for s in JobState::ALL {
            c.by_state.insert(s, 0);
        }
        c.dead_ops = g
            .ops
            .values()
            .filter(|o| {
                let live = g
                    .jobs
                    .get(&o.key.job)
                    .and_then(|j| j.lease.as_ref().filter(|l| l.is_live(now)).map(|l| l.epoch));
                ledger::is_dead(o, live)
            })
            .count() as u64;
        for j in g.jobs.values() {
            c.total += 1;
            *c.by_state.entry(j.state).or_default() += 1;
            match &j.lease {
                Some(l) if l.is_live(now) => c.live_leases += 1,
                Some(_) => c.expired_leases += 1,
                None => {}
            }
            if j.is_suspect() && !j.state.is_terminal() {
                c.suspects += 1;
            } else if j.is_acquirable(now) {
                c.due_now += 1;
                let due = j
                    .lease
                    .as_ref()
                    .map_or(j.next_attempt_at, |l| l.expires_at.max(j.next_attempt_at));
                let age = now.millis_since(due);
                c.oldest_due_age_ms = Some(c.oldest_due_age_ms.map_or(age, |a: u64| a.max(age)));
            }
            if j.state == JobState::Failed {
                let reason = crate::job::failure_reason(j.last_error.as_deref());
                *c.failures_by_reason.entry(reason).or_default() += 1;
            }
        }
        Ok(c)
    }
}
