//! The progress report's ten scenarios, and the prior art's core-level
//! defects (section 15 of the reference), as scripts with snapshot traces.
//! Each also asserts the property it is about, so a careless snapshot
//! update cannot hide a regression.

use super::Sim;
use crate::digest::Digest32;
use crate::job::{BlobInfo, Command, HeadInfo, JobError, JobState, WorkerId};
use crate::ledger::{OpDecision, OpKind, OpResult, StreamInfo};
use crate::ports::Store;
use crate::Epoch;

pub(super) const URL: &str = "https://Example.ORG:443/papers/%7Ea.pdf#page=2";

fn head() -> HeadInfo {
    HeadInfo {
        status: 200,
        etag: Some("\"v1\"".into()),
        content_length: Some(1_024),
        content_type: Some("application/pdf".into()),
        accept_ranges: true,
        ..HeadInfo::default()
    }
}

fn blob(content: &[u8]) -> BlobInfo {
    BlobInfo::new(Digest32::of(content), content.len() as u64)
}

/// Runs HEAD, STREAM and FINALIZE for a held job, as the engine does.
fn run_to_end(sim: &mut Sim, who: &str, key: crate::JobKey, e: Epoch, content: &[u8]) {
    let st = sim.job(key).state;
    if st == JobState::Leased {
        sim.begin(who, key, OpKind::Head, e).unwrap();
        sim.finish(
            who,
            key,
            OpKind::Head,
            e,
            Ok(OpResult::Head(head())),
            Some(Command::HeadDone {
                epoch: e,
                head: head(),
            }),
        )
        .unwrap();
    }
    sim.apply(who, key, Command::StreamStarted { epoch: e })
        .unwrap();
    sim.begin(who, key, OpKind::Stream, e).unwrap();
    let b = blob(content);
    let si = StreamInfo {
        sha256: b.sha256,
        size: b.size,
        resumed_from: 0,
    };
    sim.finish(who, key, OpKind::Stream, e, Ok(OpResult::Stream(si)), None)
        .unwrap();
    sim.begin(who, key, OpKind::Finalize, e).unwrap();
    sim.finish(
        who,
        key,
        OpKind::Finalize,
        e,
        Ok(OpResult::Finalize(b.clone())),
        Some(Command::Finalize { epoch: e, blob: b }),
    )
    .unwrap();
}

