//! The ports: the store and HTTP traits that adapters implement.
//!
//! Both are narrow and speak only core types; adapter errors are mapped into
//! [`StoreError`] and [`FetchError`] inside each adapter, so no `rusqlite`,
//! `tokio_postgres` or `reqwest` type crosses this boundary.
//!
//! The store is synchronous on purpose: SQLite is a blocking library, and the
//! engine calls the store from blocking threads. Every store call takes the
//! one `now` its caller read, and runs the core's pure decisions inside a
//! single transaction.

use crate::event::Event;
use crate::exec::{Write, Written};
use crate::job::{Command, HeadInfo, Job, JobError, JobState, TransitionError, WorkerId};
use crate::ledger::{OpDecision, OpKey, OpRecord, OpResult};
use crate::plan::PlanOutcome;
use crate::spec::{JobKey, JobSpec};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;

/// A store call's value plus the events its transitions produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<T> {
    pub value: T,
    pub events: Vec<Event>,
}

/// Why a store call failed. The ledger is unchanged by a failed call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The command was refused by the state machine (includes fencing).
    #[error("job {job}: {error}")]
    Refused { job: JobKey, error: TransitionError },
    #[error("no job with key {0}")]
    NotFound(JobKey),
    /// `finish_op` on an op that is not `started` (never begun, or already
    /// finished): an op is committed at most once.
    #[error("op {0} is not started; it was never begun or is already finished")]
    OpNotStarted(String),
    /// The file or database is not an idem ledger.
    #[error("{0}")]
    NotALedger(String),
    /// Written by a newer idem; refusing to touch it.
    #[error("ledger schema version {found} is newer than this idem supports ({supported}); upgrade idem")]
    TooNew { found: i64, supported: i64 },
    /// Contention outlasted the busy timeout; safe to retry.
    #[error("store busy: {0}")]
    Busy(String),
    /// The write lost a race with another writer (a row changed since it
    /// was read, a serialization failure, a deadlock) and was not applied;
    /// running it again decides again on the rows as they are then.
    #[error("write conflict: {0}")]
    Conflict(String),
    #[error("store is read-only: {0}")]
    ReadOnly(String),
    #[error("disk full: {0}")]
    DiskFull(String),
    #[error("ledger is corrupt: {0}")]
    Corrupt(String),
    /// Anything else the backend reported, as text.
    #[error("store error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Would the same call succeed later without anyone intervening?
    pub const fn is_transient(&self) -> bool {
        matches!(self, Self::Busy(_) | Self::Conflict(_))
    }

    /// Was this a stale-epoch write?
    pub const fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                error: TransitionError::Fenced { .. },
                ..
            }
        )
    }
}

/// Counts an operator reads with `idem status`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusCounts {
    pub total: u64,
    pub by_state: BTreeMap<JobState, u64>,
    pub live_leases: u64,
    pub expired_leases: u64,
    /// Non-terminal, due now and not held (suspects aside).
    pub due_now: u64,
    /// Unfinished jobs whose holders died too often while running them with
    /// others ([`crate::Job::is_suspect`]): each waits for a worker that
    /// runs it alone.
    #[serde(default)]
    pub suspects: u64,
    /// Age of the oldest due job (ms), if any is due.
    pub oldest_due_age_ms: Option<u64>,
    /// Failed jobs grouped by the reason code of their last error.
    pub failures_by_reason: BTreeMap<String, u64>,
    /// Stale-epoch writes refused so far.
    pub fenced_writes: u64,
    /// Op starts: every op begun to run (one begun and finished in one
    /// write included), and every start again of an op under the same key
    /// (a failed or abandoned op run again); replays are not starts.
    pub ops_started: u64,
    /// Work reused instead of done again (re-plans aside).
    pub replays: u64,
    /// Ops started under an epoch that is not their job's live lease: what
    /// the reconciler would mark abandoned ([`crate::ledger::is_dead`]).
    pub dead_ops: u64,
    /// What the operator paused: [`crate::hosts::ALL_HOSTS`] for every
    /// host, else host names, sorted.
    #[serde(default)]
    pub paused: Vec<String>,
}

