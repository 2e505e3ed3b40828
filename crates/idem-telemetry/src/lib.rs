//! idem-telemetry: the one mapping from idem's events to `metrics`.
//!
//! This is the only crate that knows metric names. It records through the
//! `metrics` facade and installs nothing: the `idem` binary installs the
//! Prometheus exporter, using [`CATALOGUE`] for help texts and
//! [`histogram_buckets`] for bucket boundaries (placed on every SLO
//! threshold, so each SLO is an exact bucket ratio).
//!
//! Conventions: `idem_` prefix, base units (`_seconds`, `_bytes`), `_total`
//! on counters, and only low-cardinality labels (state, op, status, reason
//! code), never job keys or URLs.
//!
//! ## Example
//!
//! ```
//! use idem_core::{Event, EventKind, JobKey, Timestamp, Digest32};
//!
//! // With a `metrics` recorder installed (the `idem` binary installs the
//! // Prometheus exporter), every event becomes counters and histograms.
//! idem_telemetry::describe();
//! let planned = EventKind::JobPlanned {
//!     job_key: JobKey::from_digest(Digest32::of(b"job")),
//!     work_id: "W1".into(),
//!     artifact_id: "pdf".into(),
//!     url: "https://example.org/w1.pdf".into(),
//! };
//! idem_telemetry::record(&Event { timestamp: Timestamp::from_millis(0), kind: planned });
//! assert!(idem_telemetry::is_known("idem_jobs_planned_total"));
//! ```
//!
//! Depends on idem-core and the `metrics` facade only.

use idem_core::{Event, EventKind, StatusCounts};
use metrics::{counter, gauge, histogram};

/// What kind of metric a catalogue entry is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, kind, labels and help text.
#[derive(Copy, Clone, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! catalogue {
    ($( $id:ident = $name:literal, $kind:ident, [$($l:literal),*], $help:literal; )*) => {
        $( pub const $id: &str = $name; )*
        /// Every metric idem exports.
        pub const CATALOGUE: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: Kind::$kind, labels: &[$($l),*], help: $help }, )*
        ];
    };
}

catalogue! {
    JOBS_PLANNED = "idem_jobs_planned_total", Counter, [], "Jobs newly planned (re-plans of an existing job are not counted).";
    KEY_CONFLICTS = "idem_key_conflicts_total", Counter, [], "Plans refused because the job key exists with another payload.";
    LEASES_ACQUIRED = "idem_leases_acquired_total", Counter, ["takeover"], "Leases acquired; takeover=true when the job was left mid-way by another holder.";
    LEASES_RENEWED = "idem_leases_renewed_total", Counter, [], "Lease renewals (heartbeats).";
    LEASES_RELEASED = "idem_leases_released_total", Counter, ["reason"], "Leases ended by their holder: finished (a terminal state), failed (the attempt failed), stopped (a graceful stop). Acquired = released + expired + live.";
    LEASES_EXPIRED = "idem_leases_expired_total", Counter, [], "Leases that ran out before their holder finished (a crash, a pause, a stall).";
    WRITES_FENCED = "idem_writes_fenced_total", Counter, [], "Writes refused because they carried a stale lease epoch.";
    STATE_TRANSITIONS = "idem_state_transitions_total", Counter, ["from", "to"], "Job state transitions.";
    JOBS_FINISHED = "idem_jobs_finished_total", Counter, ["outcome"], "Jobs reaching a terminal state, by outcome (finalized, skipped_duplicate, failed).";
    JOBS_FAILED = "idem_jobs_failed_total", Counter, ["reason"], "Jobs failed for good, by reason code.";
    OPS_STARTED = "idem_operations_started_total", Counter, ["op"], "Operations (head, stream, finalize) started.";
    OPS_COMPLETED = "idem_operations_completed_total", Counter, ["op", "status"], "Operations completed, by status (committed, failed).";
    OP_DURATION = "idem_operation_duration_seconds", Histogram, ["op"], "Time from an operation's start to its completion.";
    REPLAYS = "idem_replays_total", Counter, ["op"], "Work reused instead of done again, by what was reused (plan: a job planned again; head, stream, finalize: a committed op's result, kept by a new holder, a repair or a URL already finalized).";
    CRASH_RECOVERIES = "idem_crash_recoveries_total", Counter, ["kind"], "Repairs of what crashes left behind, by kind.";
    BYTES_DOWNLOADED = "idem_downloaded_bytes_total", Counter, [], "Body bytes fetched over the network (resumed prefixes excluded).";
    DUPLICATES = "idem_duplicates_total", Counter, ["by"], "Jobs whose content was already stored, by detection (content, url).";
    RETRIES = "idem_retries_scheduled_total", Counter, ["reason"], "Attempts that failed and were scheduled again.";
    LEASE_CALL = "idem_lease_acquire_duration_seconds", Histogram, [], "Latency of one lease call that got work (waiting for the ledger included); idle polls and leases taken in the write that finished a job are left out.";
    PLAN_TO_FINISH = "idem_plan_to_finish_seconds", Histogram, ["outcome"], "Time from planning a job to its terminal state (queue wait included).";
    LEASE_TO_FINISH = "idem_lease_to_finish_seconds", Histogram, ["outcome"], "Time from a job's first lease to its terminal state: the service time, queue wait excluded.";
    QUEUE_WAIT = "idem_queue_wait_seconds", Histogram, [], "Time a job waited from planning to its first lease.";
    QUEUE_JOBS = "idem_queue_jobs", Gauge, ["ledger", "state"], "Jobs in the ledger by state (sampled; every worker of a ledger reports the same value: take max by ledger, never sum).";
    QUEUE_DUE = "idem_queue_due_jobs", Gauge, ["ledger"], "Jobs due now and not held (sampled; max by ledger).";
    OLDEST_DUE_AGE = "idem_queue_oldest_due_age_seconds", Gauge, ["ledger"], "How long the oldest due job has waited (sampled; 0 when none is due; max by ledger).";
    LIVE_LEASES = "idem_leases_live", Gauge, ["ledger"], "Leases currently held (sampled; max by ledger).";
    STALE_LEASES = "idem_leases_stale", Gauge, ["ledger"], "Leases past their expiry that nobody has taken over yet (sampled; max by ledger).";
    PAUSED = "idem_paused_hosts", Gauge, ["ledger"], "Pauses in force (`idem pause`): 1 for every host paused at once, or the number of single hosts paused (sampled; max by ledger).";
}

