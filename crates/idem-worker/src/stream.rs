//! Streaming a body: into a part file (resumed when an earlier holder's
//! part still hashes to what its sidecar records) or, when small, into
//! memory; under the minimum speed and the lease's fence.

use crate::drive::*;
use crate::files::{self, OutDir, Sidecar, SidecarPlan};
use crate::finalize::*;
use crate::hooks;
use crate::Engine;
use idem_core::ports::{Body, FetchError, FetchErrorKind, GetResponse, Resume, Store};
use idem_core::{Epoch, HeadInfo, Http, Job, StreamInfo};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// Streams the body into this holder's part, resuming an earlier
    /// holder's part when it can be locked and its validators still match.
    /// A small body is held in memory and written by `finalize`.
    pub(crate) async fn stream(
        &self,
        job: &Job,
        epoch: Epoch,
        fenced: &AtomicBool,
        chosen: &mut Option<std::path::PathBuf>,
        prepared: Option<std::io::Result<Prepared>>,
        begin: Begin<H::Body>,
    ) -> Result<Landed, StreamErr> {
        let (committed, opened) = match begin {
            Begin::Opened(r) => (None, Some(r)),
            Begin::Ask(committed) => (committed, None),
        };
        let url = job.url().to_string();
        let head = job.head.clone().unwrap_or_default();
        let prepared = match prepared {
            Some(p) => p,
            None => {
                let out = self.out.clone();
                let key = job.key;
                let url = url.clone();
                let head = head.clone();
                tokio::task::spawn_blocking(move || {
                    prepare_part(&out, key, epoch, &url, &head, committed.as_ref())
                })
                .await
                .map_err(|e| StreamErr::Io(std::io::Error::other(e)))?
            }
        };
        let Prepared {
            part,
            file,
            mut offset,
            mut sidecar,
            mut hasher,
            fresh,
        } = prepared.map_err(StreamErr::Io)?;
        *chosen = Some(part.clone());
        let part = part.as_path();
        if offset > 0 && sidecar.length == Some(offset) {
            // A complete body from an earlier holder: nothing to fetch.
            let si = StreamInfo {
                sha256: idem_core::Digest32::from_bytes(hasher.finalize().into()),
                size: offset,
                resumed_from: offset,
            };
            let part = part.to_path_buf();
            return Ok(Landed::Synced {
                part,
                si,
                lock: file,
            });
        }
        let resume = sidecar.if_range().filter(|_| offset > 0).map(|v| Resume {
            offset,
            if_range: Some(v),
        });
        if resume.is_none() && offset > 0 {
            offset = 0;
            hasher = Sha256::new();
            file.set_len(0).map_err(StreamErr::Io)?;
        }
        self.check(fenced).map_err(StreamErr::Abort)?;
        // A fresh job's GET was sent already, in place of a HEAD (see
        // `first.rs`): its part is new, so there is nothing to resume.
        let response = match opened {
            Some(r) => r,
            None => {
                self.host_pace(&job.url().host()).await;
                self.http
                    .get(&url, &self.headers_of(job), resume.as_ref())
                    .await
                    .map_err(StreamErr::Fetch)?
            }
        };
        let GetResponse {
            head: got,
            offset: start,
            body,
        } = response;
        if start == 0 && offset > 0 {
            // The server ignored the range (or the entity changed): restart.
            offset = 0;
            hasher = Sha256::new();
            file.set_len(0).map_err(StreamErr::Io)?;
        }
        let total = got.content_length.map(|n| n + offset);
        self.check_type(job, &got).map_err(StreamErr::Fetch)?;
        sidecar = Sidecar::new(
            idem_core::redact_url(&url).into_owned(),
            got.etag.clone().or(sidecar.etag),
            got.last_modified.clone().or(sidecar.last_modified),
            total,
        );
        if offset > 0 {
            // The prefix kept was checked and fsynced by `prepare_part`.
            let sha = idem_core::Digest32::from_bytes(hasher.clone().finalize().into());
            sidecar.mark(offset, sha, true);
        }
        // Small bodies restart from zero after a crash; larger ones record
        // their validators first so a new holder can resume them.
        // A fresh part's sidecar waits (see `files::SIDECAR_AFTER`); one
        // that replaces an earlier holder's is written before any byte, so
        // the old one never describes new bytes.
        let sidecar = match total.is_none_or(|t| t >= files::SIDECAR_MIN) {
            false => SidecarPlan::None,
            true if fresh => SidecarPlan::Deferred(sidecar),
            true => {
                files::write_sidecar(part, &sidecar).map_err(StreamErr::Io)?;
                SidecarPlan::Written(sidecar)
            }
        };
        // A small body (known length, nothing to resume) is held in memory:
        // its write, fsync and commits then take one hand-off in all.
        let held = total.filter(|t| offset == 0 && *t < files::SIDECAR_MIN);
        let (mut sink, mut file) = match held {
            Some(t) => (
                Sink::Held {
                    bytes: Vec::with_capacity(usize::try_from(t).unwrap_or(0)),
                    limit: t,
                    exact: true,
                },
                Some(file),
            ),
            None => (
                Sink::Writer(files::PartWriter::start(
                    file,
                    part.to_path_buf(),
                    offset,
                    hasher,
                    sidecar,
                )),
                None,
            ),
        };
        if let Err(e) = self.read_body(&url, body, fenced, &mut sink).await {
            match e {
                // Keep what arrived (fsynced, recorded) for the next attempt.
                StreamErr::Fetch(_) => sink.keep().await,
                // The job is another holder's now: leave nothing behind.
                StreamErr::Abort(Abort::Fenced) => sink.discard(part).await,
                _ => {}
            }
            return Err(e);
        }
        let (landed, size) = match sink {
            Sink::Writer(w) => {
                // Publishing makes the part durable.
                let (sha256, size, lock) = w
                    .finish_unsynced(self.publisher.is_batched())
                    .await
                    .map_err(StreamErr::Io)?;
                let si = StreamInfo {
                    sha256,
                    size,
                    resumed_from: offset,
                };
                let part = part.to_path_buf();
                (Landed::Synced { part, si, lock }, size)
            }
            Sink::Held { bytes, .. } => {
                let size = bytes.len() as u64;
                let part = file.take().map(|f| (part.to_path_buf(), f));
                (Landed::Held { bytes, part }, size)
            }
        };
        if let Some(total) = total {
            if size != total {
                return Err(StreamErr::Fetch(FetchError::new(
                    FetchErrorKind::Truncated,
                    format!("{url}: body ended at {size} of {total} bytes"),
                )));
            }
        }
        Ok(landed)
    }

    /// Reads `body` to its end into `sink` (true), stopping when the lease
    /// is lost, the run stops, or the server is slower than the minimum
    /// speed. False: a held body of unknown length outgrew what is held.
    pub(crate) async fn read_body<B: Body>(
        &self,
        url: &str,
        mut body: B,
        fenced: &AtomicBool,
        sink: &mut Sink,
    ) -> Result<bool, StreamErr> {
        // Minimum throughput: a server that trickles bytes never trips the
        // read timeout, so measure progress over whole windows.
        let mut window_start = std::time::Instant::now();
        let mut window_bytes = 0u64;
        loop {
            self.check(fenced).map_err(StreamErr::Abort)?;
            if let Some((min, secs)) = self.cfg.min_speed {
                if window_start.elapsed() >= Duration::from_secs(secs) {
                    if window_bytes < min.saturating_mul(secs) {
                        return Err(StreamErr::Fetch(FetchError::new(
                            FetchErrorKind::Timeout,
                            format!("{url}: {window_bytes} bytes in {secs} s, below the minimum of {min} bytes/s"),
                        )));
                    }
                    window_start = std::time::Instant::now();
                    window_bytes = 0;
                }
            }
            let Some(c) = body.next_chunk().await.map_err(StreamErr::Fetch)? else {
                return Ok(true);
            };
            hooks::poison(url);
            let n = c.as_ref().len() as u64;
            window_bytes += n;
            self.progress.bytes.fetch_add(n, Ordering::Relaxed);
            match sink {
                Sink::Writer(w) => {
                    // A writer that stopped reports why at `finish`.
                    if !w.write(Box::new(c)).await {
                        return Ok(true);
                    }
                }
                Sink::Held {
                    bytes,
                    limit,
                    exact,
                } => {
                    if bytes.len() as u64 + n > *limit {
                        if !*exact {
                            return Ok(false);
                        }
                        return Err(StreamErr::Fetch(FetchError::new(
                            FetchErrorKind::Truncated,
                            format!("{url}: body runs past its Content-Length of {limit} bytes"),
                        )));
                    }
                    bytes.extend_from_slice(c.as_ref());
                }
            }
        }
    }
}