impl StatusCounts {
    /// Jobs in a terminal state.
    pub fn terminal(&self) -> u64 {
        self.by_state
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum()
    }

    /// Jobs not yet terminal.
    pub fn unfinished(&self) -> u64 {
        self.total.saturating_sub(self.terminal())
    }
}

/// When a write must be on stable storage.
///
/// A job's intermediate records (its lease, an op's start, a result that
/// leads to the next step) are only ever acted on by the worker that wrote
/// them, and every effect they guard can be redone: a HEAD, a part file the
/// reconciler removes or the next holder re-verifies (its sidecar names the
/// boot it was written in), a published blob the reconciler heals. Those
/// writes may be [`Commit::Deferred`]. What is acknowledged beyond the
/// worker (a plan, a finished, failed or rescheduled job, a released lease,
/// a repair) is [`Commit::Durable`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Commit {
    /// On stable storage before the call returns.
    #[default]
    Durable,
    /// Visible to every reader at once, and on stable storage no later
    /// than the next durable commit by anyone. A crash of the process never
    /// loses it; power loss (or an OS crash) before that durable commit
    /// does, together with everything written after it, so the ledger is
    /// always a prefix of its history.
    Deferred,
}

/// How to lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    pub owner: WorkerId,
    pub limit: usize,
    pub ttl_ms: u64,
    /// Holders known to be dead (their process is gone): their leases may be
    /// taken over before they expire.
    pub dead_owners: Vec<WorkerId>,
    /// A lease is an intermediate record: the engine defers it.
    pub commit: Commit,
    /// Lease suspects only ([`crate::Job::is_suspect`]), for a worker that
    /// runs each alone; otherwise suspects are left out.
    pub isolated: bool,
    /// At most this many live leases per host, counting every holder's
    /// (see [`crate::hosts`]); `None`: no host budget.
    pub per_host: Option<usize>,
    /// At least this long between two leases of one host's jobs, whoever
    /// takes them; `None`: no pacing.
    pub host_interval_ms: Option<u64>,
    /// Per-host overrides of the two above.
    pub host_rules: std::sync::Arc<crate::hosts::HostRules>,
}

/// One step of an atomic [`Store::run_steps`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Apply {
        key: JobKey,
        cmd: Command,
    },
    BeginOp {
        op: OpKey,
        owner: WorkerId,
    },
    FinishOp {
        op: OpKey,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
    },
    /// Leases as [`Store::lease`] does. A worker finishing one job takes
    /// its next in the same write, after the steps before it; a durable
    /// lease request makes the whole write durable.
    Lease(LeaseRequest),
    /// `host` asked to be left alone until `until` (a 429 or 503 with
    /// `Retry-After`, see [`crate::hosts::cooldown_after`]): no lease takes
    /// its jobs before then, whoever asks. A later `until` wins.
    HostCooldown {
        host: String,
        until: Timestamp,
    },
    /// The live holder of `op`'s lease reused work done before it (of
    /// `op.kind`) instead of doing it: an `idempotency_replay` event,
    /// counted with the ledger's replays. Fenced like an op.
    Reused {
        op: OpKey,
        reason: crate::event::ReplayReason,
    },
}

/// What a step returned: the job after it, an op decision, or the jobs a
/// lease step took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutput {
    Job(Box<Job>),
    Decision(OpDecision),
    Leased(Vec<Job>),
}

/// How many times a write that lost a race ([`StoreError::Conflict`]) is
/// run again before the conflict is returned.
pub const CONFLICT_RETRIES: u32 = 8;

