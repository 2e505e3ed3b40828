//! `MemStore`: the reference implementation of the [`Store`] port, in memory.
//!
//! It defines what every store must do in the simplest possible terms (a
//! mutex around two maps, every call applying the core's pure decisions), so
//! the conformance suite can be checked against it, and scenarios and
//! simulations can run without a database. Not durable, by design.

use crate::event::{Event, EventKind};
use crate::job::{transition, Command, Job, JobError, JobState, TransitionError, WorkerId};
use crate::ledger::{self, OpDecision, OpKey, OpRecord, OpResult, OpStatus};
use crate::plan::{self, PlanOutcome};
use crate::ports::{
    Applied, Commit, LeaseRequest, StatusCounts, Step, StepOutput, Store, StoreError,
};
use crate::spec::{JobKey, JobSpec};
use crate::time::Timestamp;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<JobKey, Job>,
    ops: BTreeMap<OpKey, OpRecord>,
    /// Start order of ops, for `ops()`.
    op_seq: Vec<OpKey>,
    fenced: u64,
    replays: u64,
    /// Jobs planned per host: the next job's host rank.
    host_ranks: std::collections::HashMap<String, u64>,
    /// Plan order, which breaks ties in the lease order.
    planned_seq: BTreeMap<JobKey, u64>,
    /// Hosts cooling down, and until when.
    cooldowns: std::collections::HashMap<String, Timestamp>,
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

fn stamp(events: Vec<EventKind>, now: Timestamp) -> Vec<Event> {
    events.into_iter().map(|e| e.at(now)).collect()
}

fn refused(job: JobKey, error: TransitionError) -> StoreError {
    StoreError::Refused { job, error }
}

/// Checks that `op`'s epoch is the job's live lease, the shared fence of
/// `begin_op` and `finish_op`.
pub fn check_op_fence(job: &Job, op: &OpKey) -> Result<(), StoreError> {
    check_epoch_fence(job.key, job.lease.as_ref().map(|l| l.epoch), op)
}

/// The fence of an op given only the epoch of the job's current lease
/// (`None`: not held), for stores that read just that column.
pub fn check_epoch_fence(
    job: JobKey,
    current: Option<crate::job::Epoch>,
    op: &OpKey,
) -> Result<(), StoreError> {
    if current == Some(op.epoch) {
        return Ok(());
    }
    Err(refused(
        job,
        TransitionError::Fenced {
            presented: op.epoch,
            current: current.map_or_else(|| "none".to_owned(), |e| e.to_string()),
        },
    ))
}

impl MemStore {
    fn count_fenced<T>(&self, r: &Result<T, StoreError>) {
        if r.as_ref().is_err_and(StoreError::is_fenced) {
            self.lock().fenced += 1;
        }
    }

    fn apply_in(
        g: &mut Inner,
        key: &JobKey,
        cmd: Command,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let job = g.jobs.get(key).ok_or(StoreError::NotFound(*key))?;
        let t = transition(job, cmd, now).map_err(|e| refused(*key, e))?;
        g.jobs.insert(*key, t.job.clone());
        Ok(Applied {
            value: t.job,
            events: stamp(t.events, now),
        })
    }

    fn begin_in(
        g: &mut Inner,
        op: &OpKey,
        owner: &WorkerId,
        now: Timestamp,
    ) -> Result<Applied<OpDecision>, StoreError> {
        let job = g.jobs.get(&op.job).ok_or(StoreError::NotFound(op.job))?;
        check_op_fence(job, op)?;
        let existing = g.ops.get(op).cloned();
        let decision = ledger::begin_op(existing.as_ref());
        match &decision {
            OpDecision::Run => {
                let rec = ledger::started(*op, owner.clone(), existing.as_ref(), now);
                if existing.is_none() {
                    g.op_seq.push(*op);
                }
                g.ops.insert(*op, rec);
            }
            OpDecision::Replay { .. } => g.replays += 1,
        }
        let ev = ledger::begin_event(op, &decision);
        Ok(Applied {
            value: decision,
            events: vec![ev.at(now)],
        })
    }

