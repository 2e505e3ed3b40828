//! Counts, pages and lookups; steps that are all or nothing; operator retries.

use super::*;

pub fn status_counts_are_exact(s: &dyn Store) {
    let keys = plan_n(s, 5, t(0));
    let got = lease(s, "w1", 2, 10, t(1));
    let (k0, e0) = got[0];
    do_head(s, k0, e0, "w1", t(2));
    do_finish(s, k0, e0, "w1", t(3));
    let (k1, e1) = got[1];
    s.apply(
        &k1,
        Command::Fail {
            epoch: e1,
            error: JobError::permanent("http_404", "gone"),
            retry_at: None,
        },
        t(3),
    )
    .unwrap();
    let third = lease(s, "w1", 1, 10, t(4));
    let st = s.status(t(5)).unwrap();
    assert_eq!(st.total, 5);
    assert_eq!(st.by_state[&JobState::Finalized], 1);
    assert_eq!(st.by_state[&JobState::Failed], 1);
    assert_eq!(st.by_state[&JobState::Leased], 1);
    assert_eq!(st.by_state[&JobState::Planned], 2);
    assert_eq!(st.by_state.len(), 7, "every state listed, zeros included");
    assert_eq!(st.live_leases, 1);
    assert_eq!(st.due_now, 2);
    assert_eq!(st.oldest_due_age_ms, Some(5_000));
    assert_eq!(st.failures_by_reason.get("http_404"), Some(&1));
    let st = s.status(t(20)).unwrap();
    assert_eq!((st.live_leases, st.expired_leases), (0, 1));
    assert_eq!(st.due_now, 3, "an expired lease is due");
    let _ = (keys, third);
}

pub fn scan_pages_through_every_job(s: &dyn Store) {
    let mut keys = plan_n(s, 25, t(0));
    keys.sort();
    let mut seen = Vec::new();
    let mut after: Option<JobKey> = None;
    loop {
        let page = s.scan(None, after.as_ref(), 7).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|j| j.key);
        seen.extend(page.into_iter().map(|j| j.key));
    }
    assert_eq!(seen, keys);
    assert_eq!(s.scan(Some(JobState::Failed), None, 100).unwrap().len(), 0);
    assert_eq!(
        s.scan(Some(JobState::Planned), None, 100).unwrap().len(),
        25
    );
}

pub fn finalized_by_url_finds_only_finalized(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let url = s.job(&k).unwrap().unwrap().spec.url.to_string();
    assert!(s.finalized_by_url(&url).unwrap().is_none());
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    do_head(s, k, e, "w1", t(1));
    assert!(s.finalized_by_url(&url).unwrap().is_none());
    let blob = do_finish(s, k, e, "w1", t(2));
    let found = s
        .finalized_by_url(&url)
        .unwrap()
        .expect("finalized job found");
    assert_eq!(found.key, k);
    assert_eq!(found.blob, Some(blob));
}

pub fn expired_leases_are_listed(s: &dyn Store) {
    plan_n(s, 3, t(0));
    lease(s, "w1", 2, 10, t(0));
    assert!(s.expired_leases(t(5), 10).unwrap().is_empty());
    let exp = s.expired_leases(t(10), 10).unwrap();
    assert_eq!(exp.len(), 2);
    let k = exp[0].key;
    let r = s.apply(&k, Command::Expire, t(10)).unwrap();
    assert_eq!(
        r.value.state,
        JobState::Planned,
        "an expired `leased` job is planned again"
    );
    assert_eq!(s.expired_leases(t(10), 10).unwrap().len(), 1);
}

pub fn live_lease_owners_are_listed(s: &dyn Store) {
    plan_n(s, 4, t(0));
    lease(s, "b", 2, 10, t(0));
    lease(s, "a", 1, 30, t(0));
    assert_eq!(s.lease_owners(t(1)).unwrap(), vec![w("a"), w("b")]);
    assert_eq!(
        s.lease_owners(t(15)).unwrap(),
        vec![w("a")],
        "expired leases are not live"
    );
}

