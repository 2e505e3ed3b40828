//! The store conformance suite: what every idem store must do, checked the
//! same way for each backend.
//!
//! One line runs it, one `#[test]` per case:
//!
//! ```ignore
//! idem_store_conformance::conformance_tests!(make_store());
//! ```
//!
//! where `make_store()` returns something that dereferences to a fresh,
//! empty store (`conformance_tests!(optional: maybe_store())` takes an
//! `Option` of one, and runs nothing when it is `None`: for a server that
//! may not be configured). Every case passes explicit times; none sleeps or spawns
//! pollers. The cases include every store-level defect of the prior art
//! (reference §15.2): orphaned jobs after a crash, finished jobs re-leased,
//! unfenced zombies, started ops replayed as success, errors replayed
//! forever, truncated results, renew failing outside `leased`.

mod counts;
mod import;
mod model;
pub mod races;

pub use counts::status_counts_mean_what_they_say;
pub use import::import_copies_jobs_and_ops_as_they_are;
pub use model::the_store_agrees_with_the_model_under_random_interleavings;

use idem_core::ports::{LeaseRequest, Store};
use idem_core::{
    BlobInfo, Command, Digest32, Epoch, HeadInfo, JobError, JobKey, JobSpec, JobState, OpDecision,
    OpKey, OpKind, OpResult, OpStatus, PlanOutcome, StreamInfo, Timestamp, WorkerId,
};

