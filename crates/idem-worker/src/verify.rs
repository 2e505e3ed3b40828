//! The blob audit (`idem verify`): every finished job's blob is read back
//! and checked against the size and SHA-256 the ledger recorded for it.
//! With `repair`, a blob that fails is moved to `<out>/quarantine/` and its
//! jobs are re-queued, so the next run fetches and verifies it again.
//!
//! It reads every blob, so it runs on demand, not at every start (the
//! start-up reconcile checks only that each blob is there with its size).

use crate::files::{self, OutDir};
use crate::EventSink;
use idem_core::ports::{Store, StoreError};
use idem_core::{Clock, Command, JobKey, JobState};
use serde::Serialize;

/// A finished job whose blob is not what the ledger says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadBlob {
    pub job_key: JobKey,
    pub path: String,
    pub problem: String,
    /// Whether it was re-queued (`repair`).
    pub requeued: bool,
}

/// What the audit found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Finished jobs whose blob was checked.
    pub blobs_checked: u64,
    pub bad: Vec<BadBlob>,
}

/// Reads back every finished job's blob; with `repair`, re-queues the jobs
/// whose blob fails (moving the bad file aside first).
pub fn verify<S: Store + ?Sized>(
    store: &S,
    out: &OutDir,
    sink: &dyn EventSink,
    clock: &dyn Clock,
    repair: bool,
) -> Result<VerifyReport, StoreError> {
    let mut rep = VerifyReport::default();
    for st in [JobState::Finalized, JobState::SkippedDuplicate] {
        let mut after: Option<JobKey> = None;
        loop {
            let page = store.scan(Some(st), after.as_ref(), 1000)?;
            let Some(last) = page.last().map(|j| j.key) else {
                break;
            };
            for j in page {
                let Some(b) = &j.blob else { continue };
                rep.blobs_checked += 1;
                let path = out.root().join(&b.path);
                let problem = match files::hash_file(&path) {
                    Ok((sha, size)) if sha == b.sha256 && size == b.size => continue,
                    Ok((sha, size)) => format!(
                        "holds {size} bytes with sha256 {sha}, not the {} bytes with sha256 {} recorded",
                        b.size, b.sha256
                    ),
                    Err(e) => format!("cannot be read: {e}"),
                };
                let mut requeued = false;
                if repair {
                    if path.symlink_metadata().is_ok() {
                        files::quarantine(out, &path).map_err(|e| {
                            StoreError::Backend(format!("moving {} aside: {e}", path.display()))
                        })?;
                    }
                    let cmd = Command::Requeue {
                        reason: format!("blob_missing: {} {problem}", b.path),
                        seen: j.epoch,
                    };
                    match store.apply(&j.key, cmd, clock.now()) {
                        Ok(a) => {
                            sink.emit(&a.events);
                            requeued = true;
                        }
                        // Moved on meanwhile (another repair, a new fetch).
                        Err(StoreError::Refused { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                rep.bad.push(BadBlob {
                    job_key: j.key,
                    path: b.path.clone(),
                    problem,
                    requeued,
                });
            }
            after = Some(last);
        }
    }
    Ok(rep)
}
