//! idem-core: the job lifecycle of an idempotent downloader as a pure state
//! machine.
//!
//! Plan → lease → HEAD → stream → finalize, with deterministic keys, leases
//! with fencing epochs, an operation ledger that replays committed effects,
//! a retry policy and telemetry events. Nothing here performs I/O, reads a
//! clock or needs an async runtime: time comes in as an argument and effects
//! go out as data. Adapters plug in through the [`ports`].
//!
//! ## Example
//!
//! Plan a job and lease it, with the in-memory reference store and a time
//! of your choosing (`examples/state_machine.rs` carries it to the end):
//!
//! ```
//! use idem_core::{Commit, JobSpec, JobState, LeaseRequest, MemStore, Store, Timestamp, WorkerId};
//!
//! let store = MemStore::new();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let spec = JobSpec::new("W1", "pdf", "https://example.org/w1.pdf", None, None)?;
//! store.plan(&[spec.clone()], 3, now)?;
//! store.plan(&[spec.clone()], 3, now)?; // planning again is a no-op
//! let req = LeaseRequest {
//!     owner: WorkerId::new("worker-1"),
//!     limit: 10,
//!     ttl_ms: 30_000,
//!     dead_owners: Vec::new(),
//!     commit: Commit::Durable,
//!     isolated: false,
//!     per_host: Some(2),
//!     host_interval_ms: None,
//!     host_rules: Default::default(),
//! };
//! let leased = store.lease(&req, now)?.value;
//! assert_eq!(leased.len(), 1);
//! assert_eq!(store.job(&spec.key())?.unwrap().state, JobState::Leased);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Depends on serde, serde_json, sha2, thiserror and url; nothing async.

pub mod codec;
pub mod digest;
pub mod event;
pub mod exec;
pub mod hosts;
pub mod job;
pub mod ledger;
pub mod mem;
pub mod plan;
pub mod ports;
pub mod retry;
pub mod spec;
pub mod time;
pub mod tx;

pub use digest::Digest32;
pub use event::{Event, EventKind, ReplayOp, ReplayReason, EVENT_NAMES};
pub use exec::{Write, Written};
pub use hosts::HostLoad;
pub use job::{
    failure_reason, transition, BlobInfo, Command, Epoch, ErrorClass, HeadInfo, Job, JobError,
    JobState, Lease, Transition, TransitionError, WorkerId, POISON_AFTER_ISOLATED_DEATHS,
    SUSPECT_AFTER_DEATHS,
};
pub use ledger::{OpDecision, OpKey, OpKind, OpRecord, OpResult, OpStatus, StreamInfo};
pub use mem::MemStore;
pub use plan::{KeyConflict, PlanCounts, PlanOutcome};
pub use ports::{
    Applied, Body, Commit, FetchError, FetchErrorKind, GetResponse, Http, LeaseRequest, Resume,
    StatusCounts, Step, StepOutput, Store, StoreError,
};
pub use retry::{RetryPolicy, SplitMix64};
pub use spec::{
    fingerprint_of, job_key_of, redact_text, redact_url, CanonicalUrl, Fingerprint, JobKey,
    JobSpec, SpecError,
};
pub use time::{Clock, ManualClock, Timestamp};
pub use tx::{Counter, Tx};

#[cfg(test)]
mod tests;
