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
    use idem_core::ports::{Applied, Commit, LeaseRequest, StatusCounts, Step, StepOutput};
    use idem_core::ports::{Store, StoreError};
    use idem_core::{
        Command, Job, JobError, JobKey, JobSpec, JobState, OpDecision, OpKey, OpRecord, OpResult,
        PlanOutcome, Timestamp, WorkerId,
    };

    impl Store for TwoHandles {
        fn run_steps(
            &self,
            steps: Vec<Step>,
            now: Timestamp,
            commit: Commit,
        ) -> Result<Applied<Vec<StepOutput>>, StoreError> {
            self.pick().run_steps(steps, now, commit)
        }
        fn plan(
            &self,
            specs: &[JobSpec],
            max_attempts: u32,
            now: Timestamp,
        ) -> Result<Applied<Vec<PlanOutcome>>, StoreError> {
            self.pick().plan(specs, max_attempts, now)
        }
        fn lease(
            &self,
            req: &LeaseRequest,
            now: Timestamp,
        ) -> Result<Applied<Vec<Job>>, StoreError> {
            self.pick().lease(req, now)
        }
        fn apply(
            &self,
            key: &JobKey,
            cmd: Command,
            now: Timestamp,
        ) -> Result<Applied<Job>, StoreError> {
            self.pick().apply(key, cmd, now)
        }
        fn begin_op(
            &self,
            op: &OpKey,
            owner: &WorkerId,
            now: Timestamp,
        ) -> Result<Applied<OpDecision>, StoreError> {
            self.pick().begin_op(op, owner, now)
        }
        fn finish_op(
            &self,
            op: &OpKey,
            outcome: Result<OpResult, JobError>,
            then: Option<Command>,
            now: Timestamp,
        ) -> Result<Applied<Job>, StoreError> {
            self.pick().finish_op(op, outcome, then, now)
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
        fn abandon_dead_ops(&self, now: Timestamp) -> Result<Applied<u64>, StoreError> {
            self.pick().abandon_dead_ops(now)
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