#[test]
fn s01_full_lifecycle() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "work-123", "artifact-456", URL);
    let leased = sim.at(1).lease("w1", 1, 120);
    assert_eq!(leased, vec![(j, Epoch(1))]);
    sim.at(2);
    run_to_end(&mut sim, "w1", j, Epoch(1), b"%PDF-1.7 hello");
    let job = sim.job(j);
    assert_eq!(job.state, JobState::Finalized);
    assert!(job.lease.is_none());
    assert_eq!(job.spec.url.as_str(), "https://example.org/papers/~a.pdf");
    let ops: Vec<_> = sim
        .store
        .ops(&j)
        .unwrap()
        .iter()
        .map(|o| o.key.kind)
        .collect();
    assert_eq!(ops, [OpKind::Head, OpKind::Stream, OpKind::Finalize]);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s02_crash_mid_stream_resumes_from_last_committed_step() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.at(0).lease("w1", 1, 10);
    sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    sim.finish(
        "w1",
        j,
        OpKind::Head,
        Epoch(1),
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: Epoch(1),
            head: head(),
        }),
    )
    .unwrap();
    sim.apply("w1", j, Command::StreamStarted { epoch: Epoch(1) })
        .unwrap();
    sim.begin("w1", j, OpKind::Stream, Epoch(1)).unwrap();
    sim.note("w1 is killed mid-stream; its lease runs out");
    assert!(
        sim.at(5).lease("w2", 1, 60).is_empty(),
        "live lease must not be taken"
    );
    let got = sim.at(11).lease("w2", 1, 60);
    assert_eq!(got, vec![(j, Epoch(2))]);
    assert_eq!(
        sim.job(j).state,
        JobState::Streaming,
        "resumes from the last committed step"
    );
    let stream_op = sim
        .store
        .ops(&j)
        .unwrap()
        .into_iter()
        .find(|o| o.key.kind == OpKind::Stream)
        .unwrap();
    assert_eq!(
        stream_op.status,
        crate::OpStatus::Abandoned,
        "the takeover abandoned w1's started STREAM op"
    );
    assert_eq!(sim.abandon(), 0, "nothing left for the reconciler");
    sim.note("w2 skips HEAD (committed) and resumes the stream");
    run_to_end(&mut sim, "w2", j, Epoch(2), b"body");
    sim.note("w1 wakes up and tries to commit: fenced");
    let late = sim.finish(
        "w1",
        j,
        OpKind::Stream,
        Epoch(1),
        Ok(OpResult::Stream(StreamInfo {
            sha256: Digest32::of(b"x"),
            size: 1,
            resumed_from: 0,
        })),
        None,
    );
    assert!(late.unwrap_err().is_fenced());
    assert_eq!(sim.job(j).state, JobState::Finalized);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s03_idempotent_replay_returns_recorded_result() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    assert_eq!(
        sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap(),
        OpDecision::Run
    );
    sim.finish(
        "w1",
        j,
        OpKind::Head,
        Epoch(1),
        Ok(OpResult::Head(head())),
        None,
    )
    .unwrap();
    sim.note("the same op asked again under the same lease");
    let again = sim.at(1).begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    assert!(matches!(again, OpDecision::Replay { result: OpResult::Head(h), .. } if h == head()));
    sim.note("committing it twice is refused");
    assert!(sim
        .finish(
            "w1",
            j,
            OpKind::Head,
            Epoch(1),
            Ok(OpResult::Head(head())),
            None
        )
        .is_err());
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s04_multi_worker_coordination() {
    let mut sim = Sim::new();
    let keys = [
        sim.plan("J1", "w", "a1", "http://h/1"),
        sim.plan("J2", "w", "a2", "http://h/2"),
        sim.plan("J3", "w", "a3", "http://h/3"),
    ];
    let mut seen = vec![];
    for w in ["w1", "w2", "w3"] {
        let got = sim.at(1).lease(w, 1, 60);
        assert_eq!(got.len(), 1);
        seen.push(got[0].0);
    }
    seen.sort();
    let mut want = keys.to_vec();
    want.sort();
    assert_eq!(seen, want, "each job leased by exactly one worker");
    assert!(sim.lease("w4", 1, 60).is_empty());
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s05_network_error_recovery_is_a_new_operation() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    let err = JobError::retryable("connect", "connection refused");
    let retry_at = sim.now.plus_ms(30_000);
    sim.at(1)
        .finish(
            "w1",
            j,
            OpKind::Head,
            Epoch(1),
            Err(err.clone()),
            Some(Command::Fail {
                epoch: Epoch(1),
                error: err,
                retry_at: Some(retry_at),
            }),
        )
        .unwrap();
    assert_eq!(sim.job(j).state, JobState::Planned);
    assert!(
        sim.at(10).lease("w2", 1, 60).is_empty(),
        "not due during backoff"
    );
    assert_eq!(sim.at(31).lease("w2", 1, 60), vec![(j, Epoch(2))]);
    assert_eq!(
        sim.begin("w2", j, OpKind::Head, Epoch(2)).unwrap(),
        OpDecision::Run,
        "new epoch, new op: runs"
    );
    sim.finish(
        "w2",
        j,
        OpKind::Head,
        Epoch(2),
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: Epoch(2),
            head: head(),
        }),
    )
    .unwrap();
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s06_lease_renewal_during_long_work() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 5);
    sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    sim.finish(
        "w1",
        j,
        OpKind::Head,
        Epoch(1),
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: Epoch(1),
            head: head(),
        }),
    )
    .unwrap();
    let w1 = WorkerId::new("w1");
    sim.at(4)
        .apply(
            "w1",
            j,
            Command::Renew {
                owner: w1.clone(),
                epoch: Epoch(1),
                ttl_ms: 5_000,
            },
        )
        .unwrap();
    sim.apply("w1", j, Command::StreamStarted { epoch: Epoch(1) })
        .unwrap();
    for t in [8, 12, 16, 20] {
        let job = sim
            .at(t)
            .apply(
                "w1",
                j,
                Command::Renew {
                    owner: w1.clone(),
                    epoch: Epoch(1),
                    ttl_ms: 5_000,
                },
            )
            .unwrap();
        assert_eq!(
            job.state,
            JobState::Streaming,
            "renew works in every live state"
        );
    }
    assert!(
        sim.at(22).lease("w2", 1, 60).is_empty(),
        "a renewed lease is not taken"
    );
    sim.note("a stranger cannot renew it");
    assert!(sim
        .apply(
            "w2",
            j,
            Command::Renew {
                owner: WorkerId::new("w2"),
                epoch: Epoch(1),
                ttl_ms: 5_000
            }
        )
        .is_err());
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s07_duplicate_detection_by_url_and_by_content() {
    let mut sim = Sim::new();
    let a = sim.plan("A", "w", "a", "http://h/paper.pdf");
    sim.lease("w1", 1, 60);
    run_to_end(&mut sim, "w1", a, Epoch(1), b"same bytes");
    let a_blob = sim.job(a).blob.unwrap();
    sim.note("B has the same URL as finalized A: skipped without a request");
    let b = sim.plan("B", "w", "b", "http://h/paper.pdf");
    sim.lease("w1", 1, 60);
    sim.apply(
        "w1",
        b,
        Command::Duplicate {
            epoch: Epoch(1),
            blob: a_blob.clone(),
            of: Some(a),
        },
    )
    .unwrap();
    sim.note("C has another URL but identical content: stored once");
    let c = sim.plan("C", "w", "c", "http://mirror/paper.pdf");
    sim.lease("w1", 1, 60);
    sim.begin("w1", c, OpKind::Head, Epoch(1)).unwrap();
    sim.finish(
        "w1",
        c,
        OpKind::Head,
        Epoch(1),
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: Epoch(1),
            head: head(),
        }),
    )
    .unwrap();
    sim.apply("w1", c, Command::StreamStarted { epoch: Epoch(1) })
        .unwrap();
    sim.apply(
        "w1",
        c,
        Command::Duplicate {
            epoch: Epoch(1),
            blob: blob(b"same bytes"),
            of: None,
        },
    )
    .unwrap();
    for k in [b, c] {
        let job = sim.job(k);
        assert_eq!(job.state, JobState::SkippedDuplicate);
        assert_eq!(job.blob.as_ref().unwrap().path, a_blob.path);
        assert!(job.state.is_success());
    }
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s08_failed_job_retry_only_by_operator() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    let err = JobError::permanent(
        "http_404",
        "GET https://example.org/papers/~a.pdf: 404 Not Found",
    );
    sim.finish(
        "w1",
        j,
        OpKind::Head,
        Epoch(1),
        Err(err.clone()),
        Some(Command::Fail {
            epoch: Epoch(1),
            error: err,
            retry_at: None,
        }),
    )
    .unwrap();
    assert_eq!(sim.job(j).state, JobState::Failed);
    assert!(
        sim.at(3600).lease("w2", 1, 60).is_empty(),
        "failed is terminal: never re-leased by itself"
    );
    sim.apply("operator", j, Command::OperatorRetry).unwrap();
    let got = sim.lease("w2", 1, 60);
    assert_eq!(got, vec![(j, Epoch(2))]);
    assert_eq!(sim.job(j).attempts, 1, "a new attempt series");
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s09_operation_ordering_is_enforced() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    let b = blob(b"x");
    sim.note("finalize before HEAD or stream is illegal");
    assert!(sim
        .apply(
            "w1",
            j,
            Command::Finalize {
                epoch: Epoch(1),
                blob: b.clone()
            }
        )
        .is_err());
    assert!(sim
        .apply("w1", j, Command::StreamStarted { epoch: Epoch(1) })
        .is_err());
    run_to_end(&mut sim, "w1", j, Epoch(1), b"x");
    let ops = sim.store.ops(&j).unwrap();
    let kinds: Vec<OpKind> = ops.iter().map(|o| o.key.kind).collect();
    assert_eq!(kinds, [OpKind::Head, OpKind::Stream, OpKind::Finalize]);
    assert!(ops.windows(2).all(|w| w[0].started_at <= w[1].started_at));
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn s10_key_collision_is_a_conflict_not_an_overwrite() {
    let mut sim = Sim::new();
    let j = sim.plan(
        "J1",
        "work-123",
        "artifact-456",
        "https://example.org/a.pdf",
    );
    sim.note("same identity, URL differs only in canonical details: no-op");
    let j2 = sim.plan(
        "J1",
        "work-123",
        "artifact-456",
        "HTTPS://EXAMPLE.org:443/a.pdf#frag",
    );
    assert_eq!(j, j2);
    sim.note("same identity, different URL: conflict, nothing applied");
    sim.plan(
        "J1",
        "work-123",
        "artifact-456",
        "https://example.org/b.pdf",
    );
    assert_eq!(sim.job(j).spec.url.as_str(), "https://example.org/a.pdf");
    sim.note("different artifact: a different job");
    let k = sim.plan(
        "J2",
        "work-123",
        "artifact-789",
        "https://example.org/a.pdf",
    );
    assert_ne!(j, k);
    insta::assert_snapshot!(sim.trace);
}

