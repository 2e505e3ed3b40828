//! idem-store-postgres: the idem ledger on PostgreSQL, for workers on many
//! hosts sharing one ledger, behind the core's [`Store`] port.
//!
//! Every decision is the core's: this crate implements the core's row port
//! ([`idem_core::tx::Tx`]) in SQL and runs [`idem_core::exec::run`] in one
//! transaction per write, at READ COMMITTED with row locks (see `tx.rs`):
//! due jobs are leased with `FOR UPDATE SKIP LOCKED`, so hosts never queue
//! on the same rows; every job row read for writing is locked and its
//! update guarded by the epoch read; a deadlock or serialization failure
//! (`40P01`, `40001`) is [`StoreError::Conflict`], which
//! [`Store::write`] runs again. A connection lost mid-transaction leaves
//! the ledger as it was (the server rolls it back); the call fails with
//! [`StoreError::Busy`] and the next one takes a fresh connection.
//!
//! Durability: a [`Commit::Durable`] write returns once PostgreSQL has
//! flushed its commit record; a [`Commit::Deferred`] one commits with
//! `synchronous_commit = off` (visible at once, on disk within the server's
//! WAL writer delay, and never on disk without every commit before it).
//!
//! ## Time
//!
//! Lease expiry and due times come from the database's clock: each write
//! reads it once, as its transaction starts, and ignores the caller's
//! `now`; reads that depend on time use it too. Workers whose clocks are
//! skewed therefore agree on every lease. ([`Options::caller_clock`] uses
//! the caller's time instead, for tests and simulations that drive a
//! manual clock.)
//!
//! ## Schema
//!
//! `idem_ledger` marks the schema as an idem ledger and holds its version;
//! `jobs`, `ops`, `hosts` mirror the SQLite store's tables; `counters` is
//! sharded by job, so concurrent writers never queue on one row. A schema
//! that holds other tables but no ledger, or a ledger written by a newer
//! idem, is refused untouched. Migrations are forward-only and run under an
//! advisory lock.
//!
//! ## Example
//!
//! ```no_run
//! use idem_core::{JobSpec, Store, Timestamp};
//! use idem_store_postgres::{Options, PgStore};
//!
//! let store = PgStore::connect("postgres://idem@db.internal/idem", &Options::default())?;
//! let spec = JobSpec::new("W1", "pdf", "https://example.org/w1.pdf", None, None)?;
//! store.plan(&[spec], 5, Timestamp::from_millis(0))?; // the database's clock decides
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Depends on idem-core, tokio-postgres, deadpool-postgres and tokio (its
//! own runtime: the calls are synchronous, like the SQLite store's).

#[macro_use]
mod rows;
mod error;
mod reads;
mod schema;
mod tx;

#[cfg(test)]
mod tests;

use error::{map_err, pool_err};
use idem_core::exec::{self, Write, Written};
use idem_core::ports::{Applied, Commit, StatusCounts, Store, StoreError};
use idem_core::{HostLoad, Job, JobKey, JobState, OpRecord, Timestamp, WorkerId};
use std::sync::OnceLock;
use tokio::runtime::Runtime;

/// Options for [`PgStore::connect`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Connections in the pool: at most this many calls run at once.
    pub pool_size: usize,
    /// The schema holding the ledger's tables (created if absent); `None`:
    /// the connection's `search_path`.
    pub schema: Option<String>,
    /// Use the `now` each call passes instead of the database's clock.
    pub caller_clock: bool,
    /// How long a call waits for an unreachable server (restarting, or
    /// a connection dropped) before it fails with [`StoreError::Busy`].
    pub reconnect_wait_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pool_size: 16,
            schema: None,
            caller_clock: false,
            reconnect_wait_ms: 60_000,
        }
    }
}

/// The PostgreSQL store. See the crate docs.
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    caller_clock: bool,
    reconnect_wait_ms: u64,
    shown: String,
    schema: Option<String>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &self.shown).finish()
    }
}

/// The runtime the connections run on: one for the process, never shut
/// down, so a store may be dropped anywhere. Calls block on it from the
/// caller's thread, as the port is synchronous.
fn runtime() -> Result<&'static Runtime, StoreError> {
    static RT: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("idem-postgres")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Backend(format!("starting the PostgreSQL runtime: {e}")))?;
    Ok(RT.get_or_init(|| rt))
}

