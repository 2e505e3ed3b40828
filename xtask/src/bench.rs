//! `cargo xtask bench`: idem's figures beside a baseline run in the same
//! invocation, as ratios. Never a timed test: numbers are printed, and
//! recorded by hand in docs/benchmarks.md with the command that made them.
//!
//! - `store`: planning and the durable per-job ledger path, against raw
//!   rusqlite loops doing the minimum equivalent SQL;
//! - `download`: idem against curl, wget and aria2c on the same files from
//!   the same local origin.

use anyhow::{bail, Context, Result};
use idem_core::ports::Store;
use idem_core::{
    BlobInfo, Command, Digest32, HeadInfo, JobSpec, LeaseRequest, OpKey, OpKind, OpResult,
    StreamInfo, Timestamp, WorkerId,
};
use idem_store_sqlite::{Durability, Options, SqliteStore};
use rusqlite::params;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::Instant;

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    Timestamp::from_millis(ms)
}

fn row(name: &str, idem: f64, base: f64, unit: &str, note: &str) {
    println!(
        "{name:<52} idem {idem:>10.0} {unit:<8} baseline {base:>10.0} {unit:<8} ratio {:>5.2}  {note}",
        idem / base.max(1e-9)
    );
}

fn specs(n: usize, tag: &str) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("W{}", i / 10),
                format!("{tag}-{i}"),
                format!("https://example.org/papers/{tag}/{i}.pdf"),
            )
        })
        .collect()
}

fn baseline_schema(c: &rusqlite::Connection, sync: &str) -> Result<()> {
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA cache_size=-65536;
         CREATE TABLE jobs (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, work_id TEXT NOT NULL,
            artifact_id TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL, lease_owner TEXT,
            lease_epoch INTEGER NOT NULL DEFAULT 0, lease_expires_at INTEGER, due_at INTEGER);
         CREATE INDEX jobs_due ON jobs (due_at) WHERE due_at IS NOT NULL;
         CREATE TABLE ops (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, kind TEXT NOT NULL,
            epoch INTEGER NOT NULL, status TEXT NOT NULL, result TEXT, UNIQUE (job_id, kind, epoch));"
    ))?;
    Ok(())
}

fn raw_key(w: &str, a: &str) -> [u8; 32] {
    *idem_core::job_key_of(w, a).digest().as_bytes()
}

/// Raw rusqlite: INSERT OR IGNORE in batches, keys hashed in the loop.
fn raw_plan(
    path: &Path,
    items: &[(String, String, String)],
    batch: usize,
    create: bool,
) -> Result<f64> {
    let mut c = rusqlite::Connection::open(path)?;
    if create {
        baseline_schema(&c, "FULL")?;
    } else {
        c.execute_batch("PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;")?;
    }
    let t = Instant::now();
    for chunk in items.chunks(batch) {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs (key, work_id, artifact_id, url, state, due_at) VALUES (?1, ?2, ?3, ?4, 'planned', 0)",
            )?;
            for (w, a, u) in chunk {
                st.execute(params![raw_key(w, a).as_slice(), w, a, u])?;
            }
        }
        tx.commit()?;
    }
    Ok(items.len() as f64 / t.elapsed().as_secs_f64())
}

fn idem_plan(store: &SqliteStore, items: &[(String, String, String)], batch: usize) -> Result<f64> {
    let t = Instant::now();
    for chunk in items.chunks(batch) {
        let specs: Vec<JobSpec> = chunk
            .iter()
            .map(|(w, a, u)| JobSpec::new(w, a, u, None, None))
            .collect::<Result<_, _>>()?;
        store.plan(&specs, 5, now())?;
    }
    Ok(items.len() as f64 / t.elapsed().as_secs_f64())
}