/// The store port.
///
/// A store implements [`Store::transact`] by running
/// [`crate::exec::run`] in one transaction of its own (with the isolation
/// [`crate::tx`] states), plus the reads; every write method is provided
/// here, on top of `transact`, so the ledger's decisions exist once.
pub trait Store: Send + Sync {
    /// Runs `write` in one transaction: calls [`crate::exec::run`] with
    /// the store's [`crate::tx::Tx`], commits as `commit` says, and on an
    /// error rolls back and counts the refusal
    /// ([`crate::exec::count_refusal`]). The ledger is unchanged by a
    /// failed call.
    fn transact(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, StoreError>;

    /// [`Store::transact`], run again while it loses races, up to
    /// [`CONFLICT_RETRIES`] times.
    fn write(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, StoreError> {
        let mut tries = 0;
        loop {
            match self.transact(write, now, commit) {
                Err(StoreError::Conflict(_)) if tries < CONFLICT_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    /// Runs several steps (as `apply`, `begin_op`, `finish_op` would) in
    /// one transaction: all of them, in order, or none. The engine uses it
    /// to commit an op's result, the next transition and the next op's start
    /// with one write, durable or deferred as `commit` says (durable if a
    /// lease step among them asks for it).
    fn run_steps(
        &self,
        steps: Vec<Step>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Vec<StepOutput>>, StoreError> {
        let durable = steps
            .iter()
            .any(|s| matches!(s, Step::Lease(r) if r.commit == Commit::Durable));
        let commit = if durable { Commit::Durable } else { commit };
        let a = self.write(Write::Steps(&steps), now, commit)?;
        match a.value {
            Written::Steps(out) => Ok(Applied {
                value: out,
                events: a.events,
            }),
            _ => Err(wrong_reply()),
        }
    }

    /// Pauses (`paused`) or resumes leasing on `host`, or on every host
    /// with [`crate::hosts::ALL_HOSTS`]: no lease takes a paused host's
    /// jobs; jobs already held carry on.
    fn pause(&self, host: &str, paused: bool, now: Timestamp) -> Result<(), StoreError> {
        match self
            .write(Write::Pause { host, paused }, now, Commit::Durable)?
            .value
        {
            Written::Paused => Ok(()),
            _ => Err(wrong_reply()),
        }
    }

    /// Deletes the op rows of every job that finished (finalized, skipped
    /// as a duplicate, or failed) more than `older_than_ms` before `now`,
    /// a batch of jobs per transaction, keeping each job's row and result
    /// and the counts `status` reports. Unfinished jobs are never touched.
    /// Returns the op rows deleted.
    fn prune(&self, older_than_ms: u64, now: Timestamp) -> Result<u64, StoreError> {
        const JOBS_PER_WRITE: usize = 2_000;
        let (mut deleted, mut after) = (0, 0);
        loop {
            let write = Write::Prune {
                older_than_ms,
                after,
                limit: JOBS_PER_WRITE,
            };
            match self.write(write, now, Commit::Durable)?.value {
                Written::Pruned { ops, next } => {
                    deleted += ops;
                    match next {
                        Some(n) => after = n,
                        None => return Ok(deleted),
                    }
                }
                _ => return Err(wrong_reply()),
            }
        }
    }

    /// Plans a batch in one transaction. `max_attempts` is stored on new jobs.
    fn plan(
        &self,
        specs: &[JobSpec],
        max_attempts: u32,
        now: Timestamp,
    ) -> Result<Applied<Vec<PlanOutcome>>, StoreError> {
        let write = Write::Plan {
            specs,
            max_attempts,
        };
        let a = self.write(write, now, Commit::Durable)?;
        match a.value {
            Written::Plan(out) => Ok(Applied {
                value: out,
                events: a.events,
            }),
            _ => Err(wrong_reply()),
        }
    }

    /// Leases up to `limit` acquirable jobs (planned and due, or an expired
    /// lease in any non-terminal state), in (host rank, due time) order and
    /// within the host budget ([`crate::hosts`]), in one transaction,
    /// committed as `req.commit` says.
    fn lease(&self, req: &LeaseRequest, now: Timestamp) -> Result<Applied<Vec<Job>>, StoreError> {
        let mut a = self.run_steps(vec![Step::Lease(req.clone())], now, req.commit)?;
        match a.value.pop() {
            Some(StepOutput::Leased(jobs)) => Ok(Applied {
                value: jobs,
                events: a.events,
            }),
            _ => Err(wrong_reply()),
        }
    }

    /// Applies one command through the core transition function, atomically.
    fn apply(
        &self,
        key: &JobKey,
        cmd: Command,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let a = self.run_steps(vec![Step::Apply { key: *key, cmd }], now, Commit::Durable)?;
        one_job(a)
    }

    /// Claims an op for the live lease holder: `Run` (row now `started`) or
    /// `Replay` with the recorded result. Fenced when the epoch is not live.
    fn begin_op(
        &self,
        op: &OpKey,
        owner: &WorkerId,
        now: Timestamp,
    ) -> Result<Applied<OpDecision>, StoreError> {
        let step = Step::BeginOp {
            op: *op,
            owner: owner.clone(),
        };
        let mut a = self.run_steps(vec![step], now, Commit::Durable)?;
        match a.value.pop() {
            Some(StepOutput::Decision(d)) => Ok(Applied {
                value: d,
                events: a.events,
            }),
            _ => Err(wrong_reply()),
        }
    }

    /// Records the op's outcome and, in the same transaction, applies
    /// `then` (the transition the outcome implies). Fenced like `begin_op`.
    fn finish_op(
        &self,
        op: &OpKey,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
        now: Timestamp,
    ) -> Result<Applied<Job>, StoreError> {
        let step = Step::FinishOp {
            op: *op,
            outcome,
            then,
        };
        let a = self.run_steps(vec![step], now, Commit::Durable)?;
        one_job(a)
    }

    /// Marks `started` ops whose epoch is no longer live as `abandoned`.
    fn abandon_dead_ops(&self, now: Timestamp) -> Result<Applied<u64>, StoreError> {
        let a = self.write(Write::AbandonDeadOps, now, Commit::Durable)?;
        match a.value {
            Written::Abandoned(n) => Ok(Applied {
                value: n,
                events: a.events,
            }),
            _ => Err(wrong_reply()),
        }
    }

    /// Copies jobs as they are, with their ops, in one transaction (see
    /// [`Write::Import`]); returns (copied, already held).
    fn import(
        &self,
        jobs: &[(Job, Vec<OpRecord>)],
        now: Timestamp,
    ) -> Result<(u64, u64), StoreError> {
        let a = self.write(Write::Import(jobs), now, Commit::Durable)?;
        match a.value {
            Written::Imported { copied, existing } => Ok((copied, existing)),
            _ => Err(wrong_reply()),
        }
    }

    fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError>;

    /// A job's operation ledger, in the order ops were started.
    fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError>;

    /// Jobs after `after`, optionally of one state: for export, reconcile
    /// and audits, in pages. All jobs come in key order; one state's in an
    /// order of the store's in which a job keeps its place (so paging by
    /// the last key seen visits each once), which a store may choose so a
    /// page costs its own rows.
    fn scan(
        &self,
        state: Option<JobState>,
        after: Option<&JobKey>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;

    /// A finalized job with this canonical URL, if any (URL-level dedupe).
    fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs whose lease has expired, for the reconciler.
    fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError>;

    /// Distinct owners of live leases: the engine checks which of them are
    /// dead processes on this host, to take their jobs over early.
    fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError>;

    /// Counts for `idem status`, each as [`StatusCounts`] defines it.
    fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError>;

    /// The `limit` hosts with the most jobs in flight (then due, then
    /// unfinished). It reads every unfinished job: for `idem status`, not
    /// for a loop.
    fn busiest_hosts(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::HostLoad>, StoreError>;

    /// Calls `f` with every job whose `finished_at` is at or after `since`,
    /// in no set order: what `idem slo check` reads. A store may find them
    /// through an index on the finish time; this default pages through
    /// every job.
    fn each_finished_since(
        &self,
        since: Timestamp,
        f: &mut dyn FnMut(&Job),
    ) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let page = self.scan(None, after.as_ref(), 2_000)?;
            let Some(last) = page.last().map(|j| j.key) else {
                return Ok(());
            };
            for j in page
                .iter()
                .filter(|j| j.finished_at.is_some_and(|t| t >= since))
            {
                f(j);
            }
            after = Some(last);
        }
    }
}

fn wrong_reply() -> StoreError {
    StoreError::Backend("the store answered a write with another kind of reply".into())
}

fn one_job(mut a: Applied<Vec<StepOutput>>) -> Result<Applied<Job>, StoreError> {
    match a.value.pop() {
        Some(StepOutput::Job(j)) => Ok(Applied {
            value: *j,
            events: a.events,
        }),
        _ => Err(wrong_reply()),
    }
}

/// Why a fetch failed, classified for the retry policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct FetchError {
    pub kind: FetchErrorKind,
    pub detail: String,
    pub retry_after_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchErrorKind {
    Connect,
    Timeout,
    Reset,
    /// The body ended before its declared length.
    Truncated,
    Status(u16),
    TooManyRedirects,
    /// Refused by policy: scheme, private address, https→http.
    Policy,
    /// Over the size cap.
    TooLarge,
    Other,
}

/// `s`, with the secrets of the URLs in it hidden.
pub(crate) fn redacted(s: String) -> String {
    match crate::redact_text(&s) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(r) => r,
    }
}

impl FetchError {
    /// `detail` is stored with the secrets of any URL in it redacted
    /// ([`crate::redact_text`]): it ends up in logs and in the ledger's
    /// `last_error`.
    pub fn new(kind: FetchErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: redacted(detail.into()),
            retry_after_ms: None,
        }
    }

    /// The job error this fetch error means.
    pub fn to_job_error(&self) -> JobError {
        use crate::job::ErrorClass::{Permanent, Retryable};
        let (class, reason) = match self.kind {
            FetchErrorKind::Connect => (Retryable, "connect".to_owned()),
            FetchErrorKind::Timeout => (Retryable, "timeout".to_owned()),
            FetchErrorKind::Reset => (Retryable, "reset".to_owned()),
            FetchErrorKind::Truncated => (Retryable, "truncated".to_owned()),
            FetchErrorKind::Status(s) => (crate::retry::classify_status(s), format!("http_{s}")),
            FetchErrorKind::TooManyRedirects => (Permanent, "redirects".to_owned()),
            FetchErrorKind::Policy => (Permanent, "policy".to_owned()),
            FetchErrorKind::TooLarge => (Permanent, "too_large".to_owned()),
            FetchErrorKind::Other => (Retryable, "other".to_owned()),
        };
        JobError {
            class,
            reason,
            detail: self.detail.clone(),
            retry_after_ms: self.retry_after_ms,
        }
    }
}

/// Resume an interrupted body from `offset`, only if the entity is still the
/// one identified by `if_range` (a strong ETag or a Last-Modified date).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub offset: u64,
    pub if_range: Option<String>,
}

/// The start of a GET: headers, and where the body begins.
#[derive(Debug)]
pub struct GetResponse<B> {
    pub head: HeadInfo,
    /// 0 for a full body; the resume offset when the server answered 206.
    pub offset: u64,
    pub body: B,
}

/// A response body read chunk by chunk.
pub trait Body: Send {
    type Chunk: AsRef<[u8]> + Send + 'static;
    /// The next chunk, `None` at the end. Errors are retryable per kind.
    fn next_chunk(
        &mut self,
    ) -> impl Future<Output = Result<Option<Self::Chunk>, FetchError>> + Send;
}

/// The HTTP port. Policy (schemes, redirects, addresses, size caps) is the
/// adapter's job; it reports refusals as `FetchErrorKind::Policy`.
///
/// Every request carries the job's `headers` (name, value) to the origin
/// (scheme, host and port) of `url` only: a redirect to another origin is
/// followed without them.
pub trait Http: Send + Sync + 'static {
    type Body: Body + 'static;

    /// HEAD, falling back to a GET's headers when the server refuses HEAD.
    fn head(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> impl Future<Output = Result<HeadInfo, FetchError>> + Send;

    /// GET, optionally resuming. A 200 answer to a range request comes back
    /// with `offset == 0`: the caller must restart from scratch.
    fn get(
        &self,
        url: &str,
        headers: &[(String, String)],
        resume: Option<&Resume>,
    ) -> impl Future<Output = Result<GetResponse<Self::Body>, FetchError>> + Send;

    /// A conditional GET with the validators `recorded` holds
    /// (`If-None-Match` from its ETag, `If-Modified-Since` from its
    /// Last-Modified date): `None` when the server answers 304 Not Modified,
    /// else the full response, as [`Http::get`] gives it.
    fn revalidate(
        &self,
        url: &str,
        headers: &[(String, String)],
        recorded: &HeadInfo,
    ) -> impl Future<Output = Result<Option<GetResponse<Self::Body>>, FetchError>> + Send;
}