// ---- Defects of the prior art (reference §15.2), at core level ----

#[test]
fn d01_crash_after_leased_is_not_orphaned() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 10);
    sim.note("w1 dies right after leasing");
    assert_eq!(sim.at(11).lease("w2", 1, 10), vec![(j, Epoch(2))]);
    sim.begin("w2", j, OpKind::Head, Epoch(2)).unwrap();
    sim.finish(
        "w2",
        j,
        OpKind::Head,
        Epoch(2),
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: Epoch(2),
            head: head(),
        }),
    )
    .unwrap();
    sim.note("w2 dies after HEAD: still recoverable, by a worker that runs it alone");
    assert!(sim.at(22).lease("w3", 1, 10).is_empty(), "a suspect now");
    assert_eq!(sim.lease_alone("w3", 10), vec![(j, Epoch(3))]);
    let job = sim.job(j);
    assert_eq!(job.state, JobState::HeadDone);
    assert_eq!(
        (job.attempts, job.holder_deaths),
        (1, 2),
        "deaths spend no attempt"
    );
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn d02_finished_job_is_never_leased_or_moved_again() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    run_to_end(&mut sim, "w1", j, Epoch(1), b"x");
    assert!(sim.at(1000).lease("w2", 10, 60).is_empty());
    let err = sim
        .apply(
            "w2",
            j,
            Command::Acquire {
                owner: WorkerId::new("w2"),
                ttl_ms: 1,
                isolated: false,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("terminal"), "{err}");
    assert!(
        sim.apply("w1", j, Command::OperatorRetry).is_err(),
        "only failed jobs can be retried"
    );
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn d03_zombie_worker_is_fenced() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 10);
    sim.at(20).lease("w2", 1, 60);
    sim.note("w1 was paused past its lease; every write it tries is refused");
    let cmds = [
        Command::HeadDone {
            epoch: Epoch(1),
            head: head(),
        },
        Command::Renew {
            owner: WorkerId::new("w1"),
            epoch: Epoch(1),
            ttl_ms: 60_000,
        },
        Command::Release {
            owner: WorkerId::new("w1"),
            epoch: Epoch(1),
        },
        Command::Fail {
            epoch: Epoch(1),
            error: JobError::permanent("x", ""),
            retry_at: None,
        },
    ];
    for c in cmds {
        assert!(sim.apply("w1", j, c).unwrap_err().is_fenced());
    }
    assert!(sim
        .begin("w1", j, OpKind::Head, Epoch(1))
        .unwrap_err()
        .is_fenced());
    assert_eq!(sim.job(j).lease.unwrap().owner, WorkerId::new("w2"));
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn d04_started_op_is_never_replayed_as_success_and_errors_are_not_cached() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.lease("w1", 1, 60);
    sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap();
    sim.note("crash between claim and commit: asking again runs it");
    assert_eq!(
        sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap(),
        OpDecision::Run
    );
    let err = JobError::retryable("timeout", "read timed out");
    sim.finish("w1", j, OpKind::Head, Epoch(1), Err(err), None)
        .unwrap();
    sim.note("a failed op is run again, not replayed");
    assert_eq!(
        sim.begin("w1", j, OpKind::Head, Epoch(1)).unwrap(),
        OpDecision::Run
    );
    let ops = sim.store.ops(&j).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].runs, 3);
    insta::assert_snapshot!(sim.trace);
}

