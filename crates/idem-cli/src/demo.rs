//! `idem demo`: exactly-once and crash recovery in under a minute, with no
//! network. A local origin serves generated artifacts (some identical, some
//! sharing a URL, some faulty); the demo plans them, starts a real `idem
//! run` process, kills it with SIGKILL mid-way, runs again to the end, runs
//! once more to show that nothing is fetched twice, and checks every blob.

use crate::commands::{open_store, status_json};
use crate::{DemoArgs, Global};
use anyhow::{bail, Context};
use idem_core::ports::Store;
use idem_core::{Clock, JobSpec, JobState};
use idem_origin::{content, Origin};
use idem_worker::SystemClock;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The demo's artifacts: (artifact id, origin path, file name, content).
type Files = Vec<(String, Vec<u8>)>;
type Jobs = Vec<(String, String)>;

fn catalogue(n: usize) -> (Files, Jobs) {
    let mut files = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..n {
        let name = format!("paper-{i:04}.pdf");
        // Every 10th artifact has the same bytes as artifact 0: stored once.
        // Every 16th is large and slow, so a killed worker leaves partial
        // bodies worth resuming.
        let (seed, size) = if i % 10 == 9 {
            (1, 8 * 1024)
        } else if i % 16 == 4 {
            (i as u64 + 1, 600 * 1024)
        } else {
            (i as u64 + 1, 8 * 1024 + (i * 7919) % (120 * 1024))
        };
        files.push((name.clone(), content(seed, size)));
        let path = match i {
            _ if i % 50 == 7 => format!("/f/missing-{i}.pdf"),
            _ if i % 15 == 3 => format!("/status/503/{name}?fail=1&retry_after=1"),
            _ if i % 20 == 5 => format!("/trunc/{name}?fail=1"),
            _ if i % 30 == 11 => format!("/reset/{name}?fail=1"),
            _ if i % 12 == 6 => format!("/slow/{name}?ms=15"),
            _ if i % 16 == 4 => format!("/slow/{name}?ms=3"),
            _ if i % 40 == 13 => format!("/redirect/2/{name}"),
            _ => format!("/f/{name}"),
        };
        jobs.push((format!("artifact-{i:04}"), path));
    }
    // Two more jobs pointing at URLs already planned: skipped without a request.
    for i in [1usize, 2] {
        jobs.push((
            format!("artifact-{i:04}-mirror"),
            format!("/f/paper-{i:04}.pdf"),
        ));
    }
    (files, jobs)
}

