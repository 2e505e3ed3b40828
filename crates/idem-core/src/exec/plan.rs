//! Planning a batch: new jobs inserted with their host rank, re-plans
//! answered without a write, conflicts reported.

use super::stamp;
use crate::event::{EventKind, ReplayOp, ReplayReason};
use crate::job::Job;
use crate::plan::{self, PlanOutcome};
use crate::ports::{Applied, StoreError};
use crate::spec::JobSpec;
use crate::time::Timestamp;
use crate::tx::Tx;
use std::collections::HashMap;

pub(super) fn plan<T: Tx + ?Sized>(
    tx: &mut T,
    specs: &[JobSpec],
    max_attempts: u32,
    now: Timestamp,
) -> Result<Applied<Vec<PlanOutcome>>, StoreError> {
    let mut out = Vec::with_capacity(specs.len());
    let mut events = Vec::new();
    // Plans come in runs: a first plan inserts, a re-run finds every key
    // present. Whatever the last item found decides what to try first, so
    // either run costs one store call per item.
    let mut expect_existing = false;
    let mut ranks = HostRanks::default();
    let keys: Vec<_> = specs.iter().map(JobSpec::key).collect();
    tx.will_plan(&keys)?;
    for (spec, &key) in specs.iter().zip(&keys) {
        let fingerprint = spec.fingerprint();
        let mut same = None;
        if expect_existing {
            same = tx.same_fingerprint(&key, &fingerprint)?;
        }
        if same.is_none() {
            // The job is built only when it may be new.
            let mut job = Job::planned(spec.clone(), max_attempts, now);
            let host = spec.url.host();
            job.host_rank = ranks.peek(tx, &host)?;
            if tx.insert_job(&job)? {
                ranks.take(&host);
                expect_existing = false;
                let (o, _, ev) = plan::decide(None, spec, max_attempts, now);
                events.extend(ev);
                out.push(o);
                continue;
            }
            expect_existing = true;
            same = tx.same_fingerprint(&key, &fingerprint)?;
        }
        match same {
            // Re-plans are mostly no-ops: the row is loaded only to report
            // a conflict.
            Some(true) => {
                events.push(EventKind::IdempotencyReplay {
                    job_key: key,
                    op: ReplayOp::Plan,
                    epoch: None,
                    recorded_at: None,
                    reason: ReplayReason::Replan,
                });
                out.push(PlanOutcome::Existing { job_key: key });
            }
            Some(false) => {
                let existing = tx.job(&key)?.ok_or(StoreError::NotFound(key))?;
                let (o, _, ev) = plan::decide(Some(&existing), spec, max_attempts, now);
                events.extend(ev);
                out.push(o);
            }
            None => return Err(StoreError::Backend("a job vanished while planning".into())),
        }
    }
    ranks.save(tx)?;
    Ok(Applied {
        value: out,
        events: stamp(events, now),
    })
}

/// The next host rank of each host a batch touches, read once and written
/// back once per batch.
#[derive(Default)]
struct HostRanks(HashMap<String, (u64, bool)>);

impl HostRanks {
    /// The rank the next job of `host` gets.
    fn peek<T: Tx + ?Sized>(&mut self, tx: &mut T, host: &str) -> Result<u64, StoreError> {
        if let Some((next, _)) = self.0.get(host) {
            return Ok(*next);
        }
        let next = tx.host_planned(host)?;
        self.0.insert(host.to_owned(), (next, false));
        Ok(next)
    }

    /// Uses the rank `peek` gave.
    fn take(&mut self, host: &str) {
        if let Some((next, dirty)) = self.0.get_mut(host) {
            *next += 1;
            *dirty = true;
        }
    }

    fn save<T: Tx + ?Sized>(&self, tx: &mut T) -> Result<(), StoreError> {
        for (host, (next, dirty)) in &self.0 {
            if *dirty {
                tx.set_host_planned(host, *next)?;
            }
        }
        Ok(())
    }
}