/// The minimum SQL of one job's life, one transaction per job.
fn raw_job_loop(path: &Path, jobs: usize, sync: &str) -> Result<f64> {
    let mut c = rusqlite::Connection::open(path)?;
    baseline_schema(&c, sync)?;
    {
        let tx = c.transaction()?;
        for (w, a, u) in specs(jobs, "raw") {
            tx.execute(
                "INSERT INTO jobs (key, work_id, artifact_id, url, state, due_at) VALUES (?1, ?2, ?3, ?4, 'planned', 0)",
                params![raw_key(&w, &a).as_slice(), w, a, u],
            )?;
        }
        tx.commit()?;
    }
    let t = Instant::now();
    loop {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id: Option<(i64, i64)> = tx
            .query_row(
                "UPDATE jobs SET state='leased', lease_owner='w', lease_epoch=lease_epoch+1, lease_expires_at=?1, due_at=?1
                 WHERE id = (SELECT id FROM jobs WHERE due_at <= ?2 ORDER BY due_at, id LIMIT 1) RETURNING id, lease_epoch",
                params![i64::MAX / 2, 1i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok();
        let Some((id, epoch)) = id else { break };
        for (kind, result) in [
            ("head", r#"{"status":200}"#),
            ("stream", r#"{"size":32}"#),
            ("finalize", r#"{"path":"x"}"#),
        ] {
            tx.execute(
                "INSERT INTO ops (job_id, kind, epoch, status, result) VALUES (?1, ?2, ?3, 'committed', ?4)",
                params![id, kind, epoch, result],
            )?;
        }
        tx.execute("UPDATE jobs SET state='finalized', lease_owner=NULL, due_at=NULL WHERE id=?1 AND lease_epoch=?2", params![id, epoch])?;
        tx.commit()?;
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

/// One job through idem's ledger with a null effect, as the engine does it.
fn idem_one_job(store: &SqliteStore, owner: &WorkerId, job: &idem_core::Job) -> Result<()> {
    let e = job.lease.as_ref().map(|l| l.epoch).unwrap_or_default();
    let op = |kind| OpKey {
        job: job.key,
        kind,
        epoch: e,
    };
    let head = HeadInfo {
        status: 200,
        ..HeadInfo::default()
    };
    store.begin_op(&op(OpKind::Head), owner, now())?;
    store.finish_op(
        &op(OpKind::Head),
        Ok(OpResult::Head(head.clone())),
        Some(Command::HeadDone { epoch: e, head }),
        now(),
    )?;
    store.apply(&job.key, Command::StreamStarted { epoch: e }, now())?;
    let blob = BlobInfo::new(Digest32::of(job.key.digest().as_bytes()), 32);
    store.begin_op(&op(OpKind::Stream), owner, now())?;
    let si = StreamInfo {
        sha256: blob.sha256,
        size: 32,
        resumed_from: 0,
    };
    store.finish_op(&op(OpKind::Stream), Ok(OpResult::Stream(si)), None, now())?;
    store.begin_op(&op(OpKind::Finalize), owner, now())?;
    store.finish_op(
        &op(OpKind::Finalize),
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize { epoch: e, blob }),
        now(),
    )?;
    Ok(())
}

fn idem_job_loop(
    dir: &Path,
    jobs: usize,
    durability: Durability,
    workers: usize,
    batch: usize,
) -> Result<f64> {
    let path = dir.join(format!("idem-{jobs}-{durability:?}-{workers}-{batch}.db"));
    let store = SqliteStore::open(
        &path,
        &Options {
            durability,
            ..Options::default()
        },
    )?;
    let all: Vec<JobSpec> = specs(jobs, "job")
        .iter()
        .map(|(w, a, u)| JobSpec::new(w, a, u, None, None))
        .collect::<Result<_, _>>()?;
    for chunk in all.chunks(10_000) {
        store.plan(chunk, 5, now())?;
    }
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let store = &store;
                s.spawn(move || -> Result<()> {
                    let owner = WorkerId::new(format!("bench-{w}"));
                    loop {
                        let req = LeaseRequest {
                            owner: owner.clone(),
                            limit: batch,
                            ttl_ms: 600_000,
                            dead_owners: vec![],
                        };
                        let got = store.lease(&req, now())?.value;
                        if got.is_empty() {
                            return Ok(());
                        }
                        for j in &got {
                            idem_one_job(store, &owner, j)?;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

fn release_idem(root: &Path) -> Result<PathBuf> {
    let st = Proc::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["build", "--release", "--quiet", "-p", "idem-cli"])
        .status()
        .context("building idem (release)")?;
    if !st.success() {
        bail!("cargo build --release -p idem-cli failed");
    }
    Ok(root.join("target/release/idem"))
}

/// N `idem ledger-drill` processes on one ledger.
fn idem_processes(idem: &Path, dir: &Path, jobs: usize, procs: usize) -> Result<f64> {
    let db = dir.join(format!("procs-{procs}.db"));
    let plan = dir.join("procs-plan.jsonl");
    let text: String = specs(jobs, "proc")
        .iter()
        .map(|(w, a, u)| {
            format!("{{\"work_id\":\"{w}\",\"artifact_id\":\"{a}\",\"url\":\"{u}\"}}\n")
        })
        .collect();
    std::fs::write(&plan, text)?;
    let ok = Proc::new(idem)
        .arg("--db")
        .arg(&db)
        .arg("plan")
        .arg(&plan)
        .output()?;
    if !ok.status.success() {
        bail!("plan failed: {}", String::from_utf8_lossy(&ok.stderr));
    }
    let t = Instant::now();
    let children: Vec<_> = (0..procs)
        .map(|_| {
            Proc::new(idem)
                .arg("--db")
                .arg(&db)
                .args(["ledger-drill", "--batch", "8"])
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in children {
        if !c.wait()?.success() {
            bail!("ledger-drill failed");
        }
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

pub(crate) fn store(root: &Path, quick: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let n_plan = if quick { 20_000 } else { 100_000 };
    let n_jobs = if quick { 1_000 } else { 5_000 };
    println!(
        "== store (SQLite, this machine: {} cores) ==",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let items = specs(n_plan, "plan");
    for batch in [1_000usize, 10_000] {
        let raw_db = dir.path().join(format!("raw-plan-{batch}.db"));
        let base = raw_plan(&raw_db, &items, batch, true)?;
        let store = SqliteStore::open(
            dir.path().join(format!("idem-plan-{batch}.db")),
            &Options::default(),
        )?;
        let idem = idem_plan(&store, &items, batch)?;
        row(
            &format!("plan {n_plan} new jobs, {batch}/txn"),
            idem,
            base,
            "jobs/s",
            "FULL",
        );
        let base_re = raw_plan(&raw_db, &items, batch, false)?;
        let idem_re = idem_plan(&store, &items, batch)?;
        row(
            &format!("re-plan {n_plan} existing jobs, {batch}/txn"),
            idem_re,
            base_re,
            "jobs/s",
            "no-op",
        );
    }
    for (durability, sync) in [(Durability::Full, "FULL"), (Durability::Normal, "NORMAL")] {
        let base = raw_job_loop(
            &dir.path().join(format!("raw-jobs-{sync}.db")),
            n_jobs,
            sync,
        )?;
        let one = idem_job_loop(dir.path(), n_jobs, durability, 1, 1)?;
        row(
            &format!("lease+3 ops+complete, 1 worker, {sync}"),
            one,
            base,
            "jobs/s",
            "raw: 1 txn/job",
        );
        let many = idem_job_loop(dir.path(), n_jobs * 4, durability, 16, 8)?;
        row(
            &format!("lease+3 ops+complete, 16 workers, {sync}"),
            many,
            base,
            "jobs/s",
            "group commit, lease 8",
        );
    }
    let idem = release_idem(root)?;
    let base = raw_job_loop(&dir.path().join("raw-jobs-procs.db"), n_jobs, "FULL")?;
    for procs in [1usize, 2] {
        let r = idem_processes(&idem, dir.path(), n_jobs, procs)?;
        row(
            &format!("lease+3 ops+complete, {procs} process(es), FULL"),
            r,
            base,
            "jobs/s",
            "ledger-drill",
        );
    }
    Ok(())
}

pub(crate) fn probe() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let r = idem_job_loop(dir.path(), 4000, Durability::Full, 16, 8)?;
    println!("16 workers: {r:.0} jobs/s");
    Ok(())
}
