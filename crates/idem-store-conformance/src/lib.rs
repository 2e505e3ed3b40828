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
//!
//! ## Example
//!
//! In your store's tests, one `#[test]` per case, on a fresh store each:
//!
//! ```ignore
//! idem_store_conformance::conformance_tests!(Box::new(my_store::open_scratch()));
//! ```
//!
//! or run one case yourself:
//!
//! ```
//! idem_store_conformance::plan_is_idempotent_and_reports_conflicts(&idem_core::MemStore::new());
//! ```

mod counts;
mod hosts;
mod import;
mod leases;
mod model;
mod ops;
pub mod races;
mod reads;

pub use counts::status_counts_mean_what_they_say;
pub use hosts::*;
pub use import::import_copies_jobs_and_ops_as_they_are;
pub use leases::*;
pub use model::the_store_agrees_with_the_model_under_random_interleavings;
pub use ops::*;
pub use reads::*;

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
            reuse_is_reported_and_counted,
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
            a_paced_host_is_leased_once_per_interval_whoever_asks,
            mirrors_and_headers_are_kept_and_the_url_index_moves_on,
            paused_hosts_are_not_leased_until_resumed,
            status_counts_are_exact,
            scan_pages_through_every_job,
            finalized_by_url_finds_only_finalized,
            finished_jobs_are_found_by_finish_time,
            expired_leases_are_listed,
            live_lease_owners_are_listed,
            steps_are_all_or_nothing,
            op_begun_and_finished_in_one_request_is_recorded_once,
            a_lease_step_sees_the_steps_before_it_and_rolls_back_with_them,
            operator_retry_restarts_a_failed_job,
            prune_drops_only_old_finished_jobs_ops,
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
            a_renewal_racing_a_takeover_has_one_winner,
            racing_planners_plan_each_job_once
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
        host_interval_ms: None,
        host_rules: Default::default(),
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
