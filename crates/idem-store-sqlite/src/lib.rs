//! idem-store-sqlite: the embedded idem ledger, SQLite behind the core's
//! [`Store`] port.
//!
//! Several worker processes on one host share one file safely:
//!
//! - WAL journal, so readers never block and one writer at a time commits;
//! - every writing call is one `BEGIN IMMEDIATE` transaction (a deferred one
//!   that upgrades to a write gets `SQLITE_BUSY` without waiting), and no
//!   transaction is ever held across network or disk I/O: the engine calls
//!   the store between effects, never during one;
//! - every acknowledged write is fsynced by default, so it survives power
//!   loss; a job's intermediate records (lease, op starts, results that
//!   lead to its next step), which the engine marks [`Commit::Deferred`],
//!   commit without an fsync and reach the disk with the next durable
//!   commit: the connection runs `synchronous=NORMAL` and the group commit
//!   fsyncs the write-ahead log itself after any batch holding a durable
//!   request, before acknowledging it. That fsync covers every earlier frame, so
//!   after power loss the ledger is a prefix of its history and a job's
//!   finish is never on disk without everything before it.
//!   [`Durability::Strict`] fsyncs every commit; [`Durability::Normal`]
//!   none (the last commits may roll back on power loss, never on a
//!   process crash);
//! - writes from concurrent callers in one process are **group-committed**:
//!   whoever holds the connection runs every queued request in one
//!   transaction, commits once, fsyncs once, and only then acknowledges
//!   each caller. A request refused after it wrote (rare: most refusals are
//!   decided before any write) makes the batch roll back and run again with
//!   a savepoint per request, so it rolls back alone. Deferred requests are
//!   answered right after the commit; the leader then hands leadership on
//!   and waits for the log's fsync, so the next batch runs while the disk
//!   works. One fsync runs at a time and covers every commit before it;
//! - the writer remembers the job rows and op records it wrote (a job's
//!   next step needs exactly those) and skips reading them back. It trusts
//!   them only while `PRAGMA data_version`, read under the write lock at
//!   every transaction, says no other connection has committed; any
//!   rollback forgets them. The conformance suite runs a third time with
//!   every call alternating between two handles on one file to hold it to
//!   that.
//!
//! Every decision (plan, acquire, transition, op replay, what to count) is
//! the core's: this crate implements the core's row port
//! ([`idem_core::tx::Tx`]) in SQL and runs [`idem_core::exec::run`] inside
//! the group commit's transaction. One `BEGIN IMMEDIATE` writer at a time
//! (across processes, under the writer lock) is the isolation the port
//! asks for; every job update is also guarded by the epoch it read.
//!
//! ## Schema (version 8)
//!
//! What cannot be derived, in its smallest faithful form (see
//! `compact.rs` for the codes):
//!
//! - `jobs`: one row per job key (32-byte BLOB, unique), its spec (the
//!   fingerprint is derived from it, not stored), state (a small integer),
//!   lease (owner, epoch, expiry, isolated), attempts, backoff, last error,
//!   HEAD validators and blob digest in compact bytes (the blob's path only
//!   when its digest does not imply it), timestamps, holder deaths, its
//!   host (by id) and host rank, and `due_at`: when the job may next be
//!   leased (its backoff or its lease expiry, whichever is later; NULL once
//!   terminal, and for a suspect, which is due in `suspect_due_at`). A
//!   partial index on (host rank, `due_at`) makes leasing an index range
//!   scan, one on (host, lease expiry) counts a host's live leases, and
//!   finalized jobs are found by URL through a 47-bit hash of it, and
//!   finished ones by their finish time (for SLO windows). A spec's
//!   mirrors and request headers, which few jobs have, are one JSON
//!   column (`extra`, NULL when there are none), beside `url_index`: which
//!   of its URLs the job fetches now.
//! - `ops`: the operation ledger, keyed by (job rowid, kind, epoch) with no
//!   rowid of its own: owner (by id), status, result (compact bytes, never
//!   truncated), error, run count, start time and duration. A request that
//!   moves a job through several steps reads and writes its row once,
//!   naming only the columns that changed (SQLite rewrites an index entry
//!   for every indexed column an UPDATE names).
//! - `hosts`: id, name, jobs planned (the next host rank), cooldown, pause.
//! - `owners`: the worker names ops were written by.
//! - `counters`: refused stale-epoch writes, replays, op rows ever written
//!   and starts again of an op under its key (op rows may be pruned).
//!
//! New ledgers use incremental auto-vacuum: `prune` gives the pages it
//! frees back to the file system. Opening a ledger older than version 7
//! rewrites it once in the compact form, then `VACUUM`s it.
//!
//! The file is marked with `PRAGMA application_id` and versioned with
//! `PRAGMA user_version`; migrations are forward-only. A file that is not a
//! SQLite database, a SQLite database that is not an idem ledger, or a ledger
//! written by a newer idem is refused before anything is written to it.
//!
//! ## Time
//!
//! Every call takes the caller's one clock reading (`now`). Processes on one
//! host share the system clock, so leases compare consistently; a clock
//! step backwards can only make a lease look younger (later takeover), and a
//! step forwards can expire leases early, which fencing makes safe: the old
//! holder's writes are refused.
//!
//! ## Example
//!
//! ```
//! use idem_core::{JobSpec, Store, Timestamp};
//! use idem_store_sqlite::{Options, SqliteStore};
//!
//! let dir = std::env::temp_dir().join(format!("idem-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let store = SqliteStore::open(dir.join("idem.db"), &Options::default())?;
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let spec = JobSpec::new("W1", "pdf", "https://example.org/w1.pdf", None, None)?;
//! store.plan(&[spec], 5, now)?;
//! assert_eq!(store.status(now)?.total, 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Depends on idem-core and rusqlite (with SQLite bundled).

