//! Planning as a decision: given what the ledger already holds under a key,
//! is a spec new, a no-op re-plan, or a conflict?

use crate::event::EventKind;
use crate::job::Job;
use crate::spec::{Fingerprint, JobKey, JobSpec};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The outcome of planning one spec.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PlanOutcome {
    /// New: the job was inserted.
    Planned { job_key: JobKey },
    /// Same key, same payload: nothing to do.
    Existing { job_key: JobKey },
    /// Same key, different payload: refused, both sides reported.
    Conflict(KeyConflict),
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KeyConflict {
    pub job_key: JobKey,
    pub existing: Fingerprint,
    pub proposed: Fingerprint,
    /// Both URLs as they may be shown ([`crate::redact_url`]).
    pub existing_url: String,
    pub proposed_url: String,
}

/// Decides about `spec` given the job stored under its key (if any). Returns
/// the job to insert when new, and the event to emit.
pub fn decide(
    existing: Option<&Job>,
    spec: &JobSpec,
    max_attempts: u32,
    now: Timestamp,
) -> (PlanOutcome, Option<Job>, Option<EventKind>) {
    let job_key = spec.key();
    match existing {
        None => {
            let job = Job::planned(spec.clone(), max_attempts, now);
            let ev = EventKind::JobPlanned {
                job_key,
                work_id: spec.work_id.clone(),
                artifact_id: spec.artifact_id.clone(),
                url: spec.url.redacted().into_owned(),
            };
            (PlanOutcome::Planned { job_key }, Some(job), Some(ev))
        }
        Some(job) if job.fingerprint == spec.fingerprint() => {
            (PlanOutcome::Existing { job_key }, None, None)
        }
        Some(job) => {
            let c = KeyConflict {
                job_key,
                existing: job.fingerprint,
                proposed: spec.fingerprint(),
                existing_url: job.spec.url.redacted().into_owned(),
                proposed_url: spec.url.redacted().into_owned(),
            };
            let ev = EventKind::KeyConflict {
                job_key,
                existing: c.existing,
                proposed: c.proposed,
                existing_url: c.existing_url.clone(),
                proposed_url: c.proposed_url.clone(),
            };
            (PlanOutcome::Conflict(c), None, Some(ev))
        }
    }
}

/// Totals of a plan call.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct PlanCounts {
    pub planned: u64,
    pub existing: u64,
    pub conflicts: u64,
}

impl PlanCounts {
    pub fn add(&mut self, o: &PlanOutcome) {
        match o {
            PlanOutcome::Planned { .. } => self.planned += 1,
            PlanOutcome::Existing { .. } => self.existing += 1,
            PlanOutcome::Conflict(_) => self.conflicts += 1,
        }
    }
}
