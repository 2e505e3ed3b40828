//! Every ledger write, decided once: a [`Write`] run against a store's
//! transaction ([`Tx`]).
//!
//! What to load, which transition, what to write, which events and what to
//! count live here; a store only opens the transaction, calls [`run`], and
//! commits (or rolls back). See [`crate::tx`] for the isolation it owes.

mod import;
mod lease;
mod plan;

use crate::event::{Event, EventKind};
use crate::job::{transition, Command, Epoch, Job, JobError, TransitionError, WorkerId};
use crate::ledger::{self, OpDecision, OpKey, OpResult, OpStatus};
use crate::plan::PlanOutcome;
use crate::ports::{Applied, StoreError};
use crate::ports::{Step, StepOutput};
use crate::spec::{JobKey, JobSpec};
use crate::time::Timestamp;
use crate::tx::{Counter, Tx};

/// One atomic ledger write.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// Plans a batch; `max_attempts` is stored on new jobs.
    Plan {
        specs: &'a [JobSpec],
        max_attempts: u32,
    },
    /// Runs steps in order: all of them, or none.
    Steps(&'a [Step]),
    /// Abandons every started op whose epoch is not its job's live lease.
    AbandonDeadOps,
    /// Copies jobs as they are, with their ops (from another ledger); a key
    /// already held is left alone.
    Import(&'a [(Job, Vec<crate::ledger::OpRecord>)]),
    /// Pauses (or resumes) leasing on `host`, or on every host with
    /// [`crate::hosts::ALL_HOSTS`]. Jobs already held carry on.
    Pause { host: &'a str, paused: bool },
    /// Deletes the op rows of finished jobs (finalized, skipped as
    /// duplicates, or failed) that finished more than `older_than_ms`
    /// ago, among the next `limit` jobs with op rows after `after` (a
    /// store's own position, 0 to start). Never an unfinished job's: its
    /// ops are what its next holder reuses.
    Prune {
        older_than_ms: u64,
        after: u64,
        limit: usize,
    },
}

/// What a [`Write`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    Plan(Vec<PlanOutcome>),
    Steps(Vec<StepOutput>),
    Abandoned(u64),
    /// Jobs copied, and jobs left alone because their key was held.
    Imported {
        copied: u64,
        existing: u64,
    },
    Paused,
    /// Op rows deleted, and where to go on (`None`: no job is left to look
    /// at).
    Pruned {
        ops: u64,
        next: Option<u64>,
    },
}

/// Runs `write` in `tx`. On an error the store must roll back whatever
/// `tx` wrote, then call [`count_refusal`] (in a transaction of its own
/// or the same one, after the rollback).
pub fn run<T: Tx + ?Sized>(
    tx: &mut T,
    write: Write<'_>,
    now: Timestamp,
) -> Result<Applied<Written>, StoreError> {
    let applied = decide(tx, write, now)?;
    tx.flush()?;
    Ok(applied)
}

fn decide<T: Tx + ?Sized>(
    tx: &mut T,
    write: Write<'_>,
    now: Timestamp,
) -> Result<Applied<Written>, StoreError> {
    match write {
        Write::Plan {
            specs,
            max_attempts,
        } => plan::plan(tx, specs, max_attempts, now).map(|a| Applied {
            value: Written::Plan(a.value),
            events: a.events,
        }),
        Write::Steps(steps) => {
            let a = run_steps(tx, steps, now)?;
            count_replays(tx, &a.events)?;
            Ok(Applied {
                value: Written::Steps(a.value),
                events: a.events,
            })
        }
        Write::Import(jobs) => {
            let (copied, existing) = import::import(tx, jobs)?;
            Ok(Applied {
                value: Written::Imported { copied, existing },
                events: Vec::new(),
            })
        }
        Write::Pause { host, paused } => {
            tx.set_paused(host, paused)?;
            Ok(Applied {
                value: Written::Paused,
                events: Vec::new(),
            })
        }
        Write::Prune {
            older_than_ms,
            after,
            limit,
        } => {
            let before = Timestamp::from_millis(
                now.as_millis()
                    .saturating_sub(i64::try_from(older_than_ms).unwrap_or(i64::MAX)),
            );
            let (ops, next) = tx.prune_ops(before, after, limit.max(1))?;
            Ok(Applied {
                value: Written::Pruned { ops, next },
                events: Vec::new(),
            })
        }
        Write::AbandonDeadOps => {
            let n = tx.abandon_dead_ops(now)?;
            let events = ledger::abandoned_event(None, n)
                .map(|e| e.at(now))
                .into_iter()
                .collect();
            Ok(Applied {
                value: Written::Abandoned(n),
                events,
            })
        }
    }
}

/// Counts a refused write that the ledger keeps a count of (a stale
/// epoch's). Call it after rolling the refused write back.
pub fn count_refusal<T: Tx + ?Sized>(tx: &mut T, error: &StoreError) -> Result<(), StoreError> {
    match error {
        StoreError::Refused {
            job,
            error: TransitionError::Fenced { .. },
        } => tx.bump(Counter::FencedWrites, job),
        _ => Ok(()),
    }
}

/// Counts every reuse of work a write reports, as `idem_replays_total`
/// does (re-plans are not counted: they come from `idem plan`, not work).
fn count_replays<T: Tx + ?Sized>(tx: &mut T, events: &[Event]) -> Result<(), StoreError> {
    for e in events {
        if let EventKind::IdempotencyReplay { job_key, .. } = &e.kind {
            tx.bump(Counter::Replays, job_key)?;
        }
    }
    Ok(())
}

pub(crate) fn stamp(events: Vec<EventKind>, now: Timestamp) -> Vec<Event> {
    events.into_iter().map(|e| e.at(now)).collect()
}

fn refused(job: JobKey, error: TransitionError) -> StoreError {
    StoreError::Refused { job, error }
}

/// The fence of an op: its epoch must be the job's live lease (`current`,
/// `None` when the job is not held).
fn check_fence(job: JobKey, current: Option<Epoch>, op: &OpKey) -> Result<(), StoreError> {
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

/// The job rows one run of steps reads and changes, each written back once
/// at the end: a request that moves a job through several steps reads and
/// writes its row once.
#[derive(Default)]
struct Rows {
    /// (as read, current)
    rows: Vec<(Job, Job)>,
    /// Jobs whose lease epoch alone was read.
    fences: Vec<(JobKey, Option<Epoch>)>,
}

impl Rows {
    fn get<T: Tx + ?Sized>(&mut self, tx: &mut T, key: &JobKey) -> Result<&mut Job, StoreError> {
        let i = match self.rows.iter().position(|(j, _)| j.key == *key) {
            Some(i) => i,
            None => {
                let j = tx.job(key)?.ok_or(StoreError::NotFound(*key))?;
                self.rows.push((j.clone(), j));
                self.rows.len() - 1
            }
        };
        Ok(&mut self.rows[i].1)
    }

    /// The epoch of the job's live lease, reading as little as the store
    /// allows when the row is not loaded.
    fn fence<T: Tx + ?Sized>(
        &mut self,
        tx: &mut T,
        key: &JobKey,
    ) -> Result<Option<Epoch>, StoreError> {
        if let Some((_, j)) = self.rows.iter().find(|(j, _)| j.key == *key) {
            return Ok(j.lease.as_ref().map(|l| l.epoch));
        }
        if let Some((_, e)) = self.fences.iter().find(|(k, _)| k == key) {
            return Ok(*e);
        }
        let e = tx.lease_epoch(key)?.ok_or(StoreError::NotFound(*key))?;
        self.fences.push((*key, e));
        Ok(e)
    }

    fn flush<T: Tx + ?Sized>(self, tx: &mut T) -> Result<(), StoreError> {
        for (old, new) in &self.rows {
            if old != new {
                tx.update_job(old, new)?;
            }
        }
        Ok(())
    }
}

/// Runs steps in order. The steps between two lease steps share their
/// rows, written back before a lease reads the table.
fn run_steps<T: Tx + ?Sized>(
    tx: &mut T,
    steps: &[Step],
    now: Timestamp,
) -> Result<Applied<Vec<StepOutput>>, StoreError> {
    let mut out = Vec::with_capacity(steps.len());
    let mut events = Vec::new();
    let mut rest = steps;
    loop {
        let cut = rest
            .iter()
            .position(|s| matches!(s, Step::Lease(_)))
            .unwrap_or(rest.len());
        let (segment, tail) = rest.split_at(cut);
        if !segment.is_empty() {
            let mut rows = Rows::default();
            run_segment(tx, &mut rows, segment, now, &mut out, &mut events)?;
            rows.flush(tx)?;
        }
        match tail.split_first() {
            Some((Step::Lease(req), more)) => {
                let a = lease::lease(tx, req, now)?;
                events.extend(a.events);
                out.push(StepOutput::Leased(a.value));
                rest = more;
            }
            _ => return Ok(Applied { value: out, events }),
        }
    }
}

/// Steps without a lease among them, against one set of rows.
fn run_segment<T: Tx + ?Sized>(
    tx: &mut T,
    rows: &mut Rows,
    steps: &[Step],
    now: Timestamp,
    out: &mut Vec<StepOutput>,
    events: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let mut i = 0;
    while i < steps.len() {
        let step = &steps[i];
        i += 1;
        if let (
            Step::BeginOp { op, owner },
            Some(Step::FinishOp {
                op: fop,
                outcome,
                then,
            }),
        ) = (step, steps.get(i))
        {
            if op == fop {
                if let Some(a) = record_op(tx, rows, op, owner, outcome, then.as_ref(), now)? {
                    i += 1;
                    events.extend(a.events);
                    out.extend(a.value);
                    continue;
                }
            }
        }
        match step {
            Step::Apply { key, cmd } => {
                let job = rows.get(tx, key)?;
                let t = transition(job, cmd.clone(), now).map_err(|e| refused(*key, e))?;
                *job = t.job;
                events.extend(stamp(t.events, now));
                out.push(StepOutput::Job(Box::new(job.clone())));
            }
            Step::BeginOp { op, owner } => {
                let a = begin_op(tx, rows, op, owner, now)?;
                events.extend(a.events);
                out.push(StepOutput::Decision(a.value));
            }
            Step::FinishOp { op, outcome, then } => {
                let a = finish_op(tx, rows, op, outcome.clone(), then.clone(), now)?;
                events.extend(a.events);
                out.push(StepOutput::Job(Box::new(a.value)));
            }
            Step::Lease(_) => {
                return Err(StoreError::Backend("a lease step inside a segment".into()))
            }
            Step::HostCooldown { host, until } => tx.extend_cooldown(host, *until)?,
            Step::Reused { op, reason } => {
                check_fence(op.job, rows.fence(tx, &op.job)?, op)?;
                events.push(ledger::reused_event(op, *reason).at(now));
            }
        }
    }
    Ok(())
}

/// Claims an op for the live lease holder: `Run` (its row now `started`)
/// or `Replay` with the recorded result.
fn begin_op<T: Tx + ?Sized>(
    tx: &mut T,
    rows: &mut Rows,
    op: &OpKey,
    owner: &WorkerId,
    now: Timestamp,
) -> Result<Applied<OpDecision>, StoreError> {
    check_fence(op.job, rows.fence(tx, &op.job)?, op)?;
    // A first start (the common case) is one insert; only an op that has a
    // row already is read.
    let fresh = ledger::started(*op, owner.clone(), None, now);
    let decision = if tx.insert_op(&fresh)? {
        OpDecision::Run
    } else {
        let existing = tx.op(op)?;
        let decision = ledger::begin_op(existing.as_ref());
        match &decision {
            OpDecision::Run => {
                tx.update_op(&ledger::started(*op, owner.clone(), existing.as_ref(), now))?;
                tx.bump(Counter::OpRestarts, &op.job)?;
            }
            // Counted with every other reuse (see `count_replays`).
            OpDecision::Replay { .. } => {}
        }
        decision
    };
    let ev = ledger::begin_event(op, &decision);
    Ok(Applied {
        value: decision,
        events: vec![ev.at(now)],
    })
}

/// Records a started op's outcome and applies `then` to its job.
fn finish_op<T: Tx + ?Sized>(
    tx: &mut T,
    rows: &mut Rows,
    op: &OpKey,
    outcome: Result<OpResult, JobError>,
    then: Option<Command>,
    now: Timestamp,
) -> Result<Applied<Job>, StoreError> {
    let job = rows.get(tx, &op.job)?;
    check_fence(op.job, job.lease.as_ref().map(|l| l.epoch), op)?;
    let rec = match tx.op(op)? {
        Some(r) if r.status == OpStatus::Started => r,
        _ => return Err(StoreError::OpNotStarted(op.to_string())),
    };
    let job = rows.get(tx, &op.job)?;
    let mut events = Vec::new();
    if let Some(cmd) = then {
        let t = transition(job, cmd, now).map_err(|e| refused(op.job, e))?;
        *job = t.job;
        events = t.events;
    }
    let value = job.clone();
    events.extend(ledger::body_reused(op, &outcome));
    let (rec, completed) = ledger::finished(rec, outcome, now);
    events.insert(0, completed);
    tx.update_op(&rec)?;
    Ok(Applied {
        value,
        events: stamp(events, now),
    })
}

/// An op begun and finished in one request: an effect with nothing to
/// fence beforehand (HEAD changes nothing anywhere) recorded once it is
/// done, as one finished row. `None` (nothing written) when the op has a
/// row already: the caller then runs the two steps, which decide about it.
fn record_op<T: Tx + ?Sized>(
    tx: &mut T,
    rows: &mut Rows,
    op: &OpKey,
    owner: &WorkerId,
    outcome: &Result<OpResult, JobError>,
    then: Option<&Command>,
    now: Timestamp,
) -> Result<Option<Applied<[StepOutput; 2]>>, StoreError> {
    let job = rows.get(tx, &op.job)?;
    check_fence(op.job, job.lease.as_ref().map(|l| l.epoch), op)?;
    let started = ledger::started(*op, owner.clone(), None, now);
    let (rec, completed) = ledger::finished(started, outcome.clone(), now);
    if !tx.insert_op(&rec)? {
        return Ok(None);
    }
    let mut events = vec![ledger::begin_event(op, &OpDecision::Run), completed];
    events.extend(ledger::body_reused(op, outcome));
    let job = rows.get(tx, &op.job)?;
    if let Some(cmd) = then {
        // A refusal fails the request, which rolls the insert back with it.
        let t = transition(job, cmd.clone(), now).map_err(|e| refused(op.job, e))?;
        *job = t.job;
        events.extend(t.events);
    }
    Ok(Some(Applied {
        value: [
            StepOutput::Decision(OpDecision::Run),
            StepOutput::Job(Box::new(job.clone())),
        ],
        events: stamp(events, now),
    }))
}
