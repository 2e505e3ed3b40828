//! The commands a job accepts, why one is refused, and the one
//! transition function that applies them (the diagram is in the parent
//! module's docs).

use super::{
    BlobInfo, Epoch, ErrorClass, HeadInfo, Job, JobError, JobState, Lease, WorkerId,
    POISON_AFTER_ISOLATED_DEATHS,
};
use crate::event::{EventKind, ReplayOp, ReplayReason};
use crate::spec::JobKey;
use crate::time::Timestamp;

/// Everything that can happen to a job. Commands from a lease holder carry
/// its epoch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    /// Take the lease: the job is free, or its lease has expired.
    /// `isolated`: the new holder runs this job alone in its process. A
    /// suspect ([`Job::is_suspect`]) is refused to a holder that does not,
    /// and left free for one that does.
    Acquire {
        owner: WorkerId,
        ttl_ms: u64,
        isolated: bool,
    },
    /// Extend a held lease.
    Renew {
        owner: WorkerId,
        epoch: Epoch,
        ttl_ms: u64,
    },
    /// Give the lease back without finishing (graceful stop).
    Release { owner: WorkerId, epoch: Epoch },
    /// Clear a lease that has expired (reconciler). Refused while it is live.
    Expire,
    /// Clear the lease `epoch` of `owner`, a holder known dead (a process
    /// of this host that is gone), live or not (reconciler). Refused if the
    /// job's lease is another.
    ExpireDead { owner: WorkerId, epoch: Epoch },
    /// HEAD (or its GET fallback) succeeded.
    HeadDone { epoch: Epoch, head: HeadInfo },
    /// The body stream is starting (a `.part` may now exist).
    StreamStarted { epoch: Epoch },
    /// The blob is published and durable.
    Finalize { epoch: Epoch, blob: BlobInfo },
    /// The content is already held: by digest (blob existed) or by URL
    /// (another job finalized the same canonical URL).
    Duplicate {
        epoch: Epoch,
        blob: BlobInfo,
        of: Option<JobKey>,
    },
    /// The attempt failed. `retry_at` is the retry policy's decision: `Some`
    /// schedules another attempt, `None` fails the job for good.
    Fail {
        epoch: Epoch,
        error: JobError,
        retry_at: Option<Timestamp>,
    },
    /// Operator asked to try a failed job again: a new attempt series.
    OperatorRetry,
    /// Reconciler found this job's blob published but its commit lost. Only
    /// applies when no live lease holds the job.
    Heal { blob: BlobInfo },
    /// The child process that ran this job alone under the lease `epoch` of
    /// `owner` (its parent) died, and the parent saw it (`detail`: how). The
    /// lease is freed and the death counted against the job; at
    /// [`POISON_AFTER_ISOLATED_DEATHS`] the job fails as `poison`.
    ChildDied {
        owner: WorkerId,
        epoch: Epoch,
        detail: String,
    },
    /// Reconciler found a finalized job whose blob is missing: fetch again.
    /// `seen` is the job's epoch when it was found so: a job that moved on
    /// since (another reconciler requeued it, a worker fetched it again) is
    /// refused, so a repair is never made twice.
    Requeue { reason: String, seen: Epoch },
    /// The operator ends a job that is not finished: it fails with the
    /// reason `cancelled`, whoever holds it (a holder's next write is
    /// fenced, so it publishes nothing).
    Cancel,
}

