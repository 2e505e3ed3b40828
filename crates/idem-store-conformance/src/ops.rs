//! The op ledger: what is replayed, run again, committed once, abandoned.

use super::*;

pub fn started_op_is_not_replayed_as_success(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e1) = lease(s, "w1", 1, 10, t(0))[0];
    let o1 = op(k, OpKind::Head, e1);
    assert_eq!(
        s.begin_op(&o1, &w("w1"), t(1)).unwrap().value,
        OpDecision::Run
    );
    // Crash between claim and commit; the same holder asks again: run it.
    assert_eq!(
        s.begin_op(&o1, &w("w1"), t(2)).unwrap().value,
        OpDecision::Run
    );
    // Another holder after expiry: a new op, run.
    let (_, e2) = lease(s, "w2", 1, 10, t(20))[0];
    let o2 = op(k, OpKind::Head, e2);
    assert_eq!(
        s.begin_op(&o2, &w("w2"), t(21)).unwrap().value,
        OpDecision::Run
    );
    let ops = s.ops(&k).unwrap();
    assert_eq!(ops.len(), 2);
    assert!(
        ops.iter().all(|o| o.result.is_none()),
        "nothing recorded as a result"
    );
    assert_eq!(ops[0].runs, 2);
    assert_eq!(
        ops[0].status,
        OpStatus::Abandoned,
        "the takeover abandoned the dead epoch's op"
    );
}

pub fn failed_op_is_run_again_not_replayed(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let o = op(k, OpKind::Head, e);
    s.begin_op(&o, &w("w1"), t(1)).unwrap();
    s.finish_op(
        &o,
        Err(JobError::retryable("timeout", "read timed out")),
        None,
        t(2),
    )
    .unwrap();
    let rec = &s.ops(&k).unwrap()[0];
    assert_eq!(rec.status, OpStatus::Failed);
    assert_eq!(rec.error.as_deref(), Some("timeout: read timed out"));
    for i in 0..3 {
        assert_eq!(
            s.begin_op(&o, &w("w1"), t(3 + i)).unwrap().value,
            OpDecision::Run
        );
        s.finish_op(
            &o,
            Err(JobError::retryable("timeout", "again")),
            None,
            t(3 + i),
        )
        .unwrap();
    }
    s.begin_op(&o, &w("w1"), t(10)).unwrap();
    s.finish_op(&o, Ok(OpResult::Head(head())), None, t(10))
        .unwrap();
    assert!(matches!(
        s.begin_op(&o, &w("w1"), t(11)).unwrap().value,
        OpDecision::Replay { .. }
    ));
}

pub fn committed_op_replays_its_exact_result(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let o = op(k, OpKind::Head, e);
    s.begin_op(&o, &w("w1"), t(1)).unwrap();
    s.finish_op(&o, Ok(OpResult::Head(head())), None, t(2))
        .unwrap();
    let r = s.begin_op(&o, &w("w1"), t(3)).unwrap();
    assert_eq!(
        r.value,
        OpDecision::Replay {
            result: OpResult::Head(head()),
            recorded_at: t(2)
        }
    );
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.events[0].kind.name(), "idempotency_replay");
    let st = s.status(t(3)).unwrap();
    assert_eq!(
        (st.replays, st.ops_started),
        (1, 1),
        "replays and runs are counted"
    );
}

pub fn results_round_trip_exactly_whatever_their_size(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let o = op(k, OpKind::Head, e);
    let big = HeadInfo {
        etag: Some(format!("\"{}\"", "é\u{1F600}\"\\x".repeat(100_000))),
        content_type: Some("application/pdf; name=\"ünïcödé\"".into()),
        content_length: Some(u64::MAX / 2),
        ..head()
    };
    s.begin_op(&o, &w("w1"), t(1)).unwrap();
    s.finish_op(
        &o,
        Ok(OpResult::Head(big.clone())),
        Some(Command::HeadDone {
            epoch: e,
            head: big.clone(),
        }),
        t(2),
    )
    .unwrap();
    let OpDecision::Replay { result, .. } = s.begin_op(&o, &w("w1"), t(3)).unwrap().value else {
        panic!("expected a replay")
    };
    assert_eq!(
        result,
        OpResult::Head(big.clone()),
        "no truncation, no mangling"
    );
    assert_eq!(s.job(&k).unwrap().unwrap().head, Some(big));
}

pub fn renew_works_in_every_live_state(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 10, t(0))[0];
    let renew = |now| {
        s.apply(
            &k,
            Command::Renew {
                owner: w("w1"),
                epoch: e,
                ttl_ms: 10_000,
            },
            now,
        )
        .map(|a| a.value.lease.unwrap().expires_at)
    };
    assert_eq!(renew(t(5)).unwrap(), t(15));
    do_head(s, k, e, "w1", t(6));
    assert_eq!(renew(t(12)).unwrap(), t(22), "in head_done");
    s.apply(&k, Command::StreamStarted { epoch: e }, t(13))
        .unwrap();
    for now in [20, 28, 36, 44] {
        assert_eq!(renew(t(now)).unwrap(), t(now + 10), "in streaming");
    }
    assert!(
        lease(s, "w2", 1, 60, t(50)).is_empty(),
        "renewed lease still held"
    );
}

