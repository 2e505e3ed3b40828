//! The subcommands: each validates its arguments, opens what it needs, does
//! one thing, and reports it as text or JSON.

use crate::sink::EventsFile;
use crate::{
    DrillArgs, ExportArgs, ExportFormat, Global, ReconcileArgs, RetryArgs, ShowArgs, VerifyArgs,
    EXIT_PARTIAL,
};
use anyhow::{bail, Context};
use idem_core::ports::Store;
use idem_core::{Clock, Command, Job, JobKey, JobState};
use idem_worker::{EventSink, OutDir, ReconcileOptions, SystemClock};
use serde_json::json;
use std::io::Write;

pub(crate) fn open_store(g: &Global) -> anyhow::Result<crate::ledger::Ledger> {
    crate::ledger::open(g)
}

pub(crate) fn now() -> idem_core::Timestamp {
    SystemClock.now()
}

pub(crate) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer_pretty(&mut out, v)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out));
    crate::out::tolerate(written)?;
    Ok(())
}

pub(crate) fn status_json(st: &idem_core::StatusCounts) -> serde_json::Value {
    json!({
        "total": st.total,
        "by_state": st.by_state,
        "leases": {"live": st.live_leases, "expired": st.expired_leases},
        "due_now": st.due_now,
        "suspects": st.suspects,
        "oldest_due_age_seconds": st.oldest_due_age_ms.map(|ms| ms as f64 / 1000.0),
        "failures_by_reason": st.failures_by_reason,
        "fenced_writes": st.fenced_writes,
        "ops_started": st.ops_started,
        "replays": st.replays,
        "paused": st.paused,
    })
}

pub(crate) fn print_status_text(st: &idem_core::StatusCounts) {
    outln!("{} jobs", st.total);
    for (s, n) in &st.by_state {
        outln!("  {:<18} {n}", s.as_str());
    }
    outln!(
        "leases: {} live, {} expired",
        st.live_leases,
        st.expired_leases
    );
    match st.oldest_due_age_ms {
        Some(ms) => outln!(
            "due now: {} (oldest waiting {:.1}s)",
            st.due_now,
            ms as f64 / 1000.0
        ),
        None => outln!("due now: 0"),
    }
    if !st.paused.is_empty() {
        outln!(
            "paused: {} (no new leases there; `idem resume` lifts it)",
            st.paused.join(", ")
        );
    }
    if st.suspects > 0 {
        outln!(
            "suspects: {} (their workers died too often while holding them; each runs alone, in a child process)",
            st.suspects
        );
    }
    if !st.failures_by_reason.is_empty() {
        outln!("failures by reason:");
        for (r, n) in &st.failures_by_reason {
            outln!("  {r:<18} {n}");
        }
    }
    if st.fenced_writes > 0 {
        outln!("stale-epoch writes refused: {}", st.fenced_writes);
    }
}

/// Hosts `idem status` lists.
const BUSIEST_SHOWN: usize = 10;

pub(crate) fn status(g: &Global, json: bool) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let st = store.status(now())?;
    let hosts = store.busiest_hosts(now(), BUSIEST_SHOWN)?;
    if json {
        let mut v = status_json(&st);
        v["hosts"] = json!(hosts);
        print_json(&v)?;
    } else {
        print_status_text(&st);
        if !hosts.is_empty() {
            outln!("busiest hosts:           in flight      due  unfinished  cooling down");
            let now = now();
            for h in &hosts {
                let cooling = h.cooling_down_until.map_or_else(String::new, |t| {
                    format!("{:.0} s more", t.millis_since(now) as f64 / 1000.0)
                });
                outln!(
                    "  {:<24} {:>9} {:>8} {:>11}  {cooling}",
                    escaped(&h.host),
                    h.in_flight,
                    h.due,
                    h.unfinished
                );
            }
        }
    }
    Ok(0)
}

pub(crate) fn parse_job(s: &str) -> anyhow::Result<JobKey> {
    if let Ok(k) = JobKey::parse_hex(s.trim()) {
        return Ok(k);
    }
    match s.split_once('/') {
        Some((w, a)) if !w.trim().is_empty() && !a.trim().is_empty() => {
            Ok(idem_core::job_key_of(w, a))
        }
        _ => bail!("{s:?} is neither a job key (64 hex digits) nor work_id/artifact_id"),
    }
}