pub(crate) fn run(_g: &Global, a: &DemoArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let db = a.dir.join("idem.db");
    let out = a.dir.join("artifacts");
    let g = Global {
        db: db.clone(),
        out: out.clone(),
        unsafe_fast_sync: false,
        strict_sync: false,
    };
    let say = |s: &str| {
        if !a.json {
            outln!("{s}");
        }
    };

    let (files, jobs) = catalogue(a.artifacts.max(20));
    let origin = Origin::start(files).context("starting the local origin")?;
    say(&format!(
        "1. A local origin at {} serves {} artifacts (some identical, some faulty).",
        origin.url(""),
        a.artifacts
    ));

    let store = open_store(&g)?;
    let specs: Vec<JobSpec> = jobs
        .iter()
        .map(|(art, path)| JobSpec::new("demo-work", art, &origin.url(path), None, None))
        .collect::<Result<_, _>>()?;
    let planned = store.plan(&specs, 5, SystemClock.now())?;
    let n_planned = planned
        .value
        .iter()
        .filter(|o| matches!(o, idem_core::PlanOutcome::Planned { .. }))
        .count();
    let again = store.plan(&specs, 5, SystemClock.now())?;
    let n_existing = again
        .value
        .iter()
        .filter(|o| matches!(o, idem_core::PlanOutcome::Existing { .. }))
        .count();
    say(&format!(
        "2. Planned {n_planned} jobs into {}; planning again was a no-op for {n_existing}.",
        db.display()
    ));

    let exe = std::env::current_exe().context("finding the idem executable")?;
    let worker = |json: bool| {
        let mut c = Command::new(&exe);
        c.arg("--db").arg(&db).arg("--out").arg(&out).args([
            "run",
            "--allow-loopback",
            "--concurrency",
            "8",
            "--per-host",
            "4",
            "--lease-ttl",
            "5",
            "--backoff-base-ms",
            "200",
            "--backoff-cap-ms",
            "1500",
        ]);
        if json {
            c.arg("--json");
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        c
    };

    // First worker: killed with SIGKILL part-way, mid-body.
    let mut child = worker(true).spawn().context("starting `idem run`")?;
    let total = specs.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let st = store.status(SystemClock.now())?;
        let done: u64 = st.terminal();
        // Kill with a large body half-written (so resuming shows), once a
        // quarter of the jobs are done; at half-way regardless.
        let big_part = std::fs::read_dir(out.join("tmp")).is_ok_and(|rd| {
            rd.filter_map(Result::ok).any(|e| {
                e.file_name().to_string_lossy().ends_with(".part")
                    && e.metadata().is_ok_and(|m| m.len() > 300 * 1024)
            })
        });
        if (done * 4 >= total && big_part) || done * 2 >= total || Instant::now() > deadline {
            break;
        }
        if child.try_wait()?.is_some() {
            break;
        }
    }
    child.kill().ok();
    child.wait().ok();
    let st = store.status(SystemClock.now())?;
    let done: u64 = st.terminal();
    let parts = std::fs::read_dir(out.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    say(&format!(
        "3. Started `idem run` and killed it with SIGKILL at {done}/{total} jobs done ({} leases left live, {parts} partial file(s) on disk).",
        st.live_leases
    ));

    // Second worker: takes over the dead worker's jobs at once and finishes.
    let before = origin.total();
    worker(true).output().context("running `idem run` again")?;
    let (abandoned, resumed, taken_over) = crash_traces(&store)?;
    say(&format!(
        "4. Ran `idem run` again: it took over {taken_over} job(s) the dead worker held (their {abandoned} unfinished op(s) marked abandoned, never replayed as success), resumed {resumed} partial body(ies) with Range, restarted the rest, and finished with {} more requests.",
        origin.total() - before
    ));

    // Third worker: nothing left to do, nothing fetched.
    let before = origin.total();
    let _ = worker(true)
        .output()
        .context("running `idem run` a third time")?;
    let third = origin.total() - before;
    say(&format!("5. Ran it a third time: {third} requests (every job is already finished; committed steps are never redone)."));

    // Verify every blob against its name.
    let mut checked = 0u64;
    let mut after = None;
    loop {
        let page = store.scan(None, after.as_ref(), 1000)?;
        let Some(last) = page.last().map(|j| j.key) else {
            break;
        };
        for j in &page {
            if let Some(b) = &j.blob {
                let (sha, size) = idem_worker::files::hash_file(&out.join(&b.path))
                    .with_context(|| format!("reading blob {}", b.path))?;
                if sha != b.sha256 || size != b.size {
                    bail!("blob {} does not match its name", b.path);
                }
                checked += 1;
            }
        }
        after = Some(last);
    }
    let st = store.status(SystemClock.now())?;
    let blobs = count_files(&out.join("blobs"));
    let leftover = std::fs::read_dir(out.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    let n = |s: JobState| st.by_state.get(&s).copied().unwrap_or(0);
    say(&format!(
        "6. Verified {checked} blob references: every file's SHA-256 equals its name; {blobs} distinct blobs stored for {} successful jobs; {leftover} partial files left.",
        n(JobState::Finalized) + n(JobState::SkippedDuplicate)
    ));
    say(&format!(
        "\nFinal status: {} finalized, {} skipped_duplicate (same content or same URL, stored once), {} failed (the origin answers 404 for them, by design).",
        n(JobState::Finalized),
        n(JobState::SkippedDuplicate),
        n(JobState::Failed)
    ));
    say(&format!(
        "Took {:.1}s. Inspect it: idem --db {} status",
        started.elapsed().as_secs_f64(),
        db.display()
    ));
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "status": status_json(&st),
                "blobs": blobs,
                "verified": checked,
                "requests_on_rerun": third,
                "partial_files_left": leftover,
                "seconds": started.elapsed().as_secs_f64(),
            }))?
        );
    }
    let unfinished: u64 = st.unfinished();
    if unfinished > 0 || third > 0 || leftover > 0 {
        bail!("the demo did not converge: {unfinished} unfinished job(s), {third} request(s) on re-run, {leftover} partial file(s)");
    }
    Ok(0)
}

/// From the ledger: ops abandoned by a takeover, streams resumed from a
/// partial body, and jobs leased more than once.
fn crash_traces(store: &crate::ledger::Ledger) -> anyhow::Result<(u64, u64, u64)> {
    let (mut abandoned, mut resumed, mut taken_over) = (0, 0, 0);
    let mut after = None;
    loop {
        let page = store.scan(None, after.as_ref(), 1000)?;
        let Some(last) = page.last().map(|j| j.key) else {
            break;
        };
        for j in page.iter().filter(|j| j.epoch.0 > 1) {
            let mut held_by_the_dead = false;
            for o in store.ops(&j.key)? {
                if o.status == idem_core::OpStatus::Abandoned {
                    abandoned += 1;
                    held_by_the_dead = true;
                }
                if let Some(idem_core::OpResult::Stream(si)) = &o.result {
                    if si.resumed_from > 0 {
                        resumed += 1;
                    }
                }
            }
            taken_over += u64::from(held_by_the_dead);
        }
        after = Some(last);
    }
    Ok((abandoned, resumed, taken_over))
}

fn count_files(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}
