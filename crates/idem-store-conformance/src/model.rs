//! The store under test against the reference model: random interleavings
//! of several workers' writes, with clock jumps, run on both the store and
//! a [`MemStore`]; after every write the two agree on its answer, on every
//! job, every op and every count.

use idem_core::ports::{LeaseRequest, Step, Store};
use idem_core::{
    BlobInfo, Command, Commit, Digest32, Epoch, HeadInfo, JobError, JobKey, JobSpec, MemStore,
    OpKey, OpKind, OpResult, SplitMix64, StreamInfo, Timestamp, WorkerId,
};
use std::collections::BTreeMap;

const JOBS: usize = 8;
const WORKERS: usize = 3;

struct Run<'a> {
    store: &'a dyn Store,
    model: MemStore,
    rng: SplitMix64,
    now: Timestamp,
    /// What each worker believes it holds: job index -> epoch (may be
    /// stale, so fenced writes are exercised too).
    held: Vec<BTreeMap<usize, Epoch>>,
    step: usize,
}

fn spec(i: usize, variant: bool) -> JobSpec {
    // Two hosts, so host ranks and budgets matter; a variant URL under the
    // same identity is a key conflict.
    let url = format!(
        "https://h{}.example/{i}{}.pdf",
        i % 2,
        if variant { "?v=2" } else { "" }
    );
    JobSpec::new("work", &format!("art-{i}"), &url, None, None).expect("valid spec")
}

fn worker(w: usize) -> WorkerId {
    WorkerId::new(format!("w{w}"))
}

