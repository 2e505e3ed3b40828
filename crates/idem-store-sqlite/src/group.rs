//! Group commit: many callers' writes, one transaction, one fsync.
//!
//! A durable commit costs an fsync (about 0.15 ms to several ms); with
//! sixteen workers each committing alone, the disk, not SQLite, is the
//! ceiling. Here every caller queues its request and parks. The first
//! caller to find no leader becomes one: it takes the whole queue, runs it
//! as one `BEGIN IMMEDIATE` transaction and commits once. It then wakes the
//! oldest queued caller to lead the next batch, answers the deferred
//! requests (a commit is all they were promised), waits for an fsync of
//! the log that began after its commit (one runs at a time and covers every
//! commit before it, so concurrent batches share it), and answers the
//! durable ones. No caller is acknowledged before the commit (and for a
//! durable request, the fsync) that holds its write.
//!
//! Requests run without savepoints; a request refused after it wrote makes
//! the leader roll the batch back and run it again with a savepoint per
//! request, so the refused one rolls back alone (see `run_in_tx`).
//!
//! Between processes, writers take a blocking `flock` on a lock file beside
//! the ledger before `BEGIN IMMEDIATE`. SQLite's own busy handler polls with
//! sleeps, so a process committing back to back starves the others; a
//! blocked `flock` is woken by the kernel the moment the lock is released.

use crate::cache::Cache;
use crate::open::map_err;
use crate::tx::SqliteTx;
use crate::Durability;
use idem_core::exec::{self, Write, Written};
use idem_core::ports::{Applied, Commit, Step, StoreError};
use idem_core::{JobSpec, Timestamp};
use rusqlite::Connection;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A write as queued: the caller's [`Write`], owned, with its clock
/// reading and durability.
pub(crate) struct Req {
    pub(crate) write: OwnedWrite,
    pub(crate) now: Timestamp,
    pub(crate) commit: Commit,
}

pub(crate) enum OwnedWrite {
    Plan {
        specs: Vec<JobSpec>,
        max_attempts: u32,
    },
    Steps(Vec<Step>),
    AbandonDeadOps,
    Import(Vec<(idem_core::Job, Vec<idem_core::OpRecord>)>),
    Pause {
        host: String,
        paused: bool,
    },
    Prune {
        older_than_ms: u64,
        after: u64,
        limit: usize,
    },
}

impl OwnedWrite {
    pub(crate) fn of(write: Write<'_>) -> Self {
        match write {
            Write::Plan {
                specs,
                max_attempts,
            } => Self::Plan {
                specs: specs.to_vec(),
                max_attempts,
            },
            Write::Steps(steps) => Self::Steps(steps.to_vec()),
            Write::AbandonDeadOps => Self::AbandonDeadOps,
            Write::Import(jobs) => Self::Import(jobs.to_vec()),
            Write::Pause { host, paused } => Self::Pause {
                host: host.to_owned(),
                paused,
            },
            Write::Prune {
                older_than_ms,
                after,
                limit,
            } => Self::Prune {
                older_than_ms,
                after,
                limit,
            },
        }
    }

    fn as_write(&self) -> Write<'_> {
        match self {
            Self::Plan {
                specs,
                max_attempts,
            } => Write::Plan {
                specs,
                max_attempts: *max_attempts,
            },
            Self::Steps(steps) => Write::Steps(steps),
            Self::AbandonDeadOps => Write::AbandonDeadOps,
            Self::Import(jobs) => Write::Import(jobs),
            Self::Pause { host, paused } => Write::Pause {
                host,
                paused: *paused,
            },
            Self::Prune {
                older_than_ms,
                after,
                limit,
            } => Write::Prune {
                older_than_ms: *older_than_ms,
                after: *after,
                limit: *limit,
            },
        }
    }
}

impl Req {
    /// Must the commit holding this request be on disk before it is
    /// acknowledged?
    fn durable(&self) -> bool {
        self.commit == Commit::Durable
    }
}

pub(crate) type Res = Applied<Written>;

type Slot = Arc<Mutex<Option<Result<Res, StoreError>>>>;

struct Pending {
    req: Req,
    slot: Slot,
    /// The caller, parked until its reply is in `slot` or it is to lead.
    caller: std::thread::Thread,
}

/// The write connection and what it remembers of its own writes.
struct Writer {
    conn: Connection,
    cache: Cache,
}

impl Pending {
    /// Fills the caller's reply slot and wakes it (one wake-up per request,
    /// not one per waiting thread per batch).
    fn answer(self, r: Result<Res, StoreError>) {
        *lock(&self.slot) = Some(r);
        self.caller.unpark();
    }
}

