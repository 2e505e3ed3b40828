//! The job record and its one transition function.
//!
//! ```text
//!            acquire              head ok             stream start
//!  planned ──────────▶ leased ─────────▶ head_done ─────────────▶ streaming
//!     ▲                  │ │                 │                      │   │
//!     │ retry scheduled  │ │ url known       │                      │   │ blob exists
//!     └──────────────────┤ └────────────┐    │                      │   ▼
//!     (any live state)   │              ▼    ▼                      │ skipped_duplicate
//!                        │        skipped_duplicate                 │
//!                        ▼                                          ▼
//!                      failed ◀──── permanent error / attempts ── finalized
//!                        │
//!                        └── operator retry ──▶ planned (new attempt)
//! ```
//!
//! Every command that a lease holder issues carries its epoch (fencing token);
//! a command whose epoch is not the current lease's is refused, so a worker
//! whose lease was taken over can change nothing. Terminal jobs never move,
//! except an explicit operator retry of a `failed` job.

use crate::digest::Digest32;
use crate::spec::{Fingerprint, JobKey, JobSpec};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a job is in its life. The last three are terminal.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Planned,
    Leased,
    HeadDone,
    Streaming,
    Finalized,
    SkippedDuplicate,
    Failed,
}

impl JobState {
    pub const ALL: [Self; 7] = [
        Self::Planned,
        Self::Leased,
        Self::HeadDone,
        Self::Streaming,
        Self::Finalized,
        Self::SkippedDuplicate,
        Self::Failed,
    ];

    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Finalized | Self::SkippedDuplicate | Self::Failed
        )
    }

    /// Terminal and counted as success by the SLOs (a duplicate is content
    /// we already hold, not a failure).
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Finalized | Self::SkippedDuplicate)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Leased => "leased",
            Self::HeadDone => "head_done",
            Self::Streaming => "streaming",
            Self::Finalized => "finalized",
            Self::SkippedDuplicate => "skipped_duplicate",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fencing token: +1 on every acquire of a job's lease.
#[derive(
    Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// Who holds a lease: unique per worker incarnation (the engine makes it from
/// host, pid, process start time and a slot number), so a restarted process
/// never inherits its predecessor's leases.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl WorkerId {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lease as a value.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub owner: WorkerId,
    pub epoch: Epoch,
    pub expires_at: Timestamp,
    /// The holder runs this job alone, in a child process it watches: a
    /// death of that child is the job's doing ([`Command::ChildDied`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
}

/// Holder deaths (leases taken over or freed after their holder died or
/// stalled) after which a job is a suspect: it is leased only to a worker
/// that runs it alone, in a child process it watches.
pub const SUSPECT_AFTER_DEATHS: u32 = 2;

/// Deaths of a child process that ran the job alone, seen by its living
/// parent, after which the job is taken to kill its workers: it fails with
/// the reason `poison`.
pub const POISON_AFTER_ISOLATED_DEATHS: u32 = 3;

impl Lease {
    pub fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at
    }
}

/// What a HEAD (or the headers of a fallback GET) told us.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct HeadInfo {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default)]
    pub accept_ranges: bool,
    /// The SHA-256 of the whole representation, when the server declared
    /// it (`Repr-Digest`, `Content-Digest` on a full answer, or `Digest`):
    /// a body that hashes otherwise is corrupt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest32>,
}

/// A published blob: its digest, size, and path relative to the output root.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BlobInfo {
    pub sha256: Digest32,
    pub size: u64,
    pub path: String,
}

impl BlobInfo {
    /// The content-addressed path of a digest, relative to the output root:
    /// `blobs/sha256/<aa>/<bb>/<hex>`.
    pub fn path_for(sha256: &Digest32) -> String {
        let hex = sha256.to_hex();
        format!("blobs/sha256/{}/{}/{}", &hex[..2], &hex[2..4], hex)
    }

    pub fn new(sha256: Digest32, size: u64) -> Self {
        Self {
            path: Self::path_for(&sha256),
            sha256,
            size,
        }
    }
}