impl Run<'_> {
    fn pick(&mut self, n: usize) -> usize {
        usize::try_from(self.rng.next_u64() % n as u64).unwrap_or(0)
    }

    fn key(i: usize) -> JobKey {
        spec(i, false).key()
    }

    /// Runs one write on both stores and checks they agree on it and on
    /// everything after it.
    fn both<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        f: impl Fn(&dyn Store) -> Result<T, idem_core::StoreError>,
    ) -> Option<T> {
        let got = f(self.store);
        let want = f(&self.model);
        let shown = |r: &Result<T, idem_core::StoreError>| match r {
            Ok(v) => format!("Ok({v:?})"),
            Err(e) => format!("Err({e})"),
        };
        assert_eq!(
            shown(&got),
            shown(&want),
            "step {}: {what}: the store and the model answered differently",
            self.step
        );
        self.agree(what);
        got.ok()
    }

    fn agree(&self, what: &str) {
        let at = format!("step {} ({what})", self.step);
        for i in 0..JOBS {
            let k = Self::key(i);
            assert_eq!(
                self.store.job(&k).expect("job"),
                self.model.job(&k).expect("job"),
                "{at}: job {i}"
            );
            assert_eq!(
                self.store.ops(&k).expect("ops"),
                self.model.ops(&k).expect("ops"),
                "{at}: ops of job {i}"
            );
        }
        assert_eq!(
            self.store.status(self.now).expect("status"),
            self.model.status(self.now).expect("status"),
            "{at}: status counts"
        );
        assert_eq!(
            self.store.busiest_hosts(self.now, 10).expect("hosts"),
            self.model.busiest_hosts(self.now, 10).expect("hosts"),
            "{at}: host loads"
        );
    }

    fn one_step(&mut self) {
        let now = self.now;
        match self.pick(16) {
            0 | 1 => {
                // Clock jumps: small, past a backoff, past a lease.
                let ms = [0, 700, 700, 5_000, 12_000, 31_000][self.pick(6)];
                self.now = self.now.plus_ms(ms);
            }
            2 => {
                let specs: Vec<JobSpec> = (0..1 + self.pick(4))
                    .map(|_| {
                        let i = self.pick(JOBS);
                        spec(i, self.pick(6) == 0)
                    })
                    .collect();
                self.both("plan", |s| s.plan(&specs, 3, now));
            }
            3..=5 => self.lease(),
            6..=12 => self.holder_step(),
            13 => {
                let i = self.pick(JOBS);
                let cmd = [Command::Expire, Command::OperatorRetry][self.pick(2)].clone();
                self.both("operator or reconciler", |s| {
                    s.apply(&Self::key(i), cmd.clone(), now)
                });
            }
            14 => {
                self.both("abandon dead ops", |s| s.abandon_dead_ops(now));
            }
            _ => {
                let host = format!("h{}.example", self.pick(2));
                let until = self.now.plus_ms(20_000);
                self.both("host cooldown", |s| {
                    s.run_steps(
                        vec![Step::HostCooldown {
                            host: host.clone(),
                            until,
                        }],
                        now,
                        Commit::Durable,
                    )
                });
            }
        }
    }

    fn lease(&mut self) {
        let w = self.pick(WORKERS);
        let dead = self.pick(WORKERS);
        let req = LeaseRequest {
            owner: worker(w),
            limit: 1 + self.pick(3),
            ttl_ms: 30_000,
            dead_owners: if self.pick(4) == 0 && dead != w {
                vec![worker(dead)]
            } else {
                vec![]
            },
            commit: Commit::Deferred,
            isolated: self.pick(8) == 0,
            per_host: [None, Some(1), Some(2)][self.pick(3)],
            host_interval_ms: None,
            host_rules: Default::default(),
        };
        let now = self.now;
        if let Some(a) = self.both("lease", |s| s.lease(&req, now)) {
            for job in a.value {
                let i = (0..JOBS).find(|i| Self::key(*i) == job.key).expect("known");
                let e = job.lease.expect("leased").epoch;
                self.held[w].insert(i, e);
            }
        }
    }

    /// A worker acts on a job it believes it holds.
    fn holder_step(&mut self) {
        let w = self.pick(WORKERS);
        let held: Vec<(usize, Epoch)> = self.held[w].iter().map(|(i, e)| (*i, *e)).collect();
        if held.is_empty() {
            return;
        }
        let (i, e) = held[self.pick(held.len())];
        let key = Self::key(i);
        let now = self.now;
        let op = |kind| OpKey {
            job: key,
            kind,
            epoch: e,
        };
        let blob = BlobInfo::new(Digest32::of(key.digest().as_bytes()), 32);
        let head = HeadInfo {
            status: 200,
            content_length: Some(32),
            ..HeadInfo::default()
        };
        let owner = worker(w);
        let steps: Vec<Step> = match self.pick(9) {
            0 => vec![Step::Apply {
                key,
                cmd: Command::Renew {
                    owner,
                    epoch: e,
                    ttl_ms: 30_000,
                },
            }],
            1 => vec![Step::Apply {
                key,
                cmd: Command::Release { owner, epoch: e },
            }],
            // HEAD recorded in one write (begun and finished together).
            2 => vec![
                Step::BeginOp {
                    op: op(OpKind::Head),
                    owner,
                },
                Step::FinishOp {
                    op: op(OpKind::Head),
                    outcome: Ok(OpResult::Head(head.clone())),
                    then: Some(Command::HeadDone { epoch: e, head }),
                },
            ],
            3 => vec![
                Step::Apply {
                    key,
                    cmd: Command::StreamStarted { epoch: e },
                },
                Step::BeginOp {
                    op: op(OpKind::Stream),
                    owner,
                },
            ],
            4 => vec![Step::FinishOp {
                op: op(OpKind::Stream),
                outcome: Ok(OpResult::Stream(StreamInfo {
                    sha256: blob.sha256,
                    size: 32,
                    resumed_from: 0,
                })),
                then: None,
            }],
            5 => vec![
                Step::BeginOp {
                    op: op(OpKind::Finalize),
                    owner: owner.clone(),
                },
                Step::FinishOp {
                    op: op(OpKind::Finalize),
                    outcome: Ok(OpResult::Finalize(blob.clone())),
                    then: Some(Command::Finalize { epoch: e, blob }),
                },
                Step::Lease(LeaseRequest {
                    owner,
                    limit: 1,
                    ttl_ms: 30_000,
                    dead_owners: vec![],
                    commit: Commit::Deferred,
                    isolated: false,
                    per_host: Some(2),
                    host_interval_ms: None,
                    host_rules: Default::default(),
                }),
            ],
            6 => {
                let retry = self.pick(2) == 0;
                let error = if retry {
                    JobError {
                        retry_after_ms: Some(5_000),
                        ..JobError::retryable("http_503", "busy")
                    }
                } else {
                    JobError::permanent("http_404", "gone")
                };
                vec![Step::Apply {
                    key,
                    cmd: Command::Fail {
                        epoch: e,
                        error,
                        retry_at: retry.then_some(now.plus_ms(5_000)),
                    },
                }]
            }
            // Begun alone: finished later, failed, or begun again.
            7 => vec![Step::BeginOp {
                op: op([OpKind::Head, OpKind::Stream][self.pick(2)]),
                owner,
            }],
            _ => vec![Step::FinishOp {
                op: op(OpKind::Head),
                outcome: Err(JobError::retryable("reset", "connection reset")),
                then: None,
            }],
        };
        let done = self.both("a holder's steps", |s| {
            s.run_steps(steps.clone(), now, Commit::Deferred)
        });
        let job = self.store.job(&key).expect("job").expect("planned");
        if job.lease.is_none_or(|l| l.epoch != e) {
            // A real worker stops at its first refusal; some keep trying.
            if self.pick(3) > 0 {
                self.held[w].remove(&i);
            }
        }
        if let Some(a) = done {
            for out in a.value {
                if let idem_core::StepOutput::Leased(jobs) = out {
                    for job in jobs {
                        let j = (0..JOBS).find(|x| Self::key(*x) == job.key).expect("known");
                        self.held[w].insert(j, job.lease.expect("leased").epoch);
                    }
                }
            }
        }
    }
}

/// Several hundred random writes by three workers over eight jobs on two
/// hosts, the store checked against the model after each.
pub fn the_store_agrees_with_the_model_under_random_interleavings(s: &dyn Store) {
    let mut run = Run {
        store: s,
        model: MemStore::new(),
        rng: SplitMix64::new(0x1de4_5eed),
        now: Timestamp::from_millis(1_700_000_000_000),
        held: vec![BTreeMap::new(); WORKERS],
        step: 0,
    };
    let specs: Vec<JobSpec> = (0..JOBS).map(|i| spec(i, false)).collect();
    let now = run.now;
    run.both("first plan", |s| s.plan(&specs, 3, now));
    for step in 1..=600 {
        run.step = step;
        run.one_step();
    }
}
