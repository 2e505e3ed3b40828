//! One leased job, driven from its last committed step to a terminal state
//! (or back to `planned` with a retry scheduled).
//!
//! Every effect that writes is bracketed by the op ledger: `begin_op`
//! before, and `finish_op` (op result plus state transition, atomically)
//! after. HEAD, which writes nothing, is begun and finished in one commit
//! once it has answered. A
//! heartbeat renews the lease meanwhile; if a renewal is refused, the job
//! stops at the next chunk and publishes nothing.

use crate::files;
use crate::finalize::*;
use crate::reuse::*;
use crate::stream::*;
use crate::Engine;
use idem_core::ports::{Commit, FetchError, GetResponse, Step, StepOutput, Store, StoreError};
use idem_core::{
    Command, Epoch, EventKind, Http, Job, JobError, JobState, OpDecision, OpKey, OpKind, OpResult,
    OpStatus, SplitMix64, StreamInfo,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a job's driving stopped before a terminal state.
pub(crate) enum Abort {
    /// The lease was taken over: stop, publish nothing.
    Fenced,
    /// The run is stopping: release the lease.
    Stopped,
    Store(StoreError),
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        if e.is_fenced() {
            Self::Fenced
        } else {
            Self::Store(e)
        }
    }
}

pub(crate) enum StreamErr {
    Fetch(FetchError),
    Io(std::io::Error),
    Abort(Abort),
}

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// Drives one leased job, then each job it leased as it finished (a
    /// worker takes its next job in the write that finishes its last).
    /// `dup` is content already held under the job's URL (looked up with
    /// the lease, see [`duplicate_of`]).
    pub(crate) async fn run_job(self: Arc<Self>, job: Job, dup: Option<Stored>) {
        let mut current = Some((job, dup));
        while let Some((job, dup)) = current.take() {
            current = self.run_one(job, dup).await;
        }
    }

    async fn run_one(self: &Arc<Self>, job: Job, dup: Option<Stored>) -> Option<Next> {
        let epoch = job.lease.as_ref().map(|l| l.epoch)?;
        let key = job.key;
        self.progress.in_flight.fetch_add(1, Ordering::SeqCst);
        let fenced = Arc::new(AtomicBool::new(false));
        // The lease is renewed from the start, while the job may still wait
        // for its host's slot; and the renewal stops however the job ends,
        // a panic included.
        let hb = AbortOnDrop(tokio::spawn(Arc::clone(self).heartbeat(
            key,
            epoch,
            Arc::clone(&fenced),
        )));
        // The host's slot is held for the job's whole life, so its steps run
        // back to back. Leases count the host's budget, so it is rarely
        // waited for.
        let _slot = self.host_slot(&job.url().host()).await;
        let mut next = None;
        let r = self.drive(job, epoch, &fenced, dup, &mut next).await;
        drop(hb);
        match r {
            Ok(state) => self.count_outcome(state),
            Err(Abort::Fenced) => {
                self.progress.fenced.fetch_add(1, Ordering::SeqCst);
                self.emit(&[EventKind::WriteFenced {
                    job_key: key,
                    presented: epoch,
                    command: "drive".into(),
                }
                .at(self.now())]);
            }
            Err(Abort::Stopped) => {
                let owner = self.owner.clone();
                let now = self.now();
                if let Ok(a) = self
                    .store_call(move |s| s.apply(&key, Command::Release { owner, epoch }, now))
                    .await
                {
                    self.emit(&a.events);
                }
            }
            Err(Abort::Store(e)) => {
                tracing::warn!(job = %key, error = %e, "ledger error; the job is left for its lease to expire");
            }
        }
        self.progress.in_flight.fetch_sub(1, Ordering::SeqCst);
        next
    }

    async fn heartbeat(
        self: Arc<Self>,
        key: idem_core::JobKey,
        epoch: Epoch,
        fenced: Arc<AtomicBool>,
    ) {
        let every = Duration::from_millis((self.cfg.lease_ttl_ms / 3).max(50));
        loop {
            tokio::time::sleep(every).await;
            let owner = self.owner.clone();
            let ttl_ms = self.cfg.lease_ttl_ms;
            let now = self.now();
            // A renewal only matters to this worker: deferred.
            let renew = vec![Step::Apply {
                key,
                cmd: Command::Renew {
                    owner,
                    epoch,
                    ttl_ms,
                },
            }];
            match self
                .store_call(move |s| s.run_steps(renew, now, Commit::Deferred))
                .await
            {
                Ok(a) => self.emit(&a.events),
                Err(e) if e.is_transient() => {}
                Err(_) => {
                    // Fenced, or the job moved on without us: stop at once.
                    fenced.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }

    pub(crate) fn check(&self, fenced: &AtomicBool) -> Result<(), Abort> {
        if fenced.load(Ordering::SeqCst) {
            Err(Abort::Fenced)
        } else if self.stopping() {
            Err(Abort::Stopped)
        } else {
            Ok(())
        }
    }

    pub(crate) async fn apply(&self, key: idem_core::JobKey, cmd: Command) -> Result<Job, Abort> {
        let now = self.now();
        let a = self.store_call(move |s| s.apply(&key, cmd, now)).await?;
        self.emit(&a.events);
        Ok(a.value)
    }

    /// Starts (or replays) an op. Deferred: only this holder acts on it.
    async fn begin(&self, op: OpKey) -> Result<OpDecision, Abort> {
        let owner = self.owner.clone();
        let (_, d) = self
            .steps(vec![Step::BeginOp { op, owner }], Commit::Deferred)
            .await?;
        d.ok_or_else(|| Abort::Store(StoreError::Backend("begin returned no decision".into())))
    }

    async fn finish(
        &self,
        op: OpKey,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
    ) -> Result<Job, Abort> {
        let now = self.now();
        let a = self
            .store_call(move |s| s.finish_op(&op, outcome, then, now))
            .await?;
        self.emit(&a.events);
        Ok(a.value)
    }

    /// The command that ends the attempt with `error`: a retry scheduled
    /// with backoff, or failure for good.
    pub(crate) fn fail_command(&self, job: &Job, epoch: Epoch, error: &JobError) -> Command {
        let mut rng = SplitMix64::new(self.next_seed() ^ u64::from(job.attempts));
        // A throttled answer spends no attempt, so its backoff grows with
        // the job's tries (its leases) instead.
        let tries = if idem_core::hosts::is_throttled(error) {
            u32::try_from(job.epoch.0).unwrap_or(u32::MAX)
        } else {
            job.attempts.min(job.max_attempts)
        };
        let retry_at = self.cfg.retry.decide(tries, error, &mut rng, self.now());
        Command::Fail {
            epoch,
            error: error.clone(),
            retry_at,
        }
    }

    /// The cooldown a failure asks of the job's host (a 429 or 503 with
    /// `Retry-After`), as a step of the commit that records the failure:
    /// every worker then holds off that host, not only this job.
    pub(crate) fn cooldown_step(&self, job: &Job, error: &JobError) -> Option<Step> {
        idem_core::hosts::cooldown_after(error, self.now()).map(|until| Step::HostCooldown {
            host: job.url().host(),
            until,
        })
    }

    /// Blocking: ends the attempt with `error` (retry later, or fail for
    /// good), finishing `op` with it after the steps of `prefix` (what had
    /// not been recorded yet).
    pub(crate) fn fail_now(
        &self,
        job: &Job,
        epoch: Epoch,
        mut prefix: Vec<Step>,
        op: OpKey,
        error: JobError,
    ) -> Result<Job, Abort> {
        let then = Some(self.fail_command(job, epoch, &error));
        prefix.extend(self.cooldown_step(job, &error));
        prefix.push(Step::FinishOp {
            op,
            outcome: Err(error),
            then,
        });
        let a = self.store.run_steps(prefix, self.now(), Commit::Durable)?;
        let (j, _) = self.outputs(a);
        j.ok_or_else(|| Abort::Store(StoreError::Backend("steps returned no job".into())))
    }

    /// Ends the attempt with `error` (see `fail_now`), off the runtime.
    async fn fail(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        op: OpKey,
        error: JobError,
    ) -> Result<Job, Abort> {
        let (me, job) = (Arc::clone(self), job.clone());
        tokio::task::spawn_blocking(move || me.fail_now(&job, epoch, Vec::new(), op, error))
            .await
            .map_err(|e| Abort::Store(StoreError::Backend(e.to_string())))?
    }

    pub(crate) async fn drive(
        self: &Arc<Self>,
        mut job: Job,
        epoch: Epoch,
        fenced: &Arc<AtomicBool>,
        mut dup: Option<Stored>,
        next: &mut Option<Next>,
    ) -> Result<JobState, Abort> {
        // An op already begun by the previous step's commit (see `steps`),
        // and the part prepared in the same trip off the runtime.
        let mut begun: Option<(OpKey, OpDecision)> = None;
        let mut prepared: Option<std::io::Result<Prepared>> = None;
        loop {
            self.check(fenced)?;
            job = match job.state {
                JobState::Leased => {
                    let (j, b, p) = self
                        .step_head(&job, epoch, fenced, dup.take(), next)
                        .await?;
                    begun = b;
                    prepared = p;
                    j
                }
                JobState::HeadDone => {
                    // Taken over after HEAD: start streaming and the STREAM op at once.
                    let sop = OpKey {
                        job: job.key,
                        kind: OpKind::Stream,
                        epoch,
                    };
                    let (j, d) = self
                        .job_steps(self.stream_start(job.key, sop).to_vec())
                        .await?;
                    begun = d.map(|d| (sop, d));
                    j
                }
                JobState::Streaming => {
                    self.step_body(&job, epoch, fenced, begun.take(), prepared.take(), next)
                        .await?
                }
                done => return Ok(done),
            };
        }
    }

    /// The move to streaming and the start of the STREAM op `sop`.
    pub(crate) fn stream_start(&self, key: idem_core::JobKey, sop: OpKey) -> [Step; 2] {
        [
            Step::Apply {
                key,
                cmd: Command::StreamStarted { epoch: sop.epoch },
            },
            Step::BeginOp {
                op: sop,
                owner: self.owner.clone(),
            },
        ]
    }

    /// Runs steps atomically (one commit); returns the job after the last
    /// job-returning step (if any) and the last op decision, if any.
    async fn steps(
        &self,
        steps: Vec<Step>,
        commit: Commit,
    ) -> Result<(Option<Job>, Option<OpDecision>), Abort> {
        let now = self.now();
        let a = self
            .store_call(move |s| s.run_steps(steps, now, commit))
            .await?;
        Ok(self.outputs(a))
    }

    /// Emits the events of a `run_steps` call and returns the job after its
    /// last job-returning step and its last op decision, if any.
    pub(crate) fn outputs(
        &self,
        a: idem_core::Applied<Vec<StepOutput>>,
    ) -> (Option<Job>, Option<OpDecision>) {
        self.emit(&a.events);
        let mut job = None;
        let mut decision = None;
        for out in a.value {
            match out {
                StepOutput::Job(j) => job = Some(*j),
                StepOutput::Decision(d) => decision = Some(d),
                // Taken by the caller before (see `finalize_now`).
                StepOutput::Leased(_) => {}
            }
        }
        (job, decision)
    }

    /// Deferred steps that lead a job to its next step; returns the job.
    async fn job_steps(&self, steps: Vec<Step>) -> Result<(Job, Option<OpDecision>), Abort> {
        let (j, d) = self.steps(steps, Commit::Deferred).await?;
        let j =
            j.ok_or_else(|| Abort::Store(StoreError::Backend("steps returned no job".into())))?;
        Ok((j, d))
    }

    /// STREAM then FINALIZE, reusing what earlier holders committed.
    async fn step_body(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        fenced: &Arc<AtomicBool>,
        begun: Option<(OpKey, OpDecision)>,
        prepared: Option<std::io::Result<Prepared>>,
        next: &mut Option<Next>,
    ) -> Result<Job, Abort> {
        let key = job.key;
        // Earlier holders' work matters only when this holder took over.
        let ops = if begun.is_some() {
            Vec::new()
        } else {
            self.store_call(move |s| s.ops(&key)).await?
        };
        let earlier = ops.iter().rev().find_map(|o| match (&o.status, &o.result) {
            (OpStatus::Committed, Some(OpResult::Stream(si))) => Some(si.clone()),
            _ => None,
        });
        // A holder published the blob and died before committing: verify it
        // and commit, without fetching again.
        if let Some(si) = &earlier {
            let path = self.out.blob_path(&si.sha256);
            if path.exists() {
                let p = path.clone();
                let (out, want) = (self.out.clone(), si.clone());
                // Checked, then made durable (its publisher may have died
                // before its durability step); whose it is decides how the
                // job ends.
                let found = tokio::task::spawn_blocking(move || {
                    let ok = files::hash_file(&p)
                        .is_ok_and(|(sha, size)| sha == want.sha256 && size == want.size);
                    (ok && files::sync_blob(&out, &want.sha256).is_ok())
                        .then(|| files::published_by(&out, &key, epoch.0, &want.sha256))
                })
                .await
                .ok()
                .flatten();
                if let Some(own) = found {
                    let blob = idem_core::BlobInfo::new(si.sha256, si.size);
                    let fop = OpKey {
                        job: key,
                        kind: OpKind::Finalize,
                        epoch,
                    };
                    // The FINALIZE op starts with the record of what it reuses.
                    let owner = self.owner.clone();
                    let reused = Step::Reused {
                        op: OpKey {
                            kind: OpKind::Stream,
                            ..fop
                        },
                        reason: idem_core::ReplayReason::Takeover,
                    };
                    let begin = Step::BeginOp { op: fop, owner };
                    self.steps(vec![reused, begin], Commit::Deferred).await?;
                    self.emit(&[EventKind::CrashRecovery {
                        kind: "blob_healed".into(),
                        job_key: Some(key),
                        count: 1,
                    }
                    .at(self.now())]);
                    let then = if own {
                        Command::Finalize {
                            epoch,
                            blob: blob.clone(),
                        }
                    } else {
                        Command::Duplicate {
                            epoch,
                            blob: blob.clone(),
                            of: None,
                        }
                    };
                    return self
                        .finish(fop, Ok(OpResult::Finalize(blob)), Some(then))
                        .await;
                }
            }
        }
        let sop = OpKey {
            job: key,
            kind: OpKind::Stream,
            epoch,
        };
        let primary = self.out.part_path(&key);
        let decision = match begun {
            Some((op, d)) if op == sop => d,
            _ => self.begin(sop).await?,
        };
        if let OpDecision::Replay {
            result: OpResult::Stream(si),
            ..
        } = decision
        {
            // The part STREAM committed, if nobody else holds it.
            if let Ok(Some(lock)) = files::open_locked(&primary, false) {
                let landed = Landed::Synced {
                    part: primary,
                    si,
                    lock,
                };
                return self
                    .finalize(job, epoch, landed, fenced, Finish::Replayed, next)
                    .await;
            }
        }
        // The part this holder writes (decided when streaming starts).
        let mut chosen: Option<std::path::PathBuf> = None;
        let streamed = self
            .stream(
                job,
                epoch,
                fenced,
                &mut chosen,
                prepared,
                Begin::Ask(earlier),
            )
            .await;
        self.after_stream(job, epoch, fenced, streamed, chosen, next)
            .await
    }

    /// What follows a stream: FINALIZE, or the attempt's end with the
    /// stream's error.
    pub(crate) async fn after_stream(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        fenced: &Arc<AtomicBool>,
        streamed: Result<Landed, StreamErr>,
        chosen: Option<std::path::PathBuf>,
        next: &mut Option<Next>,
    ) -> Result<Job, Abort> {
        let sop = OpKey {
            job: job.key,
            kind: OpKind::Stream,
            epoch,
        };
        match streamed {
            Ok(landed) => {
                self.finalize(job, epoch, landed, fenced, Finish::Streamed, next)
                    .await
            }
            Err(StreamErr::Abort(a)) => Err(a),
            Err(StreamErr::Fetch(e)) => self.fail(job, epoch, sop, e.to_job_error()).await,
            Err(StreamErr::Io(e)) => {
                // A part that failed to write (a full disk, an I/O error) is
                // not worth resuming and may be holding the space other jobs
                // need.
                let part = chosen.unwrap_or_else(|| self.out.part_path(&job.key));
                files::remove_part(&part);
                let err = io_error(format!("writing {}", part.display()), &e);
                self.fail(job, epoch, sop, err).await
            }
        }
    }
}

/// How a stream begins: with the GET a fresh job sent in HEAD's place, or
/// by asking for the body, resuming what earlier holders left (knowing
/// what STREAM committed, if it did).
pub(crate) enum Begin<B> {
    Opened(GetResponse<B>),
    Ask(Option<StreamInfo>),
}

/// What the commit before publishing must record besides FINALIZE's start.
pub(crate) enum Finish {
    /// STREAM was committed by an earlier call: nothing.
    Replayed,
    /// STREAM is begun: its result.
    Streamed,
    /// Nothing since the lease (a small body): these steps (HEAD's record
    /// and the move to streaming), then STREAM begun and finished.
    Recorded(Vec<Step>, Timing),
}

/// How long the effects recorded after the fact took: their ops are begun
/// and finished in one commit, so the ledger alone would say zero.
#[derive(Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) head_ms: u64,
    pub(crate) body_ms: u64,
}

impl Timing {
    pub(crate) fn apply(self, events: &mut [idem_core::Event]) {
        for ev in events {
            if let EventKind::OperationCompleted { op, elapsed_ms, .. } = &mut ev.kind {
                match op {
                    OpKind::Head => *elapsed_ms = self.head_ms,
                    OpKind::Stream => *elapsed_ms = self.body_ms,
                    OpKind::Finalize => {}
                }
            }
        }
    }
}

/// An I/O error of this host's disk as a job error: one the job cannot get
/// past by trying again (a permission refused, a read-only filesystem, a
/// file idem did not make in its way) fails it at once; others (a full
/// disk) are retried.
pub(crate) fn io_error(what: String, e: &std::io::Error) -> JobError {
    use std::io::ErrorKind as K;
    let detail = format!("{what}: {e}");
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => JobError::permanent("io", detail),
        _ => JobError::retryable("io", detail),
    }
}
