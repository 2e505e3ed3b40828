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
