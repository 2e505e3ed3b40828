//! Event sinks of the CLI: the `--events` JSON Lines file, and a fan-out.

use idem_core::Event;
use idem_worker::EventSink;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Appends every event as one JSON object per line, flushed per batch so a
/// crash loses at most the batch in flight. A write that fails (a full
/// disk, `/dev/full`) is never silent: the first error is kept, said at
/// once, and stops a run through `on_error`; the command then exits 1.
pub(crate) struct EventsFile {
    path: std::path::PathBuf,
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    failed: OnceLock<String>,
    on_error: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl EventsFile {
    pub(crate) fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open events file {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: Mutex::new(std::io::BufWriter::new(f)),
            failed: OnceLock::new(),
            on_error: OnceLock::new(),
        })
    }

    /// Calls `f` once, when a write first fails (a run stops).
    pub(crate) fn on_error(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_error.set(Box::new(f));
    }

    /// Why writing events failed, if it did.
    pub(crate) fn error(&self) -> Option<String> {
        self.failed.get().cloned()
    }
}

impl EventSink for EventsFile {
    fn emit(&self, events: &[Event]) {
        if self.failed.get().is_some() {
            return;
        }
        let mut w = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut written = Ok(());
        for e in events {
            written = serde_json::to_writer(&mut *w, e)
                .map_err(std::io::Error::from)
                .and_then(|()| w.write_all(b"\n"));
            if written.is_err() {
                break;
            }
        }
        if let Err(e) = written.and_then(|()| w.flush()) {
            let msg = format!(
                "cannot write events to {}: {e}; events from here on are lost",
                self.path.display()
            );
            if self.failed.set(msg.clone()).is_ok() {
                eprintln!("idem: error: {msg}");
                if let Some(f) = self.on_error.get() {
                    f();
                }
            }
        }
    }
}

/// Sends events to every sink in turn.
pub(crate) struct Fanout(pub(crate) Vec<Arc<dyn EventSink>>);

impl EventSink for Fanout {
    fn emit(&self, events: &[Event]) {
        for s in &self.0 {
            s.emit(events);
        }
    }
}

/// Feeds every event to the metrics mapping (`idem-telemetry`).
pub(crate) struct Metrics;

impl EventSink for Metrics {
    fn emit(&self, events: &[Event]) {
        for e in events {
            idem_telemetry::record(e);
        }
    }
}

/// Installs the Prometheus recorder for the life of the process: serving
/// `/metrics` on `addr`, and/or rewriting `textfile` (node_exporter's
/// textfile-collector format, replaced atomically) every few seconds and
/// once more by [`flush_textfile`] at exit. Must run inside the tokio
/// runtime when `addr` is given.
pub(crate) fn install_exporter(
    addr: Option<std::net::SocketAddr>,
    textfile: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut b = metrics_exporter_prometheus::PrometheusBuilder::new();
    if let Some(addr) = addr {
        b = b.with_http_listener(addr);
    }
    for (name, buckets) in idem_telemetry::histogram_buckets() {
        b = b
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.to_owned()),
                buckets,
            )
            .map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?;
    }
    let handle = if addr.is_some() {
        let (recorder, exporter) = b
            .build()
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr:?}: {e}"))?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
        tokio::spawn(exporter);
        handle
    } else {
        b.install_recorder()
            .map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?
    };
    idem_telemetry::describe();
    idem_telemetry::preregister();
    if let Some(path) = textfile {
        let file = Textfile {
            handle,
            path: path.to_owned(),
        };
        file.write()?;
        let _ = TEXTFILE.set(file);
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(TEXTFILE_EVERY_S));
            if let Some(f) = TEXTFILE.get() {
                if let Err(e) = f.write() {
                    tracing::warn!("metrics textfile: {e:#}");
                }
            }
        });
    }
    Ok(())
}

/// How often the textfile is rewritten while a command runs.
const TEXTFILE_EVERY_S: u64 = 5;

static TEXTFILE: std::sync::OnceLock<Textfile> = std::sync::OnceLock::new();

struct Textfile {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    path: std::path::PathBuf,
}

impl Textfile {
    /// Writes the exposition beside the file, then renames it over it, so
    /// a collector never reads half a file.
    fn write(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        self.handle.run_upkeep();
        let body = self.handle.render();
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }
}

/// Writes the metrics textfile one last time (a no-op without one), so a
/// run shorter than the rewrite interval, and the tail of every run, are
/// kept.
pub(crate) fn flush_textfile() -> anyhow::Result<()> {
    TEXTFILE.get().map_or(Ok(()), Textfile::write)
}
