//! Deaths, suspects, and the host budget.

use super::*;

pub fn attempts_count_failures_not_deaths_or_stops(s: &dyn Store) {
    let k = plan_n(s, 1, t(0))[0];
    // A holder that dies (its lease taken over) and one that stops cleanly
    // spend no attempt.
    assert_eq!(lease(s, "w1", 1, 10, t(0)).len(), 1);
    let (_, e) = lease(s, "w2", 1, 10, t(20))[0];
    s.apply(
        &k,
        Command::Release {
            owner: w("w2"),
            epoch: e,
        },
        t(21),
    )
    .unwrap();
    let job = s.job(&k).unwrap().unwrap();
    assert_eq!((job.attempts, job.holder_deaths), (0, 1), "{job:?}");
    // Failures do: the third fails it for good (max_attempts 3).
    for i in 0..3 {
        let got = lease(s, "w", 1, 10, t(30 + i * 100));
        assert_eq!(got.len(), 1, "attempt {i}");
        s.apply(
            &k,
            Command::Fail {
                epoch: got[0].1,
                error: JobError::retryable("http_503", "busy"),
                retry_at: Some(t(31 + i * 100)),
            },
            t(31 + i * 100),
        )
        .unwrap();
    }
    let job = s.job(&k).unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts, 3);
    let st = s.status(t(400)).unwrap();
    assert_eq!(st.failures_by_reason.get("http_503"), Some(&1));
}

pub fn suspects_are_leased_only_alone_and_poison_fails_them(s: &dyn Store) {
    let keys = plan_n(s, 2, t(0));
    assert_eq!(lease(s, "w1", 2, 10, t(0)).len(), 2);
    assert_eq!(lease(s, "w2", 2, 10, t(20)).len(), 2, "one death each");
    assert!(
        lease(s, "w3", 2, 10, t(40)).is_empty(),
        "two deaths: suspects, left for workers that run them alone"
    );
    let st = s.status(t(40)).unwrap();
    assert_eq!((st.suspects, st.due_now), (2, 0));
    for k in &keys {
        let j = s.job(k).unwrap().unwrap();
        assert_eq!((j.attempts, j.holder_deaths, &j.lease), (0, 2, &None));
        assert!(j.is_suspect());
    }
    let alone = |owner: &str, now| {
        let req = LeaseRequest {
            owner: w(owner),
            limit: 5,
            ttl_ms: 10_000,
            dead_owners: vec![],
            commit: idem_core::Commit::Durable,
            isolated: true,
            per_host: None,
            host_interval_ms: None,
            host_rules: Default::default(),
        };
        s.lease(&req, now).unwrap().value
    };
    let mut poisoned = None;
    for i in 0..3 {
        let got = alone("w4", t(50 + i * 10));
        assert_eq!(got.len(), 1, "one suspect at a time");
        let l = got[0].lease.clone().unwrap();
        assert!(l.isolated);
        assert_eq!(
            *poisoned.get_or_insert(got[0].key),
            got[0].key,
            "the oldest due"
        );
        let died = Command::ChildDied {
            owner: w("w4"),
            epoch: l.epoch,
            detail: "killed by SIGSEGV".into(),
        };
        let j = s
            .apply(&got[0].key, died.clone(), t(51 + i * 10))
            .unwrap()
            .value;
        assert_eq!(j.isolated_deaths, i as u32 + 1);
        assert!(
            s.apply(&got[0].key, died, t(52 + i * 10)).is_err(),
            "the same death is recorded once"
        );
    }
    let j = s.job(&poisoned.unwrap()).unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.last_error.unwrap().starts_with("poison:"));
    let st = s.status(t(100)).unwrap();
    assert_eq!(st.failures_by_reason.get("poison"), Some(&1));
    assert_eq!(st.suspects, 1);
    // The other suspect, run alone, finishes normally.
    let got = alone("w5", t(101));
    assert_eq!(got.len(), 1);
    assert_ne!(Some(got[0].key), poisoned);
}

