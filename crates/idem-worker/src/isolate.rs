//! Suspects run alone, in a child process the worker watches.
//!
//! A job whose holders keep dying (`Job::is_suspect`) may be the cause (a
//! body that crashes its worker) or a bystander (the workers were killed,
//! crashed for other reasons, or were restarted by a deploy). To tell them
//! apart, a worker with nothing else to do leases one suspect (an isolated
//! lease) and hands it to an [`Isolator`], which runs it in a child process
//! and waits. If the child dies while its parent lives, the job killed it:
//! the parent records that (`Command::ChildDied`), and after
//! `POISON_AFTER_ISOLATED_DEATHS` such deaths the job fails as `poison`. A
//! death nobody saw (the parent killed too) is never held against the job.

use crate::Engine;
use idem_core::ports::Store;
use idem_core::{Command, Epoch, Http, JobKey, JobState, WorkerId};
use std::sync::Arc;

/// How a child process that ran one job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// It exited with this code (0: it finished the job, or gave it back).
    Exited(i32),
    /// A signal killed it (`SIGABRT`, `SIGSEGV`, `SIGKILL` from the OOM
    /// killer): named for the record.
    Killed(String),
}

/// Runs one job in a process of its own.
pub trait Isolator: Send + Sync {
    /// Blocking: runs `job` under the lease `epoch` of `owner` in a child
    /// process (which acts as `owner`), waits for it, and says how it ended.
    fn run_alone(&self, job: &JobKey, epoch: Epoch, owner: &WorkerId) -> std::io::Result<ChildEnd>;
}

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// Runs a suspect this process leased (alone) in a child process, and
    /// records the child's death if it died.
    pub(crate) async fn run_in_child(
        self: Arc<Self>,
        iso: Arc<dyn Isolator>,
        key: JobKey,
        epoch: Epoch,
    ) {
        let owner = self.owner.clone();
        let who = owner.clone();
        let ended = tokio::task::spawn_blocking(move || iso.run_alone(&key, epoch, &who)).await;
        let cmd = match ended {
            Ok(Ok(ChildEnd::Exited(0))) => None,
            // Stopped with this worker (a Ctrl-C or a service stop reaches
            // the child too), or asked to stop: not the job's doing.
            Ok(Ok(ChildEnd::Killed(signal)))
                if self.stopping() || signal == "SIGTERM" || signal == "SIGINT" =>
            {
                Some(Command::Release { owner, epoch })
            }
            Ok(Ok(ChildEnd::Killed(signal))) => Some(Command::ChildDied {
                owner,
                epoch,
                detail: format!("killed by {signal}"),
            }),
            // A panic (Rust exits 101 from one) is the job's doing too.
            Ok(Ok(ChildEnd::Exited(101))) => Some(Command::ChildDied {
                owner,
                epoch,
                detail: "panicked".into(),
            }),
            // It could not run, or gave up without finishing: the lease goes
            // back, and nothing is held against the job.
            Ok(Ok(ChildEnd::Exited(_))) | Ok(Err(_)) | Err(_) => {
                Some(Command::Release { owner, epoch })
            }
        };
        let now = self.now();
        if let Some(cmd) = cmd {
            // Refused when the child got as far as giving the job back or
            // finishing it, or was fenced: then there is nothing to record.
            if let Ok(a) = self.store_call(move |s| s.apply(&key, cmd, now)).await {
                self.emit(&a.events);
            }
        }
        if let Ok(Some(job)) = self.store_call(move |s| s.job(&key)).await {
            if job.state.is_terminal() {
                self.count_outcome(job.state);
            }
        }
    }

    /// Runs the one job `key`, which this engine's owner holds under the
    /// lease `epoch`: the child's side of [`Isolator::run_alone`]. Returns
    /// where the job ended.
    pub async fn run_alone(
        self: &Arc<Self>,
        key: JobKey,
        epoch: Epoch,
    ) -> Result<JobState, crate::EngineError> {
        let job = self
            .store_call(move |s| s.job(&key))
            .await?
            .ok_or(idem_core::ports::StoreError::NotFound(key))?;
        let held = job
            .lease
            .as_ref()
            .is_some_and(|l| l.owner == self.owner && l.epoch == epoch);
        if !held {
            return Ok(job.state);
        }
        Arc::clone(self).run_job(job, None).await;
        let job = self.store_call(move |s| s.job(&key)).await?;
        Ok(job.map_or(JobState::Planned, |j| j.state))
    }
}
