//! `cargo xtask bench bytes`: what a finished job costs on disk in the
//! SQLite ledger, at a million jobs (`--quick`: 100,000).
//!
//! The jobs are planned from JSON Lines shaped like a scholarly corpus
//! (500 hosts, 70-character URLs), finished by `idem ledger-drill`, which
//! writes exactly a real download's ledger records with a typical HEAD
//! (entity tag, last-modified, length, type), then measured three ways:
//! the file as the run left it (log checkpointed), a `VACUUM`ed copy, and
//! after `idem prune --older-than 0`.

use crate::bench::release_idem;
use anyhow::{bail, Context, Result};
use std::io::Write as _;
use std::path::Path;
use std::process::Command as Proc;

/// The goal: bytes per finished job, operation records included.
const GOAL_BYTES: u64 = 700;

fn idem(bin: &Path, db: &Path, args: &[&str]) -> Result<String> {
    let out = Proc::new(bin)
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .with_context(|| format!("running idem {args:?}"))?;
    if !out.status.success() {
        bail!(
            "idem {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn checkpointed_bytes(db: &Path) -> Result<u64> {
    let c = rusqlite::Connection::open(db)?;
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(std::fs::metadata(db)?.len())
}

pub(crate) fn bench(root: &Path, quick: bool) -> Result<()> {
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let bin = release_idem(root)?;
    let dir = tempfile::tempdir()?;
    let plan = dir.path().join("plan.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&plan)?);
        for i in 0..n {
            writeln!(
                f,
                "{{\"work_id\":\"W{}\",\"artifact_id\":\"pdf-main\",\"url\":\"https://host{}.example.org/articles/10.1234/journal.{i:07}/fulltext.pdf\"}}",
                2_000_000_000 + i,
                i % 500
            )?;
        }
    }
    let db = dir.path().join("idem.db");
    idem(&bin, &db, &["plan", &plan.to_string_lossy()])?;
    // The durability setting changes when pages reach the disk, not what
    // they hold.
    idem(
        &bin,
        &db,
        &[
            "--unsafe-fast-sync",
            "ledger-drill",
            "--threads",
            "2",
            "--batch",
            "16",
        ],
    )?;
    let left = checkpointed_bytes(&db)?;
    let copy = dir.path().join("vacuumed.db");
    std::fs::copy(&db, &copy)?;
    rusqlite::Connection::open(&copy)?.execute_batch("VACUUM")?;
    let vacuumed = std::fs::metadata(&copy)?.len();
    idem(&bin, &db, &["prune", "--older-than", "0", "--json"])?;
    let pruned = checkpointed_bytes(&db)?;
    let per = |b: u64| b / n;
    println!("ledger bytes per finished job, {n} jobs (goal: {GOAL_BYTES} with their ops)");
    println!("  as the run left it   {:>6}", per(left));
    println!("  vacuumed             {:>6}", per(vacuumed));
    println!(
        "  after idem prune     {:>6}  (ops dropped, job rows kept)",
        per(pruned)
    );
    if per(left) > GOAL_BYTES {
        println!("  goal not met");
    }
    Ok(())
}
