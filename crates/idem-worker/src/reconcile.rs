//! The reconciler: repairs what a crash leaves behind, at the start of every
//! run and on demand (`idem reconcile`).
//!
//! 1. Expired leases, and the leases of this host's processes that are gone
//!    (killed, crashed), are released (a `leased` job goes back to
//!    `planned`; later states keep their progress for the next holder).
//! 2. `started` ops whose epoch is no longer live are marked `abandoned`.
//! 3. Part files nobody can use are removed: those of missing or terminal
//!    jobs. A part locked by a live process is never touched. Parts of
//!    unfinished jobs are kept: the next holder resumes from them.
//! 4. A `streaming` job nobody holds, whose committed STREAM result is
//!    already published as a blob with the right digest, is healed to
//!    `finalized` (the crash hit between rename and commit).
//! 5. When asked ([`BlobCheck`]), a finalized (or duplicate) job whose
//!    blob is missing, or is not a regular file of the recorded size, is
//!    re-queued. This walks the ledger, so a worker's start leaves it out:
//!    `idem reconcile --blobs` checks every finished job, and a following
//!    run checks a slice at each periodic pass.
//!
//! Steps 1 to 4 find their jobs through indexes (expired leases, started
//! ops, unfinished states), so they cost what there is to repair.
//!
//! Several reconcilers (and workers) may run at once on one ledger. Each
//! repair is decided again by the store, on the job as it is, in the
//! transaction that applies it; a repair another process made first is
//! refused there and skipped here, neither an error nor counted, so the
//! counts summed over every reconciler equal the repairs made.
//!
//! It is synchronous (it only touches the store and local files), so the
//! CLI can run it without the engine's runtime.

use crate::files::{self, OutDir};
use crate::EventSink;
use idem_core::ports::{Store, StoreError};
use idem_core::{BlobInfo, Clock, Command, EventKind, JobKey, JobState, OpResult, OpStatus};
use serde::Serialize;

#[derive(Clone, Debug, Default)]
pub struct ReconcileOptions {
    /// Report what would be repaired; change nothing.
    pub dry_run: bool,
    /// Which finished jobs' blobs to look for on disk.
    pub blobs: BlobCheck,
}

/// The finished jobs whose blobs step 5 looks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BlobCheck {
    /// None: the start of every run.
    #[default]
    Skip,
    /// Every finished job's.
    All,
    /// Those among the next `jobs` jobs (of any state) in key order after
    /// `after`; the report says where the next slice starts.
    Slice { after: Option<JobKey>, jobs: usize },
}

/// What the reconciler found (and, unless dry, repaired).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub dry_run: bool,
    /// Leases released: expired ones, and those of dead local processes.
    pub expired_leases: u64,
    pub abandoned_ops: u64,
    pub parts_removed: u64,
    pub blobs_healed: u64,
    pub blobs_missing_requeued: u64,
    /// Finished jobs whose blob was looked for.
    pub blobs_checked: u64,
    /// Where the next [`BlobCheck::Slice`] starts (`None`: from the first
    /// job again).
    #[serde(skip)]
    pub blob_check_next: Option<JobKey>,
}

impl ReconcileReport {
    pub fn total(&self) -> u64 {
        self.expired_leases
            + self.abandoned_ops
            + self.parts_removed
            + self.blobs_healed
            + self.blobs_missing_requeued
    }
}

const PAGE: usize = 1000;

fn scan_all<S: Store + ?Sized>(
    store: &S,
    state: JobState,
    mut f: impl FnMut(idem_core::Job) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut after: Option<JobKey> = None;
    loop {
        let page = store.scan(Some(state), after.as_ref(), PAGE)?;
        let Some(last) = page.last().map(|j| j.key) else {
            return Ok(());
        };
        for j in page {
            f(j)?;
        }
        after = Some(last);
    }
}

