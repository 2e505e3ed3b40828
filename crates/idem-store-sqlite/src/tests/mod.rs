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
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("idem.db"), &Options::default()).expect("open");
    TestDb { _dir: dir, store }
}

mod conformance {
    idem_store_conformance::conformance_tests!(super::fresh());
}

mod files;
