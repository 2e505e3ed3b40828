//! `cargo xtask bench scale`: what each command costs on a large ledger,
//! at 100,000 and 1,000,000 jobs (`--quick`: 100,000; `--jobs N` for
//! another size).
//!
//! Two ledgers per size. One is planned from N JSON Lines, then planned
//! again (the plan and re-plan rates). The other holds N jobs, nine in ten
//! finished (made directly through the store's import, with their three
//! op records, not by downloading; their blobs are not on disk, which no
//! command below reads) and one in ten planned against a closed port; on
//! it are timed a worker's start to its first lease (and its peak RSS
//! then), `status`, `slo check`, `reconcile --dry-run` and `export`, and
//! its bytes per job are read.

use crate::bench::release_idem;
use anyhow::{bail, Context, Result};
use idem_core::ports::Store;
use idem_core::{
    BlobInfo, Digest32, Epoch, HeadInfo, Job, JobSpec, JobState, OpKey, OpKind, OpRecord, OpResult,
    OpStatus, StreamInfo, Timestamp, WorkerId,
};
use idem_store_sqlite::{Durability, Options, SqliteStore};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

/// Jobs per import transaction.
const IMPORT_BATCH: usize = 5_000;

fn line(i: u64, url_base: &str) -> String {
    format!(
        "{{\"work_id\":\"W{}\",\"artifact_id\":\"pdf-main\",\"url\":\"{url_base}/articles/10.1234/journal.{i:07}/fulltext.pdf\"}}\n",
        2_000_000_000 + i
    )
}

fn write_lines(
    path: &Path,
    range: std::ops::Range<u64>,
    url_base: impl Fn(u64) -> String,
) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in range {
        f.write_all(line(i, &url_base(i)).as_bytes())?;
    }
    f.flush()?;
    Ok(())
}