/// One job as the ledger holds it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Job {
    pub key: JobKey,
    pub fingerprint: Fingerprint,
    pub spec: JobSpec,
    pub state: JobState,
    /// The current holder, if any. Never set on a terminal job.
    pub lease: Option<Lease>,
    /// The last epoch ever issued for this job (0: never leased).
    pub epoch: Epoch,
    /// Attempts of the current series that counted: begun and not ended by
    /// their holder's death or a graceful stop.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Not leased before this instant (backoff).
    pub next_attempt_at: Timestamp,
    pub last_error: Option<String>,
    pub head: Option<HeadInfo>,
    pub blob: Option<BlobInfo>,
    /// For `skipped_duplicate` by URL: the job whose blob this one reuses.
    pub duplicate_of: Option<JobKey>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub first_leased_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// Holders that died (or stalled past their lease) while they held this
    /// job: not attributable to the job (a crash, a kill, a deploy), never
    /// a failure.
    #[serde(default)]
    pub holder_deaths: u32,
    /// Child processes that died while they ran this job alone, as their
    /// living parent saw: attributable to the job.
    #[serde(default)]
    pub isolated_deaths: u32,
    /// Its ordinal among its host's jobs, given when it is planned: leases
    /// go by (rank, due time), interleaving hosts (see `hosts`).
    #[serde(default)]
    pub host_rank: u64,
    /// Which of the artifact's URLs ([`JobSpec::urls`]) the job fetches:
    /// 0 is the plan's `url`; a failure that another URL may not have moves
    /// it on (see [`Command::Fail`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub url_index: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Job {
    /// A freshly planned job.
    pub fn planned(spec: JobSpec, max_attempts: u32, now: Timestamp) -> Self {
        Self {
            key: spec.key(),
            fingerprint: spec.fingerprint(),
            spec,
            state: JobState::Planned,
            lease: None,
            epoch: Epoch(0),
            attempts: 0,
            max_attempts: max_attempts.max(1),
            next_attempt_at: now,
            last_error: None,
            head: None,
            blob: None,
            duplicate_of: None,
            created_at: now,
            updated_at: now,
            first_leased_at: None,
            finished_at: None,
            holder_deaths: 0,
            isolated_deaths: 0,
            host_rank: 0,
            url_index: 0,
        }
    }

    /// The URL the job fetches now: its `url_index`-th (the first if the
    /// index is past the list).
    pub fn url(&self) -> &crate::spec::CanonicalUrl {
        self.spec
            .urls()
            .nth(self.url_index as usize)
            .unwrap_or(&self.spec.url)
    }

    /// Is there another URL after the one the job fetches now?
    pub fn has_next_url(&self) -> bool {
        (self.url_index as usize) < self.spec.mirrors.len()
    }

    /// Has this job been held by enough workers that died to be leased only
    /// to one that runs it alone?
    pub fn is_suspect(&self) -> bool {
        self.holder_deaths >= SUSPECT_AFTER_DEATHS
    }

    /// Counts the death of a holder nobody saw die (its lease taken over
    /// or freed without its finishing): the attempt it was making does not
    /// count, and neither does the death against the job.
    fn count_death(&mut self) {
        self.attempts = self.attempts.saturating_sub(1);
        self.holder_deaths += 1;
    }

    /// When the job may next be leased: the later of its backoff and its
    /// lease's expiry; `None` once terminal. Leases take jobs in this order
    /// within a host rank.
    pub fn due_at(&self) -> Option<Timestamp> {
        if self.state.is_terminal() {
            return None;
        }
        Some(self.lease.as_ref().map_or(self.next_attempt_at, |l| {
            l.expires_at.max(self.next_attempt_at)
        }))
    }

    /// May a worker acquire this job at `now`? Non-terminal, due, and no live
    /// lease. (A suspect is acquired only by an isolated lease.)
    pub fn is_acquirable(&self, now: Timestamp) -> bool {
        !self.state.is_terminal()
            && self.next_attempt_at <= now
            && self.lease.as_ref().is_none_or(|l| !l.is_live(now))
    }
}

/// Why a job failed or is being retried, classified for the retry policy.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct JobError {
    pub class: ErrorClass,
    /// A short stable code for grouping (`http_503`, `timeout`, `digest_mismatch`).
    pub reason: String,
    /// Human detail: the URL, the status, what was expected.
    pub detail: String,
    /// A server's `Retry-After`, in milliseconds, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl JobError {
    /// Like [`JobError::permanent`], a `detail` quoting a URL keeps it
    /// without its secrets ([`crate::redact_text`]).
    pub fn retryable(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            reason: reason.into(),
            detail: crate::ports::redacted(detail.into()),
            retry_after_ms: None,
        }
    }

    pub fn permanent(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            reason: reason.into(),
            detail: crate::ports::redacted(detail.into()),
            retry_after_ms: None,
        }
    }

    /// `reason: detail`, the form stored as `last_error`.
    pub fn summary(&self) -> String {
        if self.detail.is_empty() {
            self.reason.clone()
        } else {
            format!("{}: {}", self.reason, self.detail)
        }
    }
}

#[derive(Copy, Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth another attempt after a backoff.
    Retryable,
    /// Will not get better by trying again.
    Permanent,
}

mod transition;
pub use transition::{transition, Command, Transition, TransitionError};

/// The reason code of a stored `last_error` (`reason: detail`).
pub fn failure_reason(last_error: Option<&str>) -> String {
    last_error
        .and_then(|e| e.split(':').next())
        .map_or_else(|| "unknown".to_owned(), |r| r.trim().to_owned())
}
