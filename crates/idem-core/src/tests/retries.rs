//! Scenarios of a job's attempts against a host that throttles and across
//! an artifact's URLs.

use super::scenarios::URL;
use super::Sim;
use crate::{Command, JobError, JobState, Store};

#[test]
fn s_throttled_answers_cost_no_attempt_within_the_bounded_wait() {
    let mut sim = Sim::new();
    let j = sim.plan("J1", "w", "a", URL);
    let throttled = || {
        let mut e = JobError::retryable("http_429", "slow down");
        e.retry_after_ms = Some(1000);
        e
    };
    // Far more throttled answers than attempts: the job waits, never fails.
    for i in 0..10 {
        let got = sim.at(i * 10).lease("w1", 1, 60);
        assert_eq!(got.len(), 1, "round {i}");
        let epoch = got[0].1;
        sim.apply(
            "w1",
            j,
            Command::Fail {
                epoch,
                error: throttled(),
                retry_at: Some(sim.now.plus_ms(1000)),
            },
        )
        .unwrap();
        assert_eq!(
            (sim.job(j).state, sim.job(j).attempts),
            (JobState::Planned, 0)
        );
    }
    // Past the bound, throttling counts as any failure.
    let late = 10 + crate::hosts::MAX_THROTTLED_WAIT_MS as i64 / 1000;
    for i in 0..3 {
        let got = sim.at(late + i * 10).lease("w1", 1, 60);
        assert_eq!(got.len(), 1);
        let epoch = got[0].1;
        sim.apply(
            "w1",
            j,
            Command::Fail {
                epoch,
                error: throttled(),
                retry_at: Some(sim.now.plus_ms(1000)),
            },
        )
        .unwrap();
    }
    assert_eq!(sim.job(j).state, JobState::Failed);
}

#[test]
fn s_a_digest_mismatch_moves_to_the_next_url_at_once() {
    let mut sim = Sim::new();
    let spec = crate::JobSpec::new("w", "a", URL, None, None)
        .unwrap()
        .with_mirrors(["https://mirror.example/a.pdf"])
        .unwrap();
    sim.store
        .plan(std::slice::from_ref(&spec), 3, sim.now)
        .unwrap();
    let j = spec.key();
    let got = sim.lease("w1", 1, 60);
    let epoch = got[0].1;
    sim.apply(
        "w1",
        j,
        Command::Fail {
            epoch,
            error: JobError::retryable("digest_mismatch", "got another body"),
            retry_at: Some(sim.now.plus_ms(5_000)),
        },
    )
    .unwrap();
    let job = sim.job(j);
    assert_eq!(
        (job.url_index, job.attempts, job.state),
        (1, 0, JobState::Planned)
    );
    assert_eq!(
        job.next_attempt_at, sim.now,
        "at once, not after the backoff"
    );
    // On its last URL a mismatch is retried there as before.
    let epoch = sim.lease("w1", 1, 60)[0].1;
    sim.apply(
        "w1",
        j,
        Command::Fail {
            epoch,
            error: JobError::retryable("digest_mismatch", "got another body"),
            retry_at: Some(sim.now.plus_ms(5_000)),
        },
    )
    .unwrap();
    let job = sim.job(j);
    assert_eq!((job.url_index, job.attempts), (1, 1));
    assert_eq!(job.next_attempt_at, sim.now.plus_ms(5_000));
}