#[macro_use]
mod rows;
mod cache;
mod compact;
mod group;
mod open;
mod reads;
mod schema;
mod tx;

#[cfg(test)]
mod tests;

use group::{Group, OwnedWrite, Req};
use idem_core::exec::{Write, Written};
use idem_core::ports::{Applied, Commit, StatusCounts, Store, StoreError};
use idem_core::{Job, JobKey, JobState, OpRecord, Timestamp, WorkerId};
use std::path::{Path, PathBuf};

/// How hard each commit is pushed to disk.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every durable commit is on disk before it is acknowledged: the
    /// connection runs `synchronous=NORMAL` and the group commit fsyncs the
    /// write-ahead log after any batch holding a durable request. A batch
    /// of [`Commit::Deferred`] requests only reaches the disk with the next
    /// durable commit (see [`Commit`]).
    #[default]
    Full,
    /// `synchronous=FULL` for every commit, deferred or not.
    Strict,
    /// `synchronous=NORMAL`: survives a process crash, but the last commits
    /// may roll back after power loss or an OS crash. Idempotent effects
    /// tolerate that (they are redone), at the cost of repeated downloads.
    Normal,
}

/// Options for [`SqliteStore::open`].
#[derive(Clone, Debug)]
pub struct Options {
    pub durability: Durability,
    /// How long a call waits for another process's write lock.
    pub busy_timeout_ms: u64,
    /// Most requests run in one group-commit transaction.
    pub max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            busy_timeout_ms: 30_000,
            max_batch: 256,
        }
    }
}

/// The SQLite ledger. Cheap to share (`Arc`) between threads.
pub struct SqliteStore {
    path: PathBuf,
    group: Group,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if absent) the ledger at `path`. Refuses, without
    /// writing, a file that is not an idem ledger or is from a newer idem.
    pub fn open(path: impl AsRef<Path>, opts: &Options) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = open::open(&path, opts)?;
        Ok(Self {
            group: Group::new(conn, &path, opts.durability, opts.max_batch),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SQLite's own check of the ledger file: `PRAGMA quick_check`
    /// (`thorough`: `integrity_check`, which also checks every index
    /// against its table). Returns the problems found; none is a sound
    /// ledger.
    pub fn check_integrity(&self, thorough: bool) -> Result<Vec<String>, StoreError> {
        self.read(|c| open::check_integrity(c, thorough))
    }

    /// The ledger's size as SQLite counts it (pages in use and free, the
    /// log not included): what `VACUUM` or `prune` can shrink.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(open::map_err)
        })
    }

    /// The schema version this build writes.
    pub const fn schema_version() -> i64 {
        schema::LATEST
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.group.read(f)
    }
}

impl Store for SqliteStore {
    fn transact(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, StoreError> {
        self.group.submit(Req {
            write: OwnedWrite::of(write),
            now,
            commit,
        })
    }

    fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        self.read(|c| reads::load_job(c, key))
    }

    fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
        self.read(|c| reads::load_ops(c, key))
    }

    fn scan(
        &self,
        state: Option<JobState>,
        after: Option<&JobKey>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        self.read(|c| reads::scan(c, state, after, limit))
    }

    fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError> {
        self.read(|c| reads::finalized_by_url(c, url))
    }

    fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.read(|c| reads::expired_leases(c, now, limit))
    }

    fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
        self.read(|c| reads::lease_owners(c, now))
    }

    fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError> {
        self.read(|c| reads::status(c, now))
    }

    fn busiest_hosts(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<idem_core::HostLoad>, StoreError> {
        self.read(|c| reads::busiest_hosts(c, now, limit))
    }

    fn each_finished_since(
        &self,
        since: Timestamp,
        f: &mut dyn FnMut(&Job),
    ) -> Result<(), StoreError> {
        self.read(|c| reads::each_finished_since(c, since, f))
    }
}