fn job_json(j: &Job) -> serde_json::Value {
    json!({
        "job_key": j.key,
        "work_id": j.spec.work_id,
        "artifact_id": j.spec.artifact_id,
        "url": j.spec.url.redacted(),
        "urls": j.spec.urls().map(|u| u.redacted()).collect::<Vec<_>>(),
        "url_index": j.url_index,
        "served_url": served_url(j),
        "headers": j.spec.headers.iter().map(|(n, _)| (n.clone(), json!("***"))).collect::<serde_json::Map<_, _>>(),
        "expected_sha256": j.spec.sha256,
        "expected_content_type": j.spec.content_type,
        "state": j.state,
        "lease": j.lease.as_ref().map(|l| json!({"owner": l.owner, "epoch": l.epoch, "expires_at": l.expires_at, "isolated": l.isolated})),
        "epoch": j.epoch,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "deaths": {"unattributed": j.holder_deaths, "isolated": j.isolated_deaths},
        "suspect": j.is_suspect() && !j.state.is_terminal(),
        "next_attempt_at": j.next_attempt_at,
        "last_error": j.last_error,
        "head": j.head,
        "sha256": j.blob.as_ref().map(|b| b.sha256),
        "size": j.blob.as_ref().map(|b| b.size),
        "path": j.blob.as_ref().map(|b| &b.path),
        "duplicate_of": j.duplicate_of,
        "created_at": j.created_at,
        "updated_at": j.updated_at,
        "first_leased_at": j.first_leased_at,
        "finished_at": j.finished_at,
    })
}

/// The URL whose answer the job's blob holds (without its secrets):
/// set once the job finished by fetching.
fn served_url(j: &Job) -> Option<String> {
    let fetched = j.state == idem_core::JobState::Finalized
        || (j.state == idem_core::JobState::SkippedDuplicate && j.duplicate_of.is_none());
    fetched.then(|| j.url().redacted().into_owned())
}

/// `s` with its control characters escaped (`\u{1b}`), for a terminal:
/// plan refuses them in ids, but a ledger may be older than that rule.
fn escaped(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

pub(crate) fn show(g: &Global, a: &ShowArgs) -> anyhow::Result<u8> {
    let key = parse_job(&a.job)?;
    let store = open_store(g)?;
    let Some(job) = store.job(&key)? else {
        bail!(
            "no job {} in {} (looked up {:?})",
            key,
            crate::ledger::shown(g),
            a.job
        );
    };
    let ops = store.ops(&key)?;
    if a.json {
        let mut v = job_json(&job);
        v["ops"] = json!(ops
            .iter()
            .map(|o| json!({"kind": o.key.kind, "epoch": o.key.epoch, "owner": o.owner, "status": o.status,
                "result": o.result, "error": o.error, "runs": o.runs, "started_at": o.started_at, "finished_at": o.finished_at}))
            .collect::<Vec<_>>());
        print_json(&v)?;
        return Ok(0);
    }
    outln!("job {}", job.key);
    outln!("  work_id      {}", escaped(&job.spec.work_id));
    outln!("  artifact_id  {}", escaped(&job.spec.artifact_id));
    outln!("  url          {}", job.spec.url.redacted());
    for (i, m) in job.spec.mirrors.iter().enumerate() {
        outln!("  mirror {:<5} {}", i + 1, m.redacted());
    }
    if !job.spec.headers.is_empty() {
        let names: Vec<&str> = job.spec.headers.iter().map(|(n, _)| n.as_str()).collect();
        outln!("  headers      {} (values hidden)", names.join(", "));
    }
    outln!("  state        {}", job.state);
    if job.url_index > 0 && !job.state.is_terminal() {
        outln!("  fetching     {}", job.url().redacted());
    }
    if let Some(u) = served_url(&job) {
        outln!("  served by    {u}");
    }
    if let Some(l) = &job.lease {
        outln!(
            "  lease        {} epoch {} until {}{}",
            l.owner,
            l.epoch.0,
            l.expires_at.as_millis(),
            if l.isolated { " (running alone)" } else { "" }
        );
    }
    outln!("  attempts     {} of {}", job.attempts, job.max_attempts);
    if job.holder_deaths > 0 || job.isolated_deaths > 0 {
        outln!(
            "  deaths       {} of a holder running it among others (not held against it), {} of a child running it alone (held against it: {} fail it as poison){}",
            job.holder_deaths,
            job.isolated_deaths,
            idem_core::POISON_AFTER_ISOLATED_DEATHS,
            if job.is_suspect() && !job.state.is_terminal() {
                "; a suspect: runs only alone"
            } else {
                ""
            }
        );
    }
    if let Some(e) = &job.last_error {
        outln!("  last error   {}", escaped(e));
    }
    if let Some(b) = &job.blob {
        outln!(
            "  blob         {} ({} bytes) at {}",
            b.sha256,
            b.size,
            b.path
        );
    }
    outln!("  ops:");
    for o in &ops {
        outln!(
            "    {:<9} epoch {:<3} {:<10} runs {} {}",
            o.key.kind.as_str(),
            o.key.epoch.0,
            o.status.as_str(),
            o.runs,
            o.error.as_deref().unwrap_or("")
        );
    }
    Ok(0)
}

pub(crate) fn reconcile(g: &Global, a: &ReconcileArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let out =
        OutDir::prepare(&g.out).with_context(|| format!("output directory {}", g.out.display()))?;
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    let sink: &dyn EventSink = match &events {
        Some(ev) => ev,
        None => &idem_worker::NullSink,
    };
    let r = idem_worker::reconcile::reconcile(
        &store,
        &out,
        sink,
        &SystemClock,
        &ReconcileOptions {
            dry_run: a.dry_run,
            blobs: if a.blobs {
                idem_worker::BlobCheck::All
            } else {
                idem_worker::BlobCheck::Skip
            },
        },
    )?;
    if let Some(e) = events.as_ref().and_then(EventsFile::error) {
        bail!("{e}");
    }
    if a.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        let verb = if a.dry_run {
            "would repair"
        } else {
            "repaired"
        };
        outln!(
            "{verb}: {} expired lease(s), {} dead op(s), {} orphaned part file(s), {} blob(s) healed, {} missing blob(s) requeued ({} checked)",
            r.expired_leases, r.abandoned_ops, r.parts_removed, r.blobs_healed, r.blobs_missing_requeued, r.blobs_checked
        );
    }
    Ok(0)
}

