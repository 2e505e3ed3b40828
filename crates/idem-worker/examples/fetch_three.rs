//! The engine as a library: plan three URLs into a SQLite ledger, run them
//! with `idem-worker` over `idem-http`, and print every event through a
//! sink of your own. With no arguments it serves three files from a local
//! origin first; give URLs to fetch those instead:
//!
//! ```sh
//! cargo run -p idem-worker --example fetch_three
//! cargo run -p idem-worker --example fetch_three -- https://example.org/a.pdf …
//! ```
//!
//! Run it twice with the same URLs and nothing is fetched again: the
//! ledger remembers. (The local origin listens on a new port each time, so
//! without URLs each run starts from an empty directory.)

use idem_core::{Clock, Event, EventKind, JobSpec, Store};
use idem_store_sqlite::{Options, SqliteStore};
use idem_worker::{Engine, EngineConfig, EventSink, SystemClock};
use std::sync::Arc;

/// Prints what happens to each job, one line per event that matters.
struct Printer;

impl EventSink for Printer {
    fn emit(&self, events: &[Event]) {
        for e in events {
            match &e.kind {
                EventKind::JobStateChanged { job_key, to, .. } => {
                    println!("{} -> {to}", &job_key.to_hex()[..12]);
                }
                EventKind::RetryScheduled {
                    reason, delay_ms, ..
                } => {
                    println!("  retry in {delay_ms} ms ({reason})");
                }
                _ => {}
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("idem-fetch-three");
    let mut urls: Vec<String> = std::env::args().skip(1).collect();
    // Without URLs, a local origin serves three files (kept alive to the end).
    let _origin = if urls.is_empty() {
        let files =
            (0..3u64).map(|i| (format!("paper-{i}.pdf"), idem_origin::content(i, 64 * 1024)));
        let origin = idem_origin::Origin::start(files)?;
        urls = (0..3)
            .map(|i| origin.url(&format!("/f/paper-{i}.pdf")))
            .collect();
        Some(origin)
    } else {
        None
    };
    let local = _origin.is_some();
    if local {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;

    let store = Arc::new(SqliteStore::open(dir.join("idem.db"), &Options::default())?);
    let specs = urls
        .iter()
        .enumerate()
        .map(|(i, u)| JobSpec::new("example", &format!("file-{i}"), u, None, None))
        .collect::<Result<Vec<_>, _>>()?;
    store.plan(&specs, 5, SystemClock.now())?;

    let http = Arc::new(idem_http::HttpClient::new(idem_http::Policy {
        allow_loopback: local,
        ..idem_http::Policy::default()
    })?);
    let cfg = EngineConfig {
        out_dir: dir.join("artifacts"),
        concurrency: 4,
        ..EngineConfig::default()
    };
    let engine = Arc::new(Engine::new(store, http, cfg, Arc::new(Printer))?);
    let summary = tokio::runtime::Runtime::new()?.block_on(engine.run())?;
    println!(
        "finalized {}, duplicates {}, failed {}, {} bytes; blobs under {}",
        summary.finalized,
        summary.skipped_duplicate,
        summary.failed,
        summary.bytes_downloaded,
        dir.join("artifacts").display()
    );
    Ok(())
}