pub fn steps_are_all_or_nothing(s: &dyn Store) {
    use idem_core::{Step, StepOutput};
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let head_op = op(k, OpKind::Head, e);
    s.begin_op(&head_op, &w("w1"), t(1)).unwrap();
    let stream_op = op(k, OpKind::Stream, e);
    // HEAD's result, the move to streaming and STREAM's start: one commit.
    let r = s
        .run_steps(
            vec![
                Step::FinishOp {
                    op: head_op,
                    outcome: Ok(OpResult::Head(head())),
                    then: Some(Command::HeadDone {
                        epoch: e,
                        head: head(),
                    }),
                },
                Step::Apply {
                    key: k,
                    cmd: Command::StreamStarted { epoch: e },
                },
                Step::BeginOp {
                    op: stream_op,
                    owner: w("w1"),
                },
            ],
            t(2),
            // Deferred or durable, a commit is visible at once.
            idem_core::Commit::Deferred,
        )
        .unwrap();
    assert_eq!(r.value.len(), 3);
    assert!(matches!(&r.value[1], StepOutput::Job(j) if j.state == JobState::Streaming));
    assert_eq!(r.value[2], StepOutput::Decision(OpDecision::Run));
    let before = s.job(&k).unwrap();
    let ops_before = s.ops(&k).unwrap();
    // A batch whose last step fails changes nothing at all.
    let blob = BlobInfo::new(Digest32::of(b"z"), 1);
    let bad = s.run_steps(
        vec![
            Step::FinishOp {
                op: stream_op,
                outcome: Ok(OpResult::Stream(StreamInfo {
                    sha256: blob.sha256,
                    size: 1,
                    resumed_from: 0,
                })),
                then: None,
            },
            Step::BeginOp {
                op: op(k, OpKind::Finalize, Epoch(e.0 + 7)),
                owner: w("w1"),
            },
        ],
        t(3),
        idem_core::Commit::Durable,
    );
    assert!(bad.unwrap_err().is_fenced());
    assert_eq!(s.job(&k).unwrap(), before);
    assert_eq!(
        s.ops(&k).unwrap(),
        ops_before,
        "the first step was rolled back too"
    );
    assert_eq!(s.status(t(3)).unwrap().fenced_writes, 1);
}

/// An effect recorded once it is done (the engine's HEAD): begin and finish
/// in one request. The result is exactly the two steps' result, one
/// committed row, and every refusal leaves nothing behind.
pub fn op_begun_and_finished_in_one_request_is_recorded_once(s: &dyn Store) {
    use idem_core::{Step, StepOutput};
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    let record = |epoch: Epoch, then: Command| {
        vec![
            Step::BeginOp {
                op: op(k, OpKind::Head, epoch),
                owner: w("w1"),
            },
            Step::FinishOp {
                op: op(k, OpKind::Head, epoch),
                outcome: Ok(OpResult::Head(head())),
                then: Some(then),
            },
        ]
    };
    let head_done = |epoch| Command::HeadDone {
        epoch,
        head: head(),
    };
    // A stale epoch is fenced and writes nothing.
    let stale = s.run_steps(
        record(Epoch(e.0 + 1), head_done(Epoch(e.0 + 1))),
        t(1),
        idem_core::Commit::Durable,
    );
    assert!(stale.unwrap_err().is_fenced());
    // A refused transition takes the op row back with it.
    let blob = BlobInfo::new(Digest32::of(b"x"), 1);
    let refused = s.run_steps(
        record(e, Command::Finalize { epoch: e, blob }),
        t(1),
        idem_core::Commit::Durable,
    );
    assert!(refused.is_err());
    assert!(s.ops(&k).unwrap().is_empty(), "nothing recorded");
    assert_eq!(state(s, k), JobState::Leased);
    // A failed try of the same op (its row exists) is run again.
    let ho = op(k, OpKind::Head, e);
    s.begin_op(&ho, &w("w1"), t(1)).unwrap();
    s.finish_op(&ho, Err(JobError::retryable("reset", "x")), None, t(1))
        .unwrap();
    let r = s
        .run_steps(record(e, head_done(e)), t(2), idem_core::Commit::Deferred)
        .unwrap();
    assert_eq!(r.value.len(), 2);
    assert_eq!(r.value[0], StepOutput::Decision(OpDecision::Run));
    assert!(matches!(&r.value[1], StepOutput::Job(j) if j.state == JobState::HeadDone));
    let kinds: Vec<&str> = r.events.iter().map(|ev| ev.kind.name()).collect();
    assert_eq!(
        &kinds[..2],
        ["operation_started", "operation_completed"],
        "{kinds:?}"
    );
    let ops = s.ops(&k).unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0].status, OpStatus::Committed);
    assert_eq!(ops[0].result, Some(OpResult::Head(head())));
    assert_eq!(ops[0].runs, 2);
    assert_eq!((ops[0].started_at, ops[0].finished_at), (t(2), Some(t(2))));
    // Recording it again is refused (it replays; it cannot finish twice).
    let before = s.job(&k).unwrap();
    assert!(s
        .run_steps(record(e, head_done(e)), t(3), idem_core::Commit::Durable)
        .is_err());
    assert_eq!(s.job(&k).unwrap(), before);
    assert_eq!(s.ops(&k).unwrap(), ops);
}

