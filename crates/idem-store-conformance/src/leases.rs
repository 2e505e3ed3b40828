//! Planning, leasing, fencing: who may hold a job and write to it.

use super::*;

pub fn plan_is_idempotent_and_reports_conflicts(s: &dyn Store) {
    let a = spec(1);
    let r = s.plan(std::slice::from_ref(&a), 3, t(0)).unwrap();
    assert_eq!(r.value, vec![PlanOutcome::Planned { job_key: a.key() }]);
    assert_eq!(r.events.len(), 1);
    let r = s.plan(std::slice::from_ref(&a), 3, t(1)).unwrap();
    assert_eq!(r.value, vec![PlanOutcome::Existing { job_key: a.key() }]);
    let names: Vec<_> = r.events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names,
        ["idempotency_replay"],
        "a re-plan reports a reuse only"
    );
    let changed =
        JobSpec::new("work", "art-1", "https://example.org/other.pdf", None, None).unwrap();
    let r = s.plan(&[changed], 3, t(2)).unwrap();
    let PlanOutcome::Conflict(c) = &r.value[0] else {
        panic!("expected a conflict, got {:?}", r.value)
    };
    assert_eq!(c.existing_url, "https://example.org/1.pdf");
    assert_eq!(c.proposed_url, "https://example.org/other.pdf");
    let job = s.job(&a.key()).unwrap().unwrap();
    assert_eq!(job.spec, a, "a conflict is never applied");
    assert_eq!(job.created_at, t(0));
}

pub fn plan_batch_reports_each_item(s: &dyn Store) {
    plan_n(s, 2, t(0));
    let mut specs: Vec<JobSpec> = (0..5).map(spec).collect();
    specs.push(JobSpec::new("work", "art-0", "https://example.org/zzz", None, None).unwrap());
    let r = s.plan(&specs, 3, t(1)).unwrap().value;
    let kinds: Vec<&str> = r
        .iter()
        .map(|o| match o {
            PlanOutcome::Planned { .. } => "planned",
            PlanOutcome::Existing { .. } => "existing",
            PlanOutcome::Conflict(_) => "conflict",
        })
        .collect();
    assert_eq!(
        kinds,
        ["existing", "existing", "planned", "planned", "planned", "conflict"]
    );
    assert_eq!(s.status(t(1)).unwrap().total, 5);
}

pub fn lease_takes_oldest_due_first_up_to_limit(s: &dyn Store) {
    let old = plan_n(s, 1, t(0))[0];
    let specs: Vec<JobSpec> = (1..4).map(spec).collect();
    s.plan(&specs, 3, t(10)).unwrap();
    let got = lease(s, "w1", 2, 60, t(20));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, old, "oldest due first");
    assert_eq!(lease(s, "w2", 10, 60, t(20)).len(), 2, "the rest");
    assert!(lease(s, "w3", 10, 60, t(20)).is_empty());
    // Not yet planned at t(5): a job planned in the future is not due.
    let late = JobSpec::new("work", "late", "https://example.org/late", None, None).unwrap();
    s.plan(&[late], 3, t(100)).unwrap();
    assert!(
        lease(s, "w3", 10, 60, t(50)).is_empty(),
        "not due before its time"
    );
}

pub fn lease_bumps_epoch_and_never_double_leases(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    assert_eq!(lease(s, "w1", 1, 10, t(0)), vec![(k, Epoch(1))]);
    assert!(
        lease(s, "w2", 1, 10, t(9)).is_empty(),
        "live lease is exclusive"
    );
    assert_eq!(
        lease(s, "w2", 1, 10, t(10)),
        vec![(k, Epoch(2))],
        "expired at exactly its expiry"
    );
    s.apply(
        &k,
        Command::Release {
            owner: w("w2"),
            epoch: Epoch(2),
        },
        t(11),
    )
    .unwrap();
    assert_eq!(lease(s, "w3", 1, 10, t(30)), vec![(k, Epoch(3))]);
    let job = s.job(&k).unwrap().unwrap();
    assert_eq!(job.epoch, Epoch(3));
    assert_eq!(job.lease.unwrap().owner, w("w3"));
}

