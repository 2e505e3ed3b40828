//! The operation ledger model: every side effect is an op with a key, and the
//! rules that decide whether to run it, replay it, or abandon it.
//!
//! An op key is (job key, kind, lease epoch). A retry under a new lease is a
//! new op; asking again under the same lease is the same op, and if that op
//! committed, its recorded result is returned instead of running the effect.
//! Only `committed` is ever replayed: a `failed` op is run again, and a
//! `started` op of a dead epoch is `abandoned`, never mistaken for success.

use crate::digest::Digest32;
use crate::job::{BlobInfo, Epoch, HeadInfo, WorkerId};
use crate::spec::JobKey;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The side effects the engine records.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Head,
    Stream,
    Finalize,
}

impl OpKind {
    pub const ALL: [Self; 3] = [Self::Head, Self::Stream, Self::Finalize];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Head => "head",
            Self::Stream => "stream",
            Self::Finalize => "finalize",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct OpKey {
    pub job: JobKey,
    pub kind: OpKind,
    pub epoch: Epoch,
}

impl fmt::Display for OpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.job, self.kind, self.epoch)
    }
}

#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    Started,
    Committed,
    Failed,
    Abandoned,
}

impl OpStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Committed => "committed",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Started,
            Self::Committed,
            Self::Failed,
            Self::Abandoned,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What the body stream produced.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StreamInfo {
    pub sha256: Digest32,
    pub size: u64,
    /// Bytes already on disk from an earlier attempt, re-hashed not re-fetched.
    pub resumed_from: u64,
}

/// The recorded result of a committed op; replays return exactly this.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpResult {
    Head(HeadInfo),
    Stream(StreamInfo),
    Finalize(BlobInfo),
}

impl OpResult {
    pub const fn kind(&self) -> OpKind {
        match self {
            Self::Head(_) => OpKind::Head,
            Self::Stream(_) => OpKind::Stream,
            Self::Finalize(_) => OpKind::Finalize,
        }
    }
}

/// One row of the ledger.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct OpRecord {
    pub key: OpKey,
    pub owner: WorkerId,
    pub status: OpStatus,
    pub result: Option<OpResult>,
    pub error: Option<String>,
    /// How many times this op was started (a restart under the same lease).
    pub runs: u32,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
}

/// What to do about an op the engine is about to run.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum OpDecision {
    /// Run the effect; the op is (re)started.
    Run,
    /// Do not run it; here is what it returned the first time.
    Replay {
        result: OpResult,
        recorded_at: Timestamp,
    },
}

/// Decides about `existing`, the ledger row with the same op key (if any).
/// Pure: the store persists what this returns.
pub fn begin_op(existing: Option<&OpRecord>) -> OpDecision {
    match existing {
        Some(OpRecord {
            status: OpStatus::Committed,
            result: Some(result),
            finished_at,
            started_at,
            ..
        }) => OpDecision::Replay {
            result: result.clone(),
            recorded_at: finished_at.unwrap_or(*started_at),
        },
        // Started (our own crashed try), failed (an error is not a result),
        // abandoned, or a committed row without a result (cannot happen through
        // `commit_op`, and is never trusted as success): run it.
        _ => OpDecision::Run,
    }
}

/// The row after `begin_op` said `Run`.
pub fn started(
    key: OpKey,
    owner: WorkerId,
    existing: Option<&OpRecord>,
    now: Timestamp,
) -> OpRecord {
    OpRecord {
        key,
        owner,
        status: OpStatus::Started,
        result: None,
        error: None,
        runs: existing.map_or(1, |r| r.runs + 1),
        started_at: now,
        finished_at: None,
    }
}

/// Should a `started` op of `op_epoch` be abandoned, given the job's current
/// lease epoch? Yes when its epoch is no longer the live one.
pub fn is_dead(op: &OpRecord, live_epoch: Option<Epoch>) -> bool {
    op.status == OpStatus::Started && live_epoch != Some(op.key.epoch)
}

/// The event a `begin_op` decision produces.
pub fn begin_event(op: &OpKey, decision: &OpDecision) -> crate::event::EventKind {
    use crate::event::EventKind;
    match decision {
        OpDecision::Run => EventKind::OperationStarted {
            job_key: op.job,
            op: op.kind,
            epoch: op.epoch,
        },
        OpDecision::Replay { recorded_at, .. } => EventKind::IdempotencyReplay {
            job_key: op.job,
            op: op.kind.into(),
            epoch: Some(op.epoch),
            recorded_at: Some(*recorded_at),
            reason: crate::event::ReplayReason::Again,
        },
    }
}

/// The `idempotency_replay` event of reused work (see [`crate::ports::Step::Reused`]).
pub fn reused_event(op: &OpKey, reason: crate::event::ReplayReason) -> crate::event::EventKind {
    crate::event::EventKind::IdempotencyReplay {
        job_key: op.job,
        op: op.kind.into(),
        epoch: Some(op.epoch),
        recorded_at: None,
        reason,
    }
}

/// A STREAM that fetched nothing because a previous holder's part held the
/// whole body is a reuse of that holder's work.
pub fn body_reused(
    op: &OpKey,
    outcome: &Result<OpResult, crate::job::JobError>,
) -> Option<crate::event::EventKind> {
    match outcome {
        Ok(OpResult::Stream(si)) if si.size > 0 && si.resumed_from == si.size => {
            Some(reused_event(op, crate::event::ReplayReason::Takeover))
        }
        _ => None,
    }
}

/// The row of a `started` op once its outcome is known, and the
/// `operation_completed` event that reports it.
pub fn finished(
    rec: OpRecord,
    outcome: Result<OpResult, crate::job::JobError>,
    now: Timestamp,
) -> (OpRecord, crate::event::EventKind) {
    let bytes = match &outcome {
        Ok(OpResult::Stream(si)) => Some(si.size.saturating_sub(si.resumed_from)),
        _ => None,
    };
    let (status, result, error) = match outcome {
        Ok(r) => (OpStatus::Committed, Some(r), None),
        Err(e) => (OpStatus::Failed, None, Some(e.summary())),
    };
    let event = crate::event::EventKind::OperationCompleted {
        job_key: rec.key.job,
        op: rec.key.kind,
        epoch: rec.key.epoch,
        status,
        elapsed_ms: now.millis_since(rec.started_at),
        error: error.clone(),
        bytes,
    };
    let rec = OpRecord {
        status,
        result,
        error,
        finished_at: Some(now),
        ..rec
    };
    (rec, event)
}

/// The `crash_recovery_event` for `count` started ops marked abandoned (by a
/// takeover of `job`, or by the reconciler across jobs); none for zero.
pub fn abandoned_event(job: Option<JobKey>, count: u64) -> Option<crate::event::EventKind> {
    (count > 0).then(|| crate::event::EventKind::CrashRecovery {
        kind: "op_abandoned".into(),
        job_key: job,
        count,
    })
}