pub fn leases_interleave_hosts_within_their_budget(s: &dyn Store) {
    let on = |host: &str, i: usize| {
        JobSpec::new(
            "w",
            &format!("{host}-{i}"),
            &format!("https://{host}.example/{i}"),
            None,
            None,
        )
        .unwrap()
    };
    // A lopsided plan: the slow host's jobs first, then the fast host's.
    let mut specs: Vec<JobSpec> = (0..6).map(|i| on("slow", i)).collect();
    specs.extend((0..3).map(|i| on("fast", i)));
    s.plan(&specs, 3, t(0)).unwrap();
    let req = |owner: &str| LeaseRequest {
        owner: w(owner),
        limit: 10,
        ttl_ms: 60_000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: Some(2),
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let got: Vec<String> = s
        .lease(&req("w1"), t(1))
        .unwrap()
        .value
        .iter()
        .map(|j| j.spec.artifact_id.clone())
        .collect();
    assert_eq!(
        got,
        ["slow-0", "fast-0", "slow-1", "fast-1"],
        "hosts take turns (by rank, due time, then plan order), two each"
    );
    assert!(
        s.lease(&req("w2"), t(2)).unwrap().value.is_empty(),
        "the budget is the ledger's, whoever asks"
    );
    let slow0 = specs[0].key();
    s.apply(
        &slow0,
        Command::Release {
            owner: w("w1"),
            epoch: Epoch(1),
        },
        t(3),
    )
    .unwrap();
    let got = s.lease(&req("w2"), t(4)).unwrap().value;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].spec.artifact_id, "slow-0",
        "a released job keeps its place"
    );
    let busiest = s.busiest_hosts(t(5), 10).unwrap();
    let shown: Vec<(&str, u64, u64, u64)> = busiest
        .iter()
        .map(|h| (h.host.as_str(), h.in_flight, h.due, h.unfinished))
        .collect();
    assert_eq!(
        shown,
        [("slow.example", 2, 4, 6), ("fast.example", 2, 1, 3)]
    );
}

pub fn a_full_hosts_long_queue_does_not_hide_the_others(s: &dyn Store) {
    let on = |host: &str, i: usize| {
        JobSpec::new(
            "w",
            &format!("{host}-{i}"),
            &format!("https://{host}.example/{i}"),
            None,
            None,
        )
        .unwrap()
    };
    let mut specs: Vec<JobSpec> = (0..400).map(|i| on("slow", i)).collect();
    specs.extend((0..400).map(|i| on("fast", i)));
    s.plan(&specs, 3, t(0)).unwrap();
    let req = LeaseRequest {
        owner: w("w"),
        limit: 2,
        ttl_ms: 3_600_000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: Some(1),
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    // The slow host's one slot stays taken; the fast host's jobs go one by
    // one, past ranks far beyond the slow host's waiting queue.
    let mut fast_done = 0;
    for round in 0..300 {
        let got = s.lease(&req, t(1)).unwrap().value;
        let fast: Vec<_> = got
            .iter()
            .filter(|j| j.spec.artifact_id.starts_with("fast"))
            .collect();
        assert_eq!(
            fast.len(),
            1,
            "round {round}: the fast host has room and due jobs: {got:?}"
        );
        let (key, epoch) = (fast[0].key, fast[0].lease.as_ref().unwrap().epoch);
        do_head(s, key, epoch, "w", t(1));
        do_finish(s, key, epoch, "w", t(1));
        fast_done += 1;
    }
    assert_eq!(fast_done, 300);
}

pub fn a_host_cooling_down_is_not_leased(s: &dyn Store) {
    let specs: Vec<JobSpec> = ["busy", "calm"]
        .iter()
        .map(|h| JobSpec::new("w", h, &format!("https://{h}.example/x"), None, None).unwrap())
        .collect();
    s.plan(&specs, 3, t(0)).unwrap();
    let cool = |until| {
        s.run_steps(
            vec![idem_core::ports::Step::HostCooldown {
                host: "busy.example".into(),
                until,
            }],
            t(1),
            idem_core::Commit::Durable,
        )
        .unwrap();
    };
    cool(t(30));
    cool(t(20)); // an earlier end does not shorten it
    let req = LeaseRequest {
        owner: w("w"),
        limit: 5,
        ttl_ms: 60_000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: Some(2),
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let got = s.lease(&req, t(25)).unwrap().value;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].spec.artifact_id, "calm");
    let hosts = s.busiest_hosts(t(25), 5).unwrap();
    let busy = hosts.iter().find(|h| h.host == "busy.example").unwrap();
    assert_eq!(busy.cooling_down_until, Some(t(30)));
    let got = s.lease(&req, t(30)).unwrap().value;
    assert_eq!(got.len(), 1, "cooled down at its time");
    assert_eq!(got[0].spec.artifact_id, "busy");
}

/// A pause stops leasing (every host, or one), is shown by `status`, and
/// a resume lifts it; a job already held carries on.
pub fn paused_hosts_are_not_leased_until_resumed(s: &dyn Store) {
    use idem_core::hosts::ALL_HOSTS;
    let other = JobSpec::new("work", "other", "https://other.example/x.pdf", None, None).unwrap();
    plan_n(s, 3, t(0));
    s.plan(std::slice::from_ref(&other), 3, t(0)).unwrap();
    let held = lease(s, "w1", 1, 60, t(0));
    assert_eq!(held.len(), 1);

    s.pause(ALL_HOSTS, true, t(1)).unwrap();
    assert_eq!(s.status(t(1)).unwrap().paused, [ALL_HOSTS]);
    assert!(
        lease(s, "w2", 10, 60, t(1)).is_empty(),
        "nothing while all is paused"
    );
    let (k, e) = held[0];
    s.apply(
        &k,
        Command::Renew {
            owner: w("w1"),
            epoch: e,
            ttl_ms: 60_000,
        },
        t(2),
    )
    .expect("a held job carries on");

    s.pause("example.org", true, t(3)).unwrap();
    s.pause(ALL_HOSTS, false, t(3)).unwrap();
    assert_eq!(s.status(t(3)).unwrap().paused, ["example.org"]);
    let got = lease(s, "w2", 10, 60, t(3));
    assert_eq!(got.len(), 1, "only the host not paused: {got:?}");
    assert_eq!(got[0].0, other.key());

    s.pause("example.org", false, t(4)).unwrap();
    assert!(s.status(t(4)).unwrap().paused.is_empty());
    assert_eq!(lease(s, "w2", 10, 60, t(4)).len(), 2, "resumed");
}