/// Seconds a command takes; fails if it fails.
fn timed(bin: &Path, db: &Path, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = Proc::new(bin)
        .arg("--db")
        .arg(db)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running idem {args:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "idem {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// A finished job as a download leaves it, with its three op records.
fn finished(i: u64, now: Timestamp) -> Result<(Job, Vec<OpRecord>)> {
    let spec = JobSpec::new(
        &format!("W{}", 2_000_000_000 + i),
        "pdf-main",
        &format!(
            "https://host{}.example.org/articles/10.1234/journal.{i:07}/fulltext.pdf",
            i % 500
        ),
        None,
        None,
    )?;
    let mut job = Job::planned(spec, 5, now);
    let sha = Digest32::of(&i.to_le_bytes());
    let size = 100_000 + i % 900_000;
    let head = HeadInfo {
        status: 200,
        etag: Some(format!(
            "\"{:016x}\"",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        )),
        last_modified: Some("Tue, 15 Nov 2022 08:12:31 GMT".into()),
        content_length: Some(size),
        content_type: Some("application/pdf".into()),
        accept_ranges: true,
        sha256: None,
    };
    let blob = BlobInfo::new(sha, size);
    job.state = JobState::Finalized;
    job.epoch = Epoch(1);
    job.attempts = 1;
    job.head = Some(head.clone());
    job.blob = Some(blob.clone());
    job.first_leased_at = Some(now);
    job.finished_at = Some(now);
    job.updated_at = now;
    let owner = WorkerId::new("scale@bench/1/1#0");
    let op = |kind, result| OpRecord {
        key: OpKey {
            job: job.key,
            kind,
            epoch: Epoch(1),
        },
        owner: owner.clone(),
        status: OpStatus::Committed,
        result: Some(result),
        error: None,
        runs: 1,
        started_at: now,
        finished_at: Some(now),
    };
    let ops = vec![
        op(OpKind::Head, OpResult::Head(head)),
        op(
            OpKind::Stream,
            OpResult::Stream(StreamInfo {
                sha256: sha,
                size,
                resumed_from: 0,
            }),
        ),
        op(OpKind::Finalize, OpResult::Finalize(blob)),
    ];
    Ok((job, ops))
}

/// From a worker's start to its first `job_leased` event, and its peak
/// RSS (KiB) by then.
fn first_lease(bin: &Path, db: &Path, out: &Path, events: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let mut child = Proc::new(bin)
        .arg("--db")
        .arg(db)
        .arg("--out")
        .arg(out)
        .args(["run", "--allow-loopback", "--events"])
        .arg(events)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = t + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        if text.contains("\"job_leased\"") {
            break;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("no lease within {:?}", deadline - t);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = t.elapsed().as_secs_f64();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    child.kill()?;
    child.wait()?;
    Ok((secs, hwm_kib))
}

fn one_size(bin: &Path, n: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Plan and re-plan rates.
    let plan = dir.path().join("plan.jsonl");
    write_lines(&plan, 0..n, |i| {
        format!("https://host{}.example.org", i % 500)
    })?;
    let db = dir.path().join("plan.db");
    let plan_s = timed(bin, &db, &["plan", &plan.to_string_lossy()])?;
    let replan_s = timed(bin, &db, &["plan", &plan.to_string_lossy()])?;
    std::fs::remove_file(&db)?;

    // The scale ledger: nine in ten finished, one in ten planned.
    let db = dir.path().join("scale.db");
    let done = n - n / 10;
    {
        let store = SqliteStore::open(
            &db,
            &Options {
                durability: Durability::Normal,
                ..Options::default()
            },
        )?;
        let now = crate::bench::now();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        for i in 0..done {
            batch.push(finished(i, now)?);
            if batch.len() == IMPORT_BATCH || i + 1 == done {
                store.import(&batch, now)?;
                batch.clear();
            }
        }
    }
    let rest = dir.path().join("rest.jsonl");
    // A closed port: each job fails at once, so a lease is all it costs.
    write_lines(&rest, done..n, |_| "http://127.0.0.1:9".into())?;
    timed(bin, &db, &["plan", &rest.to_string_lossy()])?;
    let bytes = std::fs::metadata(&db)?.len();
    let status_s = timed(bin, &db, &["status", "--json"])?;
    let slo_s = timed(bin, &db, &["slo", "check", "--json"])
        .or_else(|_| Ok::<f64, anyhow::Error>(f64::NAN))?;
    let out = dir.path().join("out");
    let dry_s = timed(
        bin,
        &db,
        &[
            "--out",
            &out.to_string_lossy(),
            "reconcile",
            "--dry-run",
            "--json",
        ],
    )?;
    let export_s = timed(bin, &db, &["export"])?;
    let (lease_s, rss_kib) = first_lease(bin, &db, &out, &dir.path().join("events.jsonl"))?;

    let rate = |s: f64| n as f64 / s;
    println!("scale: {n} jobs ({done} finished, {} planned)", n - done);
    println!(
        "  plan                     {:>10.0} jobs/s  (goal at 5M: 100,000)",
        rate(plan_s)
    );
    println!(
        "  re-plan                  {:>10.0} jobs/s  (goal at 5M: 300,000)",
        rate(replan_s)
    );
    println!("  first lease after start  {lease_s:>10.2} s       (goal at 5M: 1)");
    println!(
        "  peak RSS by then         {:>10.1} MiB     (goal at 5M: 64)",
        rss_kib as f64 / 1024.0
    );
    println!("  status                   {status_s:>10.2} s       (goal at 5M: 1)");
    println!("  slo check (1d window)    {slo_s:>10.2} s       (goal at 5M: 1)");
    println!("  reconcile --dry-run      {dry_s:>10.2} s       (goal at 5M: 2)");
    println!("  export                   {:>10.0} jobs/s", rate(export_s));
    println!("  ledger bytes per job     {:>10}", bytes / n);
    Ok(())
}

pub(crate) fn bench(root: &Path, quick: bool, jobs: Option<u64>) -> Result<()> {
    let bin = release_idem(root)?;
    let sizes: Vec<u64> = match (jobs, quick) {
        (Some(n), _) => vec![n],
        (None, true) => vec![100_000],
        (None, false) => vec![100_000, 1_000_000],
    };
    for n in sizes {
        one_size(&bin, n)?;
    }
    Ok(())
}
