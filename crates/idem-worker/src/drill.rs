//! The engine's ledger path with a null effect: the exact sequence of store
//! calls one job makes, without network or files. Used by `idem
//! ledger-drill` (the multi-process test) and `cargo xtask bench`, so both
//! measure what the engine really does.

use idem_core::ports::{Commit, Step, Store, StoreError};
use idem_core::{
    BlobInfo, Command, Digest32, HeadInfo, Job, OpKey, OpKind, OpResult, StreamInfo, Timestamp,
    WorkerId,
};

/// Runs a leased job to `finalized` with the engine's three commits after
/// the lease: HEAD's record (begun and finished at once) + stream start +
/// begin STREAM; STREAM's result + begin FINALIZE (these two deferred, as the
/// engine's are); and FINALIZE's result, durable.
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
    store.run_steps(
        vec![
            Step::BeginOp {
                op: op(OpKind::Head),
                owner: owner.clone(),
            },
            Step::FinishOp {
                op: op(OpKind::Head),
                outcome: Ok(OpResult::Head(head.clone())),
                then: Some(Command::HeadDone { epoch: e, head }),
            },
            Step::Apply {
                key: job.key,
                cmd: Command::StreamStarted { epoch: e },
            },
            Step::BeginOp {
                op: op(OpKind::Stream),
                owner: owner.clone(),
            },
        ],
        now(),
        Commit::Deferred,
    )?;
    let blob = BlobInfo::new(Digest32::of(job.key.digest().as_bytes()), 32);
    let si = StreamInfo {
        sha256: blob.sha256,
        size: 32,
        resumed_from: 0,
    };
    store.run_steps(
        vec![
            Step::FinishOp {
                op: op(OpKind::Stream),
                outcome: Ok(OpResult::Stream(si)),
                then: None,
            },
            Step::BeginOp {
                op: op(OpKind::Finalize),
                owner: owner.clone(),
            },
        ],
        now(),
        Commit::Deferred,
    )?;
    store.finish_op(
        &op(OpKind::Finalize),
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize { epoch: e, blob }),
        now(),
    )?;
    Ok(())
}