pub fn a_paced_host_is_leased_once_per_interval_whoever_asks(s: &dyn Store) {
    let specs: Vec<JobSpec> = (0..6)
        .map(|i| {
            let host = if i % 2 == 0 { "paced" } else { "free" };
            JobSpec::new(
                "w",
                &format!("{host}-{i}"),
                &format!("https://{host}.example/{i}"),
                None,
                None,
            )
            .unwrap()
        })
        .collect();
    s.plan(&specs, 3, t(0)).unwrap();
    let rules = idem_core::hosts::HostRules::new([idem_core::hosts::HostRule {
        pattern: "paced.example".into(),
        interval_ms: Some(10_000),
        ..Default::default()
    }]);
    let req = |owner: &str| LeaseRequest {
        owner: w(owner),
        limit: 10,
        ttl_ms: 3_600_000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: std::sync::Arc::new(rules.clone()),
    };
    let paced = |got: &[idem_core::Job]| {
        got.iter()
            .filter(|j| j.spec.artifact_id.starts_with("paced"))
            .count()
    };
    let got = s.lease(&req("a"), t(1)).unwrap().value;
    assert_eq!(
        (got.len(), paced(&got)),
        (4, 1),
        "every free job, one paced"
    );
    let got = s.lease(&req("b"), t(5)).unwrap().value;
    assert!(
        got.is_empty(),
        "another worker waits for the host's next slot: {got:?}"
    );
    let got = s.lease(&req("b"), t(11)).unwrap().value;
    assert_eq!(paced(&got), 1, "the next slot: {got:?}");
    assert!(s.lease(&req("c"), t(12)).unwrap().value.is_empty());
}

pub fn mirrors_and_headers_are_kept_and_the_url_index_moves_on(s: &dyn Store) {
    let spec = JobSpec::new("w", "m", "https://one.example/a.pdf", None, None)
        .unwrap()
        .with_mirrors(["https://two.example/a.pdf", "https://three.example/a.pdf"])
        .unwrap()
        .with_headers([
            ("Authorization", "Bearer s3cret"),
            ("Accept", "application/pdf"),
        ])
        .unwrap();
    let kinds = |r: Vec<PlanOutcome>| {
        r.iter()
            .map(|o| match o {
                PlanOutcome::Planned { .. } => "planned",
                PlanOutcome::Existing { .. } => "existing",
                PlanOutcome::Conflict(_) => "conflict",
            })
            .collect::<Vec<_>>()
    };
    let out = s.plan(std::slice::from_ref(&spec), 3, t(0)).unwrap();
    assert_eq!(kinds(out.value), ["planned"]);
    let key = spec.key();
    let job = s.job(&key).unwrap().unwrap();
    assert_eq!(job.spec, spec, "mirrors and headers come back as planned");
    assert_eq!(job.fingerprint, spec.fingerprint());
    let again = s.plan(std::slice::from_ref(&spec), 3, t(1)).unwrap();
    assert_eq!(kinds(again.value), ["existing"], "a re-plan is a no-op");
    let mut reordered = spec.clone();
    reordered.mirrors.reverse();
    let clash = s.plan(&[reordered], 3, t(2)).unwrap();
    assert_eq!(
        kinds(clash.value),
        ["conflict"],
        "other mirrors are another payload"
    );
    let mut other_headers = spec.clone();
    other_headers.headers.clear();
    let same = s.plan(&[other_headers], 3, t(2)).unwrap();
    assert_eq!(
        kinds(same.value),
        ["existing"],
        "headers are not the payload"
    );
    // A permanent failure moves the job to its next URL at once.
    let (_, e) = lease(s, "w", 1, 10, t(3))[0];
    s.apply(
        &key,
        Command::Fail {
            epoch: e,
            error: JobError::permanent("http_404", "gone"),
            retry_at: None,
        },
        t(3),
    )
    .unwrap();
    let job = s.job(&key).unwrap().unwrap();
    assert_eq!(
        (job.state, job.url_index, job.attempts),
        (JobState::Planned, 1, 0)
    );
    assert_eq!(job.url().as_str(), "https://two.example/a.pdf");
    assert_eq!(lease(s, "w", 1, 10, t(3)).len(), 1, "due at once");
}