/// Is `s` a PostgreSQL connection URL?
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> String {
    idem_core::redact_url(url).into_owned()
}

impl PgStore {
    /// Connects to the ledger at `url` (`postgres://user:password@host:port/db`),
    /// creating or migrating its tables. Refuses a schema that holds other
    /// tables but no ledger, or a newer ledger, without touching it.
    pub fn connect(url: &str, opts: &Options) -> Result<Self, StoreError> {
        let shown = redacted(url);
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("{shown}: not a PostgreSQL URL: {e}")))?;
        if let Some(schema) = &opts.schema {
            if !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(StoreError::Backend(format!(
                    "schema name {schema:?}: letters, digits and _ only"
                )));
            }
            cfg.options(format!("-c search_path={schema}"));
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(std::time::Duration::from_secs(10));
        }
        let rt = runtime()?;
        let mgr = deadpool_postgres::Manager::from_config(
            cfg.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend(format!("{shown}: {e}")))?;
        rt.block_on(async {
            let (mut client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| with_url(map_err(e), &shown))?;
            let task = tokio::spawn(conn);
            if let Some(schema) = &opts.schema {
                client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .await
                    .map_err(map_err)?;
            }
            let r = schema::migrate(&mut client).await;
            drop(client);
            let _ = task.await;
            r.map_err(|e| with_url(e, &shown))
        })?;
        Ok(Self {
            pool,
            caller_clock: opts.caller_clock,
            reconnect_wait_ms: opts.reconnect_wait_ms,
            shown,
            schema: opts.schema.clone(),
        })
    }

    /// The URL it was opened with, password hidden.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The schema holding the ledger's tables, when [`Options::schema`]
    /// named one.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The schema version this build writes.
    pub const fn schema_version() -> i64 {
        schema::LATEST
    }

    fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        runtime()?.block_on(self.pool.get()).map_err(pool_err)
    }

    /// The time a call uses: the database's clock, or the caller's.
    async fn now(
        &self,
        c: &tokio_postgres::Client,
        caller: Timestamp,
    ) -> Result<Timestamp, StoreError> {
        if self.caller_clock {
            return Ok(caller);
        }
        let r = c
            .query_one("SELECT (extract(epoch FROM now()) * 1000)::bigint", &[])
            .await
            .map_err(map_err)?;
        Ok(Timestamp::from_millis(r.try_get(0).map_err(map_err)?))
    }

    /// Runs `f` again while it fails before anything could have been
    /// applied because the server is unreachable (a restart, a dropped
    /// connection), for up to [`Options::reconnect_wait_ms`].
    fn patiently<T>(&self, f: impl Fn() -> Result<T, Attempt>) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let mut pause_ms = 50;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Attempt::Unapplied(StoreError::Busy(why)))
                    if start.elapsed().as_millis() < u128::from(self.reconnect_wait_ms) =>
                {
                    pause(&why, pause_ms);
                    pause_ms = (pause_ms * 2).min(2_000);
                }
                Err(Attempt::Unapplied(e) | Attempt::Unknown(e)) => return Err(e),
            }
        }
    }

    /// One write, in one transaction.
    fn attempt(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, Attempt> {
        let rt = runtime()?;
        let client = self.client()?;
        let now = self.begin(&client, now, commit)?;
        let mut t = tx::PgTx::new(&client, rt);
        match exec::run(&mut t, write, now) {
            Ok(a) => {
                // A commit whose answer is lost may or may not have been
                // applied: never run again blindly.
                drop(end(client, "COMMIT").map_err(Attempt::Unknown)?);
                Ok(a)
            }
            Err(e) => {
                // A failed statement aborts the transaction: roll back,
                // then count the refusal in a transaction of its own.
                let client = end(client, "ROLLBACK").ok();
                if let (true, Some(client)) = (e.is_fenced(), client) {
                    self.begin(&client, now, Commit::Durable)?;
                    if let Err(err) = exec::count_refusal(&mut tx::PgTx::new(&client, rt), &e) {
                        let _ = end(client, "ROLLBACK");
                        return Err(err.into());
                    }
                    drop(end(client, "COMMIT")?);
                }
                Err(Attempt::Unapplied(e))
            }
        }
    }

    /// Opens a transaction (durable or not) and reads the time it runs at,
    /// in one round trip.
    fn begin(
        &self,
        client: &deadpool_postgres::Object,
        caller: Timestamp,
        commit: Commit,
    ) -> Result<Timestamp, StoreError> {
        let sql = if commit == Commit::Deferred {
            "BEGIN; SET LOCAL synchronous_commit = off; SELECT (extract(epoch FROM now()) * 1000)::bigint"
        } else {
            "BEGIN; SELECT (extract(epoch FROM now()) * 1000)::bigint"
        };
        let msgs = runtime()?
            .block_on(client.simple_query(sql))
            .map_err(map_err)?;
        if self.caller_clock {
            return Ok(caller);
        }
        msgs.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .and_then(|v| v.parse::<i64>().ok())
            .map(Timestamp::from_millis)
            .ok_or_else(|| StoreError::Backend("the server did not say what time it is".into()))
    }

    fn read<T>(
        &self,
        caller_now: Timestamp,
        f: impl AsyncFn(&tokio_postgres::Client, Timestamp) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.patiently(|| {
            let client = self.client()?;
            runtime()?
                .block_on(async {
                    let now = self.now(&client, caller_now).await?;
                    f(&client, now).await
                })
                .map_err(Attempt::Unapplied)
        })
    }
}

