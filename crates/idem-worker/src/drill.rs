//! The engine's ledger path with a null effect: the exact sequence of store
//! calls one job makes, without network or files. Used by `idem
//! ledger-drill` (the multi-process test) and `cargo xtask bench`, so both
//! measure what the engine really does.

use idem_core::ports::{Commit, LeaseRequest, Step, StepOutput, Store, StoreError};
use idem_core::{
    BlobInfo, Command, Digest32, HeadInfo, Job, OpKey, OpKind, OpResult, StreamInfo, Timestamp,
    WorkerId,
};

/// One worker's loop: lease `batch` jobs, run each with [`null_job`], and
/// take the next batch in the write that finishes the last one, as the
/// engine's workers do. Calls `done` per finished job; returns when nothing
/// is due.
pub fn run_worker<S: Store + ?Sized>(
    store: &S,
    owner: &WorkerId,
    batch: usize,
    now: impl Fn() -> Timestamp,
    mut done: impl FnMut(&Job),
) -> Result<(), StoreError> {
    let req = LeaseRequest {
        owner: owner.clone(),
        limit: batch.max(1),
        ttl_ms: 600_000,
        dead_owners: vec![],
        commit: Commit::Deferred,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let mut jobs = store.lease(&req, now())?.value;
    while !jobs.is_empty() {
        let last = jobs.len() - 1;
        let mut next = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            let then = (i == last).then(|| req.clone());
            next = null_job(store, owner, j, &now, then)?;
            done(j);
        }
        jobs = next;
    }
    Ok(())
}

/// Runs a leased job to `finalized` with the engine's two commits after the
/// lease for a small body: HEAD's and STREAM's records (each begun and
/// finished at once) + the moves to streaming + begin FINALIZE, deferred as
/// the engine's is; and FINALIZE's result, durable, with `next` leased in
/// the same write (returned).
pub fn null_job<S: Store + ?Sized>(
    store: &S,
    owner: &WorkerId,
    job: &Job,
    now: impl Fn() -> Timestamp,
    next: Option<LeaseRequest>,
) -> Result<Vec<Job>, StoreError> {
    let e = job.lease.as_ref().map(|l| l.epoch).unwrap_or_default();
    let op = |kind| OpKey {
        job: job.key,
        kind,
        epoch: e,
    };
    // What a typical origin answers, so the ledger holds what it would.
    let head = HeadInfo {
        status: 200,
        etag: Some(format!("\"{}\"", &job.key.to_string()[..16])),
        last_modified: Some("Tue, 15 Nov 2022 08:12:31 GMT".into()),
        content_length: Some(32),
        content_type: Some("application/pdf".into()),
        accept_ranges: true,
        sha256: None,
    };
    let blob = BlobInfo::new(Digest32::of(job.key.digest().as_bytes()), 32);
    let si = StreamInfo {
        sha256: blob.sha256,
        size: 32,
        resumed_from: 0,
    };
    let record = |kind, outcome, then| {
        [
            Step::BeginOp {
                op: op(kind),
                owner: owner.clone(),
            },
            Step::FinishOp {
                op: op(kind),
                outcome: Ok(outcome),
                then,
            },
        ]
    };
    let steps = record(
        OpKind::Head,
        OpResult::Head(head.clone()),
        Some(Command::HeadDone { epoch: e, head }),
    )
    .into_iter()
    .chain([Step::Apply {
        key: job.key,
        cmd: Command::StreamStarted { epoch: e },
    }])
    .chain(record(OpKind::Stream, OpResult::Stream(si), None))
    .chain([Step::BeginOp {
        op: op(OpKind::Finalize),
        owner: owner.clone(),
    }])
    .collect();
    store.run_steps(steps, now(), Commit::Deferred)?;
    let finish = Step::FinishOp {
        op: op(OpKind::Finalize),
        outcome: Ok(OpResult::Finalize(blob.clone())),
        then: Some(Command::Finalize { epoch: e, blob }),
    };
    let steps = std::iter::once(finish)
        .chain(next.map(Step::Lease))
        .collect();
    let a = store.run_steps(steps, now(), Commit::Durable)?;
    Ok(a.value
        .into_iter()
        .find_map(|o| match o {
            StepOutput::Leased(jobs) => Some(jobs),
            _ => None,
        })
        .unwrap_or_default())
}