pub(crate) fn verify(g: &Global, a: &VerifyArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let ledger = match store.check_integrity(true) {
        Ok(problems) => problems,
        Err(e) => vec![e.to_string()],
    };
    let out =
        OutDir::prepare(&g.out).with_context(|| format!("output directory {}", g.out.display()))?;
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    let sink: &dyn EventSink = match &events {
        Some(ev) => ev,
        None => &idem_worker::NullSink,
    };
    // A damaged ledger's rows are not worth auditing blobs against.
    let blobs = if ledger.is_empty() {
        Some(idem_worker::verify::verify(
            &store,
            &out,
            sink,
            &SystemClock,
            a.repair,
        )?)
    } else {
        None
    };
    if let Some(e) = events.as_ref().and_then(EventsFile::error) {
        bail!("{e}");
    }
    let bad_blobs = blobs.as_ref().map_or(0, |b| b.bad.len());
    if a.json {
        print_json(&json!({
            "ledger": {"ok": ledger.is_empty(), "problems": ledger},
            "blobs": blobs,
        }))?;
    } else {
        if ledger.is_empty() {
            outln!("ledger {}: ok", crate::ledger::shown(g));
        } else {
            outln!("ledger {}: damaged", crate::ledger::shown(g));
            for p in &ledger {
                outln!("  {p}");
            }
        }
        if let Some(b) = &blobs {
            outln!("blobs: {} checked, {} bad", b.blobs_checked, b.bad.len());
            for bad in &b.bad {
                let fate = if bad.requeued { " (re-queued)" } else { "" };
                outln!("  {} {}{fate}: {}", bad.job_key, bad.path, bad.problem);
            }
        }
    }
    Ok(if ledger.is_empty() && bad_blobs == 0 {
        0
    } else {
        EXIT_PARTIAL
    })
}