/// Where the bytes of a body go while it streams.
pub(crate) enum Sink {
    Writer(files::PartWriter),
    Held {
        bytes: Vec<u8>,
        /// The body's Content-Length, or (when it has none) the most held.
        limit: u64,
        /// Whether `limit` is the body's Content-Length.
        exact: bool,
    },
}

impl Sink {
    /// Keeps what arrived before a failure: a streamed part is flushed and
    /// fsynced for the next attempt; a held body is dropped (small bodies
    /// restart from zero).
    async fn keep(self) {
        if let Self::Writer(w) = self {
            let _ = w.keep().await;
        }
    }

    /// Drops what arrived, and the part it went to.
    async fn discard(self, part: &Path) {
        match self {
            Self::Writer(w) => w.discard(part).await,
            Self::Held { .. } => files::remove_part(part),
        }
    }
}

/// This holder's part: its path, the locked file, the resume offset, the
/// sidecar and the hash of the prefix already on disk.
pub(crate) struct Prepared {
    pub(crate) part: std::path::PathBuf,
    pub(crate) file: std::fs::File,
    offset: u64,
    sidecar: Sidecar,
    hasher: Sha256,
    /// A new, empty part with no sidecar on disk.
    fresh: bool,
}

/// Whether `f` holds exactly the body STREAM committed.
fn is_complete(f: &mut std::fs::File, si: &StreamInfo) -> bool {
    if si.size == 0 || f.metadata().map(|m| m.len()).ok() != Some(si.size) {
        return false;
    }
    let mut h = Sha256::new();
    files::hash_prefix(f, si.size, &mut h).is_ok()
        && idem_core::Digest32::from_bytes(h.finalize().into()) == si.sha256
}

