//! The SQLite store against the shared conformance suite, plus its own
//! checks: refusing foreign files, durability options, faults.

use crate::{Options, SqliteStore};

pub(crate) struct TestDb {
    _dir: tempfile::TempDir,
    store: SqliteStore,
}

impl std::ops::Deref for TestDb {
    type Target = SqliteStore;
    fn deref(&self) -> &SqliteStore {
        &self.store
    }
}

pub(crate) fn fresh() -> TestDb {
    fresh_with(crate::Durability::default())
}

pub(crate) fn fresh_with(durability: crate::Durability) -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        durability,
        ..Options::default()
    };
    let store = SqliteStore::open(dir.path().join("idem.db"), &opts).expect("open");
    TestDb { _dir: dir, store }
}

mod conformance {
    idem_store_conformance::conformance_tests!(super::fresh());
}

/// The same suite with every commit fsynced by SQLite itself (the default
/// fsyncs the log from the group commit instead).
mod conformance_strict {
    idem_store_conformance::conformance_tests!(super::fresh_with(crate::Durability::Strict));
}

/// The suite again with every write alternating between two handles on one
/// file, as two processes would share it: each handle's writer remembers
/// the rows it wrote, and must notice the other's commits.
mod conformance_two_handles {
    idem_store_conformance::conformance_tests!(super::two_handles());
}

/// Two handles on one file racing each other on real threads, as two
/// processes would.
mod races {
    idem_store_conformance::conformance_races!(super::pair());
}

pub(crate) fn pair() -> (Box<SqliteStore>, Box<SqliteStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("idem.db");
    let open = || Box::new(SqliteStore::open(&path, &Options::default()).expect("open"));
    (open(), open(), dir)
}

/// Two stores on one file; each call goes to the next one in turn.
pub(crate) struct TwoHandles {
    _dir: tempfile::TempDir,
    stores: [SqliteStore; 2],
    next: std::sync::atomic::AtomicUsize,
}

pub(crate) fn two_handles() -> Box<TwoHandles> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("idem.db");
    let open = || SqliteStore::open(&path, &Options::default()).expect("open");
    let stores = [open(), open()];
    Box::new(TwoHandles {
        _dir: dir,
        stores,
        next: std::sync::atomic::AtomicUsize::new(0),
    })
}

impl TwoHandles {
    fn pick(&self) -> &SqliteStore {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.stores[i % 2]
    }
}

mod two_handles_impl {
    use super::TwoHandles;
    use idem_core::ports::{Applied, Commit, StatusCounts, Store, StoreError};
    use idem_core::{Job, JobKey, JobState, OpRecord, Timestamp, WorkerId, Write, Written};

    impl Store for TwoHandles {
        fn transact(
            &self,
            write: Write<'_>,
            now: Timestamp,
            commit: Commit,
        ) -> Result<Applied<Written>, StoreError> {
            self.pick().transact(write, now, commit)
        }
        fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
            self.pick().job(key)
        }
        fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
            self.pick().ops(key)
        }
        fn scan(
            &self,
            state: Option<JobState>,
            after: Option<&JobKey>,
            limit: usize,
        ) -> Result<Vec<Job>, StoreError> {
            self.pick().scan(state, after, limit)
        }
        fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError> {
            self.pick().finalized_by_url(url)
        }
        fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
            self.pick().expired_leases(now, limit)
        }
        fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
            self.pick().lease_owners(now)
        }
        fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError> {
            self.pick().status(now)
        }
        fn busiest_hosts(
            &self,
            now: Timestamp,
            limit: usize,
        ) -> Result<Vec<idem_core::HostLoad>, StoreError> {
            self.pick().busiest_hosts(now, limit)
        }
    }
}

mod files;
mod upgrade;