/// A worker takes its next job in the write that finishes its last: the
/// lease step sees what the steps before it did, and a refused step takes
/// the lease back with it.
pub fn a_lease_step_sees_the_steps_before_it_and_rolls_back_with_them(s: &dyn Store) {
    use idem_core::{Step, StepOutput};
    let keys = plan_n(s, 2, t(0));
    let (k, e) = lease(s, "w1", 1, 60, t(0))[0];
    let other = keys.into_iter().find(|x| *x != k).expect("two jobs");
    let next = |limit| {
        Step::Lease(LeaseRequest {
            owner: w("w1"),
            limit,
            ttl_ms: 60_000,
            dead_owners: vec![],
            commit: idem_core::Commit::Deferred,
            isolated: false,
            per_host: None,
            host_interval_ms: None,
            host_rules: Default::default(),
        })
    };
    let stale = Step::Apply {
        key: k,
        cmd: Command::StreamStarted {
            epoch: Epoch(e.0 + 1),
        },
    };
    let bad = s.run_steps(vec![stale, next(1)], t(1), idem_core::Commit::Durable);
    assert!(bad.unwrap_err().is_fenced());
    assert_eq!(state(s, other), JobState::Planned, "the lease rolled back");
    // Released, then leased in one write: the lease sees the release.
    let release = Step::Apply {
        key: k,
        cmd: Command::Release {
            owner: w("w1"),
            epoch: e,
        },
    };
    let r = s
        .run_steps(vec![release, next(2)], t(2), idem_core::Commit::Durable)
        .unwrap();
    assert_eq!(r.value.len(), 2);
    assert!(matches!(&r.value[0], StepOutput::Job(j) if j.state == JobState::Planned));
    let StepOutput::Leased(jobs) = &r.value[1] else {
        panic!(
            "a lease step answers with the jobs it took: {:?}",
            r.value[1]
        );
    };
    let mut got: Vec<(JobKey, Option<Epoch>)> = jobs
        .iter()
        .map(|j| (j.key, j.lease.as_ref().map(|l| l.epoch)))
        .collect();
    got.sort();
    let mut want = vec![(k, Some(Epoch(e.0 + 1))), (other, Some(Epoch(1)))];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(state(s, other), JobState::Leased);
}

pub fn operator_retry_restarts_a_failed_job(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    s.apply(
        &k,
        Command::Fail {
            epoch: e,
            error: JobError::permanent("http_403", "Forbidden"),
            retry_at: None,
        },
        t(1),
    )
    .unwrap();
    assert!(lease(s, "w1", 1, 60, t(100)).is_empty());
    let job = s.apply(&k, Command::OperatorRetry, t(101)).unwrap().value;
    assert_eq!((job.state, job.attempts), (JobState::Planned, 0));
    assert_eq!(lease(s, "w2", 1, 60, t(101)), vec![(k, Epoch(2))]);
}

/// The jobs finished at or after a time, whatever their end, and no other.
pub fn finished_jobs_are_found_by_finish_time(s: &dyn Store) {
    let keys = plan_n(s, 3, t(0));
    let held = lease(s, "w1", 3, 600, t(1));
    let epoch = |k: JobKey| held.iter().find(|h| h.0 == k).expect("held").1;
    do_head(s, keys[0], epoch(keys[0]), "w1", t(2));
    do_finish(s, keys[0], epoch(keys[0]), "w1", t(10));
    s.apply(
        &keys[1],
        Command::Fail {
            epoch: epoch(keys[1]),
            error: JobError::permanent("http_404", "gone"),
            retry_at: None,
        },
        t(20),
    )
    .unwrap();
    let found = |since: i64| {
        let mut got = Vec::new();
        s.each_finished_since(t(since), &mut |j| got.push(j.key))
            .unwrap();
        got.sort();
        got
    };
    let mut both = vec![keys[0], keys[1]];
    both.sort();
    assert_eq!(found(0), both);
    assert_eq!(found(10), both, "the bound is included");
    assert_eq!(found(11), vec![keys[1]]);
    assert!(found(21).is_empty());
}