/// Runs the reconciler once.
pub fn reconcile<S: Store + ?Sized>(
    store: &S,
    out: &OutDir,
    sink: &dyn EventSink,
    clock: &dyn Clock,
    opts: &ReconcileOptions,
) -> Result<ReconcileReport, StoreError> {
    let mut rep = ReconcileReport {
        dry_run: opts.dry_run,
        ..ReconcileReport::default()
    };
    let now = clock.now();

    // 1. Leases of dead local processes, then expired leases, a page at a
    // time (each repaired one leaves the set).
    let dead = dead_local_owners(store, now)?;
    if !dead.is_empty() {
        for st in [JobState::Leased, JobState::HeadDone, JobState::Streaming] {
            let mut held = Vec::new();
            scan_all(store, st, |j| {
                if let Some(l) = j.lease.as_ref().filter(|l| l.is_live(now)) {
                    if dead.contains(&l.owner) {
                        held.push((j.key, l.owner.clone(), l.epoch));
                    }
                }
                Ok(())
            })?;
            for (key, owner, epoch) in held {
                if opts.dry_run {
                    rep.expired_leases += 1;
                    continue;
                }
                let cmd = Command::ExpireDead { owner, epoch };
                if let Some(a) = lost_race_is_none(store.apply(&key, cmd, now))? {
                    sink.emit(&a.events);
                    rep.expired_leases += 1;
                }
            }
        }
    }
    if opts.dry_run {
        rep.expired_leases += store.status(now)?.expired_leases;
    } else {
        loop {
            let page = store.expired_leases(now, PAGE)?;
            if page.is_empty() {
                break;
            }
            let mut progressed = false;
            for job in page {
                // Someone took it over or released it meanwhile: nothing to
                // repair.
                if let Some(a) = lost_race_is_none(store.apply(&job.key, Command::Expire, now))? {
                    sink.emit(&a.events);
                    rep.expired_leases += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
    }
    if rep.expired_leases > 0 {
        sink.emit(&[EventKind::CrashRecovery {
            kind: "lease_expired".into(),
            job_key: None,
            count: rep.expired_leases,
        }
        .at(now)]);
    }

    // 2. Ops of dead epochs.
    if opts.dry_run {
        rep.abandoned_ops = store.status(now)?.dead_ops;
    } else {
        let a = store.abandon_dead_ops(now)?;
        sink.emit(&a.events);
        rep.abandoned_ops = a.value;
    }

    // 3. Part files nobody can use.
    let parts = out
        .parts()
        .map_err(|e| StoreError::Backend(format!("listing {}: {e}", out.tmp_dir().display())))?;
    for (path, name) in &parts {
        let job = JobKey::parse_hex(&name.job)
            .ok()
            .map(|k| store.job(&k))
            .transpose()?
            .flatten();
        // Parts of unfinished jobs are kept: their next holder resumes from
        // the best one and removes the rest.
        let useless = job.as_ref().is_none_or(|j| j.state.is_terminal());
        if !useless {
            continue;
        }
        // Never touch a part a live process holds (even a paused one). Of
        // several reconcilers, the one whose removal succeeds counts it.
        if let Ok(Some(_lock)) = files::open_locked(path, false) {
            if opts.dry_run {
                rep.parts_removed += 1;
            } else if std::fs::remove_file(path).is_ok() {
                files::remove_part(path);
                rep.parts_removed += 1;
            }
        }
    }
    if !opts.dry_run {
        for sc in out.orphan_sidecars().unwrap_or_default() {
            let _ = std::fs::remove_file(sc);
        }
    }
    if rep.parts_removed > 0 {
        sink.emit(&[EventKind::CrashRecovery {
            kind: "part_removed".into(),
            job_key: None,
            count: rep.parts_removed,
        }
        .at(now)]);
    }

    // 4. Published but not committed.
    let mut heal: Vec<(JobKey, BlobInfo, idem_core::Epoch)> = Vec::new();
    scan_all(store, JobState::Streaming, |j| {
        if j.lease.as_ref().is_some_and(|l| l.is_live(now)) {
            return Ok(());
        }
        let ops = store.ops(&j.key)?;
        let si = ops.iter().rev().find_map(|o| match (&o.status, &o.result) {
            (OpStatus::Committed, Some(OpResult::Stream(si))) => Some(si.clone()),
            _ => None,
        });
        if let Some(si) = si {
            let p = out.blob_path(&si.sha256);
            if files::hash_file(&p).is_ok_and(|(sha, size)| sha == si.sha256 && size == si.size) {
                heal.push((j.key, BlobInfo::new(si.sha256, si.size), j.epoch));
            }
        }
        Ok(())
    })?;
    // Twins (one body under two jobs) published in one batch: the one
    // whose part is the blob stored it (else the first healed), the others
    // are its duplicates, as their holders would have recorded.
    let mut healed = std::collections::HashSet::new();
    for (key, blob, seen) in heal {
        if opts.dry_run {
            rep.blobs_healed += 1;
            continue;
        }
        // Published with its durability batched, then the crash: the blob
        // may be in the page cache only.
        if let Err(e) = files::sync_blob(out, &blob.sha256) {
            tracing::warn!(job = %key, error = %e, "could not make a published blob durable; left for the next holder");
            continue;
        }
        if let Some(a) = lost_race_is_none(heal_with_op(
            store,
            key,
            blob.clone(),
            seen,
            !healed.insert(blob.sha256) || !files::published_by(out, &key, seen.0, &blob.sha256),
            now,
        ))? {
            sink.emit(&a.events);
            sink.emit(&[EventKind::CrashRecovery {
                kind: "blob_healed".into(),
                job_key: Some(key),
                count: 1,
            }
            .at(now)]);
            rep.blobs_healed += 1;
            // A crash before its publisher dropped the part's name leaves
            // the part, now of a finished job (step 3 ran before the heal).
            for part in out.parts_of(&key, seen.0) {
                if let Ok(Some(_lock)) = files::open_locked(&part, false) {
                    files::remove_part(&part);
                }
            }
        }
    }

    // 5. Finished jobs whose blob is gone, repaired page by page.
    let (mut after, mut left) = match &opts.blobs {
        BlobCheck::Skip => return Ok(rep),
        BlobCheck::All => (None, usize::MAX),
        BlobCheck::Slice { after, jobs } => (*after, *jobs),
    };
    while left > 0 {
        let page = store.scan(None, after.as_ref(), PAGE.min(left))?;
        let Some(last) = page.last().map(|j| j.key) else {
            after = None;
            break;
        };
        left = left.saturating_sub(page.len());
        for j in page {
            check_blob(store, out, &j, now, opts.dry_run, sink, &mut rep)?;
        }
        after = Some(last);
    }
    rep.blob_check_next = after;
    Ok(rep)
}

/// Step 5 for one job: re-queues a finished job whose blob is not a
/// regular file of its recorded size.
fn check_blob<S: Store + ?Sized>(
    store: &S,
    out: &OutDir,
    j: &idem_core::Job,
    now: idem_core::Timestamp,
    dry_run: bool,
    sink: &dyn EventSink,
    rep: &mut ReconcileReport,
) -> Result<(), StoreError> {
    if !matches!(j.state, JobState::Finalized | JobState::SkippedDuplicate) {
        return Ok(());
    }
    let Some(b) = &j.blob else { return Ok(()) };
    rep.blobs_checked += 1;
    // The size, not the digest: reading every blob is `idem verify`'s.
    let found = std::fs::symlink_metadata(out.root().join(&b.path));
    let reason = match found {
        Ok(m) if m.is_file() && m.len() == b.size => return Ok(()),
        Ok(m) if m.is_file() => format!(
            "blob_missing: {} holds {} bytes, not the {} recorded",
            b.path,
            m.len(),
            b.size
        ),
        Ok(_) => format!("blob_missing: {} is not a regular file", b.path),
        Err(_) => format!(
            "blob_missing: {} was not found under the output directory",
            b.path
        ),
    };
    if dry_run {
        rep.blobs_missing_requeued += 1;
        return Ok(());
    }
    let cmd = Command::Requeue {
        reason,
        seen: j.epoch,
    };
    if let Some(a) = lost_race_is_none(store.apply(&j.key, cmd, now))? {
        sink.emit(&a.events);
        rep.blobs_missing_requeued += 1;
    }
    Ok(())
}

/// Commits the FINALIZE of a job whose blob was published (and checked)
/// but whose commit was lost, as its holder would have (as a duplicate
/// when another job's heal stored that blob): the reconciler
/// takes the lease (the epoch after `seen`), and records FINALIZE begun and
/// committed, in one durable write. Refused, as a lost race, if the job
/// moved on since it was read.
fn heal_with_op<S: Store + ?Sized>(
    store: &S,
    key: JobKey,
    blob: BlobInfo,
    seen: idem_core::Epoch,
    duplicate: bool,
    now: idem_core::Timestamp,
) -> Result<idem_core::Applied<Vec<idem_core::ports::StepOutput>>, StoreError> {
    use idem_core::ports::Step;
    use idem_core::{OpKey, OpKind};
    let owner = crate::owner::this_worker();
    let op = OpKey {
        job: key,
        kind: OpKind::Finalize,
        epoch: idem_core::Epoch(seen.0 + 1),
    };
    let steps = vec![
        Step::Apply {
            key,
            // Isolated: a suspect is healed too (nothing runs here that
            // could die).
            cmd: Command::Acquire {
                owner: owner.clone(),
                ttl_ms: 60_000,
                isolated: true,
            },
        },
        Step::BeginOp { op, owner },
        Step::FinishOp {
            op,
            outcome: Ok(OpResult::Finalize(blob.clone())),
            then: Some(if duplicate {
                Command::Duplicate {
                    epoch: op.epoch,
                    blob,
                    of: None,
                }
            } else {
                Command::Finalize {
                    epoch: op.epoch,
                    blob,
                }
            }),
        },
    ];
    store.run_steps(steps, now, idem_core::Commit::Durable)
}

/// A repair refused because the job is no longer as it was read (another
/// process repaired it, or a worker moved it on): `None`, an outcome.
fn lost_race_is_none<T>(r: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::Refused { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Owners of live leases that are processes of this host no longer running.
fn dead_local_owners<S: Store + ?Sized>(
    store: &S,
    now: idem_core::Timestamp,
) -> Result<Vec<idem_core::WorkerId>, StoreError> {
    let host = crate::owner::hostname();
    let me = crate::owner::this_worker();
    Ok(store
        .lease_owners(now)?
        .into_iter()
        .filter(|o| *o != me && crate::owner::is_dead_local(o, &host))
        .collect())
}

impl<S: Store + 'static, H: idem_core::Http> crate::Engine<S, H> {
    /// Runs the reconciler on a blocking thread.
    pub async fn reconcile(&self, opts: &ReconcileOptions) -> Result<ReconcileReport, StoreError> {
        let store = std::sync::Arc::clone(&self.store);
        let out = self.out.clone();
        let sink = std::sync::Arc::clone(&self.sink);
        let clock = std::sync::Arc::clone(&self.clock);
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || reconcile(&*store, &out, &*sink, &*clock, &opts))
            .await
            .map_err(|e| StoreError::Backend(format!("reconciler task failed: {e}")))?
    }
}
