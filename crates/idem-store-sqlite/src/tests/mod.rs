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

mod files;