    fn finish_in(
        g: &mut Inner,
        op: &OpKey,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let job = g
            .jobs
            .get(&op.job)
            .ok_or(StoreError::NotFound(op.job))?
            .clone();
        check_op_fence(&job, op)?;
        let Some(rec) = g.ops.get(op).cloned() else {
            return Err(StoreError::OpNotStarted(op.to_string()));
        };
        if rec.status != OpStatus::Started {
            return Err(StoreError::OpNotStarted(op.to_string()));
        }
        let t = match then {
            Some(cmd) => transition(&job, cmd, now).map_err(|e| refused(op.job, e))?,
            None => crate::job::Transition {
                job: job.clone(),
                events: vec![],
            },
        };
        let (rec, completed) = ledger::finished(rec, outcome, now);
        let mut events = vec![completed];
        events.extend(t.events);
        g.ops.insert(*op, rec);
        g.jobs.insert(op.job, t.job.clone());
        Ok(Applied {
            value: t.job,
            events: stamp(events, now),
        })
    }
}

impl MemStore {
    fn lease_in(
        g: &mut Inner,
        req: &LeaseRequest,
        now: Timestamp,
    ) -> Result<Applied<Vec<Job>>, StoreError> {
        let mut candidates: Vec<&Job> = g
            .jobs
            .values()
            .filter(|j| {
                j.is_suspect() == req.isolated
                    && (j.is_acquirable(now)
                        || (!j.state.is_terminal()
                            && j.next_attempt_at <= now
                            && j.lease
                                .as_ref()
                                .is_some_and(|l| req.dead_owners.contains(&l.owner))))
            })
            .collect();
        let due = |j: &Job| {
            j.lease
                .as_ref()
                .map_or(j.next_attempt_at, |l| l.expires_at.max(j.next_attempt_at))
        };
        candidates.sort_by_key(|j| (j.host_rank, due(j), g.planned_seq.get(&j.key).copied()));
        // A suspect runs alone: one per isolated lease.
        let limit = if req.isolated { 1 } else { req.limit };
        let live_on = |host: &str| {
            // A host cooling down is as good as full.
            if g.cooldowns.get(host).is_some_and(|t| *t > now) {
                return Ok(usize::MAX);
            }
            Ok::<_, StoreError>(
                g.jobs
                    .values()
                    .filter(|j| j.lease.as_ref().is_some_and(|l| l.is_live(now)))
                    .filter(|j| {
                        !j.lease
                            .as_ref()
                            .is_some_and(|l| req.dead_owners.contains(&l.owner))
                    })
                    .filter(|j| j.spec.url.host() == host)
                    .count(),
            )
        };
        let keys: Vec<JobKey> = crate::hosts::pick_by_host_room(
            candidates.iter().map(|j| (j.key, j.spec.url.host())),
            limit,
            &mut crate::hosts::HostRoom::new(req.per_host),
            live_on,
        )?;
        let mut leased = Vec::new();
        let mut events = Vec::new();
        for key in keys {
            let mut job = g.jobs[&key].clone();
            if job.lease.as_ref().is_some_and(|l| l.is_live(now)) {
                // A dead owner's live lease: expire it now so acquire may proceed.
                if let Some(l) = job.lease.as_mut() {
                    l.expires_at = now;
                }
            }
            let t = transition(
                &job,
                Command::Acquire {
                    owner: req.owner.clone(),
                    ttl_ms: req.ttl_ms,
                    isolated: req.isolated,
                },
                now,
            )
            .map_err(|e| refused(key, e))?;
            events.extend(t.events);
            if let Some(l) = &t.job.lease {
                // The previous holders' unfinished ops died with their epochs.
                let mut n = 0;
                for rec in g.ops.values_mut() {
                    if rec.key.job == key
                        && rec.status == OpStatus::Started
                        && rec.key.epoch < l.epoch
                    {
                        rec.status = OpStatus::Abandoned;
                        rec.finished_at = Some(now);
                        n += 1;
                    }
                }
                events.extend(ledger::abandoned_event(Some(key), n));
                leased.push(t.job.clone());
            }
            g.jobs.insert(key, t.job);
        }
        Ok(Applied {
            value: leased,
            events: stamp(events, now),
        })
    }

    fn steps_in(
        g: &mut Inner,
        steps: Vec<Step>,
        now: Timestamp,
    ) -> Result<Applied<Vec<StepOutput>>, StoreError> {
        let mut out = Vec::with_capacity(steps.len());
        let mut events = Vec::new();
        for step in steps {
            match step {
                Step::Apply { key, cmd } => {
                    let a = Self::apply_in(g, &key, cmd, now)?;
                    events.extend(a.events);
                    out.push(StepOutput::Job(Box::new(a.value)));
                }
                Step::BeginOp { op, owner } => {
                    let a = Self::begin_in(g, &op, &owner, now)?;
                    events.extend(a.events);
                    out.push(StepOutput::Decision(a.value));
                }
                Step::FinishOp { op, outcome, then } => {
                    let a = Self::finish_in(g, &op, outcome, then, now)?;
                    events.extend(a.events);
                    out.push(StepOutput::Job(Box::new(a.value)));
                }
                Step::Lease(req) => {
                    let a = Self::lease_in(g, &req, now)?;
                    events.extend(a.events);
                    out.push(StepOutput::Leased(a.value));
                }
                Step::HostCooldown { host, until } => {
                    let e = g.cooldowns.entry(host).or_insert(until);
                    *e = (*e).max(until);
                }
            }
        }
        Ok(Applied { value: out, events })
    }
}