pub fn retry_backoff_is_respected(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let mut err = JobError::retryable("http_503", "Service Unavailable");
    err.retry_after_ms = Some(30_000);
    let job = s
        .apply(
            &k,
            Command::Fail {
                epoch: e,
                error: err,
                retry_at: Some(t(31)),
            },
            t(1),
        )
        .unwrap()
        .value;
    assert_eq!(job.state, JobState::Planned);
    assert_eq!(
        job.last_error.as_deref(),
        Some("http_503: Service Unavailable")
    );
    assert!(lease(s, "w2", 1, 60, t(30)).is_empty(), "still backing off");
    assert_eq!(lease(s, "w2", 1, 60, t(31)), vec![(k, Epoch(2))]);
}

pub fn op_outcome_and_transition_are_atomic(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let o = op(k, OpKind::Finalize, e);
    s.begin_op(&o, &w("w1"), t(1)).unwrap();
    let blob = BlobInfo::new(Digest32::of(b"x"), 1);
    // Finalize from `leased` is illegal: the op must not be committed either.
    let r = s.finish_op(
        &o,
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize { epoch: e, blob }),
        t(2),
    );
    assert!(r.is_err());
    assert_eq!(s.ops(&k).unwrap()[0].status, OpStatus::Started);
    assert_eq!(state(s, k), JobState::Leased);
}

pub fn op_is_committed_at_most_once(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let o = op(k, OpKind::Head, e);
    assert!(
        s.finish_op(&o, Ok(OpResult::Head(head())), None, t(1))
            .is_err(),
        "never begun"
    );
    s.begin_op(&o, &w("w1"), t(1)).unwrap();
    s.finish_op(&o, Ok(OpResult::Head(head())), None, t(2))
        .unwrap();
    let other = HeadInfo {
        status: 299,
        ..head()
    };
    assert!(
        s.finish_op(&o, Ok(OpResult::Head(other)), None, t(3))
            .is_err(),
        "second commit refused"
    );
    let OpDecision::Replay { result, .. } = s.begin_op(&o, &w("w1"), t(4)).unwrap().value else {
        panic!("expected replay")
    };
    assert_eq!(result, OpResult::Head(head()), "first result kept");
}

pub fn dead_ops_are_abandoned(s: &dyn Store) {
    let keys = plan_n(s, 2, t(0));
    let got = lease(s, "w1", 2, 10, t(0));
    for (k, e) in &got {
        s.begin_op(&op(*k, OpKind::Head, *e), &w("w1"), t(1))
            .unwrap();
    }
    assert_eq!(
        s.abandon_dead_ops(t(5)).unwrap().value,
        0,
        "live epochs keep their ops"
    );
    // keys[0]'s lease is renewed, keys[1]'s expires.
    let e0 = got.iter().find(|(k, _)| *k == keys[0]).unwrap().1;
    s.apply(
        &keys[0],
        Command::Renew {
            owner: w("w1"),
            epoch: e0,
            ttl_ms: 60_000,
        },
        t(9),
    )
    .unwrap();
    let r = s.abandon_dead_ops(t(11)).unwrap();
    assert_eq!(r.value, 1);
    assert_eq!(r.events[0].kind.name(), "crash_recovery_event");
    assert_eq!(s.ops(&keys[1]).unwrap()[0].status, OpStatus::Abandoned);
    assert_eq!(s.ops(&keys[0]).unwrap()[0].status, OpStatus::Started);
    assert_eq!(s.abandon_dead_ops(t(12)).unwrap().value, 0, "idempotent");
}

