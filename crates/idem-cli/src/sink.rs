//! Event sinks of the CLI: the `--events` JSON Lines file, and a fan-out.

use idem_core::Event;
use idem_worker::EventSink;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Appends every event as one JSON object per line, flushed per batch so a
/// crash loses at most the batch in flight.
pub(crate) struct EventsFile(Mutex<std::io::BufWriter<std::fs::File>>);

impl EventsFile {
    pub(crate) fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open events file {}: {e}", path.display()))?;
        Ok(Self(Mutex::new(std::io::BufWriter::new(f))))
    }
}

impl EventSink for EventsFile {
    fn emit(&self, events: &[Event]) {
        let mut w = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in events {
            if serde_json::to_writer(&mut *w, e).is_ok() {
                let _ = w.write_all(b"\n");
            }
        }
        let _ = w.flush();
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

/// Installs the Prometheus exporter serving `/metrics` on `addr` for the
/// life of the process. Must run inside the tokio runtime.
pub(crate) fn install_exporter(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut b = metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr);
    for (name, buckets) in idem_telemetry::histogram_buckets() {
        b = b
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(name.to_owned()),
                buckets,
            )
            .map_err(|e| anyhow::anyhow!("metrics buckets: {e}"))?;
    }
    b.install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    idem_telemetry::describe();
    idem_telemetry::preregister();
    Ok(())
}