pub(crate) fn retry(g: &Global, a: &RetryArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let keys: Vec<JobKey> = if a.failed {
        let mut keys = Vec::new();
        let mut after: Option<JobKey> = None;
        loop {
            let page = store.scan(Some(JobState::Failed), after.as_ref(), 1000)?;
            let Some(last) = page.last().map(|j| j.key) else {
                break;
            };
            keys.extend(page.iter().map(|j| j.key));
            after = Some(last);
        }
        keys
    } else {
        a.jobs
            .iter()
            .map(|s| parse_job(s))
            .collect::<anyhow::Result<_>>()?
    };
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    let mut retried = 0u64;
    let mut refused = Vec::new();
    for k in &keys {
        match store.apply(k, Command::OperatorRetry, now()) {
            Ok(applied) => {
                retried += 1;
                if let Some(ev) = &events {
                    ev.emit(&applied.events);
                }
            }
            Err(e) => refused.push(json!({"job_key": k, "error": e.to_string()})),
        }
    }
    if let Some(e) = events.as_ref().and_then(EventsFile::error) {
        bail!("{e}");
    }
    if a.json {
        print_json(&json!({"retried": retried, "refused": refused}))?;
    } else {
        outln!("retried {retried} job(s)");
        for r in &refused {
            eprintln!(
                "idem: {}: {}",
                r["job_key"].as_str().unwrap_or(""),
                r["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if refused.is_empty() { 0 } else { EXIT_PARTIAL })
}

pub(crate) fn export(g: &Global, a: &ExportArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut csv_w =
        matches!(a.format, ExportFormat::Csv).then(|| csv::Writer::from_writer(Vec::new()));
    if let Some(w) = csv_w.as_mut() {
        w.write_record([
            "work_id",
            "artifact_id",
            "url",
            "job_key",
            "state",
            "sha256",
            "size",
            "path",
            "attempts",
            "last_error",
            "served_url",
        ])?;
    }
    let mut after: Option<JobKey> = None;
    loop {
        let page = store.scan(None, after.as_ref(), 1000)?;
        let Some(last) = page.last().map(|j| j.key) else {
            break;
        };
        for j in &page {
            let sha = j.blob.as_ref().map(|b| b.sha256.to_hex());
            let size = j.blob.as_ref().map(|b| b.size);
            let path = j.blob.as_ref().map(|b| b.path.clone());
            match csv_w.as_mut() {
                Some(w) => w.write_record([
                    j.spec.work_id.clone(),
                    j.spec.artifact_id.clone(),
                    j.spec.url.redacted().into_owned(),
                    j.key.to_hex(),
                    j.state.to_string(),
                    sha.unwrap_or_default(),
                    size.map(|s| s.to_string()).unwrap_or_default(),
                    path.unwrap_or_default(),
                    j.attempts.to_string(),
                    j.last_error.clone().unwrap_or_default(),
                    served_url(j).unwrap_or_default(),
                ])?,
                None => {
                    serde_json::to_writer(
                        &mut out,
                        &json!({"work_id": j.spec.work_id, "artifact_id": j.spec.artifact_id, "url": j.spec.url.redacted(),
                            "job_key": j.key, "state": j.state, "sha256": sha, "size": size, "path": path,
                            "attempts": j.attempts, "last_error": j.last_error, "served_url": served_url(j)}),
                    )?;
                    out.write_all(b"\n")?;
                }
            }
        }
        if let Some(w) = csv_w.take() {
            // Drain the CSV buffer page by page to keep memory constant.
            out.write_all(&w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
            csv_w = Some(csv::Writer::from_writer(Vec::new()));
        }
        after = Some(last);
    }
    if let Some(w) = csv_w.take() {
        out.write_all(&w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
    }
    out.flush()?;
    Ok(0)
}

/// Leases and completes jobs with a null effect: lease, HEAD/STREAM/FINALIZE
/// ops begun and committed, job finalized. Exercises exactly the ledger
/// writes of a real download, with no network or files.
pub(crate) fn ledger_drill(g: &Global, a: &DrillArgs) -> anyhow::Result<u8> {
    use idem_core::WorkerId;
    let store = open_store(g)?;
    let started = std::time::Instant::now();
    let done = std::sync::atomic::AtomicU64::new(0);
    let me = idem_worker::owner::this_worker();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for t in 0..a.threads.max(1) {
            let store = &store;
            let done = &done;
            let owner = WorkerId::new(format!("{me}#{t}"));
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let out = std::io::stdout();
                let mut printed = Ok(());
                idem_worker::drill::run_worker(store, &owner, a.batch, now, |j| {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if a.print_keys && printed.is_ok() {
                        printed = writeln!(out.lock(), "{}", j.key);
                    }
                })?;
                Ok(printed?)
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("drill thread panicked"))??;
        }
        Ok(())
    })?;
    let n = done.into_inner();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "ledger-drill: {n} jobs in {secs:.3}s ({:.0} jobs/s)",
        n as f64 / secs.max(1e-9)
    );
    Ok(0)
}
