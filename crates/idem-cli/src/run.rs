//! `idem run`: the engine with its event sinks, metrics, signals and
//! progress, and the run's summary.

use crate::commands::{now, open_store, print_json, print_status_text, status_json};
use crate::sink::{EventsFile, Fanout, Metrics};
use crate::{Global, RunArgs, EXIT_INTERRUPTED, EXIT_PARTIAL};
use anyhow::{bail, Context};
use idem_core::ports::Store;
use idem_core::{JobState, RetryPolicy};
use idem_worker::{EngineConfig, EventSink};
use serde_json::json;
use std::io::IsTerminal;
use std::sync::Arc;

/// The largest SQLite ledger a run checks (`PRAGMA quick_check`, which
/// reads every page) before it starts: a check that takes well under a
/// second.
const START_CHECK_MAX_BYTES: u64 = 128 << 20;

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
    let alone = match (&a.alone_job, a.alone_epoch, &a.alone_owner) {
        (Some(k), Some(e), Some(o)) => Some(crate::alone::AloneJob::parse(k, e, o)?),
        _ => None,
    };
    // A ledger damaged inside (past its header) is refused before any work
    // builds on it; `idem verify` says what is wrong. The check reads the
    // whole file, so a large ledger's start leaves it to `idem verify`
    // (SQLite still refuses any damaged page it reads). A child running
    // one job for its parent relies on the parent's check.
    let size_bytes = store.size_bytes().unwrap_or(None);
    let problems = match (&alone, size_bytes) {
        (Some(_), _) => Vec::new(),
        (None, Some(n)) if n > START_CHECK_MAX_BYTES => {
            tracing::info!(
                ledger_bytes = n,
                "the ledger is too large to check at every start; `idem verify` checks it"
            );
            Vec::new()
        }
        (None, _) => store
            .check_integrity(false)
            .unwrap_or_else(|e| vec![e.to_string()]),
    };
    if let Some(first) = problems.first() {
        bail!(
            "ledger {} fails SQLite's quick check ({first}); run `idem verify` for the details, and restore it from a backup",
            crate::ledger::shown(g)
        );
    }
    let mut rules = match &a.host_config {
        Some(p) => crate::hosts::read_host_config(p)?,
        None => Vec::new(),
    };
    // A --host-limit overrides the file's limits for its pattern; the
    // file's headers for it stay.
    for limit in &a.host_limits {
        let same = |r: &&mut idem_core::hosts::HostRule| {
            r.pattern.eq_ignore_ascii_case(limit.pattern.trim())
        };
        match rules.iter_mut().find(same) {
            Some(r) => {
                r.per_host = limit.per_host;
                r.interval_ms = limit.interval_ms.or(r.interval_ms);
            }
            None => rules.push(limit.clone()),
        }
    }
    let host_rules = Arc::new(idem_core::hosts::HostRules::new(rules));
    let policy = idem_http::Policy {
        user_agent: a.user_agent.clone(),
        allow_private: a.allow_private,
        allow_loopback: a.allow_loopback || a.allow_private,
        max_bytes: (a.max_bytes > 0).then_some(a.max_bytes),
        read_timeout: std::time::Duration::from_secs(a.read_timeout.max(1)),
        ..idem_http::Policy::default()
    };
    let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
    let events = a
        .events
        .as_deref()
        .map(EventsFile::open)
        .transpose()?
        .map(Arc::new);
    if let Some(ev) = &events {
        sinks.push(Arc::clone(ev) as Arc<dyn EventSink>);
    }
    if let Some(addr) = a.metrics_addr {
        if !addr.ip().is_loopback() && !a.metrics_allow_remote {
            bail!("--metrics-addr {addr} is not a loopback address; add --metrics-allow-remote to expose metrics beyond this host");
        }
    }
    if a.metrics_addr.is_some() || a.metrics_textfile.is_some() {
        sinks.push(Arc::new(Metrics));
    }
    let sink: Arc<dyn EventSink> = Arc::new(Fanout(sinks));
    let cfg = EngineConfig {
        out_dir: g.out.clone(),
        concurrency: a.concurrency as usize,
        per_host: a.per_host as usize,
        per_host_rate: a.per_host_rate,
        host_rules,
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
        probe_head: a.head,
        reconcile_every_ms: (a.reconcile_every > 0).then(|| a.reconcile_every * 1000),
        reuse_max_age_ms: a.reuse_max_age.saturating_mul(1000),
        seed: u64::from(std::process::id()) ^ now().as_millis().unsigned_abs(),
        ..EngineConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")?;
    if let Some(job) = alone {
        crate::alone::die_with_parent();
        rt.block_on(async {
            let http = Arc::new(idem_http::HttpClient::new(policy)?);
            let engine = idem_worker::Engine::new(Arc::clone(&store), http, cfg, sink)?
                .with_owner(job.owner);
            let engine = Arc::new(engine);
            let stopper = engine.stopper();
            tokio::spawn(async move {
                wait_for_signal().await;
                stopper.stop();
            });
            anyhow::Ok(engine.run_alone(job.key, job.epoch).await?)
        })?;
        return Ok(0);
    }
    let total_before = store.status(now())?;
    let show_bar = !a.json && std::io::stderr().is_terminal();
    let summary = rt.block_on(async {
        if a.metrics_addr.is_some() || a.metrics_textfile.is_some() {
            crate::sink::install_exporter(a.metrics_addr, a.metrics_textfile.as_deref())?;
            let store = Arc::clone(&store);
            let ledger = crate::ledger::id(g);
            tokio::spawn(async move {
                loop {
                    let s = Arc::clone(&store);
                    if let Ok(Ok(st)) = tokio::task::spawn_blocking(move || s.status(now())).await {
                        idem_telemetry::record_status(&st, &ledger);
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            });
        }
        let http = Arc::new(idem_http::HttpClient::new(policy)?);
        let children = crate::alone::ChildRunner::from_this_process()
            .context("finding this program, to run suspects in child processes")?;
        let engine = idem_worker::Engine::new(Arc::clone(&store), http, cfg, sink)?
            .with_isolator(Arc::new(children));
        let engine = Arc::new(engine);
        let stopper = engine.stopper();
        if let Some(ev) = &events {
            // Events that cannot be written stop the run: a run whose
            // record is lost is not one an operator would let go on.
            let stop = stopper.clone();
            ev.on_error(move || stop.stop());
        }
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(
                "stopping: finishing in-flight steps and releasing leases (signal again to force)"
            );
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
    if a.metrics_textfile.is_some() {
        idem_telemetry::record_status(&st, &crate::ledger::id(g));
        crate::sink::flush_textfile()?;
    }
    let failed = st.by_state.get(&JobState::Failed).copied().unwrap_or(0);
    if let Some(e) = events.as_ref().and_then(|ev| ev.error()) {
        bail!("{e}");
    }
    if a.json {
        print_json(&json!({"run": summary, "status": status_json(&st)}))?;
    } else {
        outln!(
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
            outln!(
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
        tracing::info!(
            finalized = p.finalized.load(Relaxed),
            duplicate = p.duplicates.load(Relaxed),
            failed = p.failed.load(Relaxed),
            retried = p.retried.load(Relaxed),
            in_flight = p.in_flight.load(Relaxed),
            "progress: {} at {}/s",
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
