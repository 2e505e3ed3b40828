//! Two handles on one ledger racing for the same rows, on real threads:
//! exactly one write wins each race; the other is refused or told to try
//! again, never applied over the winner.

use crate::{lease, op, plan_n, spec, t, w};
use idem_core::ports::{LeaseRequest, Store};
use idem_core::{
    Command, Commit, HeadInfo, JobError, JobKey, OpDecision, OpKind, OpResult, OpStatus, StoreError,
};
use std::collections::BTreeSet;

const ROUNDS: usize = 40;

/// Both handles lease the same due jobs at once, over and over: every job
/// is leased exactly once, at epoch 1.
pub fn racing_leasers_never_share_a_job(a: &dyn Store, b: &dyn Store) {
    let keys = plan_n(a, 200, t(0));
    let take = |s: &dyn Store, owner: &str| {
        let mut got = Vec::new();
        loop {
            let req = LeaseRequest {
                owner: w(owner),
                limit: 3,
                ttl_ms: 600_000,
                dead_owners: vec![],
                commit: Commit::Deferred,
                isolated: false,
                per_host: None,
                host_interval_ms: None,
                host_rules: Default::default(),
            };
            match s.lease(&req, t(1)) {
                Ok(a) if a.value.is_empty() => return got,
                Ok(a) => got.extend(a.value),
                Err(e) if e.is_transient() => {}
                Err(e) => panic!("lease failed: {e}"),
            }
        }
    };
    let (ga, gb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| take(a, "a"));
        let hb = sc.spawn(|| take(b, "b"));
        (ha.join().expect("a"), hb.join().expect("b"))
    });
    let mut seen = BTreeSet::new();
    for j in ga.iter().chain(&gb) {
        assert!(seen.insert(j.key), "job {} leased twice", j.key);
        assert_eq!(j.lease.as_ref().map(|l| l.epoch.0), Some(1));
    }
    assert_eq!(seen.len(), keys.len(), "every job leased once");
    for j in &ga {
        let stored = a.job(&j.key).unwrap().unwrap();
        assert_eq!(stored.lease.unwrap().owner, w("a"), "the winner holds it");
    }
}

/// Both handles finish the same started op at once with different
/// results: one commits, the other is told the op is not started, and the
/// recorded result is the winner's.
pub fn racing_finishes_commit_an_op_once(a: &dyn Store, b: &dyn Store) {
    let keys = plan_n(a, ROUNDS, t(0));
    let held = lease(a, "h", ROUNDS, 600, t(1));
    assert_eq!(held.len(), keys.len());
    for (key, e) in held {
        let o = op(key, OpKind::Head, e);
        a.begin_op(&o, &w("h"), t(2)).unwrap();
        let finish = |s: &dyn Store, status: u16| {
            let head = HeadInfo {
                status,
                ..HeadInfo::default()
            };
            s.finish_op(
                &o,
                Ok(OpResult::Head(head.clone())),
                Some(Command::HeadDone { epoch: e, head }),
                t(3),
            )
        };
        let (ra, rb) = std::thread::scope(|sc| {
            let ha = sc.spawn(|| finish(a, 200));
            let hb = sc.spawn(|| finish(b, 203));
            (ha.join().expect("a"), hb.join().expect("b"))
        });
        let winner = match (&ra, &rb) {
            (Ok(_), Err(StoreError::OpNotStarted(_))) => 200,
            (Err(StoreError::OpNotStarted(_)), Ok(_)) => 203,
            other => panic!("exactly one finish must win: {other:?}"),
        };
        let ops = a.ops(&key).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].status, OpStatus::Committed);
        assert!(
            matches!(&ops[0].result, Some(OpResult::Head(h)) if h.status == winner),
            "the recorded result is the winner's"
        );
        assert!(matches!(
            b.begin_op(&o, &w("h"), t(4)).unwrap().value,
            OpDecision::Replay { .. }
        ));
    }
}

