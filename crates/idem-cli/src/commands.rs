//! The subcommands: each validates its arguments, opens what it needs, does
//! one thing, and reports it as text or JSON.

use crate::input::{self, BadLine, Item};
use crate::sink::{EventsFile, Fanout, Metrics};
use crate::{
    DrillArgs, ExportArgs, ExportFormat, Global, PlanArgs, ReconcileArgs, RetryArgs, RunArgs,
    ShowArgs, EXIT_INTERRUPTED, EXIT_PARTIAL,
};
use anyhow::{bail, Context};
use idem_core::ports::Store;
use idem_core::{
    Clock, Command, Job, JobKey, JobSpec, JobState, PlanCounts, PlanOutcome, RetryPolicy,
};
use idem_store_sqlite::{Durability, Options, SqliteStore};
use idem_worker::{EngineConfig, EventSink, OutDir, ReconcileOptions, SystemClock};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::sync::Arc;

pub(crate) fn open_store(g: &Global) -> anyhow::Result<SqliteStore> {
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
    SqliteStore::open(&g.db, &opts).with_context(|| format!("opening ledger {}", g.db.display()))
}

fn now() -> idem_core::Timestamp {
    SystemClock.now()
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub(crate) fn plan(g: &Global, a: &PlanArgs) -> anyhow::Result<u8> {
    if a.strict {
        // First pass: validate everything, apply nothing on any error.
        let mut bad = Vec::new();
        for f in &a.files {
            if f == "-" {
                bail!("--strict needs files, not stdin: it reads the input twice (once to check, once to apply)");
            }
            input::read(f, |it| {
                if let Item::Bad(b) = it {
                    bad.push(b);
                }
                Ok(())
            })?;
        }
        if !bad.is_empty() {
            for b in bad.iter().take(50) {
                eprintln!("idem: {b}");
            }
            report_plan(a.json, PlanCounts::default(), &bad, &[], true)?;
            return Ok(EXIT_PARTIAL);
        }
    }
    let store = open_store(g)?;
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    let mut counts = PlanCounts::default();
    let mut conflicts: Vec<serde_json::Value> = Vec::new();
    // Millions of lines take minutes: a terminal gets a running count.
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {human_pos} jobs applied  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    // Reading and parsing run on their own thread, one batch ahead of the
    // ledger: a parsed line costs about as much as its insert, so the two
    // stages together take little longer than the ledger alone.
    let bad = std::thread::scope(|s| -> anyhow::Result<Vec<BadLine>> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PlanBatch>(1);
        let reader_bar = bar.clone();
        let reader = s.spawn(move || read_batches(&a.files, a.batch, &tx, reader_bar.as_ref()));
        for batch in rx {
            // On an error `rx` is dropped here, so the reader stops at its
            // next batch.
            apply_plan(
                &store,
                a.max_attempts,
                &batch,
                events.as_ref(),
                &mut counts,
                &mut conflicts,
                bar.as_ref(),
            )?;
            if let Some(bar) = &bar {
                bar.inc(batch.specs.len() as u64);
                let secs = bar.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!("{:.0} jobs/s", bar.position() as f64 / secs));
            }
        }
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the input reader panicked"))?
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let bad = bad?;
    report_plan(a.json, counts, &bad, &conflicts, false)?;
    Ok(if bad.is_empty() && counts.conflicts == 0 {
        0
    } else {
        EXIT_PARTIAL
    })
}

/// Parsed jobs on their way to the ledger, with where each came from.
#[derive(Default)]
struct PlanBatch {
    specs: Vec<JobSpec>,
    origins: Vec<(String, u64)>,
}

/// Reads every input in batches of `size` and sends them on; reports bad
/// lines on stderr and returns them. Stops early, without error, when the
/// receiver has gone (the ledger side failed and reports why).
fn read_batches(
    files: &[String],
    size: usize,
    tx: &std::sync::mpsc::SyncSender<PlanBatch>,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<Vec<BadLine>> {
    struct Gone;
    let mut bad = Vec::new();
    let mut batch = PlanBatch::default();
    let send = |batch: &mut PlanBatch| -> Result<(), Gone> {
        if batch.specs.is_empty() {
            return Ok(());
        }
        tx.send(std::mem::take(batch)).map_err(|_| Gone)
    };
    let mut gone = false;
    for f in files {
        let r = input::read(f, |it| {
            match it {
                Item::Spec { spec, file, line } => {
                    batch.specs.push(spec);
                    batch.origins.push((file, line));
                    if batch.specs.len() >= size && send(&mut batch).is_err() {
                        gone = true;
                        bail!("the ledger side stopped");
                    }
                }
                Item::Bad(b) => {
                    warn(bar, &b);
                    bad.push(b);
                }
            }
            Ok(())
        });
        if gone {
            return Ok(bad);
        }
        r?;
    }
    // A failed send means the ledger side failed; it reports the error.
    let _ = send(&mut batch);
    Ok(bad)
}

/// A warning on stderr that does not tear through a progress bar.
fn warn(bar: Option<&indicatif::ProgressBar>, msg: impl std::fmt::Display) {
    match bar {
        Some(bar) => bar.suspend(|| eprintln!("idem: {msg}")),
        None => eprintln!("idem: {msg}"),
    }
}

/// Plans one batch and tallies its outcomes; a conflict is reported on
/// stderr with the line it came from.
fn apply_plan(
    store: &SqliteStore,
    max_attempts: u32,
    batch: &PlanBatch,
    events: Option<&EventsFile>,
    counts: &mut PlanCounts,
    conflicts: &mut Vec<serde_json::Value>,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<()> {
    let r = store.plan(&batch.specs, max_attempts, now())?;
    if let Some(ev) = events {
        ev.emit(&r.events);
    }
    for (o, (file, line)) in r.value.iter().zip(&batch.origins) {
        counts.add(o);
        if let PlanOutcome::Conflict(c) = o {
            warn(
                bar,
                format_args!("{file}:{line}: key conflict for job {}: planned with {} but this line has {}; not applied",
                c.job_key, c.existing_url, c.proposed_url),
            );
            if conflicts.len() < 1000 {
                conflicts.push(json!({"file": file, "line": line, "job_key": c.job_key,
                    "existing_url": c.existing_url, "proposed_url": c.proposed_url}));
            }
        }
    }
    Ok(())
}

fn report_plan(
    json: bool,
    c: PlanCounts,
    bad: &[BadLine],
    conflicts: &[serde_json::Value],
    aborted: bool,
) -> anyhow::Result<()> {
    if json {
        print_json(&json!({
            "planned": c.planned, "existing": c.existing, "conflicts": c.conflicts,
            "rejected": bad.len(), "aborted": aborted,
            "errors": bad.iter().take(1000).collect::<Vec<_>>(),
            "conflict_details": conflicts,
        }))
    } else {
        if aborted {
            println!(
                "nothing applied: {} malformed line(s) (--strict)",
                bad.len()
            );
        } else {
            println!(
                "planned {}, existing {}, conflicts {}, rejected {}",
                c.planned,
                c.existing,
                c.conflicts,
                bad.len()
            );
        }
        Ok(())
    }
}

pub(crate) fn run(g: &Global, a: &RunArgs) -> anyhow::Result<u8> {
    if a.backoff_base_ms == 0 || a.backoff_cap_ms < a.backoff_base_ms {
        bail!("--backoff-cap-ms must be at least --backoff-base-ms, and both above 0");
    }
    if let Some(r) = a.per_host_rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--per-host-rate must be a positive number of requests per second");
        }
    }
    let store = Arc::new(open_store(g)?);
    let policy = idem_http::Policy {
        allow_private: a.allow_private,
        allow_loopback: a.allow_loopback || a.allow_private,
        max_bytes: (a.max_bytes > 0).then_some(a.max_bytes),
        read_timeout: std::time::Duration::from_secs(a.read_timeout.max(1)),
        ..idem_http::Policy::default()
    };
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    if let Some(p) = &a.events {
        sinks.push(Arc::new(EventsFile::open(p)?));
    }
    if let Some(addr) = a.metrics_addr {
        if !addr.ip().is_loopback() && !a.metrics_allow_remote {
            bail!("--metrics-addr {addr} is not a loopback address; add --metrics-allow-remote to expose metrics beyond this host");
        }
        sinks.push(Arc::new(Metrics));
    }
    let sink: Arc<dyn EventSink> = Arc::new(Fanout(sinks));
    let cfg = EngineConfig {
        out_dir: g.out.clone(),
        concurrency: a.concurrency as usize,
        per_host: a.per_host as usize,
        per_host_rate: a.per_host_rate,
        lease_ttl_ms: a.lease_ttl * 1000,
        retry: RetryPolicy {
            base_ms: a.backoff_base_ms,
            cap_ms: a.backoff_cap_ms,
            ..RetryPolicy::default()
        },
        follow: a.follow,
        max_bytes: (a.max_bytes > 0).then_some(a.max_bytes),
        min_speed: (a.min_speed > 0 && a.min_speed_window > 0)
            .then_some((a.min_speed, a.min_speed_window)),
        seed: u64::from(std::process::id()) ^ now().as_millis().unsigned_abs(),
        ..EngineConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")?;
    let total_before = store.status(now())?;
    let show_bar = !a.json && std::io::stderr().is_terminal();
    let summary = rt.block_on(async {
        if let Some(addr) = a.metrics_addr {
            crate::sink::install_exporter(addr)?;
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                loop {
                    let s = Arc::clone(&store);
                    if let Ok(Ok(st)) = tokio::task::spawn_blocking(move || s.status(now())).await {
                        idem_telemetry::record_status(&st);
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            });
        }
        let http = Arc::new(idem_http::HttpClient::new(policy)?);
        let engine = Arc::new(idem_worker::Engine::new(Arc::clone(&store), http, cfg, sink)?);
        let stopper = engine.stopper();
        tokio::spawn(async move {
            wait_for_signal().await;
            eprintln!("idem: stopping: finishing in-flight steps and releasing leases (signal again to force)");
            stopper.stop();
            wait_for_signal().await;
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        });
        let bar = show_bar.then(|| progress_bar(&total_before, engine.progress()));
        // Without a terminal (a service, a log file), a line every 30 s.
        let log = (!show_bar && !a.json).then(|| tokio::spawn(progress_log(engine.progress())));
        let r = engine.run().await;
        if let Some((bar, task)) = bar {
            task.abort();
            bar.finish_and_clear();
        }
        if let Some(task) = log {
            task.abort();
        }
        anyhow::Ok(r?)
    })?;
    let st = store.status(now())?;
    let failed = st.by_state.get(&JobState::Failed).copied().unwrap_or(0);
    if a.json {
        print_json(&json!({"run": summary, "status": status_json(&st)}))?;
    } else {
        println!(
            "finalized {}, skipped_duplicate {}, failed {}, retries {}, {} downloaded in {} requests",
            summary.finalized,
            summary.skipped_duplicate,
            summary.failed,
            summary.retries_scheduled,
            human_bytes(summary.bytes_downloaded),
            summary.requests
        );
        if summary.reconcile.total() > 0 {
            let r = &summary.reconcile;
            println!(
                "reconciled at start: {} expired lease(s), {} dead op(s), {} part file(s), {} blob(s) healed, {} requeued",
                r.expired_leases, r.abandoned_ops, r.parts_removed, r.blobs_healed, r.blobs_missing_requeued
            );
        }
        print_status_text(&st);
    }
    Ok(if summary.interrupted {
        EXIT_INTERRUPTED
    } else if failed > 0 {
        EXIT_PARTIAL
    } else {
        0
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn progress_bar(
    st: &idem_core::StatusCounts,
    p: Arc<idem_worker::Progress>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering::Relaxed;
    let todo: u64 = st.unfinished();
    let bar = indicatif::ProgressBar::new(todo);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs  {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let started = std::time::Instant::now();
    let task = tokio::spawn(async move {
        loop {
            let done =
                p.finalized.load(Relaxed) + p.duplicates.load(Relaxed) + p.failed.load(Relaxed);
            b.set_position(done);
            let bytes = p.bytes.load(Relaxed);
            let rate = bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
            b.set_message(format!(
                "{}  {}/s  {} failed  {} in flight",
                human_bytes(bytes),
                human_bytes(rate as u64),
                p.failed.load(Relaxed),
                p.in_flight.load(Relaxed)
            ));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    (bar, task)
}

async fn progress_log(p: Arc<idem_worker::Progress>) {
    use std::sync::atomic::Ordering::Relaxed;
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        let bytes = p.bytes.load(Relaxed);
        eprintln!(
            "idem: {} finalized, {} duplicate, {} failed, {} retried, {} in flight; {} at {}/s",
            p.finalized.load(Relaxed),
            p.duplicates.load(Relaxed),
            p.failed.load(Relaxed),
            p.retried.load(Relaxed),
            p.in_flight.load(Relaxed),
            human_bytes(bytes),
            human_bytes((bytes as f64 / started.elapsed().as_secs_f64().max(0.001)) as u64)
        );
    }
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

pub(crate) fn status_json(st: &idem_core::StatusCounts) -> serde_json::Value {
    json!({
        "total": st.total,
        "by_state": st.by_state,
        "leases": {"live": st.live_leases, "expired": st.expired_leases},
        "due_now": st.due_now,
        "oldest_due_age_seconds": st.oldest_due_age_ms.map(|ms| ms as f64 / 1000.0),
        "failures_by_reason": st.failures_by_reason,
        "fenced_writes": st.fenced_writes,
        "ops_started": st.ops_started,
        "replays": st.replays,
    })
}

fn print_status_text(st: &idem_core::StatusCounts) {
    println!("{} jobs", st.total);
    for (s, n) in &st.by_state {
        println!("  {:<18} {n}", s.as_str());
    }
    println!(
        "leases: {} live, {} expired",
        st.live_leases, st.expired_leases
    );
    match st.oldest_due_age_ms {
        Some(ms) => println!(
            "due now: {} (oldest waiting {:.1}s)",
            st.due_now,
            ms as f64 / 1000.0
        ),
        None => println!("due now: 0"),
    }
    if !st.failures_by_reason.is_empty() {
        println!("failures by reason:");
        for (r, n) in &st.failures_by_reason {
            println!("  {r:<18} {n}");
        }
    }
    if st.fenced_writes > 0 {
        println!("stale-epoch writes refused: {}", st.fenced_writes);
    }
}

pub(crate) fn status(g: &Global, json: bool) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let st = store.status(now())?;
    if json {
        print_json(&status_json(&st))?;
    } else {
        print_status_text(&st);
    }
    Ok(0)
}

fn parse_job(s: &str) -> anyhow::Result<JobKey> {
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
        "expected_sha256": j.spec.sha256,
        "expected_content_type": j.spec.content_type,
        "state": j.state,
        "lease": j.lease.as_ref().map(|l| json!({"owner": l.owner, "epoch": l.epoch, "expires_at": l.expires_at})),
        "epoch": j.epoch,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
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

pub(crate) fn show(g: &Global, a: &ShowArgs) -> anyhow::Result<u8> {
    let key = parse_job(&a.job)?;
    let store = open_store(g)?;
    let Some(job) = store.job(&key)? else {
        bail!(
            "no job {} in {} (looked up {:?})",
            key,
            g.db.display(),
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
    println!("job {}", job.key);
    println!("  work_id      {}", job.spec.work_id);
    println!("  artifact_id  {}", job.spec.artifact_id);
    println!("  url          {}", job.spec.url.redacted());
    println!("  state        {}", job.state);
    if let Some(l) = &job.lease {
        println!(
            "  lease        {} epoch {} until {}",
            l.owner,
            l.epoch.0,
            l.expires_at.as_millis()
        );
    }
    println!("  attempts     {} of {}", job.attempts, job.max_attempts);
    if let Some(e) = &job.last_error {
        println!("  last error   {e}");
    }
    if let Some(b) = &job.blob {
        println!(
            "  blob         {} ({} bytes) at {}",
            b.sha256, b.size, b.path
        );
    }
    println!("  ops:");
    for o in &ops {
        println!(
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
    let sink: Box<dyn EventSink> = match &a.events {
        Some(p) => Box::new(EventsFile::open(p)?),
        None => Box::new(idem_worker::NullSink),
    };
    let r = idem_worker::reconcile::reconcile(
        &store,
        &out,
        &*sink,
        &SystemClock,
        &ReconcileOptions { dry_run: a.dry_run },
    )?;
    if a.json {
        print_json(&serde_json::to_value(&r)?)?;
    } else {
        let verb = if a.dry_run {
            "would repair"
        } else {
            "repaired"
        };
        println!(
            "{verb}: {} expired lease(s), {} dead op(s), {} orphaned part file(s), {} blob(s) healed, {} missing blob(s) requeued",
            r.expired_leases, r.abandoned_ops, r.parts_removed, r.blobs_healed, r.blobs_missing_requeued
        );
    }
    Ok(0)
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
    let mut retried = 0u64;
    let mut refused = Vec::new();
    for k in &keys {
        match store.apply(k, Command::OperatorRetry, now()) {
            Ok(_) => retried += 1,
            Err(e) => refused.push(json!({"job_key": k, "error": e.to_string()})),
        }
    }
    if a.json {
        print_json(&json!({"retried": retried, "refused": refused}))?;
    } else {
        println!("retried {retried} job(s)");
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
                ])?,
                None => {
                    serde_json::to_writer(
                        &mut out,
                        &json!({"work_id": j.spec.work_id, "artifact_id": j.spec.artifact_id, "url": j.spec.url.redacted(),
                            "job_key": j.key, "state": j.state, "sha256": sha, "size": size, "path": path,
                            "attempts": j.attempts, "last_error": j.last_error}),
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
