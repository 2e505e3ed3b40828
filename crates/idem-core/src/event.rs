//! Telemetry events as data: every transition says what happened, and the
//! engine hands these to `idem-telemetry` (metrics) and the events log.
//!
//! Events carry job keys for audits; the metrics mapping drops them, so no
//! label ever has a per-job value.

use crate::digest::Digest32;
use crate::job::{Epoch, JobState, WorkerId};
use crate::ledger::{OpKind, OpStatus};
use crate::spec::{Fingerprint, JobKey};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// An event with the instant it happened.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Every event idem emits. The first nine are the progress report's.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    JobPlanned {
        job_key: JobKey,
        work_id: String,
        artifact_id: String,
        /// Without its secrets ([`crate::redact_url`]), as every URL in an event.
        url: String,
    },
    JobLeased {
        job_key: JobKey,
        owner: WorkerId,
        epoch: Epoch,
        ttl_ms: u64,
        attempt: u32,
        /// Set when this lease takes over a job another holder left mid-way.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_from: Option<JobState>,
        /// On a job's first lease: how long it waited since it was planned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queued_ms: Option<u64>,
        /// The holder runs this job alone (a suspect, see `Job::is_suspect`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        isolated: bool,
    },
    JobStateChanged {
        job_key: JobKey,
        from: JobState,
        to: JobState,
        reason: String,
        /// On a move into a terminal state: time since the job was planned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_planned_ms: Option<u64>,
        /// On a move into a terminal state: time since its first lease (the
        /// service time, queue wait excluded; absent if never leased).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_leased_ms: Option<u64>,
    },
    LeaseRenewed {
        job_key: JobKey,
        owner: WorkerId,
        epoch: Epoch,
        ttl_ms: u64,
    },
    /// A lease ended by its holder: `finished` (the job reached a terminal
    /// state), `failed` (the attempt failed; the job may be retried),
    /// `stopped` (given back on a graceful stop). With `lease_expired`,
    /// every lease ends in exactly one event.
    LeaseReleased {
        job_key: JobKey,
        owner: WorkerId,
        epoch: Epoch,
        #[serde(default)]
        reason: String,
    },
    OperationStarted {
        job_key: JobKey,
        op: OpKind,
        epoch: Epoch,
    },
    OperationCompleted {
        job_key: JobKey,
        op: OpKind,
        epoch: Epoch,
        status: OpStatus,
        elapsed_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// For a committed STREAM: bytes fetched over the network by it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// The reconciler (or a takeover) repaired what a crash left behind.
    #[serde(rename = "crash_recovery_event")]
    CrashRecovery {
        /// `lease_expired`, `op_abandoned`, `part_removed`, `blob_healed`,
        /// `blob_missing_requeued`.
        kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_key: Option<JobKey>,
        count: u64,
    },
    /// Work already done was reused instead of done again: what (`op`)
    /// and why (`reason`).
    IdempotencyReplay {
        job_key: JobKey,
        op: ReplayOp,
        /// The lease that reused it (none for a re-plan).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
        /// When the reused op was recorded, where the ledger says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recorded_at: Option<Timestamp>,
        #[serde(default)]
        reason: ReplayReason,
    },
    KeyConflict {
        job_key: JobKey,
        existing: Fingerprint,
        proposed: Fingerprint,
        existing_url: String,
        proposed_url: String,
    },
    LeaseExpired {
        job_key: JobKey,
        owner: WorkerId,
        epoch: Epoch,
        state: JobState,
    },
    /// A write from a stale epoch was refused.
    WriteFenced {
        job_key: JobKey,
        presented: Epoch,
        command: String,
    },
    DuplicateDetected {
        job_key: JobKey,
        sha256: Digest32,
        /// `content` (blob already stored) or `url` (URL already finalized).
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        of: Option<JobKey>,
    },
    RetryScheduled {
        job_key: JobKey,
        attempt: u32,
        reason: String,
        delay_ms: u64,
        /// Set when the next attempt moves to another of the artifact's
        /// URLs: its index (0 is the plan's `url`, then its mirrors).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url_index: Option<u32>,
    },
    JobFailed {
        job_key: JobKey,
        reason: String,
        error: String,
        attempts: u32,
    },
    /// One lease call of the engine: how many jobs it got and how long the
    /// call took (including waiting for the ledger's writer).
    LeaseCall {
        owner: WorkerId,
        jobs: u64,
        elapsed_ms: u64,
        /// Made in the write that finished the holder's previous job, so
        /// `elapsed_ms` includes that commit.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        successor: bool,
    },
}

impl EventKind {
    /// The `event` tag as it appears in JSON.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::JobPlanned { .. } => "job_planned",
            Self::JobLeased { .. } => "job_leased",
            Self::JobStateChanged { .. } => "job_state_changed",
            Self::LeaseRenewed { .. } => "lease_renewed",
            Self::LeaseReleased { .. } => "lease_released",
            Self::OperationStarted { .. } => "operation_started",
            Self::OperationCompleted { .. } => "operation_completed",
            Self::CrashRecovery { .. } => "crash_recovery_event",
            Self::IdempotencyReplay { .. } => "idempotency_replay",
            Self::KeyConflict { .. } => "key_conflict",
            Self::LeaseExpired { .. } => "lease_expired",
            Self::WriteFenced { .. } => "write_fenced",
            Self::DuplicateDetected { .. } => "duplicate_detected",
            Self::RetryScheduled { .. } => "retry_scheduled",
            Self::JobFailed { .. } => "job_failed",
            Self::LeaseCall { .. } => "lease_call",
        }
    }

    pub fn at(self, timestamp: Timestamp) -> Event {
        Event {
            timestamp,
            kind: self,
        }
    }
}

/// What a replay reused: a job's plan, or one of its committed ops.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayOp {
    Plan,
    Head,
    Stream,
    Finalize,
}

impl ReplayOp {
    pub const ALL: [Self; 4] = [Self::Plan, Self::Head, Self::Stream, Self::Finalize];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Head => "head",
            Self::Stream => "stream",
            Self::Finalize => "finalize",
        }
    }
}

impl From<OpKind> for ReplayOp {
    fn from(k: OpKind) -> Self {
        match k {
            OpKind::Head => Self::Head,
            OpKind::Stream => Self::Stream,
            OpKind::Finalize => Self::Finalize,
        }
    }
}

/// Why work was reused rather than done.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayReason {
    /// A committed op begun again under the same lease: its recorded
    /// result was returned.
    #[default]
    Again,
    /// The same job planned again: nothing was written.
    Replan,
    /// A new holder kept what a previous one did (its HEAD's facts, its
    /// complete body, its published blob).
    Takeover,
    /// The reconciler committed a blob a dead holder had published.
    Repair,
    /// The URL was already finalized by another job: its blob was reused
    /// without a request.
    Url,
}

impl ReplayReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Again => "again",
            Self::Replan => "replan",
            Self::Takeover => "takeover",
            Self::Repair => "repair",
            Self::Url => "url",
        }
    }
}

/// Every event name, for catalogues and docs checks.
pub const EVENT_NAMES: [&str; 16] = [
    "job_planned",
    "job_leased",
    "job_state_changed",
    "lease_renewed",
    "lease_released",
    "operation_started",
    "operation_completed",
    "crash_recovery_event",
    "idempotency_replay",
    "key_conflict",
    "lease_expired",
    "write_fenced",
    "duplicate_detected",
    "retry_scheduled",
    "job_failed",
    "lease_call",
];