/// Ends the open transaction. A connection that cannot end it is not
/// handed back to the pool (the next user would find a transaction open).
fn end(
    client: deadpool_postgres::Object,
    sql: &str,
) -> Result<deadpool_postgres::Object, StoreError> {
    match runtime()?.block_on(client.batch_execute(sql)) {
        Ok(()) => Ok(client),
        Err(e) => {
            drop(deadpool_postgres::Object::take(client));
            Err(map_err(e))
        }
    }
}

/// How a write failed: before anything could be applied, or with its
/// outcome unknown (its commit's answer was lost).
enum Attempt {
    Unapplied(StoreError),
    Unknown(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Self::Unapplied(e)
    }
}

/// Waits before trying an unreachable server again.
fn pause(why: &str, pause_ms: u64) {
    tracing::warn!(retry_in_ms = pause_ms, "PostgreSQL unreachable: {why}");
    std::thread::sleep(std::time::Duration::from_millis(pause_ms));
}

fn with_url(e: StoreError, shown: &str) -> StoreError {
    match e {
        StoreError::Backend(t) => StoreError::Backend(format!("{shown}: {t}")),
        StoreError::Busy(t) => StoreError::Busy(format!("{shown}: {t}")),
        StoreError::NotALedger(t) => {
            StoreError::NotALedger(format!("{shown} is not an idem ledger: {t}"))
        }
        other => other,
    }
}

impl Store for PgStore {
    fn transact(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, StoreError> {
        self.patiently(|| self.attempt(write, now, commit))
    }

    fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        self.read(Timestamp::from_millis(0), async |c, _| {
            reads::job(c, key).await
        })
    }

    fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
        self.read(Timestamp::from_millis(0), async |c, _| {
            reads::ops(c, key).await
        })
    }

    fn scan(
        &self,
        state: Option<JobState>,
        after: Option<&JobKey>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        self.read(Timestamp::from_millis(0), async |c, _| {
            reads::scan(c, state, after, limit).await
        })
    }

    fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError> {
        self.read(Timestamp::from_millis(0), async |c, _| {
            reads::finalized_by_url(c, url).await
        })
    }

    fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.read(now, async |c, now| {
            reads::expired_leases(c, now, limit).await
        })
    }

    fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
        self.read(now, async |c, now| reads::lease_owners(c, now).await)
    }

    fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError> {
        self.read(now, async |c, now| reads::status(c, now).await)
    }

    fn busiest_hosts(&self, now: Timestamp, limit: usize) -> Result<Vec<HostLoad>, StoreError> {
        self.read(now, async |c, now| {
            reads::busiest_hosts(c, now, limit).await
        })
    }
}