pub(crate) struct Group {
    writer: Mutex<Writer>,
    /// The ledger's write-ahead log and how far it is known durable.
    wal: Mutex<Wal>,
    /// Commits so far, numbered from 1.
    committed: AtomicU64,
    wal_path: std::path::PathBuf,
    durability: Durability,
    /// Cross-process writer lock (flock), taken around each transaction.
    lock_file: std::fs::File,
    reader: Mutex<Connection>,
    queue: Mutex<Queue>,
    max_batch: usize,
}

#[derive(Default)]
struct Wal {
    /// Opened at the first durable batch.
    file: Option<std::fs::File>,
    /// Every commit numbered up to this is on disk.
    synced: u64,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    leader: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything that
    // can panic, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Group {
    pub(crate) fn new(
        conns: (Connection, Connection, std::fs::File),
        db: &std::path::Path,
        durability: Durability,
        max_batch: usize,
    ) -> Self {
        let mut wal_path = db.as_os_str().to_owned();
        wal_path.push("-wal");
        Self {
            writer: Mutex::new(Writer {
                conn: conns.0,
                cache: Cache::default(),
            }),
            wal: Mutex::new(Wal::default()),
            committed: AtomicU64::new(0),
            wal_path: wal_path.into(),
            durability,
            lock_file: conns.2,
            reader: Mutex::new(conns.1),
            queue: Mutex::new(Queue::default()),
            max_batch: max_batch.max(1),
        }
    }

