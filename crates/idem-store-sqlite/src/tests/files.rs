//! Opening files that are not ledgers, newer ledgers, read-only places:
//! each refused with a clear error, and left exactly as they were.

use crate::{Durability, Options, SqliteStore};
use idem_core::ports::{Store, StoreError};
use idem_core::{JobSpec, Timestamp};

fn spec(i: usize) -> JobSpec {
    JobSpec::new("w", &format!("a{i}"), &format!("http://h/{i}"), None, None).unwrap()
}

#[test]
fn refuses_a_text_file_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "hello, not a database\n").unwrap();
    let err = SqliteStore::open(&p, &Options::default()).unwrap_err();
    assert!(matches!(err, StoreError::NotALedger(_)), "{err}");
    assert!(err.to_string().contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        "hello, not a database\n"
    );
    assert!(!dir.path().join("notes.txt-wal").exists());
}

#[test]
fn refuses_a_foreign_sqlite_database_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(&p).unwrap();
    let err = SqliteStore::open(&p, &Options::default()).unwrap_err();
    assert!(matches!(err, StoreError::NotALedger(_)), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before, "not a byte changed");
}

#[test]
fn refuses_a_ledger_from_a_newer_idem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("idem.db");
    drop(SqliteStore::open(&p, &Options::default()).unwrap());
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA user_version = 99;").unwrap();
    }
    let err = SqliteStore::open(&p, &Options::default()).unwrap_err();
    assert_eq!(
        err,
        StoreError::TooNew {
            found: 99,
            supported: SqliteStore::schema_version()
        }
    );
    assert!(err.to_string().contains("upgrade idem"));
}

#[test]
fn reopens_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("idem.db");
    let now = Timestamp::from_millis(1);
    {
        let s = SqliteStore::open(
            &p,
            &Options {
                durability: Durability::Normal,
                ..Options::default()
            },
        )
        .unwrap();
        s.plan(&[spec(1), spec(2)], 3, now).unwrap();
    }
    let s = SqliteStore::open(&p, &Options::default()).unwrap();
    assert_eq!(s.status(now).unwrap().total, 2);
    assert!(s.job(&spec(1).key()).unwrap().is_some());
}

#[test]
fn read_only_directory_gives_a_clear_error() {
    if is_root() {
        // Root ignores directory permissions; the check would be vacuous.
        eprintln!("skipped: running as root, permissions are not enforced");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
    std::fs::set_permissions(&ro, perm).unwrap();
    let err = SqliteStore::open(ro.join("idem.db"), &Options::default()).unwrap_err();
    assert!(err.to_string().contains("idem.db"), "{err}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn concurrent_callers_in_one_process_are_group_committed_correctly() {
    let db = super::fresh();
    let specs: Vec<JobSpec> = (0..400).map(spec).collect();
    db.plan(&specs, 3, Timestamp::from_millis(0)).unwrap();
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for w in 0..8 {
            let db = &*db;
            let done = &done;
            scope.spawn(move || {
                let owner = idem_core::WorkerId::new(format!("w{w}"));
                let now = Timestamp::from_millis(10);
                loop {
                    let req = idem_core::LeaseRequest {
                        owner: owner.clone(),
                        limit: 3,
                        ttl_ms: 60_000,
                        dead_owners: vec![],
                        commit: idem_core::Commit::Durable,
                        isolated: false,
                        per_host: None,
                        host_interval_ms: None,
                        host_rules: Default::default(),
                    };
                    let got = db.lease(&req, now).unwrap().value;
                    if got.is_empty() {
                        break;
                    }
                    for j in got {
                        let e = j.lease.unwrap().epoch;
                        let err = idem_core::JobError::permanent("test", "done");
                        db.apply(
                            &j.key,
                            idem_core::Command::Fail {
                                epoch: e,
                                error: err,
                                retry_at: None,
                            },
                            now,
                        )
                        .unwrap();
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(done.into_inner(), 400, "each job completed exactly once");
    let st = db.status(Timestamp::from_millis(10)).unwrap();
    assert_eq!(st.by_state[&idem_core::JobState::Failed], 400);
}

#[test]
fn migrates_a_version_1_ledger_and_keeps_its_ops() {
    use idem_core::{Epoch, OpKey, OpKind, OpResult, OpStatus, WorkerId};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v1.db");
    let now = Timestamp::from_millis(1);
    // A ledger as idem with schema 1 left it: version 1's tables, one job
    // leased at epoch 1 whose HEAD committed, rows in that version's text
    // forms.
    let key = spec(1).key();
    let head_op = OpKey {
        job: key,
        kind: OpKind::Head,
        epoch: Epoch(1),
    };
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(crate::schema::MIGRATIONS[0]).unwrap();
        c.execute_batch(&format!(
            "PRAGMA user_version = 1; PRAGMA application_id = {};",
            crate::schema::APPLICATION_ID
        ))
        .unwrap();
        let k = key.digest().as_bytes().to_vec();
        c.execute(
            "INSERT INTO jobs (key, fingerprint, work_id, artifact_id, url, state, lease_owner, lease_epoch, lease_expires_at, \
               epoch, attempts, max_attempts, next_attempt_at, due_at, head, created_at, updated_at, first_leased_at) \
             VALUES (?1, ?2, 'w', 'a1', 'http://h/1', 'head_done', 'w', 1, 60001, 1, 1, 3, 1, 60001, \
               '{\"status\":200,\"accept_ranges\":false}', 1, 1, 1)",
            rusqlite::params![k, spec(1).fingerprint().digest().as_bytes().to_vec()],
        )
        .unwrap();
        c.execute(
            "INSERT INTO ops (job_key, kind, epoch, owner, status, result, runs, started_at, finished_at) \
             VALUES (?1, 'head', 1, 'w', 'committed', '{\"op\":\"head\",\"status\":200,\"accept_ranges\":false}', 1, 1, 1)",
            [k],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&p, &Options::default()).unwrap();
    let ops = s.ops(&key).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].key, head_op);
    assert_eq!(ops[0].status, OpStatus::Committed);
    assert!(matches!(ops[0].result, Some(OpResult::Head(ref h)) if h.status == 200));
    let v: i64 = rusqlite::Connection::open(&p)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SqliteStore::schema_version());
    // The migrated ledger keeps working: the op is replayed, not rerun.
    let d = s
        .begin_op(&head_op, &WorkerId::new("w"), now)
        .unwrap()
        .value;
    assert!(matches!(d, idem_core::OpDecision::Replay { .. }));
}