/// A holder renews its expired lease while another worker takes the job
/// over: either the renewal came first (and the takeover waits for the
/// renewed lease to expire) or the takeover did (and the renewal is
/// fenced). Never both.
pub fn a_renewal_racing_a_takeover_has_one_winner(a: &dyn Store, b: &dyn Store) {
    let mut outcomes = BTreeSet::new();
    for i in 0..ROUNDS {
        // One due job per round: the earlier rounds' are held or failed.
        a.plan(&[spec(i)], 3, t(0)).unwrap();
        let held = lease(a, "old", 1, 10, t(1));
        let [(key, e)] = held[..] else {
            panic!("one job due per round: {held:?}")
        };
        let renew = || {
            a.apply(
                &key,
                Command::Renew {
                    owner: w("old"),
                    epoch: e,
                    ttl_ms: 600_000,
                },
                t(30),
            )
        };
        let take = || -> Result<Vec<JobKey>, StoreError> {
            let req = LeaseRequest {
                owner: w("new"),
                limit: 1,
                ttl_ms: 600_000,
                dead_owners: vec![],
                commit: Commit::Durable,
                isolated: false,
                per_host: None,
                host_interval_ms: None,
                host_rules: Default::default(),
            };
            Ok(b.lease(&req, t(30))?
                .value
                .into_iter()
                .map(|j| j.key)
                .collect())
        };
        let (rr, rt) = std::thread::scope(|sc| {
            let hr = sc.spawn(renew);
            let ht = sc.spawn(take);
            (hr.join().expect("renew"), ht.join().expect("take"))
        });
        let job = a.job(&key).unwrap().unwrap();
        let holder = job.lease.expect("held").owner;
        let taken = rt.expect("a lease never fails").contains(&key);
        match (rr, taken) {
            (Err(e), true) if e.is_fenced() => {
                outcomes.insert("takeover first");
                assert_eq!(holder, w("new"));
            }
            (Ok(_), false) => {
                outcomes.insert("renewal first");
                assert_eq!(holder, w("old"));
            }
            (r, taken) => panic!("renewal {r:?} and takeover {taken} both applied or neither"),
        }
        // The next round's takeover finds only its own job due.
        if holder == w("old") {
            a.apply(
                &key,
                Command::Fail {
                    epoch: e,
                    error: JobError::permanent("test", "set aside"),
                    retry_at: None,
                },
                t(31),
            )
            .unwrap();
        }
    }
    assert!(!outcomes.is_empty());
}

/// Both handles plan the same new lines at once, in batches, one of them
/// backwards: each job is planned once, reported `Planned` by exactly one
/// of them and `Existing` by the other.
pub fn racing_planners_plan_each_job_once(a: &dyn Store, b: &dyn Store) {
    use idem_core::PlanOutcome;
    let specs: Vec<_> = (0..300).map(crate::spec).collect();
    let plan_all = |s: &dyn Store, backwards: bool| {
        let mut mine: Vec<_> = specs.clone();
        if backwards {
            mine.reverse();
        }
        let mut planned = BTreeSet::new();
        for batch in mine.chunks(40) {
            let out = loop {
                match s.plan(batch, 3, t(0)) {
                    Ok(a) => break a.value,
                    Err(e) if e.is_transient() => {}
                    Err(e) => panic!("plan failed: {e}"),
                }
            };
            for o in out {
                match o {
                    PlanOutcome::Planned { job_key } => {
                        planned.insert(job_key);
                    }
                    PlanOutcome::Existing { .. } => {}
                    PlanOutcome::Conflict(c) => panic!("no conflict expected: {c:?}"),
                }
            }
        }
        planned
    };
    let (pa, pb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| plan_all(a, false));
        let hb = sc.spawn(|| plan_all(b, true));
        (ha.join().expect("a"), hb.join().expect("b"))
    });
    assert!(pa.is_disjoint(&pb), "a job reported planned by both");
    assert_eq!(pa.len() + pb.len(), specs.len(), "every job planned once");
    assert_eq!(a.status(t(1)).unwrap().total, specs.len() as u64);
}