/// Work reused instead of done again is reported and counted: a re-plan
/// (reported, not counted), a new holder keeping HEAD's facts, and a reuse
/// the live holder records. A stale holder cannot record one.
pub fn reuse_is_reported_and_counted(s: &dyn Store) {
    use idem_core::{EventKind, ReplayOp, ReplayReason, Step};
    let replays = |events: &[idem_core::Event]| -> Vec<(ReplayOp, ReplayReason)> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::IdempotencyReplay { op, reason, .. } => Some((*op, *reason)),
                _ => None,
            })
            .collect()
    };
    let k = plan_n(s, 1, t(0))[0];
    let again = s.plan(&[spec(0)], 3, t(1)).unwrap();
    assert_eq!(
        replays(&again.events),
        [(ReplayOp::Plan, ReplayReason::Replan)]
    );
    assert_eq!(s.status(t(1)).unwrap().replays, 0, "re-plans are not work");

    let (_, e1) = lease(s, "w1", 1, 10, t(1))[0];
    do_head(s, k, e1, "w1", t(2));
    let req = LeaseRequest {
        owner: w("w2"),
        limit: 1,
        ttl_ms: 60_000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let taken = s.lease(&req, t(20)).unwrap();
    assert_eq!(
        replays(&taken.events),
        [(ReplayOp::Head, ReplayReason::Takeover)],
        "the new holder keeps HEAD's facts"
    );
    let e2 = taken.value[0].lease.as_ref().unwrap().epoch;
    assert_eq!(s.status(t(20)).unwrap().replays, 1);

    let reused = |e| {
        vec![Step::Reused {
            op: op(k, OpKind::Stream, e),
            reason: ReplayReason::Takeover,
        }]
    };
    let stale = s.run_steps(reused(e1), t(21), idem_core::Commit::Durable);
    assert!(
        matches!(stale, Err(idem_core::StoreError::Refused { .. })),
        "a stale holder records no reuse: {stale:?}"
    );
    let a = s
        .run_steps(reused(e2), t(21), idem_core::Commit::Durable)
        .unwrap();
    assert_eq!(
        replays(&a.events),
        [(ReplayOp::Stream, ReplayReason::Takeover)]
    );
    assert_eq!(s.status(t(21)).unwrap().replays, 2);
}

/// Prune drops the op rows of jobs finished before the cutoff and nothing
/// else: unfinished jobs keep theirs (a takeover reuses them), recent
/// finishes keep theirs, every job keeps its row and result, the counts
/// status reports do not move, and re-planning stays a no-op.
pub fn prune_drops_only_old_finished_jobs_ops(s: &dyn Store) {
    let keys = plan_n(s, 4, t(0));
    let held = lease(s, "w1", 4, 600, t(1));
    assert_eq!(held.len(), 4);
    let epoch = |k: JobKey| held.iter().find(|h| h.0 == k).expect("held").1;
    // 0 finishes early, 1 finishes late, 2 fails early, 3 is unfinished.
    do_head(s, keys[0], epoch(keys[0]), "w1", t(2));
    let blob = do_finish(s, keys[0], epoch(keys[0]), "w1", t(2));
    do_head(s, keys[1], epoch(keys[1]), "w1", t(2));
    do_finish(s, keys[1], epoch(keys[1]), "w1", t(500));
    let fail = op(keys[2], OpKind::Head, epoch(keys[2]));
    s.begin_op(&fail, &w("w1"), t(3)).unwrap();
    s.finish_op(
        &fail,
        Err(JobError::permanent("http_404", "not found")),
        Some(Command::Fail {
            epoch: epoch(keys[2]),
            error: JobError::permanent("http_404", "not found"),
            retry_at: None,
        }),
        t(3),
    )
    .unwrap();
    do_head(s, keys[3], epoch(keys[3]), "w1", t(4));
    assert_eq!(state(s, keys[2]), JobState::Failed);
    let counts = s.status(t(600)).unwrap();
    let ops_of = |k: JobKey| s.ops(&k).unwrap().len();
    let before: Vec<usize> = keys.iter().map(|k| ops_of(*k)).collect();
    assert_eq!(before, [3, 3, 1, 1]);

    // Finished at least 300 s before t(600): jobs 0 and 2.
    let deleted = s.prune(300_000, t(600)).unwrap();
    assert_eq!(deleted, 4);
    let after: Vec<usize> = keys.iter().map(|k| ops_of(*k)).collect();
    assert_eq!(after, [0, 3, 0, 1], "only old finished jobs lose their ops");
    let j = s.job(&keys[0]).unwrap().expect("the job row stays");
    assert_eq!(j.state, JobState::Finalized);
    assert_eq!(j.blob, Some(blob));
    assert_eq!(j.head, Some(head()));
    assert_eq!(state(s, keys[2]), JobState::Failed);
    assert_eq!(s.status(t(600)).unwrap(), counts, "status counts are kept");
    assert_eq!(
        s.prune(300_000, t(600)).unwrap(),
        0,
        "a second prune finds nothing"
    );

    // Re-planning a pruned job is still a no-op; the unfinished job goes on
    // with its HEAD kept.
    let again = s.plan(&[spec(0), spec(2)], 3, t(601)).unwrap().value;
    assert!(
        again
            .iter()
            .all(|o| matches!(o, PlanOutcome::Existing { .. })),
        "{again:?}"
    );
    do_finish(s, keys[3], epoch(keys[3]), "w1", t(602));
    assert_eq!(state(s, keys[3]), JobState::Finalized);

    // 0 s: every finished job.
    assert_eq!(s.prune(0, t(700)).unwrap(), 6);
    assert!(keys.iter().all(|k| ops_of(*k) == 0));
}