impl Command {
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Acquire { .. } => "acquire",
            Self::Renew { .. } => "renew",
            Self::Release { .. } => "release",
            Self::Expire => "expire",
            Self::ExpireDead { .. } => "expire_dead",
            Self::ChildDied { .. } => "child_died",
            Self::HeadDone { .. } => "head_done",
            Self::StreamStarted { .. } => "stream_started",
            Self::Finalize { .. } => "finalize",
            Self::Duplicate { .. } => "duplicate",
            Self::Fail { .. } => "fail",
            Self::OperatorRetry => "operator_retry",
            Self::Heal { .. } => "heal",
            Self::Requeue { .. } => "requeue",
            Self::Cancel => "cancel",
        }
    }

    /// The epoch a lease holder's command is fenced on.
    pub const fn epoch(&self) -> Option<Epoch> {
        match self {
            Self::Renew { epoch, .. }
            | Self::Release { epoch, .. }
            | Self::HeadDone { epoch, .. }
            | Self::StreamStarted { epoch }
            | Self::Finalize { epoch, .. }
            | Self::Duplicate { epoch, .. }
            | Self::Fail { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }
}

/// Why a command was refused. Refusals never panic and never change the job.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    #[error("job is {state} (terminal); `{command}` cannot move it")]
    Terminal {
        state: JobState,
        command: &'static str,
    },
    #[error("fenced: command carries epoch {presented} but the job's lease is {current}")]
    Fenced {
        presented: Epoch,
        /// The current lease's epoch, or `e0`-style "none" when free.
        current: String,
    },
    #[error("lease is held by {holder} until {until}")]
    LeaseHeld { holder: WorkerId, until: Timestamp },
    #[error("job not due until {0}")]
    NotDue(Timestamp),
    #[error("illegal move: `{command}` from state {from}")]
    Illegal {
        from: JobState,
        command: &'static str,
    },
    /// A repair decided on the job as it was (`seen`) finds it changed.
    #[error("the job changed since it was read: it was {seen}, it is {current}")]
    Stale { seen: String, current: String },
}

/// The result of a legal command: the job after it, and what to emit.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transition {
    pub job: Job,
    pub events: Vec<EventKind>,
}

