//! The ledger a command opens: a SQLite file, or a PostgreSQL database
//! named by a `postgres://` URL, behind one [`Store`].

use crate::{CopyArgs, Global};
use anyhow::Context;
use idem_core::ports::{Applied, Commit, StatusCounts, Store, StoreError};
use idem_core::{HostLoad, Job, JobKey, JobState, OpRecord, Timestamp, WorkerId, Write, Written};
use idem_store_postgres::PgStore;
use idem_store_sqlite::{Durability, Options, SqliteStore};

pub(crate) enum Ledger {
    Sqlite(Box<SqliteStore>),
    Postgres(PgStore),
}

/// How `--db` is shown: a path, or a URL without its password.
pub(crate) fn shown(g: &Global) -> String {
    let db = g.db.to_string_lossy();
    if idem_store_postgres::is_url(&db) {
        idem_store_postgres::redacted(&db)
    } else {
        g.db.display().to_string()
    }
}

/// The ledger's name in metrics: the same for every worker of one ledger,
/// wherever it runs: a SQLite file's absolute path, or the database's URL
/// without its credentials.
pub(crate) fn id(g: &Global) -> String {
    let db = g.db.to_string_lossy();
    if idem_store_postgres::is_url(&db) {
        return shown(g);
    }
    std::fs::canonicalize(&g.db).map_or_else(|_| shown(g), |p| p.display().to_string())
}

pub(crate) fn open(g: &Global) -> anyhow::Result<Ledger> {
    let db = g.db.to_string_lossy();
    if idem_store_postgres::is_url(&db) {
        let store = PgStore::connect(&db, &idem_store_postgres::Options::default())
            .with_context(|| format!("opening ledger {}", shown(g)))?;
        return Ok(Ledger::Postgres(store));
    }
    let opts = Options {
        durability: if g.unsafe_fast_sync {
            Durability::Normal
        } else if g.strict_sync {
            Durability::Strict
        } else {
            Durability::Full
        },
        ..Options::default()
    };
    let store = SqliteStore::open(&g.db, &opts)
        .with_context(|| format!("opening ledger {}", g.db.display()))?;
    Ok(Ledger::Sqlite(Box::new(store)))
}

impl Ledger {
    /// Problems the database finds in its own files (SQLite's
    /// `quick_check`, or with `thorough` its `integrity_check`); none is a
    /// sound ledger. PostgreSQL checks its own pages as it reads them.
    pub(crate) fn check_integrity(&self, thorough: bool) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Sqlite(s) => s.check_integrity(thorough),
            Self::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// The ledger file's size, for a SQLite ledger.
    pub(crate) fn size_bytes(&self) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Sqlite(s) => s.size_bytes().map(Some),
            Self::Postgres(_) => Ok(None),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Ledger::Sqlite($s) => $e,
            Ledger::Postgres($s) => $e,
        }
    };
}

impl Store for Ledger {
    fn transact(
        &self,
        write: Write<'_>,
        now: Timestamp,
        commit: Commit,
    ) -> Result<Applied<Written>, StoreError> {
        each!(self, s => s.transact(write, now, commit))
    }

    fn job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        each!(self, s => s.job(key))
    }

    fn ops(&self, key: &JobKey) -> Result<Vec<OpRecord>, StoreError> {
        each!(self, s => s.ops(key))
    }

    fn scan(
        &self,
        state: Option<JobState>,
        after: Option<&JobKey>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        each!(self, s => s.scan(state, after, limit))
    }

    fn finalized_by_url(&self, url: &str) -> Result<Option<Job>, StoreError> {
        each!(self, s => s.finalized_by_url(url))
    }

    fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        each!(self, s => s.expired_leases(now, limit))
    }

    fn lease_owners(&self, now: Timestamp) -> Result<Vec<WorkerId>, StoreError> {
        each!(self, s => s.lease_owners(now))
    }

    fn status(&self, now: Timestamp) -> Result<StatusCounts, StoreError> {
        each!(self, s => s.status(now))
    }

    fn busiest_hosts(&self, now: Timestamp, limit: usize) -> Result<Vec<HostLoad>, StoreError> {
        each!(self, s => s.busiest_hosts(now, limit))
    }

    fn each_finished_since(
        &self,
        since: Timestamp,
        f: &mut dyn FnMut(&Job),
    ) -> Result<(), StoreError> {
        each!(self, s => s.each_finished_since(since, f))
    }
}

/// Jobs per destination transaction.
const COPY_BATCH: usize = 500;

/// `idem copy-ledger`: pages through the source in key order and imports
/// each page in one transaction of the destination.
pub(crate) fn copy(g: &Global, a: &CopyArgs) -> anyhow::Result<u8> {
    let src = open(g)?;
    let now = crate::commands::now();
    let live = src.status(now)?.live_leases;
    if live > 0 {
        anyhow::bail!(
            "{} has {live} live lease(s): stop every worker (or wait for the leases to expire) before copying",
            shown(g)
        );
    }
    let dest_g = Global {
        db: a.to.clone(),
        ..g.clone()
    };
    if shown(&dest_g) == shown(g) {
        anyhow::bail!("--to names the ledger --db already names");
    }
    let dest = open(&dest_g)?;
    let (mut copied, mut existing) = (0u64, 0u64);
    let mut after: Option<JobKey> = None;
    loop {
        let page = src.scan(None, after.as_ref(), COPY_BATCH)?;
        let Some(last) = page.last() else { break };
        after = Some(last.key);
        let mut batch = Vec::with_capacity(page.len());
        for job in page {
            let ops = src.ops(&job.key)?;
            batch.push((job, ops));
        }
        let (c, e) = dest
            .import(&batch, now)
            .with_context(|| format!("copying into {}", shown(&dest_g)))?;
        copied += c;
        existing += e;
        tracing::info!(copied, existing, "copying");
    }
    if a.json {
        crate::commands::print_json(&serde_json::json!({
            "from": shown(g), "to": shown(&dest_g), "copied": copied, "existing": existing,
        }))?;
    } else {
        outln!(
            "copied {copied} job(s) from {} to {}; {existing} already there, left as they were",
            shown(g),
            shown(&dest_g)
        );
    }
    Ok(0)
}