impl Store for MemStore {
    fn run_steps(
        &self,
        steps: Vec<Step>,
        now: Timestamp,
        _commit: Commit,
    ) -> Result<Applied<Vec<StepOutput>>, StoreError> {
        // Memory has no stable storage: every commit is as durable as any.
        let mut g = self.lock();
        // All or nothing: work on a copy, keep it only if every step passed.
        let mut copy = Inner {
            jobs: g.jobs.clone(),
            ops: g.ops.clone(),
            op_seq: g.op_seq.clone(),
            fenced: g.fenced,
            replays: g.replays,
            host_ranks: g.host_ranks.clone(),
            planned_seq: g.planned_seq.clone(),
            cooldowns: g.cooldowns.clone(),
        };
        let r = Self::steps_in(&mut copy, steps, now);
        match &r {
            Ok(_) => *g = copy,
            Err(e) if e.is_fenced() => g.fenced += 1,
            Err(_) => {}
        }
        r
    }

    fn plan(
        &self,
        specs: &[JobSpec],
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Applied<Vec<PlanOutcome>>, StoreError> {
        let mut g = self.lock();
        let mut out = Vec::with_capacity(specs.len());
        let mut events = Vec::new();
        for spec in specs {
            let (o, job, ev) = plan::decide(g.jobs.get(&spec.key()), spec, max_attempts, now);
            if let Some(mut job) = job {
                let next = g.host_ranks.entry(spec.url.host()).or_default();
                job.host_rank = *next;
                *next += 1;
                let seq = g.planned_seq.len() as u64;
                g.planned_seq.insert(job.key, seq);
                g.jobs.insert(job.key, job);
            }
            events.extend(ev);
            out.push(o);
        }
        Ok(Applied {
            value: out,
            events: stamp(events, now),
        })
    }

    fn lease(&self, req: &LeaseRequest, now: Timestamp) -> Result<Applied<Vec<Job>>, StoreError> {
        Self::lease_in(&mut self.lock(), req, now)
    }

    fn apply(
        &self,
        key: &JobKey,
        cmd: Command,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let r = Self::apply_in(&mut self.lock(), key, cmd, now);
        self.count_fenced(&r);
        r
    }

    fn begin_op(
        &self,
        op: &OpKey,
        owner: &WorkerId,
        now: Timestamp,
    ) -> Result<Applied<OpDecision>, StoreError> {
        let r = Self::begin_in(&mut self.lock(), op, owner, now);
        self.count_fenced(&r);
        r
    }

    fn finish_op(
        &self,
        op: &OpKey,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let r = Self::finish_in(&mut self.lock(), op, outcome, then, now);
        self.count_fenced(&r);
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

    fn abandon_dead_ops(&self, now: Timestamp) -> Result<Applied<u64>, StoreError> {
        let mut g = self.lock();
        let live: BTreeMap<JobKey, Option<crate::job::Epoch>> = g
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
        for rec in g.ops.values_mut() {
            if ledger::is_dead(rec, live.get(&rec.key.job).copied().flatten()) {
                rec.status = OpStatus::Abandoned;
                rec.finished_at = Some(now);
                n += 1;
            }
        }
        let events = ledger::abandoned_event(None, n)
            .map(|e| e.at(now))
            .into_iter()
            .collect();
        Ok(Applied { value: n, events })
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
            fenced_writes: g.fenced,
            replays: g.replays,
            ops_started: g.ops.values().map(|o| u64::from(o.runs)).sum(),
            ..StatusCounts::default()
        };
        for s in JobState::ALL {
            c.by_state.insert(s, 0);
        }
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
                let reason = failure_reason(j.last_error.as_deref());
                *c.failures_by_reason.entry(reason).or_default() += 1;
            }
        }
        Ok(c)
    }
}

/// The reason code of a stored `last_error` (`reason: detail`).
pub fn failure_reason(last_error: Option<&str>) -> String {
    last_error
        .and_then(|e| e.split(':').next())
        .map_or_else(|| "unknown".to_owned(), |r| r.trim().to_owned())
}
