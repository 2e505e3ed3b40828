//! The reconciler: repairs what a crash leaves behind, at the start of every
//! run and on demand (`idem reconcile`).
//!
//! 1. Expired leases are released (a `leased` job goes back to `planned`;
//!    later states keep their progress for the next holder).
//! 2. `started` ops whose epoch is no longer live are marked `abandoned`.
//! 3. Part files nobody can use are removed: those of missing or terminal
//!    jobs. A part locked by a live process is never touched. Parts of
//!    unfinished jobs are kept: the next holder resumes from them.
//! 4. A `streaming` job nobody holds, whose committed STREAM result is
//!    already published as a blob with the right digest, is healed to
//!    `finalized` (the crash hit between rename and commit).
//! 5. A finalized (or duplicate) job whose blob is missing is re-queued.
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
}

/// What the reconciler found (and, unless dry, repaired).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub dry_run: bool,
    pub expired_leases: u64,
    pub abandoned_ops: u64,
    pub parts_removed: u64,
    pub blobs_healed: u64,
    pub blobs_missing_requeued: u64,
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

    // 1. Expired leases, a page at a time (each repaired one leaves the set).
    if opts.dry_run {
        rep.expired_leases = store.status(now)?.expired_leases;
    } else {
        loop {
            let page = store.expired_leases(now, PAGE)?;
            if page.is_empty() {
                break;
            }
            let mut progressed = false;
            for job in page {
                match store.apply(&job.key, Command::Expire, now) {
                    Ok(a) => {
                        sink.emit(&a.events);
                        rep.expired_leases += 1;
                        progressed = true;
                    }
                    // Someone took it over meanwhile: nothing to repair.
                    Err(StoreError::Refused { .. }) => {}
                    Err(e) => return Err(e),
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
        for st in [
            JobState::Leased,
            JobState::HeadDone,
            JobState::Streaming,
            JobState::Planned,
        ] {
            scan_all(store, st, |j| {
                let live = j.lease.as_ref().filter(|l| l.is_live(now)).map(|l| l.epoch);
                rep.abandoned_ops += store
                    .ops(&j.key)?
                    .iter()
                    .filter(|o| o.status == OpStatus::Started && Some(o.key.epoch) != live)
                    .count() as u64;
                Ok(())
            })?;
        }
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
        // Never touch a part a live process holds (even a paused one).
        if let Ok(Some(_lock)) = files::open_locked(path, false) {
            rep.parts_removed += 1;
            if !opts.dry_run {
                files::remove_part(path);
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
    let mut heal: Vec<(JobKey, BlobInfo)> = Vec::new();
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
                heal.push((j.key, BlobInfo::new(si.sha256, si.size)));
            }
        }
        Ok(())
    })?;
    for (key, blob) in heal {
        rep.blobs_healed += 1;
        if !opts.dry_run {
            match store.apply(&key, Command::Heal { blob }, now) {
                Ok(a) => sink.emit(&a.events),
                Err(StoreError::Refused { .. }) => rep.blobs_healed -= 1,
                Err(e) => return Err(e),
            }
        }
    }

    // 5. Finished jobs whose blob is gone, repaired page by page.
    for st in [JobState::Finalized, JobState::SkippedDuplicate] {
        let mut after: Option<JobKey> = None;
        loop {
            let page = store.scan(Some(st), after.as_ref(), PAGE)?;
            let Some(last) = page.last().map(|j| j.key) else {
                break;
            };
            for j in page {
                let Some(b) = &j.blob else { continue };
                if out.root().join(&b.path).exists() {
                    continue;
                }
                rep.blobs_missing_requeued += 1;
                if !opts.dry_run {
                    let reason = format!(
                        "blob_missing: {} was not found under the output directory",
                        b.path
                    );
                    let a = store.apply(&j.key, Command::Requeue { reason }, now)?;
                    sink.emit(&a.events);
                }
            }
            after = Some(last);
        }
    }
    Ok(rep)
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