/// Generates one `#[test]` per conformance case for the store `$make`
/// builds (a fresh one per case).
#[macro_export]
macro_rules! conformance_tests {
    (optional: $make:expr) => {
        $crate::__conformance_list!($make);
    };
    ($make:expr) => {
        $crate::__conformance_list!(::core::option::Option::Some($make));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_list {
    ($make:expr) => {
        $crate::__conformance_cases!($make;
            plan_is_idempotent_and_reports_conflicts,
            plan_batch_reports_each_item,
            lease_takes_oldest_due_first_up_to_limit,
            lease_bumps_epoch_and_never_double_leases,
            expired_lease_is_retaken_in_every_live_state,
            dead_owner_lease_is_taken_over_early,
            finished_job_is_never_leased_or_moved,
            fenced_worker_changes_nothing_and_is_counted,
            started_op_is_not_replayed_as_success,
            failed_op_is_run_again_not_replayed,
            committed_op_replays_its_exact_result,
            results_round_trip_exactly_whatever_their_size,
            renew_works_in_every_live_state,
            retry_backoff_is_respected,
            op_outcome_and_transition_are_atomic,
            op_is_committed_at_most_once,
            dead_ops_are_abandoned,
            attempts_count_failures_not_deaths_or_stops,
            suspects_are_leased_only_alone_and_poison_fails_them,
            leases_interleave_hosts_within_their_budget,
            a_full_hosts_long_queue_does_not_hide_the_others,
            a_host_cooling_down_is_not_leased,
            status_counts_are_exact,
            scan_pages_through_every_job,
            finalized_by_url_finds_only_finalized,
            expired_leases_are_listed,
            live_lease_owners_are_listed,
            steps_are_all_or_nothing,
            op_begun_and_finished_in_one_request_is_recorded_once,
            a_lease_step_sees_the_steps_before_it_and_rolls_back_with_them,
            operator_retry_restarts_a_failed_job,
            status_counts_mean_what_they_say,
            import_copies_jobs_and_ops_as_they_are,
            the_store_agrees_with_the_model_under_random_interleavings
        );
    };
}

/// Generates one `#[test]` per race between two handles on one ledger,
/// for the handles `$make_two` builds (fresh ones per case): a value whose
/// `.0` and `.1` dereference to stores sharing a ledger.
#[macro_export]
macro_rules! conformance_races {
    (optional: $make_two:expr) => {
        $crate::__race_list!($make_two);
    };
    ($make_two:expr) => {
        $crate::__race_list!(::core::option::Option::Some($make_two));
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __race_list {
    ($make_two:expr) => {
        $crate::__conformance_races!($make_two;
            racing_leasers_never_share_a_job,
            racing_finishes_commit_an_op_once,
            a_renewal_racing_a_takeover_has_one_winner
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_races {
    ($make_two:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let ::core::option::Option::Some(two) = $make_two else {
                    return;
                };
                $crate::races::$name(&*two.0, &*two.1);
            }
        )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let ::core::option::Option::Some(store) = $make else {
                    return;
                };
                $crate::$name(&*store);
            }
        )*
    };
}

const T0: i64 = 1_700_000_000_000;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

fn spec(i: usize) -> JobSpec {
    JobSpec::new(
        "work",
        &format!("art-{i}"),
        &format!("https://example.org/{i}.pdf"),
        None,
        None,
    )
    .expect("valid spec")
}

fn w(name: &str) -> WorkerId {
    WorkerId::new(name)
}

fn lease(
    s: &dyn Store,
    owner: &str,
    limit: usize,
    ttl_s: u64,
    now: Timestamp,
) -> Vec<(JobKey, Epoch)> {
    let req = LeaseRequest {
        owner: w(owner),
        limit,
        ttl_ms: ttl_s * 1000,
        dead_owners: vec![],
        commit: idem_core::Commit::Durable,
        isolated: false,
        per_host: None,
    };
    s.lease(&req, now)
        .expect("lease")
        .value
        .into_iter()
        .map(|j| (j.key, j.lease.expect("leased job has a lease").epoch))
        .collect()
}

fn plan_n(s: &dyn Store, n: usize, now: Timestamp) -> Vec<JobKey> {
    let specs: Vec<JobSpec> = (0..n).map(spec).collect();
    s.plan(&specs, 3, now).expect("plan");
    specs.iter().map(JobSpec::key).collect()
}

fn head() -> HeadInfo {
    HeadInfo {
        status: 200,
        etag: Some("\"abc\"".into()),
        last_modified: Some("Sun, 06 Nov 1994 08:49:37 GMT".into()),
        content_length: Some(3),
        content_type: Some("application/pdf".into()),
        accept_ranges: true,
        sha256: None,
    }
}

fn op(key: JobKey, kind: OpKind, epoch: Epoch) -> OpKey {
    OpKey {
        job: key,
        kind,
        epoch,
    }
}

/// HEAD committed for a held job.
fn do_head(s: &dyn Store, key: JobKey, e: Epoch, owner: &str, now: Timestamp) {
    let o = op(key, OpKind::Head, e);
    assert_eq!(
        s.begin_op(&o, &w(owner), now).unwrap().value,
        OpDecision::Run
    );
    s.finish_op(
        &o,
        Ok(OpResult::Head(head())),
        Some(Command::HeadDone {
            epoch: e,
            head: head(),
        }),
        now,
    )
    .unwrap();
}

fn do_finish(s: &dyn Store, key: JobKey, e: Epoch, owner: &str, now: Timestamp) -> BlobInfo {
    s.apply(&key, Command::StreamStarted { epoch: e }, now)
        .unwrap();
    let blob = BlobInfo::new(Digest32::of(key.digest().as_bytes()), 32);
    let so = op(key, OpKind::Stream, e);
    s.begin_op(&so, &w(owner), now).unwrap();
    s.finish_op(
        &so,
        Ok(OpResult::Stream(StreamInfo {
            sha256: blob.sha256,
            size: 32,
            resumed_from: 0,
        })),
        None,
        now,
    )
    .unwrap();
    let fo = op(key, OpKind::Finalize, e);
    s.begin_op(&fo, &w(owner), now).unwrap();
    s.finish_op(
        &fo,
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize {
            epoch: e,
            blob: blob.clone(),
        }),
        now,
    )
    .unwrap();
    blob
}

fn state(s: &dyn Store, key: JobKey) -> JobState {
    s.job(&key).unwrap().expect("job exists").state
}

pub fn plan_is_idempotent_and_reports_conflicts(s: &dyn Store) {
    let a = spec(1);
    let r = s.plan(std::slice::from_ref(&a), 3, t(0)).unwrap();
    assert_eq!(r.value, vec![PlanOutcome::Planned { job_key: a.key() }]);
    assert_eq!(r.events.len(), 1);
    let r = s.plan(std::slice::from_ref(&a), 3, t(1)).unwrap();
    assert_eq!(r.value, vec![PlanOutcome::Existing { job_key: a.key() }]);
    assert!(r.events.is_empty(), "a no-op re-plan emits nothing");
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

#[cfg(test)]
mod tests {
    //! The reference in-memory store passes the suite: the suite's
    //! expectations are satisfiable by the simplest correct store.
    crate::conformance_tests!(Box::new(idem_core::MemStore::new()));

    mod races {
        crate::conformance_races!({
            let s = std::sync::Arc::new(idem_core::MemStore::new());
            (std::sync::Arc::clone(&s), s)
        });
    }
}