/// The one transition function. Pure: `job` and `now` in, a new job and the
/// events it produced out.
pub fn transition(job: &Job, cmd: Command, now: Timestamp) -> Result<Transition, TransitionError> {
    let name = cmd.name();
    // The fence comes first: a stale holder writing to a job that has
    // since finished is a stale-epoch write, and is counted as one.
    if let Some(presented) = cmd.epoch() {
        let current = job.lease.as_ref().map(|l| l.epoch);
        if current != Some(presented) {
            return Err(TransitionError::Fenced {
                presented,
                current: current.map_or_else(|| "none".to_owned(), |e| e.to_string()),
            });
        }
    }
    if job.state.is_terminal() {
        let operator_ok = matches!(cmd, Command::OperatorRetry) && job.state == JobState::Failed;
        let requeue_ok = matches!(cmd, Command::Requeue { .. }) && job.state.is_success();
        if !operator_ok && !requeue_ok {
            return Err(TransitionError::Terminal {
                state: job.state,
                command: name,
            });
        }
    }
    let key = job.key;
    let mut next = job.clone();
    next.updated_at = now;
    let mut events = Vec::new();
    let from = job.state;

    match cmd {
        Command::Acquire {
            owner,
            ttl_ms,
            isolated,
        } => {
            if let Some(l) = job.lease.as_ref().filter(|l| l.is_live(now)) {
                return Err(TransitionError::LeaseHeld {
                    holder: l.owner.clone(),
                    until: l.expires_at,
                });
            }
            if job.next_attempt_at > now {
                return Err(TransitionError::NotDue(job.next_attempt_at));
            }
            let takeover = job.lease.is_some()
                || matches!(job.state, JobState::HeadDone | JobState::Streaming);
            // A lease still in place means its holder never finished: it
            // died (or stalled past its TTL). That spends no attempt; it is
            // counted as a death, attributable only if it ran the job alone.
            if let Some(old) = &job.lease {
                events.push(EventKind::LeaseExpired {
                    job_key: key,
                    owner: old.owner.clone(),
                    epoch: old.epoch,
                    state: job.state,
                });
                next.count_death();
                next.lease = None;
            }
            if next.isolated_deaths >= POISON_AFTER_ISOLATED_DEATHS {
                let error = format!(
                    "poison: the worker running this job alone died {} times",
                    next.isolated_deaths
                );
                next.state = JobState::Failed;
                next.last_error = Some(error.clone());
                next.finished_at = Some(now);
                events.push(state_changed(key, from, JobState::Failed, "poison"));
                events.push(EventKind::JobFailed {
                    job_key: key,
                    reason: "poison".into(),
                    error,
                    attempts: next.attempts,
                });
                stamp_age(&mut events, job, now);
                return Ok(Transition { job: next, events });
            }
            if next.is_suspect() && !isolated {
                // Left free (and back to `planned` if it was only leased)
                // for a worker that will run it alone.
                if next.state == JobState::Leased {
                    next.state = JobState::Planned;
                    events.push(state_changed(key, from, JobState::Planned, "suspect"));
                }
                stamp_age(&mut events, job, now);
                return Ok(Transition { job: next, events });
            }
            let epoch = Epoch(job.epoch.0 + 1);
            next.epoch = epoch;
            next.attempts += 1;
            let queued_ms = job
                .first_leased_at
                .is_none()
                .then(|| now.millis_since(job.created_at));
            next.first_leased_at.get_or_insert(now);
            next.lease = Some(Lease {
                owner: owner.clone(),
                epoch,
                expires_at: now.plus_ms(ttl_ms),
                isolated,
            });
            if next.state == JobState::Planned {
                next.state = JobState::Leased;
            }
            events.push(EventKind::JobLeased {
                job_key: key,
                owner,
                epoch,
                ttl_ms,
                attempt: next.attempts,
                resumed_from: takeover.then_some(job.state),
                queued_ms,
                isolated,
            });
            if next.state != from {
                events.push(state_changed(key, from, next.state, "acquire"));
            }
            // A holder taking over after HEAD keeps its facts: no new HEAD.
            if takeover && job.head.is_some() {
                events.push(EventKind::IdempotencyReplay {
                    job_key: key,
                    op: ReplayOp::Head,
                    epoch: Some(epoch),
                    recorded_at: None,
                    reason: ReplayReason::Takeover,
                });
            }
        }
        Command::Renew {
            owner,
            epoch,
            ttl_ms,
        } => {
            // The fence above guarantees a lease; say so without panicking.
            let Some(lease) = job.lease.as_ref() else {
                return Err(TransitionError::Fenced {
                    presented: epoch,
                    current: "none".to_owned(),
                });
            };
            if lease.owner != owner {
                return Err(TransitionError::Fenced {
                    presented: epoch,
                    current: format!("{} held by {}", lease.epoch, lease.owner),
                });
            }
            next.lease = Some(Lease {
                owner: owner.clone(),
                epoch,
                expires_at: now.plus_ms(ttl_ms),
                isolated: lease.isolated,
            });
            events.push(EventKind::LeaseRenewed {
                job_key: key,
                owner,
                epoch,
                ttl_ms,
            });
        }
        Command::Release { owner, epoch } => {
            // The fence above guarantees a lease; say so without panicking.
            let Some(lease) = job.lease.as_ref() else {
                return Err(TransitionError::Fenced {
                    presented: epoch,
                    current: "none".to_owned(),
                });
            };
            if lease.owner != owner {
                return Err(TransitionError::Fenced {
                    presented: epoch,
                    current: format!("{} held by {}", lease.epoch, lease.owner),
                });
            }
            next.lease = None;
            // A graceful stop spends no attempt; a job that ran alone and was
            // stopped cleanly did not kill its worker.
            next.attempts = next.attempts.saturating_sub(1);
            if lease.isolated {
                next.holder_deaths = 0;
            }
            if job.state == JobState::Leased {
                next.state = JobState::Planned;
                events.push(state_changed(key, from, JobState::Planned, "released"));
            }
            events.push(EventKind::LeaseReleased {
                job_key: key,
                owner,
                epoch,
                reason: "stopped".into(),
            });
        }
        Command::Expire | Command::ExpireDead { .. } => {
            let Some(lease) = job.lease.as_ref() else {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            };
            match &cmd {
                Command::ExpireDead { owner, epoch }
                    if lease.owner != *owner || lease.epoch != *epoch =>
                {
                    return Err(TransitionError::Stale {
                        seen: format!("{epoch} held by {owner}"),
                        current: format!("{} held by {}", lease.epoch, lease.owner),
                    });
                }
                Command::ExpireDead { .. } => {}
                _ if lease.is_live(now) => {
                    return Err(TransitionError::LeaseHeld {
                        holder: lease.owner.clone(),
                        until: lease.expires_at,
                    });
                }
                _ => {}
            }
            events.push(EventKind::LeaseExpired {
                job_key: key,
                owner: lease.owner.clone(),
                epoch: lease.epoch,
                state: job.state,
            });
            next.count_death();
            next.lease = None;
            if job.state == JobState::Leased {
                next.state = JobState::Planned;
                events.push(state_changed(key, from, JobState::Planned, "lease_expired"));
            }
        }
        Command::HeadDone { head, .. } => {
            if from != JobState::Leased {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            next.head = Some(head);
            next.state = JobState::HeadDone;
            events.push(state_changed(key, from, JobState::HeadDone, "head"));
        }
        Command::StreamStarted { .. } => match from {
            JobState::HeadDone => {
                next.state = JobState::Streaming;
                events.push(state_changed(key, from, JobState::Streaming, "stream"));
            }
            // A holder that took over mid-stream resumes without a new edge.
            JobState::Streaming => {}
            _ => {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                })
            }
        },
        Command::Finalize { blob, .. } => {
            if from != JobState::Streaming {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            finish(&mut next, JobState::Finalized, now);
            next.blob = Some(blob);
            events.push(state_changed(key, from, JobState::Finalized, "finalize"));
        }
        Command::Duplicate { blob, of, .. } => {
            if !matches!(
                from,
                JobState::Leased | JobState::HeadDone | JobState::Streaming
            ) {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            events.push(EventKind::DuplicateDetected {
                job_key: key,
                sha256: blob.sha256,
                by: if of.is_some() { "url" } else { "content" }.into(),
                of,
            });
            // By URL, another job's finalized blob stands in for this job's
            // download: nothing was fetched.
            if of.is_some() {
                events.push(EventKind::IdempotencyReplay {
                    job_key: key,
                    op: ReplayOp::Finalize,
                    epoch: job.lease.as_ref().map(|l| l.epoch),
                    recorded_at: None,
                    reason: ReplayReason::Url,
                });
            }
            finish(&mut next, JobState::SkippedDuplicate, now);
            next.blob = Some(blob);
            next.duplicate_of = of;
            events.push(state_changed(
                key,
                from,
                JobState::SkippedDuplicate,
                "duplicate",
            ));
        }
        Command::Fail {
            error, retry_at, ..
        } => {
            // A job that ran alone and failed in the ordinary way did not
            // kill its worker.
            if job.lease.as_ref().is_some_and(|l| l.isolated) {
                next.holder_deaths = 0;
            }
            next.lease = None;
            next.last_error = Some(error.summary());
            // A host asking to be left alone says nothing against the job:
            // within a bounded wait, that attempt does not count.
            let throttled = crate::hosts::is_throttled(&error)
                && job
                    .first_leased_at
                    .is_some_and(|t| now.millis_since(t) < crate::hosts::MAX_THROTTLED_WAIT_MS);
            if throttled {
                next.attempts = next.attempts.saturating_sub(1);
            }
            let retry = retry_at.filter(|_| {
                error.class == ErrorClass::Retryable
                    && (throttled || job.attempts < job.max_attempts)
            });
            // A body that is not the artifact will not become it by
            // asking the same URL again while another URL may serve it.
            let other_url_now = job.has_next_url() && error.reason == "digest_mismatch";
            if let Some(at) = retry.filter(|_| !other_url_now) {
                next.state = JobState::Planned;
                next.next_attempt_at = at;
                // Validators may be stale by the next attempt; HEAD again.
                next.head = None;
                events.push(EventKind::RetryScheduled {
                    job_key: key,
                    attempt: job.attempts,
                    reason: error.reason.clone(),
                    delay_ms: at.millis_since(now),
                    url_index: None,
                });
                if from != JobState::Planned {
                    events.push(state_changed(key, from, JobState::Planned, "retry"));
                }
            } else if job.has_next_url() && moves_to_next_url(&error) {
                // This URL will not serve the artifact (or ran out of
                // attempts): the next one starts now, with its own attempts.
                next.state = JobState::Planned;
                next.url_index = job.url_index + 1;
                next.attempts = 0;
                next.next_attempt_at = now;
                next.head = None;
                events.push(EventKind::RetryScheduled {
                    job_key: key,
                    attempt: job.attempts,
                    reason: error.reason.clone(),
                    delay_ms: 0,
                    url_index: Some(next.url_index),
                });
                if from != JobState::Planned {
                    events.push(state_changed(key, from, JobState::Planned, "next_url"));
                }
            } else {
                finish(&mut next, JobState::Failed, now);
                events.push(state_changed(key, from, JobState::Failed, "failed"));
                events.push(EventKind::JobFailed {
                    job_key: key,
                    reason: error.reason.clone(),
                    error: error.summary(),
                    attempts: job.attempts,
                });
            }
        }
        Command::Cancel => {
            next.lease = None;
            finish(&mut next, JobState::Failed, now);
            next.last_error = Some("cancelled: by the operator".to_owned());
            events.push(state_changed(key, from, JobState::Failed, "cancelled"));
            events.push(EventKind::JobFailed {
                job_key: key,
                reason: "cancelled".to_owned(),
                error: "cancelled: by the operator".to_owned(),
                attempts: job.attempts,
            });
        }
        Command::OperatorRetry => {
            if from != JobState::Failed {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            next.state = JobState::Planned;
            next.attempts = 0;
            next.url_index = 0;
            next.holder_deaths = 0;
            next.isolated_deaths = 0;
            next.next_attempt_at = now;
            next.finished_at = None;
            next.head = None;
            events.push(state_changed(
                key,
                from,
                JobState::Planned,
                "operator_retry",
            ));
        }
        Command::Heal { blob } => {
            if let Some(l) = job.lease.as_ref().filter(|l| l.is_live(now)) {
                return Err(TransitionError::LeaseHeld {
                    holder: l.owner.clone(),
                    until: l.expires_at,
                });
            }
            if from != JobState::Streaming {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            finish(&mut next, JobState::Finalized, now);
            next.blob = Some(blob);
            events.push(EventKind::CrashRecovery {
                kind: "blob_healed".into(),
                job_key: Some(key),
                count: 1,
            });
            events.push(EventKind::IdempotencyReplay {
                job_key: key,
                op: ReplayOp::Finalize,
                epoch: None,
                recorded_at: None,
                reason: ReplayReason::Repair,
            });
            events.push(state_changed(
                key,
                from,
                JobState::Finalized,
                "crash_recovery",
            ));
        }
        Command::ChildDied {
            owner,
            epoch,
            detail,
        } => {
            let Some(lease) = job.lease.as_ref() else {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            };
            if lease.owner != owner || lease.epoch != epoch {
                return Err(TransitionError::Stale {
                    seen: format!("{epoch} held by {owner}"),
                    current: format!("{} held by {}", lease.epoch, lease.owner),
                });
            }
            events.push(EventKind::LeaseExpired {
                job_key: key,
                owner,
                epoch,
                state: job.state,
            });
            next.lease = None;
            next.attempts = next.attempts.saturating_sub(1);
            next.isolated_deaths += 1;
            let error = format!(
                "poison: the worker running this job alone died {} times (last: {detail})",
                next.isolated_deaths
            );
            if next.isolated_deaths >= POISON_AFTER_ISOLATED_DEATHS {
                finish(&mut next, JobState::Failed, now);
                next.last_error = Some(error.clone());
                events.push(state_changed(key, from, JobState::Failed, "poison"));
                events.push(EventKind::JobFailed {
                    job_key: key,
                    reason: "poison".into(),
                    error,
                    attempts: next.attempts,
                });
            } else {
                next.last_error = Some(format!("isolated_death: {detail}"));
                if from == JobState::Leased {
                    next.state = JobState::Planned;
                    events.push(state_changed(key, from, JobState::Planned, "child_died"));
                }
            }
        }
        Command::Requeue { reason, seen } => {
            if !from.is_success() {
                return Err(TransitionError::Illegal {
                    from,
                    command: name,
                });
            }
            if job.epoch != seen {
                return Err(TransitionError::Stale {
                    seen: seen.to_string(),
                    current: job.epoch.to_string(),
                });
            }
            next.state = JobState::Planned;
            next.blob = None;
            next.duplicate_of = None;
            next.finished_at = None;
            next.attempts = 0;
            next.url_index = 0;
            next.next_attempt_at = now;
            next.last_error = Some(reason);
            events.push(EventKind::CrashRecovery {
                kind: "blob_missing_requeued".into(),
                job_key: Some(key),
                count: 1,
            });
            events.push(state_changed(
                key,
                from,
                JobState::Planned,
                "crash_recovery",
            ));
        }
    }
    lease_end(job, &next, name == "cancel", &mut events);
    stamp_age(&mut events, job, now);
    Ok(Transition { job: next, events })
}

fn finish(job: &mut Job, state: JobState, now: Timestamp) {
    job.state = state;
    job.lease = None;
    job.finished_at = Some(now);
    if state.is_success() {
        job.last_error = None;
    }
}

fn state_changed(job_key: JobKey, from: JobState, to: JobState, reason: &str) -> EventKind {
    EventKind::JobStateChanged {
        job_key,
        from,
        to,
        reason: reason.to_owned(),
        since_planned_ms: None,
        since_leased_ms: None,
    }
}

/// Stamps terminal state changes with the job's age, for latency SLOs.
fn stamp_age(events: &mut [EventKind], job: &Job, now: Timestamp) {
    for e in events {
        if let EventKind::JobStateChanged {
            to,
            since_planned_ms,
            since_leased_ms,
            ..
        } = e
        {
            if to.is_terminal() {
                *since_planned_ms = Some(now.millis_since(job.created_at));
                *since_leased_ms = job.first_leased_at.map(|t| now.millis_since(t));
            }
        }
    }
}

/// A lease the transition ended without saying so (the job finished or
/// its attempt failed) ends with its release: every lease ends in exactly
/// one `lease_released` or `lease_expired` event.
fn lease_end(job: &Job, next: &Job, cancelled: bool, events: &mut Vec<EventKind>) {
    let Some(old) = &job.lease else { return };
    if next.lease.as_ref().is_some_and(|l| l.epoch == old.epoch) {
        return;
    }
    let said = events.iter().any(|e| {
        matches!(e,
            EventKind::LeaseReleased { epoch, .. } | EventKind::LeaseExpired { epoch, .. }
                if *epoch == old.epoch)
    });
    if said {
        return;
    }
    let reason = if cancelled {
        "cancelled"
    } else if next.state.is_terminal() && next.state != JobState::Failed {
        "finished"
    } else {
        "failed"
    };
    events.push(EventKind::LeaseReleased {
        job_key: job.key,
        owner: old.owner.clone(),
        epoch: old.epoch,
        reason: reason.into(),
    });
}

/// Whether a failure that ends a URL's attempts lets the job go on to the
/// next URL: failures of the URL (statuses, refusals, a body that is not
/// the artifact) do; failures here (the disk, the operator) would follow it
/// there.
fn moves_to_next_url(error: &JobError) -> bool {
    !matches!(error.reason.as_str(), "io" | "cancelled" | "poison")
}
