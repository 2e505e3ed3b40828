//! Finishing a job: the held body written, STREAM recorded with FINALIZE
//! begun, the digest checks, the publish, and FINALIZE's commit with the
//! worker's next lease.

use crate::drive::*;
use crate::files::{self, Published};
use crate::hooks;
use crate::reuse::*;
use crate::stream::*;
use crate::Engine;
use idem_core::ports::{Commit, Step, StepOutput, Store, StoreError};
use idem_core::{
    Command, Epoch, EventKind, HeadInfo, Http, Job, JobError, OpDecision, OpKey, OpKind, OpResult,
    StreamInfo,
};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// Everything after the body has landed, in one trip off the runtime
    /// (a small file's whole finish is then one hand-off, not four).
    pub(crate) async fn finalize(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        landed: Landed,
        fenced: &Arc<AtomicBool>,
        finish: Finish,
        next: &mut Option<Next>,
    ) -> Result<Job, Abort> {
        let (me, job, fenced) = (Arc::clone(self), job.clone(), Arc::clone(fenced));
        let (job, taken) = tokio::task::spawn_blocking(move || {
            let mut taken = None;
            me.finalize_now(&job, epoch, landed, &fenced, finish, &mut taken)
                .map(|j| (j, taken))
        })
        .await
        .map_err(|e| Abort::Store(StoreError::Backend(e.to_string())))??;
        *next = taken;
        Ok(job)
    }

    /// Blocking: a held body's write and fsync; the commit that records
    /// what `finish` says is not yet recorded and begins FINALIZE (which
    /// also proves the lease is still ours right before publishing); the
    /// checks; publishing; FINALIZE's result.
    fn finalize_now(
        &self,
        job: &Job,
        epoch: Epoch,
        landed: Landed,
        fenced: &AtomicBool,
        finish: Finish,
        next: &mut Option<Next>,
    ) -> Result<Job, Abort> {
        let key = job.key;
        let op = |kind| OpKey {
            job: key,
            kind,
            epoch,
        };
        let (sop, fop) = (op(OpKind::Stream), op(OpKind::Finalize));
        let owner = self.owner.clone();
        // What must be in the ledger before STREAM can be finished.
        let prefix = |finish: &Finish| match finish {
            Finish::Recorded(record, _) => record
                .iter()
                .cloned()
                .chain([Step::BeginOp {
                    op: sop,
                    owner: owner.clone(),
                }])
                .collect(),
            Finish::Streamed | Finish::Replayed => Vec::new(),
        };
        // The part stays locked (`_lock`) until it is published or removed,
        // so no other holder adopts it meanwhile.
        let (part, si, _lock) = match landed {
            Landed::Synced { part, si, lock } => (part, si, lock),
            Landed::Held { bytes, part } => {
                let opened = match part {
                    Some(pf) => Ok(pf),
                    None => prepare_part(
                        &self.out,
                        key,
                        epoch,
                        job.url().as_str(),
                        &HeadInfo::default(),
                        None,
                    )
                    .map(|p| (p.part, p.file)),
                };
                let written = opened.and_then(|(path, file)| {
                    files::write_whole(&file, &bytes)
                        .map(|()| (path.clone(), file))
                        .map_err(|e| {
                            files::remove_part(&path);
                            std::io::Error::new(
                                e.kind(),
                                format!("writing {}: {e}", path.display()),
                            )
                        })
                });
                match written {
                    Ok((path, file)) => (
                        path,
                        StreamInfo {
                            sha256: idem_core::Digest32::of(&bytes),
                            size: bytes.len() as u64,
                            resumed_from: 0,
                        },
                        file,
                    ),
                    Err(e) => {
                        let err = io_error("writing the part".into(), &e);
                        return self.fail_now(job, epoch, prefix(&finish), sop, err);
                    }
                }
            }
        };
        let mut steps = prefix(&finish);
        if !matches!(finish, Finish::Replayed) {
            steps.push(Step::FinishOp {
                op: sop,
                outcome: Ok(OpResult::Stream(si.clone())),
                then: None,
            });
        }
        steps.push(Step::BeginOp { op: fop, owner });
        let mut a = match self.store.run_steps(steps, self.now(), Commit::Deferred) {
            Ok(a) => a,
            Err(e) => {
                // Fenced (the lease was taken while the body arrived): the
                // job is another holder's, and this part is nobody's.
                let abort = Abort::from(e);
                if matches!(abort, Abort::Fenced) {
                    files::remove_part(&part);
                }
                return Err(abort);
            }
        };
        if let Finish::Recorded(_, timing) = &finish {
            timing.apply(&mut a.events);
        }
        if !matches!(finish, Finish::Replayed) {
            hooks::crashpoint("after_stream_commit");
        }
        let part = part.as_path();
        let decision = self.outputs(a).1.ok_or_else(|| {
            Abort::Store(StoreError::Backend("begin returned no decision".into()))
        })?;
        if let OpDecision::Replay {
            result: OpResult::Finalize(blob),
            ..
        } = decision
        {
            let a = self
                .store
                .apply(&key, Command::Finalize { epoch, blob }, self.now())?;
            self.emit(&a.events);
            return Ok(a.value);
        }
        // The plan's digest, else the one the server declared for the
        // whole representation: a body that hashes otherwise is corrupt.
        let expected = job
            .spec
            .sha256
            .map(|d| (d, "expected"))
            .or_else(|| declared_sha256(job, &finish).map(|d| (d, "declared by the server")));
        if let Some((want, whose)) = expected {
            if want != si.sha256 {
                files::remove_part(part);
                let err = JobError::retryable(
                    "digest_mismatch",
                    format!("{}: got sha256 {}, {whose} {want}", job.url(), si.sha256),
                );
                return self.fail_now(job, epoch, Vec::new(), fop, err);
            }
        }
        // The commit that began FINALIZE proved the lease a moment ago; the
        // heartbeat's verdict is the last check before publishing.
        if let Err(abort) = self.check(fenced) {
            if matches!(abort, Abort::Fenced) {
                files::remove_part(part);
            }
            return Err(abort);
        }
        let published = self
            .publisher
            .publish(part.to_path_buf(), si.sha256, si.size);
        hooks::crashpoint("after_publish");
        let (blob, then) = match published {
            Ok(Published::New(blob)) => (blob.clone(), Command::Finalize { epoch, blob }),
            Ok(Published::Replaced(blob, aside)) => {
                tracing::warn!(
                    blob = %blob.path,
                    moved_to = %aside.display(),
                    job = %key,
                    "a file at a blob's address held other bytes than its name says; moved aside and replaced by the job's verified content"
                );
                self.emit(&[EventKind::CrashRecovery {
                    kind: "blob_replaced".into(),
                    job_key: Some(key),
                    count: 1,
                }
                .at(self.now())]);
                (blob.clone(), Command::Finalize { epoch, blob })
            }
            Ok(Published::AlreadyStored(blob)) => (
                blob.clone(),
                Command::Duplicate {
                    epoch,
                    blob,
                    of: None,
                },
            ),
            Err(e) => {
                let err = io_error(format!("publishing {}", part.display()), &e);
                return self.fail_now(job, epoch, Vec::new(), fop, err);
            }
        };
        let finish = Step::FinishOp {
            op: fop,
            outcome: Ok(OpResult::Finalize(blob)),
            then: Some(then),
        };
        // This worker's next job, leased in the same write; not after a job
        // it ran alone (a suspect), which leaves the process to its loop.
        let alone = job.lease.as_ref().is_some_and(|l| l.isolated);
        let lease = self.successor_request().filter(|_| !alone).map(Step::Lease);
        let leasing = lease.is_some();
        let asked = std::time::Instant::now();
        let steps = std::iter::once(finish).chain(lease).collect();
        let mut a = self.store.run_steps(steps, self.now(), Commit::Durable)?;
        if leasing {
            let jobs = a.value.iter_mut().find_map(|o| match o {
                StepOutput::Leased(jobs) => Some(std::mem::take(jobs)),
                _ => None,
            });
            let jobs = jobs.unwrap_or_default();
            self.emit_lease_call(jobs.len(), asked, true);
            let root = self.out.root();
            *next = jobs.into_iter().next().map(|j| {
                let dup = duplicate_of(&*self.store, root, &j);
                (j, dup)
            });
        }
        let (j, _) = self.outputs(a);
        j.ok_or_else(|| Abort::Store(StoreError::Backend("steps returned no job".into())))
    }
}

/// Where a body landed: in its part, fsynced (hashed as it was written), or
/// held in memory (a small body), with its part if one is open already.
pub(crate) enum Landed {
    /// In its part, fsynced; `lock` is the part, locked, held until it is
    /// published or removed.
    Synced {
        part: std::path::PathBuf,
        si: StreamInfo,
        lock: std::fs::File,
    },
    Held {
        bytes: Vec<u8>,
        part: Option<(std::path::PathBuf, std::fs::File)>,
    },
}

/// The SHA-256 the server declared for the job's whole representation:
/// in HEAD's record (made in this finish's commit, or before it).
fn declared_sha256(job: &Job, finish: &Finish) -> Option<idem_core::Digest32> {
    let recorded = match finish {
        Finish::Recorded(steps, _) => steps.iter().find_map(|s| match s {
            Step::FinishOp {
                outcome: Ok(OpResult::Head(h)),
                ..
            } => Some(h),
            _ => None,
        }),
        Finish::Streamed | Finish::Replayed => job.head.as_ref(),
    };
    recorded.and_then(|h| h.sha256)
}
