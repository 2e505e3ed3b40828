//! `cargo xtask bench store --db postgres://…`: the PostgreSQL ledger, as
//! whole `idem` processes, beside pgbench running by hand the minimum SQL
//! the same job life needs (a `SKIP LOCKED` lease, three op rows, four job
//! updates), in the same run, on scratch databases of that server.

use crate::bench::{release_idem, row, write_plan};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command as Proc;
use std::time::Instant;

/// The raw loop: one job per script run, leased with SKIP LOCKED, then
/// HEAD, STREAM and FINALIZE each recorded with the job's new state; the
/// first three commits asynchronous, the last durable, as idem's are.
const RAW_SCRIPT: &str = r"
BEGIN;
SET LOCAL synchronous_commit = off;
SELECT id FROM raw_jobs WHERE due_at IS NOT NULL ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED \gset
UPDATE raw_jobs SET state = 'leased', epoch = epoch + 1, lease_owner = 'raw', due_at = NULL WHERE id = :id;
COMMIT;
BEGIN;
SET LOCAL synchronous_commit = off;
INSERT INTO raw_ops (job_id, kind, status) VALUES (:id, 'head', 'committed');
UPDATE raw_jobs SET state = 'head_done' WHERE id = :id;
INSERT INTO raw_ops (job_id, kind, status) VALUES (:id, 'stream', 'started');
COMMIT;
BEGIN;
SET LOCAL synchronous_commit = off;
UPDATE raw_ops SET status = 'committed' WHERE job_id = :id AND kind = 'stream';
UPDATE raw_jobs SET state = 'streaming' WHERE id = :id;
INSERT INTO raw_ops (job_id, kind, status) VALUES (:id, 'finalize', 'started');
COMMIT;
BEGIN;
UPDATE raw_ops SET status = 'committed' WHERE job_id = :id AND kind = 'finalize';
UPDATE raw_jobs SET state = 'finalized', lease_owner = NULL WHERE id = :id;
COMMIT;
";

const RAW_SCHEMA: &str = r"
CREATE TABLE raw_jobs (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
  state TEXT NOT NULL, epoch BIGINT NOT NULL DEFAULT 0, lease_owner TEXT, due_at BIGINT);
CREATE INDEX raw_jobs_due ON raw_jobs (due_at, id) WHERE due_at IS NOT NULL;
CREATE TABLE raw_ops (id BIGSERIAL PRIMARY KEY, job_id BIGINT NOT NULL REFERENCES raw_jobs (id),
  kind TEXT NOT NULL, status TEXT NOT NULL, UNIQUE (job_id, kind));
";

fn psql(url: &str, sql: &str) -> Result<String> {
    let out = Proc::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .context("running psql")?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh database on `server`'s host; its URL.
fn scratch(server: &str, name: &str) -> Result<String> {
    psql(
        server,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )?;
    psql(server, &format!("CREATE DATABASE {name}"))?;
    let (base, _) = server
        .rsplit_once('/')
        .context("a postgres:// URL with a database")?;
    Ok(format!("{base}/{name}"))
}

fn pgbench() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path().join("bin/pgbench"))
                .find(|p| p.exists())
        })
        .map_or_else(|| "pgbench".to_owned(), |p| p.display().to_string())
}

/// Jobs per second of the raw loop with `clients` connections.
fn raw_loop(server: &str, tag: &str, jobs: usize, clients: usize) -> Result<f64> {
    let url = scratch(server, &format!("idem_bench_raw_{tag}"))?;
    psql(&url, RAW_SCHEMA)?;
    psql(
        &url,
        &format!(
            "INSERT INTO raw_jobs (key, url, state, due_at) SELECT 'k' || i, 'https://example.org/' || i, 'planned', 0 FROM generate_series(1, {jobs}) i"
        ),
    )?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("job.sql");
    std::fs::write(&script, RAW_SCRIPT)?;
    let per_client = jobs / clients;
    let t = Instant::now();
    let out = Proc::new(pgbench())
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &per_client.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(&url)
        .output()
        .context("running pgbench")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((per_client * clients) as f64 / secs)
}

/// Jobs per second of `procs` `idem ledger-drill` processes, 16 workers each.
fn idem_loop(idem: &Path, server: &str, tag: &str, jobs: usize, procs: usize) -> Result<f64> {
    let url = scratch(server, &format!("idem_bench_drill_{tag}"))?;
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.jsonl");
    write_plan(&plan, jobs, tag)?;
    let ok = Proc::new(idem)
        .args(["--db", &url, "plan"])
        .arg(&plan)
        .output()?;
    if !ok.status.success() {
        bail!("plan failed: {}", String::from_utf8_lossy(&ok.stderr));
    }
    let t = Instant::now();
    let children: Vec<_> = (0..procs)
        .map(|_| {
            Proc::new(idem)
                .args([
                    "--db",
                    &url,
                    "ledger-drill",
                    "--threads",
                    "16",
                    "--batch",
                    "1",
                ])
                .stdout(std::process::Stdio::null())
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

/// `idem plan` of `n` lines into a fresh ledger, then again: jobs/s each.
fn plan_rates(idem: &Path, server: &str, n: usize) -> Result<(f64, f64)> {
    let url = scratch(server, "idem_bench_plan")?;
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.jsonl");
    write_plan(&plan, n, "plan")?;
    let rate = || -> Result<f64> {
        let t = Instant::now();
        let ok = Proc::new(idem)
            .args(["--db", &url, "plan"])
            .arg(&plan)
            .output()?;
        if !ok.status.success() {
            bail!("plan failed: {}", String::from_utf8_lossy(&ok.stderr));
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    Ok((rate()?, rate()?))
}

pub(crate) fn store(root: &Path, server: &str, quick: bool) -> Result<()> {
    let idem = release_idem(root)?;
    let n_plan = if quick { 20_000 } else { 100_000 };
    let n_jobs = if quick { 1_600 } else { 8_000 };
    println!(
        "== store (PostgreSQL, {}; this machine: {} cores) ==",
        idem_core::redact_url(server),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (plan, replan) = plan_rates(&idem, server, n_plan)?;
    println!("plan {n_plan} new jobs (idem plan)                      {plan:>10.0} jobs/s");
    println!("re-plan {n_plan} existing jobs                           {replan:>10.0} jobs/s");
    for procs in [1usize, 2, 4] {
        let tag = format!("p{procs}");
        let raw = raw_loop(server, &tag, n_jobs, 16 * procs)?;
        let ours = idem_loop(&idem, server, &tag, n_jobs, procs)?;
        row(
            &format!("lease+3 ops+complete, {procs} process(es) x 16"),
            ours,
            raw,
            "jobs/s",
            "raw: pgbench, same clients",
        );
    }
    Ok(())
}