    pub(crate) fn submit(&self, req: Req) -> Result<Res, StoreError> {
        let slot: Slot = Arc::new(Mutex::new(None));
        lock(&self.queue).pending.push(Pending {
            req,
            slot: Arc::clone(&slot),
            caller: std::thread::current(),
        });
        loop {
            if let Some(r) = lock(&slot).take() {
                return r;
            }
            let mut q = lock(&self.queue);
            // Lead when nobody does and our request is still queued (once a
            // leader has taken it, the reply is on its way).
            if q.leader || !q.pending.iter().any(|p| Arc::ptr_eq(&p.slot, &slot)) {
                drop(q);
                // Woken by the leader that answers us, or told to lead;
                // a spurious wake-up just loops.
                std::thread::park();
                continue;
            }
            // Lead: take everything queued so far and commit it as one.
            q.leader = true;
            let n = q.pending.len().min(self.max_batch);
            let batch: Vec<Pending> = q.pending.drain(..n).collect();
            drop(q);
            let (results, seq) = {
                let mut w = lock(&self.writer);
                let locked = self.lock_file.lock();
                let r = run_in_tx(&mut w, &batch);
                if locked.is_ok() {
                    let _ = self.lock_file.unlock();
                }
                // Numbered while the writer is still ours, so commit numbers
                // follow the order of the commits in the log.
                (r, self.committed.fetch_add(1, Ordering::AcqRel) + 1)
            };
            // The next batch may run while this one's fsync is in flight.
            {
                let mut q = lock(&self.queue);
                q.leader = false;
                if let Some(next) = q.pending.first() {
                    next.caller.unpark();
                }
            }
            // The fsync runs outside the writer locks: other batches (and
            // other processes) commit meanwhile, and one fsync covers every
            // commit that finished before it began. A deferred request was
            // promised a commit, not an fsync: it is answered at once, so
            // its caller's next request can join the next batch.
            match results {
                Ok(results) => {
                    let sync = self.durability == Durability::Full
                        && batch.iter().any(|p| p.req.durable());
                    let mut waiting = Vec::new();
                    for (p, r) in batch.into_iter().zip(results) {
                        if sync && p.req.durable() {
                            waiting.push((p, r));
                        } else {
                            p.answer(r);
                        }
                    }
                    if !waiting.is_empty() {
                        let synced = self.sync_through(seq);
                        for (p, r) in waiting {
                            p.answer(match &synced {
                                Ok(()) => r,
                                Err(e) => Err(e.clone()),
                            });
                        }
                    }
                }
                Err(e) => {
                    for p in batch {
                        p.answer(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Makes commit number `seq` durable: an fsync of the write-ahead log,
    /// unless one that began after that commit has already finished. At
    /// most one fsync runs at a time; whoever waits for it and finds their
    /// commit covered returns without another.
    ///
    /// Under [`Durability::Full`] the connection runs `synchronous=NORMAL`
    /// and a batch holding any durable request is followed by this fsync
    /// before any durable request in it is acknowledged. In WAL mode it covers every
    /// frame written so far, so deferred commits reach the disk with the
    /// next durable one, in order. (Switching `synchronous` per batch would
    /// do the same, but every switch makes SQLite re-prepare all cached
    /// statements, and SQLite's own sync holds the write lock meanwhile.)
    fn sync_through(&self, seq: u64) -> Result<(), StoreError> {
        let mut wal = lock(&self.wal);
        if wal.synced >= seq {
            return Ok(());
        }
        // Every commit numbered up to here has written its frames.
        let target = self.committed.load(Ordering::Acquire);
        if wal.file.is_none() {
            let f = std::fs::File::open(&self.wal_path).map_err(|e| {
                StoreError::Backend(format!("opening {}: {e}", self.wal_path.display()))
            })?;
            wal.file = Some(f);
        }
        if let Some(f) = wal.file.as_ref() {
            f.sync_data().map_err(|e| {
                StoreError::Backend(format!("fsync of {}: {e}", self.wal_path.display()))
            })?;
        }
        wal.synced = target;
        Ok(())
    }

    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = lock(&self.reader);
        f(&conn)
    }
}

/// Runs the batch in one transaction. An error here (cannot begin, cannot
/// commit) fails every request in it; the transaction rolls back whole.
///
/// Requests run without savepoints first: a savepoint makes SQLite copy
/// every page a request touches into a statement journal, which cost more
/// than the request. Almost every refusal (a fenced epoch, a transition the
/// core refuses) is decided before the request writes anything, so it needs
/// no rollback. Only when a request fails after writing does the batch roll
/// back and run again, each request in its own savepoint.
fn run_in_tx(
    w: &mut Writer,
    batch: &[Pending],
) -> Result<Vec<Result<Res, StoreError>>, StoreError> {
    let r = try_tx(w, batch);
    if r.is_err() {
        // Whatever the cache learnt in a transaction that did not commit
        // may not be on disk.
        w.cache.forget();
    }
    r
}

fn try_tx(w: &mut Writer, batch: &[Pending]) -> Result<Vec<Result<Res, StoreError>>, StoreError> {
    let Writer { conn, cache } = w;
    begin(conn, cache)?;
    match run_requests(conn, cache, batch, false) {
        Ok(Some(results)) => commit(conn).map(|()| results),
        Ok(None) => {
            rollback(conn);
            cache.forget();
            begin(conn, cache)?;
            match run_requests(conn, cache, batch, true) {
                Ok(Some(results)) => commit(conn).map(|()| results),
                Ok(None) => {
                    rollback(conn);
                    Err(StoreError::Backend(
                        "savepoint run left writes behind".into(),
                    ))
                }
                Err(e) => {
                    rollback(conn);
                    Err(e)
                }
            }
        }
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

/// Opens the write transaction and checks the cache against it.
fn begin(conn: &Connection, cache: &mut Cache) -> Result<(), StoreError> {
    begin_immediate(conn)?;
    if let Err(e) = cache.validate(conn) {
        rollback(conn);
        return Err(map_err(e));
    }
    Ok(())
}

/// Runs every request; `None` when one failed after writing and there was
/// no savepoint to undo it.
fn run_requests(
    conn: &Connection,
    cache: &mut Cache,
    batch: &[Pending],
    savepoints: bool,
) -> Result<Option<Vec<Result<Res, StoreError>>>, StoreError> {
    let mut results = Vec::with_capacity(batch.len());
    for p in batch {
        if savepoints {
            sql(conn, "SAVEPOINT req")?;
        }
        let before = conn.total_changes();
        let r = exec(conn, cache, &p.req);
        if let Err(e) = &r {
            if savepoints {
                sql(conn, "ROLLBACK TO req")?;
                cache.forget();
            } else if conn.total_changes() != before || !is_decision(e) {
                return Ok(None);
            }
            exec::count_refusal(&mut SqliteTx { c: conn, cache }, e)?;
        }
        if savepoints {
            sql(conn, "RELEASE req")?;
        }
        results.push(r);
    }
    Ok(Some(results))
}

/// A refusal decided from what the request read (no backend failure).
const fn is_decision(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Refused { .. } | StoreError::NotFound(_) | StoreError::OpNotStarted(_)
    )
}

fn sql(c: &Connection, text: &str) -> Result<(), StoreError> {
    c.prepare_cached(text)
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(map_err)
}

fn commit(conn: &Connection) -> Result<(), StoreError> {
    let r = sql(conn, "COMMIT");
    if r.is_err() && !conn.is_autocommit() {
        rollback(conn);
    }
    r
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        // A failed ROLLBACK leaves nothing to do: SQLite has already
        // rolled back or will on the next BEGIN.
        let _ = sql(conn, "ROLLBACK");
    }
}

/// `BEGIN IMMEDIATE`, waiting out other processes' writers. The busy
/// timeout covers one wait; a long batch in another process can outlast it,
/// so keep trying for a bounded time rather than surface `SQLITE_BUSY`.
fn begin_immediate(conn: &Connection) -> Result<(), StoreError> {
    let mut tries = 0;
    loop {
        match sql(conn, "BEGIN IMMEDIATE") {
            Ok(()) => return Ok(()),
            Err(e) => {
                tries += 1;
                if !e.is_transient() || tries >= 20 {
                    return Err(e);
                }
            }
        }
    }
}

fn exec(c: &Connection, cache: &mut Cache, req: &Req) -> Result<Res, StoreError> {
    exec::run(&mut SqliteTx { c, cache }, req.write.as_write(), req.now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{Epoch, JobState, LeaseRequest, OpKey, OpKind, WorkerId};

    fn steps(steps: Vec<Step>, now: Timestamp, commit: Commit) -> Req {
        Req {
            write: OwnedWrite::Steps(steps),
            now,
            commit,
        }
    }

    fn pending(req: Req) -> Pending {
        Pending {
            req,
            slot: Arc::new(Mutex::new(None)),
            caller: std::thread::current(),
        }
    }

    /// A batch whose middle request fails after it wrote: the batch runs
    /// again with savepoints, the failed request leaves nothing behind, and
    /// the requests around it commit.
    #[test]
    fn a_request_failing_after_writing_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let conns = crate::open::open(&path, &crate::Options::default()).unwrap();
        let conn = conns.0;
        let now = Timestamp::from_millis(1_000);
        let spec = |i: u32| {
            JobSpec::new("w", &format!("a{i}"), &format!("http://h/{i}"), None, None).unwrap()
        };
        let mut cache = Cache::default();
        let specs = [spec(1), spec(2)];
        let plan = Write::Plan {
            specs: &specs,
            max_attempts: 3,
        };
        exec::run(
            &mut SqliteTx {
                c: &conn,
                cache: &mut cache,
            },
            plan,
            now,
        )
        .unwrap();
        let lease = LeaseRequest {
            owner: WorkerId::new("w"),
            limit: 2,
            ttl_ms: 60_000,
            dead_owners: vec![],
            commit: Commit::Durable,
            isolated: false,
            per_host: None,
            host_interval_ms: None,
            host_rules: Default::default(),
        };
        let mut w = Writer {
            conn,
            cache: Cache::default(),
        };
        let leased = [Step::Lease(lease)];
        let mut tx = SqliteTx {
            c: &w.conn,
            cache: &mut w.cache,
        };
        let Written::Steps(mut out) = exec::run(&mut tx, Write::Steps(&leased), now)
            .unwrap()
            .value
        else {
            panic!("a lease answers steps")
        };
        let Some(idem_core::StepOutput::Leased(jobs)) = out.pop() else {
            panic!("a lease step answers leased jobs")
        };
        let (a, b) = (jobs[0].key, jobs[1].key);
        let op = |key, epoch| OpKey {
            job: key,
            kind: OpKind::Head,
            epoch,
        };
        let e = Epoch(1);
        let owner = WorkerId::new("w");
        let batch = vec![
            pending(steps(
                vec![Step::BeginOp {
                    op: op(a, e),
                    owner: owner.clone(),
                }],
                now,
                Commit::Durable,
            )),
            // Writes (begins a's STREAM op under the live epoch), then is
            // refused (a stale epoch for b): must leave no trace.
            pending(steps(
                vec![
                    Step::BeginOp {
                        op: OpKey {
                            kind: OpKind::Stream,
                            ..op(a, e)
                        },
                        owner: owner.clone(),
                    },
                    Step::BeginOp {
                        op: op(b, Epoch(9)),
                        owner: owner.clone(),
                    },
                ],
                now,
                Commit::Deferred,
            )),
            pending(steps(
                vec![Step::BeginOp {
                    op: op(b, e),
                    owner: owner.clone(),
                }],
                now,
                Commit::Durable,
            )),
        ];
        let results = run_in_tx(&mut w, &batch).unwrap();
        let conn = &w.conn;
        assert!(results[0].is_ok());
        assert!(results[1].as_ref().is_err_and(StoreError::is_fenced));
        assert!(results[2].is_ok());
        let kinds = |k| -> Vec<OpKind> {
            crate::reads::load_ops(conn, &k)
                .unwrap()
                .into_iter()
                .map(|o| o.key.kind)
                .collect()
        };
        assert_eq!(
            kinds(a),
            vec![OpKind::Head],
            "the refused request's write is gone"
        );
        assert_eq!(kinds(b), vec![OpKind::Head]);
        let fenced: i64 = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'fenced_writes'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(fenced, 1, "counted once, not once per run of the batch");
        assert_eq!(
            crate::reads::load_job(conn, &a).unwrap().unwrap().state,
            JobState::Leased
        );
    }
}