/// Histogram bucket boundaries, in seconds. Each SLO threshold is a bucket
/// edge: 0.1 s (lease acquisition p99) and 120 s (service latency p95).
pub fn histogram_buckets() -> Vec<(&'static str, &'static [f64])> {
    const LATENCY: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    const OPS: &[f64] = &[
        0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    const AGE: &[f64] = &[
        1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0,
    ];
    vec![
        (LEASE_CALL, LATENCY),
        (OP_DURATION, OPS),
        (PLAN_TO_FINISH, AGE),
        (LEASE_TO_FINISH, OPS),
        (QUEUE_WAIT, AGE),
    ]
}

/// Registers help texts with the installed recorder.
pub fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help),
        }
    }
}

/// Exports failure and recovery counters at zero before the first event,
/// so rate() and absent() work from the first scrape.
pub fn preregister() {
    counter!(JOBS_PLANNED).absolute(0);
    counter!(KEY_CONFLICTS).absolute(0);
    counter!(LEASES_EXPIRED).absolute(0);
    counter!(LEASES_RENEWED).absolute(0);
    for reason in ["finished", "failed", "stopped"] {
        counter!(LEASES_RELEASED, "reason" => reason).absolute(0);
    }
    counter!(WRITES_FENCED).absolute(0);
    for by in ["content", "url"] {
        counter!(DUPLICATES, "by" => by).absolute(0);
    }
    // The crash-recovery SLI's numerator; other reasons appear as they
    // happen (their set is open).
    counter!(JOBS_FAILED, "reason" => "poison").absolute(0);
    counter!(BYTES_DOWNLOADED).absolute(0);
    for outcome in ["finalized", "skipped_duplicate", "failed"] {
        counter!(JOBS_FINISHED, "outcome" => outcome).absolute(0);
    }
    for kind in [
        "lease_expired",
        "op_abandoned",
        "part_removed",
        "blob_healed",
        "blob_missing_requeued",
    ] {
        counter!(CRASH_RECOVERIES, "kind" => kind).absolute(0);
    }
    for takeover in ["false", "true"] {
        counter!(LEASES_ACQUIRED, "takeover" => takeover).absolute(0);
    }
    for op in idem_core::ReplayOp::ALL {
        counter!(REPLAYS, "op" => op.as_str()).absolute(0);
    }
    for op in ["head", "stream", "finalize"] {
        counter!(OPS_STARTED, "op" => op).absolute(0);
        for status in ["committed", "failed"] {
            counter!(OPS_COMPLETED, "op" => op, "status" => status).absolute(0);
        }
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Records one event.
pub fn record(event: &Event) {
    match &event.kind {
        EventKind::JobPlanned { .. } => counter!(JOBS_PLANNED).increment(1),
        EventKind::KeyConflict { .. } => counter!(KEY_CONFLICTS).increment(1),
        EventKind::JobLeased {
            resumed_from,
            queued_ms,
            ..
        } => {
            let takeover = if resumed_from.is_some() {
                "true"
            } else {
                "false"
            };
            counter!(LEASES_ACQUIRED, "takeover" => takeover).increment(1);
            if let Some(ms) = queued_ms {
                histogram!(QUEUE_WAIT).record(secs(*ms));
            }
        }
        EventKind::LeaseRenewed { .. } => counter!(LEASES_RENEWED).increment(1),
        EventKind::LeaseReleased { reason, .. } => {
            counter!(LEASES_RELEASED, "reason" => reason.clone()).increment(1)
        }
        EventKind::LeaseExpired { .. } => counter!(LEASES_EXPIRED).increment(1),
        EventKind::WriteFenced { .. } => counter!(WRITES_FENCED).increment(1),
        EventKind::JobStateChanged {
            from,
            to,
            since_planned_ms,
            since_leased_ms,
            ..
        } => {
            counter!(STATE_TRANSITIONS, "from" => from.as_str(), "to" => to.as_str()).increment(1);
            if to.is_terminal() {
                counter!(JOBS_FINISHED, "outcome" => to.as_str()).increment(1);
                if let Some(ms) = since_planned_ms {
                    histogram!(PLAN_TO_FINISH, "outcome" => to.as_str()).record(secs(*ms));
                }
                if let Some(ms) = since_leased_ms {
                    histogram!(LEASE_TO_FINISH, "outcome" => to.as_str()).record(secs(*ms));
                }
            }
        }
        EventKind::JobFailed { reason, .. } => {
            counter!(JOBS_FAILED, "reason" => reason.clone()).increment(1)
        }
        EventKind::OperationStarted { op, .. } => {
            counter!(OPS_STARTED, "op" => op.as_str()).increment(1)
        }
        EventKind::OperationCompleted {
            op,
            status,
            elapsed_ms,
            bytes,
            ..
        } => {
            counter!(OPS_COMPLETED, "op" => op.as_str(), "status" => status.as_str()).increment(1);
            histogram!(OP_DURATION, "op" => op.as_str()).record(secs(*elapsed_ms));
            if let Some(b) = bytes {
                counter!(BYTES_DOWNLOADED).increment(*b);
            }
        }
        EventKind::IdempotencyReplay { op, .. } => {
            counter!(REPLAYS, "op" => op.as_str()).increment(1)
        }
        EventKind::CrashRecovery { kind, count, .. } => {
            counter!(CRASH_RECOVERIES, "kind" => kind.clone()).increment(*count);
        }
        EventKind::DuplicateDetected { by, .. } => {
            counter!(DUPLICATES, "by" => by.clone()).increment(1)
        }
        EventKind::RetryScheduled { reason, .. } => {
            counter!(RETRIES, "reason" => reason.clone()).increment(1)
        }
        // The lease SLI times the lease alone: an idle poll measures an
        // empty queue, a successor lease includes its FINALIZE's commit.
        EventKind::LeaseCall {
            elapsed_ms,
            jobs,
            successor,
            ..
        } => {
            if *jobs > 0 && !successor {
                histogram!(LEASE_CALL).record(secs(*elapsed_ms));
            }
        }
    }
}

/// Records a sample of the ledger's counts (queue gauges), labelled with
/// the ledger they describe: every worker of one ledger reports the same
/// numbers, so a fleet's total is the sum over ledgers of the max over
/// workers.
pub fn record_status(st: &StatusCounts, ledger: &str) {
    let ledger = ledger.to_owned();
    for (state, n) in &st.by_state {
        gauge!(QUEUE_JOBS, "ledger" => ledger.clone(), "state" => state.as_str()).set(*n as f64);
    }
    gauge!(QUEUE_DUE, "ledger" => ledger.clone()).set(st.due_now as f64);
    gauge!(OLDEST_DUE_AGE, "ledger" => ledger.clone()).set(st.oldest_due_age_ms.map_or(0.0, secs));
    gauge!(LIVE_LEASES, "ledger" => ledger.clone()).set(st.live_leases as f64);
    gauge!(STALE_LEASES, "ledger" => ledger.clone()).set(st.expired_leases as f64);
    gauge!(PAUSED, "ledger" => ledger).set(st.paused.len() as f64);
}

/// Is `name` (possibly with a Prometheus suffix such as `_bucket`) a metric
/// of the catalogue? For checks of dashboards and rules.
pub fn is_known(name: &str) -> bool {
    CATALOGUE.iter().any(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|sfx| name.strip_suffix(sfx) == Some(m.name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("idem_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                Kind::Histogram => assert!(m.name.ends_with("_seconds"), "{}", m.name),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            assert!(!m.help.is_empty());
            for l in m.labels {
                assert!(
                    !["job_key", "url", "key", "work_id", "artifact_id"].contains(l),
                    "high-cardinality label {l}"
                );
            }
        }
        assert!(is_known("idem_plan_to_finish_seconds_bucket"));
        assert!(!is_known("idem_jobs_planned_total_bucket"));
    }
}
