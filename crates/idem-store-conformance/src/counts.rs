//! What each status count means, pinned for every store.

use crate::{head, lease, op, plan_n, t, w};
use idem_core::ports::{Step, Store};
use idem_core::{Command, Epoch, JobError, JobState, OpDecision, OpKind, OpResult};

/// Every [`idem_core::StatusCounts`] field, as its docs define it: op
/// starts count a failed op run again, not a replay; refused stale writes
/// are counted whichever call made them.
pub fn status_counts_mean_what_they_say(s: &dyn Store) {
    let keys = plan_n(s, 3, t(0));
    let got = lease(s, "w1", 2, 10, t(1));
    let (k0, e0) = got[0];
    let (k1, e1) = got[1];
    let head_op = op(k0, OpKind::Head, e0);
    assert_eq!(
        s.begin_op(&head_op, &w("w1"), t(2)).unwrap().value,
        OpDecision::Run
    );
    s.finish_op(
        &head_op,
        Err(JobError::retryable("reset", "connection reset")),
        None,
        t(2),
    )
    .unwrap();
    assert_eq!(s.status(t(2)).unwrap().ops_started, 1);
    // Run again under the same key: a second start of the same op.
    assert_eq!(
        s.begin_op(&head_op, &w("w1"), t(3)).unwrap().value,
        OpDecision::Run
    );
    s.finish_op(
        &head_op,
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: e0,
            head: head(),
        }),
        t(3),
    )
    .unwrap();
    assert!(matches!(
        s.begin_op(&head_op, &w("w1"), t(3)).unwrap().value,
        OpDecision::Replay { .. }
    ));
    // Begun and finished in one write: one start.
    let fused = op(k1, OpKind::Head, e1);
    s.run_steps(
        vec![
            Step::BeginOp {
                op: fused,
                owner: w("w1"),
            },
            Step::FinishOp {
                op: fused,
                outcome: Ok(OpResult::Head(head())),
                then: None,
            },
        ],
        t(3),
        idem_core::Commit::Deferred,
    )
    .unwrap();
    // Two stale writes, by two kinds of call.
    let stale = Epoch(e0.0 + 7);
    assert!(s
        .apply(
            &k0,
            Command::Renew {
                owner: w("w1"),
                epoch: stale,
                ttl_ms: 10_000
            },
            t(4)
        )
        .unwrap_err()
        .is_fenced());
    assert!(s
        .begin_op(&op(k0, OpKind::Stream, stale), &w("w1"), t(4))
        .unwrap_err()
        .is_fenced());
    s.apply(
        &k1,
        Command::Fail {
            epoch: e1,
            error: JobError::permanent("http_404", "gone"),
            retry_at: None,
        },
        t(4),
    )
    .unwrap();
    let st = s.status(t(5)).unwrap();
    assert_eq!(st.total, 3);
    assert_eq!(st.by_state[&JobState::HeadDone], 1);
    assert_eq!(st.by_state[&JobState::Failed], 1);
    assert_eq!(st.by_state[&JobState::Planned], 1);
    assert_eq!(st.unfinished(), 2);
    assert_eq!((st.live_leases, st.expired_leases), (1, 0));
    assert_eq!(st.due_now, 1);
    assert_eq!(st.oldest_due_age_ms, Some(5_000), "planned at t0");
    assert_eq!(st.suspects, 0);
    assert_eq!(
        st.failures_by_reason.into_iter().collect::<Vec<_>>(),
        vec![("http_404".to_owned(), 1)]
    );
    assert_eq!(st.ops_started, 3, "two starts of one op, one fused");
    assert_eq!(st.replays, 1);
    assert_eq!(st.fenced_writes, 2);
    let st = s.status(t(20)).unwrap();
    assert_eq!((st.live_leases, st.expired_leases), (0, 1));
    assert_eq!(st.due_now, 2, "an expired lease is due");
    assert_eq!(st.oldest_due_age_ms, Some(20_000));
    let _ = keys;
}