/// Chooses and opens this holder's part, adopting the best earlier part of
/// the same job that nobody holds and whose validators match (or
/// whose body is the one STREAM committed). The part is
/// `<job>.part`, or `<job>.e<epoch>.part` while a paused holder still locks
/// that one.
pub(crate) fn prepare_part(
    out: &OutDir,
    key: idem_core::JobKey,
    epoch: Epoch,
    url: &str,
    head: &HeadInfo,
    committed: Option<&StreamInfo>,
) -> std::io::Result<Prepared> {
    // Sidecars sit outside the ledger, so they keep the URL without its
    // secrets; the redacted form still tells a part fetched from the URL
    // the job fetches now from one of its other URLs (a mirror's bytes are
    // never spliced onto another's) or from a stray.
    let shown = idem_core::redact_url(url);
    let fresh_sc = Sidecar::new(
        shown.clone().into_owned(),
        head.etag.clone(),
        head.last_modified.clone(),
        head.content_length,
    );
    let same_entity = |sc: &Sidecar| {
        sc.url == shown
            && match (&head.etag, &head.last_modified) {
                (Some(e), _) => sc.etag.as_ref() == Some(e),
                (None, Some(lm)) => sc.last_modified.as_ref() == Some(lm),
                (None, None) => false,
            }
    };
    let primary = out.part_path(&key);
    let mut primary_held = false;
    // The part to adopt: its path, sidecar, file, and the prefix trusted.
    let mut best: Option<(std::path::PathBuf, Sidecar, std::fs::File, u64, Sha256)> = None;
    for p in out.parts_of(&key, epoch.0) {
        let mut f = match files::open_locked(&p, false) {
            Ok(Some(f)) => f,
            // A link or other non-file at a part's name was not made by
            // idem: its name goes (never what it points to).
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                tracing::warn!(path = %p.display(), error = %e, "removing a part idem did not make");
                files::remove_part(&p);
                primary_held |= p == primary && p.symlink_metadata().is_ok();
                continue;
            }
            // A part still locked belongs to a live (perhaps paused) writer.
            _ => {
                primary_held |= p == primary;
                continue;
            }
        };
        // A body an earlier holder streamed and committed (its part was
        // fsynced before that commit) is known by the ledger's record, with
        // or without a sidecar: a body that landed fast never wrote one.
        // Any other part is resumed only as far as its bytes still hash to
        // what its sidecar recorded for them.
        let found = match committed {
            Some(si) if is_complete(&mut f, si) => {
                let mut sc = fresh_sc.clone();
                sc.length = Some(si.size);
                let mut h = Sha256::new();
                files::hash_prefix(&mut f, si.size, &mut h)?;
                Some((sc, si.size, h))
            }
            _ => files::read_sidecar(&p)
                .filter(|sc| same_entity(sc))
                .and_then(|sc| match sc.trusted_prefix(&mut f) {
                    Ok((n, h)) if n > 0 => Some((sc, n, h)),
                    _ => None,
                }),
        };
        match found {
            Some((sc, n, h)) if best.as_ref().is_none_or(|b| n > b.3) => {
                if let Some((old, ..)) = best.replace((p, sc, f, n, h)) {
                    files::remove_part(&old);
                }
            }
            _ => files::remove_part(&p),
        }
    }
    let target = if primary_held {
        out.fallback_part_path(&key, epoch.0)
    } else {
        primary
    };
    if let Some((old, sc, f, offset, hasher)) = best {
        if old != target {
            std::fs::rename(&old, &target)?;
            let _ = std::fs::rename(OutDir::sidecar_path(&old), OutDir::sidecar_path(&target));
        }
        // What follows the trusted prefix is dropped; the prefix is made
        // durable, so the sidecar may say so.
        f.set_len(offset)?;
        f.sync_data()?;
        return Ok(Prepared {
            part: target,
            file: f,
            offset,
            sidecar: sc,
            hasher,
            fresh: false,
        });
    }
    let f = files::open_locked(&target, true)?.ok_or_else(|| {
        std::io::Error::other(format!("{} is locked by another process", target.display()))
    })?;
    f.set_len(0)?;
    let hasher = Sha256::new();
    // Earlier parts were removed with their sidecars; one left beside the
    // target by a crash between the two removals is overwritten before any
    // byte is written, like any earlier holder's.
    let fresh = !OutDir::sidecar_path(&target).exists();
    Ok(Prepared {
        part: target,
        file: f,
        offset: 0,
        sidecar: fresh_sc,
        hasher,
        fresh,
    })
}
