//! Property tests: random interleavings of several workers' commands with
//! arbitrary clock jumps, checking the ledger's invariants after every step.

use crate::digest::Digest32;
use crate::job::{BlobInfo, Command, Epoch, HeadInfo, JobError, JobState, WorkerId};
use crate::ledger::{OpKey, OpKind, OpResult};
use crate::ports::{LeaseRequest, Store};
use crate::spec::{JobKey, JobSpec};
use crate::{MemStore, Timestamp};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
enum Step {
    Tick(u64),
    Lease(usize),
    Renew(usize, usize),
    Release(usize, usize),
    Head(usize, usize),
    Stream(usize, usize),
    Finalize(usize, usize),
    Fail(usize, usize, bool),
    Expire(usize),
    OperatorRetry(usize),
    Abandon,
}

const WORKERS: usize = 3;
const JOBS: usize = 3;

fn step() -> impl Strategy<Value = Step> {
    let w = 0..WORKERS;
    let j = 0..JOBS;
    prop_oneof![
        (0u64..120_000).prop_map(Step::Tick),
        w.clone().prop_map(Step::Lease),
        (w.clone(), j.clone()).prop_map(|(w, j)| Step::Renew(w, j)),
        (w.clone(), j.clone()).prop_map(|(w, j)| Step::Release(w, j)),
        (w.clone(), j.clone()).prop_map(|(w, j)| Step::Head(w, j)),
        (w.clone(), j.clone()).prop_map(|(w, j)| Step::Stream(w, j)),
        (w.clone(), j.clone()).prop_map(|(w, j)| Step::Finalize(w, j)),
        (w, j.clone(), any::<bool>()).prop_map(|(w, j, r)| Step::Fail(w, j, r)),
        j.clone().prop_map(Step::Expire),
        j.prop_map(Step::OperatorRetry),
        Just(Step::Abandon),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_invariants_hold_under_any_interleaving(steps in prop::collection::vec(step(), 1..80)) {
        let store = MemStore::new();
        let mut now = Timestamp::from_millis(1_000);
        let keys: Vec<JobKey> = (0..JOBS).map(|i| {
            let spec = JobSpec::new("w", &format!("a{i}"), &format!("http://h/{i}"), None, None).unwrap();
            spec.key()
        }).collect();
        let specs: Vec<JobSpec> = (0..JOBS).map(|i| JobSpec::new("w", &format!("a{i}"), &format!("http://h/{i}"), None, None).unwrap()).collect();
        store.plan(&specs, 3, now).unwrap();
        // What each worker believes it holds: job -> epoch (may be stale).
        let mut held: Vec<BTreeMap<usize, Epoch>> = vec![BTreeMap::new(); WORKERS];
        let mut max_epoch: BTreeMap<JobKey, Epoch> = BTreeMap::new();
        let mut commits: BTreeMap<OpKey, u32> = BTreeMap::new();
        let worker = |w: usize| WorkerId::new(format!("w{w}"));

        for s in steps {
            let before: BTreeMap<JobKey, _> = keys.iter().map(|k| (*k, store.job(k).unwrap().unwrap())).collect();
            let mut accepted_epoch: Option<(JobKey, Epoch)> = None;
            let mut operator = false;
            match s {
                Step::Tick(ms) => now = now.plus_ms(ms),
                Step::Lease(w) => {
                    let req = LeaseRequest { owner: worker(w), limit: 2, ttl_ms: 30_000, dead_owners: vec![], commit: crate::Commit::Durable, isolated: false, per_host: None, host_interval_ms: None, host_rules: Default::default() };
                    for job in store.lease(&req, now).unwrap().value {
                        let e = job.lease.as_ref().unwrap().epoch;
                        let prev = max_epoch.insert(job.key, e).unwrap_or_default();
                        prop_assert!(e > prev, "epochs strictly increase");
                        let idx = keys.iter().position(|k| *k == job.key).unwrap();
                        held[w].insert(idx, e);
                    }
                }
                Step::Renew(w, j) | Step::Release(w, j) | Step::Head(w, j) | Step::Stream(w, j) | Step::Finalize(w, j) | Step::Fail(w, j, _) => {
                    let Some(&e) = held[w].get(&j) else { continue };
                    let key = keys[j];
                    let result = match s {
                        Step::Renew(..) => store.apply(&key, Command::Renew { owner: worker(w), epoch: e, ttl_ms: 30_000 }, now).map(|_| ()),
                        Step::Release(..) => store.apply(&key, Command::Release { owner: worker(w), epoch: e }, now).map(|_| ()),
                        Step::Head(..) => {
                            let op = OpKey { job: key, kind: OpKind::Head, epoch: e };
                            store.begin_op(&op, &worker(w), now).and_then(|_| {
                                store.finish_op(&op, Ok(OpResult::Head(HeadInfo::default())), Some(Command::HeadDone { epoch: e, head: HeadInfo::default() }), now)
                            }).map(|_| ())
                        }
                        Step::Stream(..) => store.apply(&key, Command::StreamStarted { epoch: e }, now).map(|_| ()),
                        Step::Finalize(..) => {
                            let op = OpKey { job: key, kind: OpKind::Finalize, epoch: e };
                            let blob = BlobInfo::new(Digest32::of(&[j as u8]), 1);
                            store.begin_op(&op, &worker(w), now).and_then(|_| {
                                store.finish_op(&op, Ok(OpResult::Finalize(blob.clone())), Some(Command::Finalize { epoch: e, blob }), now)
                            }).map(|_| {
                                *commits.entry(op).or_default() += 1;
                            })
                        }
                        Step::Fail(_, _, retry) => {
                            let err = if retry { JobError::retryable("reset", "") } else { JobError::permanent("http_404", "") };
                            store.apply(&key, Command::Fail { epoch: e, error: err, retry_at: retry.then_some(now.plus_ms(5_000)) }, now).map(|_| ())
                        }
                        _ => unreachable!(),
                    };
                    if result.is_ok() {
                        accepted_epoch = Some((key, e));
                    }
                }
                Step::Expire(j) => { let _ = store.apply(&keys[j], Command::Expire, now); }
                Step::OperatorRetry(j) => {
                    operator = store.apply(&keys[j], Command::OperatorRetry, now).is_ok();
                }
                Step::Abandon => { store.abandon_dead_ops(now).unwrap(); }
            }

            // Invariants after every step.
            if let Some((key, e)) = accepted_epoch {
                prop_assert_eq!(Some(&e), max_epoch.get(&key), "only the newest epoch may write");
            }
            for k in &keys {
                let after = store.job(k).unwrap().unwrap();
                let prev = &before[k];
                if prev.state.is_terminal() && !operator {
                    prop_assert_eq!(prev, &after, "a terminal job never changes");
                }
                prop_assert!(after.attempts <= after.max_attempts, "attempts bounded");
                if after.state.is_terminal() {
                    prop_assert!(after.lease.is_none(), "no lease on a terminal job");
                }
                if after.state == JobState::Leased {
                    prop_assert!(after.lease.is_some(), "leased means held");
                }
                prop_assert!(after.epoch >= prev.epoch);
            }
            for (op, n) in &commits {
                prop_assert!(*n <= 1, "op {} committed {} times", op, n);
            }
            let live: BTreeSet<_> = keys.iter().filter(|k| store.job(k).unwrap().unwrap().lease.as_ref().is_some_and(|l| l.is_live(now))).collect();
            prop_assert!(live.len() <= JOBS);
        }
    }
}