pub fn expired_lease_is_retaken_in_every_live_state(s: &dyn Store) {
    let keys = plan_n(s, 3, t(0));
    let leased = lease(s, "w1", 3, 10, t(0));
    let epoch_of = |k: JobKey| leased.iter().find(|(x, _)| *x == k).unwrap().1;
    // keys[0] stays leased; keys[1] reaches head_done; keys[2] streaming.
    do_head(s, keys[1], epoch_of(keys[1]), "w1", t(1));
    do_head(s, keys[2], epoch_of(keys[2]), "w1", t(1));
    s.apply(
        &keys[2],
        Command::StreamStarted {
            epoch: epoch_of(keys[2]),
        },
        t(1),
    )
    .unwrap();
    // w1 dies. After expiry, all three come back, each in its own state.
    let again = lease(s, "w2", 10, 60, t(11));
    assert_eq!(again.len(), 3, "no job is orphaned by a crash");
    assert_eq!(state(s, keys[0]), JobState::Leased);
    assert_eq!(state(s, keys[1]), JobState::HeadDone, "resumes after HEAD");
    assert_eq!(state(s, keys[2]), JobState::Streaming, "resumes the stream");
    assert!(
        s.job(&keys[1]).unwrap().unwrap().head.is_some(),
        "HEAD result kept for the new holder"
    );
}

pub fn dead_owner_lease_is_taken_over_early(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    lease(s, "dead", 1, 600, t(0));
    let req = LeaseRequest {
        owner: w("w2"),
        limit: 5,
        ttl_ms: 60_000,
        dead_owners: vec![w("dead")],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let got = s.lease(&req, t(5)).unwrap().value;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key, k);
    assert_eq!(got[0].lease.as_ref().unwrap().epoch, Epoch(2));
    let req = LeaseRequest {
        dead_owners: vec![w("alive")],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: Default::default(),
        ..req
    };
    assert!(
        s.lease(&req, t(6)).unwrap().value.is_empty(),
        "only named dead owners"
    );
}

pub fn finished_job_is_never_leased_or_moved(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e) = lease(s, "w1", 1, 60, t(0))[0];
    do_head(s, k, e, "w1", t(1));
    do_finish(s, k, e, "w1", t(2));
    assert_eq!(state(s, k), JobState::Finalized);
    for later in [3, 100, 100_000] {
        assert!(lease(s, "w2", 10, 60, t(later)).is_empty());
    }
    let before = s.job(&k).unwrap();
    assert!(s
        .apply(
            &k,
            Command::Acquire {
                owner: w("w2"),
                ttl_ms: 1000,
                isolated: false,
            },
            t(5)
        )
        .is_err());
    assert!(s.apply(&k, Command::Expire, t(5)).is_err());
    assert!(s
        .apply(&k, Command::StreamStarted { epoch: e }, t(5))
        .is_err());
    assert_eq!(s.job(&k).unwrap(), before, "refusals change nothing");
}

pub fn fenced_worker_changes_nothing_and_is_counted(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    let (_, e1) = lease(s, "w1", 1, 10, t(0))[0];
    let o1 = op(k, OpKind::Head, e1);
    s.begin_op(&o1, &w("w1"), t(1)).unwrap();
    let (_, e2) = lease(s, "w2", 1, 60, t(20))[0];
    assert!(e2 > e1);
    let before = s.job(&k).unwrap();
    let attempts = [
        s.apply(
            &k,
            Command::HeadDone {
                epoch: e1,
                head: head(),
            },
            t(21),
        )
        .err(),
        s.apply(
            &k,
            Command::Renew {
                owner: w("w1"),
                epoch: e1,
                ttl_ms: 60_000,
            },
            t(21),
        )
        .err(),
        s.apply(
            &k,
            Command::Release {
                owner: w("w1"),
                epoch: e1,
            },
            t(21),
        )
        .err(),
        s.apply(
            &k,
            Command::Fail {
                epoch: e1,
                error: JobError::permanent("x", "y"),
                retry_at: None,
            },
            t(21),
        )
        .err(),
        s.finish_op(
            &o1,
            Ok(OpResult::Head(head())),
            Some(Command::HeadDone {
                epoch: e1,
                head: head(),
            }),
            t(21),
        )
        .err(),
        s.begin_op(&op(k, OpKind::Stream, e1), &w("w1"), t(21))
            .err(),
    ];
    for (i, a) in attempts.iter().enumerate() {
        let err = a
            .as_ref()
            .unwrap_or_else(|| panic!("stale write {i} was accepted"));
        assert!(err.is_fenced(), "write {i}: {err}");
    }
    assert_eq!(s.job(&k).unwrap(), before, "nothing changed");
    assert_eq!(
        s.status(t(21)).unwrap().fenced_writes,
        6,
        "every refusal counted"
    );
    // The w1 op was abandoned by the takeover, never committed.
    let ops = s.ops(&k).unwrap();
    assert_eq!(ops[0].status, OpStatus::Abandoned);
    assert!(ops[0].result.is_none());
}
