//! A custom [`Http`] behind the engine: this one serves `dir://NAME` from a
//! local directory instead of the network (a mirror on a mounted disk, a
//! test fixture, a cache). The engine, the ledger and the store layout are
//! unchanged: only where bytes come from is yours.
//!
//! Run with `cargo run -p idem-worker --example local_http`.

use idem_core::ports::{Body, FetchError, FetchErrorKind, GetResponse, Http, Resume};
use idem_core::{Clock, Digest32, HeadInfo, JobSpec, MemStore, Store};
use idem_worker::{Engine, EngineConfig, NullSink, SystemClock};
use std::path::PathBuf;
use std::sync::Arc;

/// Answers every URL with the file named by its last path segment.
struct LocalDir(PathBuf);

impl LocalDir {
    fn file(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let name = url.rsplit('/').next().unwrap_or_default();
        std::fs::read(self.0.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                FetchError::new(FetchErrorKind::Status(404), format!("{url}: no such file"))
            }
            _ => FetchError::new(FetchErrorKind::Other, format!("{url}: {e}")),
        })
    }

    fn head_of(bytes: &[u8]) -> HeadInfo {
        HeadInfo {
            status: 200,
            content_length: Some(bytes.len() as u64),
            content_type: Some("application/octet-stream".into()),
            accept_ranges: true,
            // A strong validator, so a resumed body is known to be the same.
            etag: Some(format!("\"{}\"", Digest32::of(bytes).to_hex())),
            ..HeadInfo::default()
        }
    }
}

/// A body handed out in 16 KiB chunks.
struct Chunks(Vec<u8>, usize);

impl Body for Chunks {
    type Chunk = Vec<u8>;

    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        if self.1 >= self.0.len() {
            return Ok(None);
        }
        let end = (self.1 + 16 * 1024).min(self.0.len());
        let chunk = self.0[self.1..end].to_vec();
        self.1 = end;
        Ok(Some(chunk))
    }
}

impl Http for LocalDir {
    type Body = Chunks;

    async fn head(&self, url: &str, _headers: &[(String, String)]) -> Result<HeadInfo, FetchError> {
        Ok(Self::head_of(&self.file(url)?))
    }

    async fn get(
        &self,
        url: &str,
        _headers: &[(String, String)],
        resume: Option<&Resume>,
    ) -> Result<GetResponse<Chunks>, FetchError> {
        let bytes = self.file(url)?;
        let head = Self::head_of(&bytes);
        // Resume only the same content, as `If-Range` would.
        let offset = resume
            .filter(|r| r.if_range == head.etag && r.offset <= bytes.len() as u64)
            .map_or(0, |r| r.offset);
        Ok(GetResponse {
            head,
            offset,
            body: Chunks(bytes, offset as usize),
        })
    }

    async fn revalidate(
        &self,
        url: &str,
        headers: &[(String, String)],
        recorded: &HeadInfo,
    ) -> Result<Option<GetResponse<Chunks>>, FetchError> {
        let r = self.get(url, headers, None).await?;
        Ok((r.head.etag != recorded.etag).then_some(r))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::temp_dir().join("idem-local-http");
    // A fresh store each run, so the counts below are this run's.
    let _ = std::fs::remove_dir_all(&root);
    let source = root.join("source");
    std::fs::create_dir_all(&source)?;
    for (name, text) in [("a.txt", "first"), ("b.txt", "second"), ("c.txt", "first")] {
        std::fs::write(source.join(name), text)?;
    }
    let store = Arc::new(MemStore::new());
    let specs = ["a.txt", "b.txt", "c.txt", "missing.txt"]
        .iter()
        .map(|n| JobSpec::new("local", n, &format!("https://files.local/{n}"), None, None))
        .collect::<Result<Vec<_>, _>>()?;
    store.plan(&specs, 2, SystemClock.now())?;
    let cfg = EngineConfig {
        out_dir: root.join("artifacts"),
        ..EngineConfig::default()
    };
    let engine = Arc::new(Engine::new(
        Arc::clone(&store),
        Arc::new(LocalDir(source)),
        cfg,
        Arc::new(NullSink),
    )?);
    let summary = tokio::runtime::Runtime::new()?.block_on(engine.run())?;
    // c.txt holds a.txt's bytes: stored once. missing.txt fails with 404.
    println!(
        "finalized {}, duplicates {}, failed {}",
        summary.finalized, summary.skipped_duplicate, summary.failed
    );
    for spec in &specs {
        let job = store.job(&spec.key())?.ok_or("planned")?;
        println!(
            "{:<12} {:<18} {}",
            spec.artifact_id,
            job.state,
            job.blob.map(|b| b.path).unwrap_or_default()
        );
    }
    Ok(())
}
