//! A ledger written by idem's first schema (made by that release, committed
//! as a fixture) opens, upgrades in place and keeps working.

use crate::{Options, SqliteStore};
use idem_core::ports::{LeaseRequest, Store};
use idem_core::{
    Commit, JobSpec, JobState, OpKind, OpResult, OpStatus, PlanOutcome, Timestamp, WorkerId,
};

/// Three jobs finalized, one failed (HTTP 404), one planned after the run.
const V1: &[u8] = include_bytes!("fixtures/ledger-v1.db");

fn specs() -> Vec<JobSpec> {
    let sha = "bdc2d5cd894a4cc0f9e84d2bd664d5532bac2f8755d2a7214c504ed354063ed6";
    let base = "http://127.0.0.1:18931";
    vec![
        JobSpec::new(
            "w-alpha",
            "a1",
            &format!("{base}/alpha.bin"),
            Some(sha),
            None,
        ),
        JobSpec::new(
            "w-beta",
            "a1",
            &format!("{base}/beta.txt"),
            None,
            Some("text/plain"),
        ),
        JobSpec::new("w-gamma", "a2", &format!("{base}/gamma.dat"), None, None),
        JobSpec::new(
            "w-missing",
            "a1",
            &format!("{base}/missing.bin"),
            None,
            None,
        ),
        JobSpec::new("w-delta", "a1", &format!("{base}/delta.bin"), None, None),
    ]
    .into_iter()
    .map(|s| s.expect("valid spec"))
    .collect()
}

#[test]
fn a_version_1_ledger_made_by_idem_upgrades_in_place_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    std::fs::write(&path, V1).unwrap();
    let version = |p: &std::path::Path| -> i64 {
        rusqlite::Connection::open(p)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(version(&path), 1);
    let s = SqliteStore::open(&path, &Options::default()).unwrap();
    assert_eq!(version(&path), SqliteStore::schema_version());
    let now = Timestamp::from_millis(2_000_000_000_000);

    // Every job is where that release left it, under the key this release
    // computes for the same line.
    let specs = specs();
    let states: Vec<JobState> = specs
        .iter()
        .map(|sp| s.job(&sp.key()).unwrap().expect("job kept").state)
        .collect();
    use JobState::{Failed, Finalized, Planned};
    assert_eq!(states, [Finalized, Finalized, Finalized, Failed, Planned]);
    let alpha = s.job(&specs[0].key()).unwrap().unwrap();
    let blob = alpha.blob.expect("blob kept");
    assert_eq!(blob.size, 2048);
    assert_eq!(Some(blob.sha256), specs[0].sha256);
    let ops = s.ops(&specs[0].key()).unwrap();
    let kinds: Vec<_> = ops.iter().map(|o| (o.key.kind, o.status)).collect();
    assert_eq!(
        kinds,
        [
            (OpKind::Head, OpStatus::Committed),
            (OpKind::Stream, OpStatus::Committed),
            (OpKind::Finalize, OpStatus::Committed)
        ]
    );
    assert!(matches!(&ops[2].result, Some(OpResult::Finalize(b)) if b.size == 2048));
    let failed = s.job(&specs[3].key()).unwrap().unwrap();
    assert!(failed.last_error.unwrap().starts_with("http_404"));

    let st = s.status(now).unwrap();
    assert_eq!(st.total, 5);
    assert_eq!(st.ops_started, 10, "every op row of that release counted");
    assert_eq!(st.failures_by_reason.get("http_404"), Some(&1));
    assert_eq!(st.due_now, 1);

    // Re-planning that release's lines is a no-op.
    let again = s.plan(&specs, 5, now).unwrap().value;
    assert!(again
        .iter()
        .all(|o| matches!(o, PlanOutcome::Existing { .. })));

    // The planned job is leased next, ranked among its host's jobs.
    let req = LeaseRequest {
        owner: WorkerId::new("w"),
        limit: 10,
        ttl_ms: 60_000,
        dead_owners: vec![],
        commit: Commit::Durable,
        isolated: false,
        per_host: Some(4),
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    let leased = s.lease(&req, now).unwrap().value;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].key, specs[4].key());
    assert_eq!(leased[0].host_rank, 4, "fifth job planned on its host");
    drop(s);
    assert!(crate::SqliteStore::open(&path, &Options::default())
        .unwrap()
        .check_integrity(true)
        .unwrap()
        .is_empty());
}