#[test]
fn d06_deaths_never_fail_a_job_but_one_that_kills_its_workers_is_poison() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    sim.note("holders die again and again while it runs among others");
    assert_eq!(sim.at(0).lease("w", 1, 10).len(), 1);
    assert_eq!(sim.at(100).lease("w", 1, 10).len(), 1);
    assert!(
        sim.at(200).lease("w", 1, 10).is_empty(),
        "a suspect now: left for a worker that runs it alone"
    );
    sim.note("even alone, a death nobody saw is not held against it");
    for i in 3..10 {
        assert_eq!(sim.at(i * 100).lease_alone("w", 10).len(), 1, "death {i}");
    }
    let job = sim.job(j);
    assert_eq!(job.state, JobState::Leased);
    assert_eq!(
        (job.attempts, job.holder_deaths, job.isolated_deaths),
        (1, 8, 0)
    );
    assert!(
        sim.at(1000).lease("w", 1, 10).is_empty(),
        "a suspect runs only alone"
    );
    sim.note("its child, alone, dies as its parent watches: held against it");
    for k in 0..3i64 {
        let epoch = sim.job(j).lease.unwrap().epoch;
        let died = Command::ChildDied {
            owner: WorkerId::new("w"),
            epoch,
            detail: "killed by SIGABRT".into(),
        };
        sim.at(2000 + k * 100).apply("w", j, died).unwrap();
        if k < 2 {
            assert_eq!(sim.lease_alone("w", 10).len(), 1);
        }
    }
    let job = sim.job(j);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.isolated_deaths, 3);
    assert!(job.last_error.unwrap().starts_with("poison:"));
    insta::assert_snapshot!(sim.trace);
}
