//! Operator control: `idem cancel` ends jobs that are not finished;
//! `idem pause` and `idem resume` stop and restart leasing; `idem prune`
//! drops what finished jobs no longer need.

use crate::commands::{now, open_store, parse_job, print_json};
use crate::sink::EventsFile;
use crate::{CancelArgs, Global, PauseArgs, PruneArgs, EXIT_PARTIAL};
use idem_core::ports::Store;
use idem_core::{Command, JobKey};
use idem_worker::EventSink as _;
use serde_json::json;

pub(crate) fn cancel(g: &Global, a: &CancelArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let keys: Vec<JobKey> = a
        .jobs
        .iter()
        .map(|s| parse_job(s))
        .collect::<anyhow::Result<_>>()?;
    let events = a.events.as_deref().map(EventsFile::open).transpose()?;
    let mut cancelled = 0u64;
    let mut refused = Vec::new();
    for k in &keys {
        match store.apply(k, Command::Cancel, now()) {
            Ok(applied) => {
                cancelled += 1;
                if let Some(ev) = &events {
                    ev.emit(&applied.events);
                }
            }
            Err(e) => refused.push(json!({"job_key": k, "error": e.to_string()})),
        }
    }
    if let Some(e) = events.as_ref().and_then(EventsFile::error) {
        anyhow::bail!("{e}");
    }
    if a.json {
        print_json(&json!({"cancelled": cancelled, "refused": refused}))?;
    } else {
        outln!("cancelled {cancelled} job(s)");
        for r in &refused {
            tracing::warn!(
                job = r["job_key"].as_str().unwrap_or(""),
                "not cancelled: {}",
                r["error"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if refused.is_empty() { 0 } else { EXIT_PARTIAL })
}

/// Pauses (`paused`) or resumes leasing on one host or all.
pub(crate) fn prune(g: &Global, a: &PruneArgs) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let before = store.size_bytes()?;
    let older_than_ms = a.older_than.saturating_mul(1000);
    let deleted = store.prune(older_than_ms, now())?;
    let after = store.size_bytes()?;
    if a.json {
        print_json(&json!({
            "ops_deleted": deleted,
            "older_than_s": a.older_than,
            "ledger_bytes_before": before,
            "ledger_bytes_after": after,
        }))?;
    } else {
        outln!(
            "pruned {deleted} operation records of jobs finished over {}s ago",
            a.older_than
        );
        if let (Some(b), Some(n)) = (before, after) {
            outln!("ledger: {b} bytes before, {n} bytes after");
        }
    }
    Ok(0)
}

pub(crate) fn pause(g: &Global, a: &PauseArgs, paused: bool) -> anyhow::Result<u8> {
    let store = open_store(g)?;
    let host = a.host.as_deref().unwrap_or(idem_core::hosts::ALL_HOSTS);
    if host.is_empty() {
        anyhow::bail!("--host: give a host name, or leave --host out for every host");
    }
    store.pause(host, paused, now())?;
    let now_paused = store.status(now())?.paused;
    if a.json {
        print_json(&json!({"paused": now_paused}))?;
    } else {
        let what = a.host.as_deref().unwrap_or("every host");
        outln!("{} {what}", if paused { "paused" } else { "resumed" });
        if !now_paused.is_empty() {
            outln!("paused now: {}", now_paused.join(", "));
        }
    }
    Ok(0)
}
