//! The engine's ledger path with a null effect: the exact sequence of store
//! calls one job makes, without network or files. Used by `idem
//! ledger-drill` (the multi-process test) and `cargo xtask bench`, so both
//! measure what the engine really does.

use idem_core::ports::{Commit, Step, Store, StoreError};
use idem_core::{
    BlobInfo, Command, Digest32, HeadInfo, Job, OpKey, OpKind, OpResult, StreamInfo, Timestamp,
    WorkerId,
};

/// Runs a leased job to `finalized` with the engine's two commits after the
/// lease for a small body: HEAD's and STREAM's records (each begun and
/// finished at once) + the moves to streaming + begin FINALIZE, deferred as
/// the engine's is; and FINALIZE's result, durable.
pub fn null_job<S: Store + ?Sized>(
    store: &S,
    owner: &WorkerId,
    job: &Job,
    now: impl Fn() -> Timestamp,
) -> Result<(), StoreError> {
    let e = job.lease.as_ref().map(|l| l.epoch).unwrap_or_default();
    let op = |kind| OpKey {
        job: job.key,
        kind,
        epoch: e,
    };
    let head = HeadInfo {
        status: 200,
        ..HeadInfo::default()
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
    store.finish_op(
        &op(OpKind::Finalize),
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize { epoch: e, blob }),
        now(),
    )?;
    Ok(())
}
