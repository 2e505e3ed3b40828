//! The part writer: a body's chunks written to its part file and hashed on
//! a thread of the runtime's blocking pool, with early writeback and the
//! sidecar marks that let a new holder resume the part.

use crate::files::{remove_part, write_sidecar, Sidecar};
use idem_core::Digest32;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Writes every chunk, in order, with as few `writev` calls as the kernel
/// allows.
fn write_chunks(file: &mut File, chunks: &[Chunk]) -> io::Result<()> {
    // Empty chunks would make a `writev` of nothing look like a full disk.
    let mut slices: Vec<io::IoSlice<'_>> = chunks
        .iter()
        .map(|c| (**c).as_ref())
        .filter(|b| !b.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A chunk of body, whatever buffer type the HTTP adapter hands out.
pub type Chunk = Box<dyn AsRef<[u8]> + Send>;

/// Writes chunks to a part file and hashes them on a thread of the
/// runtime's blocking pool, so hashing and disk writes overlap with the
/// network.
pub struct PartWriter {
    tx: Option<tokio::sync::mpsc::Sender<Vec<Chunk>>>,
    handle: Option<tokio::task::JoinHandle<io::Result<(Digest32, u64, File)>>>,
    /// Small chunks gathered before they cross to the writer thread: a
    /// fast server hands the reader many small reads, and one hand-off
    /// (with its wake-up) per read cost more CPU than hashing the bytes.
    /// The chunks themselves are kept, not copied: the writer hands them
    /// to one `writev`.
    pending: Vec<Chunk>,
    pending_bytes: usize,
    /// When the oldest gathered chunk arrived: a slow server's bytes are
    /// not kept from the disk (and from a resume after a crash) for long.
    pending_since: Option<std::time::Instant>,
    /// The part and its sidecar, for [`PartWriter::keep`] to record what
    /// was written when a stream fails.
    kept: Option<Box<(PathBuf, Sidecar)>>,
    /// Whether the final fsync may be left to whoever publishes the part.
    skip_final_sync: Arc<std::sync::atomic::AtomicBool>,
}

/// Longest a gathered chunk waits for more before it goes to the writer.
const GATHER_FOR: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes gathered on the network side before one hand-off to the writer.
const SEND_BATCH: usize = 64 << 10;

/// Most chunks in one `writev` (Linux takes at most 1,024).
const MAX_IOV: usize = 512;

/// Most bytes gathered from queued chunks into one write.
const WRITE_GATHER: usize = 256 << 10;

/// Bytes between early writebacks of a part.
const SYNC_EVERY: u64 = 8 << 20;

/// Time between sidecar updates of a part being written: what a crash of
/// the process costs a resume.
const MARK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Background fsyncs of a part being written. A request made while one is
/// running is coalesced into the next. How far the part is durable (and
/// that prefix's digest) is left in `durable` for the writer's next
/// sidecar update.
struct Syncer {
    tx: Option<std::sync::mpsc::SyncSender<(u64, Digest32)>>,
    handle: Option<std::thread::JoinHandle<()>>,
    durable: Arc<Mutex<Option<(u64, Digest32)>>>,
}

impl Syncer {
    fn start(file: File) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Digest32)>(1);
        let durable = Arc::new(Mutex::new(None));
        let done = Arc::clone(&durable);
        let handle = std::thread::spawn(move || {
            while let Ok(mut upto) = rx.recv() {
                while let Ok(more) = rx.try_recv() {
                    upto = more;
                }
                if file.sync_data().is_err() {
                    return;
                }
                *done
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(upto);
            }
        });
        Self {
            tx: Some(tx),
            handle: Some(handle),
            durable,
        }
    }

    /// Asks for the first `upto.0` bytes (hashing to `upto.1`) to be made
    /// durable.
    fn request(&self, upto: (u64, Digest32)) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(upto);
        }
    }

    /// The longest prefix known durable so far.
    fn durable(&self) -> Option<(u64, Digest32)> {
        *self
            .durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How long a fresh part goes without a sidecar. A body that lands sooner
/// never gets one: a crash in that window costs a refetch of what so short
/// a stream brought, which is less than creating, writing and deleting one
/// more file per body (on ext4 without a journal, as on this project's
/// machines, each recently deleted file also slows the creation of the
/// next ones). Slow or large bodies, the ones worth resuming, get their
/// sidecar once this has passed or at their first early writeback.
pub const SIDECAR_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// The sidecar a part writer keeps.
pub enum SidecarPlan {
    /// No sidecar (small bodies, not worth resuming).
    None,
    /// Written already, by the caller; the writer updates it.
    Written(Sidecar),
    /// Not on disk yet: the writer creates it after [`SIDECAR_AFTER`] or at
    /// the first early writeback, whichever comes first.
    Deferred(Sidecar),
}

impl PartWriter {
    /// Starts writing `file` (already truncated to `offset`, with `hasher`
    /// holding the hash of that prefix).
    /// Without a sidecar, nothing but the part itself is written.
    pub fn start(
        mut file: File,
        part: PathBuf,
        offset: u64,
        mut hasher: Sha256,
        plan: SidecarPlan,
    ) -> Self {
        let started = std::time::Instant::now();
        let (sidecar, mut deferred) = match plan {
            SidecarPlan::None => (None, false),
            SidecarPlan::Written(sc) => (Some(sc), false),
            SidecarPlan::Deferred(sc) => (Some(sc), true),
        };
        let kept = sidecar.clone().map(|sc| Box::new((part.clone(), sc)));
        // Bounded: a full queue means the disk is behind, and the sender
        // waits asynchronously (backpressure on the network read).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Chunk>>(8);
        // On the runtime's blocking pool, whose threads are reused: a thread
        // of its own per part cost more than a small body's whole write.
        let skip_final_sync = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let skip = Arc::clone(&skip_final_sync);
        let handle = tokio::task::spawn_blocking(move || -> io::Result<(Digest32, u64, File)> {
            use std::io::Seek;
            file.seek(io::SeekFrom::Start(offset))?;
            // Early writeback runs on its own thread, so the disk flushes
            // while the network keeps streaming; the final fsync then has
            // little left to do. It reports how far it got for the sidecar.
            // Started on the first writeback: small bodies never need one.
            let mut syncer: Option<Syncer> = None;
            let mut sidecar = sidecar;
            let mut written = offset;
            let mut since_sync = 0u64;
            let mut marked_at = started;
            let digest = |h: &Sha256| Digest32::from_bytes(h.clone().finalize().into());
            // Chunks arrive in the sizes the socket delivers (often 8-16
            // KiB); whatever is queued is gathered into one `writev`, so a
            // body costs a few system calls rather than one per chunk, and
            // no copy of its bytes.
            while let Some(mut batch) = rx.blocking_recv() {
                let mut len: usize = batch.iter().map(|c| (**c).as_ref().len()).sum();
                while len < WRITE_GATHER && batch.len() < MAX_IOV {
                    match rx.try_recv() {
                        Ok(more) => {
                            len += more.iter().map(|c| (**c).as_ref().len()).sum::<usize>();
                            batch.extend(more);
                        }
                        Err(_) => break,
                    }
                }
                write_chunks(&mut file, &batch)?;
                for c in &batch {
                    hasher.update((**c).as_ref());
                }
                let n = len as u64;
                written += n;
                since_sync += n;
                if since_sync >= SYNC_EVERY {
                    let s = match &syncer {
                        Some(s) => s,
                        None => syncer.insert(Syncer::start(file.try_clone()?)),
                    };
                    s.request((written, digest(&hasher)));
                    since_sync = 0;
                }
                // The sidecar records how far the part is written (and,
                // from the syncer, durable) with each prefix's digest, so
                // a resume can check those bytes are still the ones
                // written: a deferred one once it is due, then every
                // `MARK_EVERY`.
                let due = if deferred {
                    written - offset >= SYNC_EVERY || started.elapsed() >= SIDECAR_AFTER
                } else {
                    marked_at.elapsed() >= MARK_EVERY
                };
                if let Some(sc) = sidecar.as_mut().filter(|_| due) {
                    sc.mark(written, digest(&hasher), false);
                    if let Some((bytes, sha)) = syncer.as_ref().and_then(Syncer::durable) {
                        sc.durable_bytes = bytes;
                        sc.durable_sha256 = Some(sha);
                    }
                    write_sidecar(&part, sc)?;
                    deferred = false;
                    marked_at = std::time::Instant::now();
                }
            }
            // Without early writebacks (a body under SYNC_EVERY) the
            // sidecar keeps its last mark: its only reader after this
            // point is a holder after a crash in the moment before STREAM's
            // commit, and refetching so little costs less than a write per
            // part.
            let record_durable = syncer.is_some();
            drop(syncer);
            if record_durable || !skip.load(std::sync::atomic::Ordering::Acquire) {
                file.sync_all()?;
            }
            let sha = digest(&hasher);
            if let Some(sc) = sidecar.as_mut().filter(|_| record_durable) {
                sc.mark(written, sha, true);
                write_sidecar(&part, sc)?;
            }
            Ok((sha, written, file))
        });
        Self {
            tx: Some(tx),
            handle: Some(handle),
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            kept,
            skip_final_sync,
        }
    }

    /// Queues a chunk. Returns false when the writer has failed (its error
    /// comes from [`PartWriter::finish`]).
    pub async fn write(&mut self, chunk: Chunk) -> bool {
        self.pending_bytes += (*chunk).as_ref().len();
        self.pending.push(chunk);
        let now = std::time::Instant::now();
        let since = *self.pending_since.get_or_insert(now);
        if self.pending_bytes < SEND_BATCH
            && self.pending.len() < MAX_IOV
            && now.duration_since(since) < GATHER_FOR
        {
            return true;
        }
        self.pending_bytes = 0;
        self.pending_since = None;
        let batch = std::mem::take(&mut self.pending);
        self.send(batch).await
    }

    async fn send(&mut self, batch: Vec<Chunk>) -> bool {
        match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        }
    }

    /// Flushes and fsyncs what arrived before a failed stream, and records
    /// all of it (with its digest) in the part's sidecar, so the next
    /// attempt resumes it however early the failure came.
    pub async fn keep(mut self) -> io::Result<()> {
        let kept = self.kept.take();
        let (sha, size, _lock) = self.finish().await?;
        if let Some((part, mut sc)) = kept.filter(|_| size > 0).map(|k| *k) {
            sc.mark(size, sha, true);
            write_sidecar(&part, &sc)?;
        }
        Ok(())
    }

    /// Stops writing and removes the part and its sidecar (a holder that
    /// lost its lease leaves nothing behind).
    pub async fn discard(mut self, part: &Path) {
        self.pending.clear();
        // Removed while still locked: nobody can have adopted it.
        let lock = self.finish().await;
        remove_part(part);
        drop(lock);
    }

    /// [`PartWriter::finish`], leaving the final fsync to whoever publishes
    /// the part when `publisher_syncs` (a part that had early writebacks
    /// is still fsynced, as its sidecar then records it durable).
    pub async fn finish_unsynced(self, publisher_syncs: bool) -> io::Result<(Digest32, u64, File)> {
        self.skip_final_sync
            .store(publisher_syncs, std::sync::atomic::Ordering::Release);
        self.finish().await
    }

    /// Flushes, fsyncs and returns the digest and size of the whole part,
    /// and the part itself, still locked: whoever publishes or removes it
    /// holds it until then, so no other holder adopts it meanwhile.
    pub async fn finish(mut self) -> io::Result<(Digest32, u64, File)> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            // A writer that failed reports its error below.
            let _ = self.send(rest).await;
        }
        drop(self.tx.take());
        let h = self
            .handle
            .take()
            .ok_or_else(|| io::Error::other("writer already finished"))?;
        h.await
            .map_err(|_| io::Error::other("part writer thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::read_sidecar;
    use std::fs::{self, OpenOptions};

    /// Chunks of every size, gathered into batches and `writev`s, land in
    /// order and hash to the body's digest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_part_writer_writes_and_hashes_every_chunk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        let file = File::create(&path).unwrap();
        let mut w = PartWriter::start(file, path.clone(), 0, Sha256::new(), SidecarPlan::None);
        let mut body = Vec::new();
        for i in 0..3_000usize {
            // Empty, tiny, and larger than a send batch.
            let len = [0, 1, 7, 1500, 16 << 10, 70 << 10][i % 6];
            let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            body.extend_from_slice(&chunk);
            assert!(w.write(Box::new(chunk)).await);
        }
        let (sha, size, _) = w.finish().await.unwrap();
        assert_eq!(size, body.len() as u64);
        assert_eq!(sha, Digest32::of(&body));
        assert_eq!(fs::read(&path).unwrap(), body);
    }

    /// A fresh part's sidecar for a body of `length` bytes.
    fn test_sidecar(length: u64) -> Sidecar {
        Sidecar::new(
            "https://example.org/x".into(),
            Some("\"v1\"".into()),
            None,
            Some(length),
        )
    }

    /// A fresh part that lands quickly never gets a sidecar; one still
    /// streaming after `SIDECAR_AFTER` gets it, so it can be resumed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deferred_sidecar_is_written_only_for_a_slow_body() {
        let dir = tempfile::tempdir().unwrap();
        let sc = test_sidecar(4 * SEND_BATCH as u64);
        for slow in [false, true] {
            let path = dir.path().join(format!("{slow}.part"));
            let file = File::create(&path).unwrap();
            let t = std::time::Instant::now();
            let mut w = PartWriter::start(
                file,
                path.clone(),
                0,
                Sha256::new(),
                SidecarPlan::Deferred(sc.clone()),
            );
            for i in 0..4u8 {
                if slow && i == 2 {
                    tokio::time::sleep(SIDECAR_AFTER * 2).await;
                }
                assert!(w.write(Box::new(vec![i; SEND_BATCH])).await);
            }
            w.finish().await.unwrap();
            if slow {
                let got = read_sidecar(&path).expect("a slow body has a sidecar");
                assert_eq!((got.url.as_str(), &got.etag), (sc.url.as_str(), &sc.etag));
                assert!(got.written_bytes >= SEND_BATCH as u64, "{got:?}");
                let mut f = File::open(&path).unwrap();
                let (trusted, _) = got.trusted_prefix(&mut f).unwrap();
                assert_eq!(trusted, got.written_bytes, "the mark's digest matches");
            } else if t.elapsed() < SIDECAR_AFTER {
                // (A machine too busy to write 256 KiB in that time proves
                // nothing either way.)
                assert_eq!(read_sidecar(&path), None);
            }
        }
    }

    /// A part kept after a failed stream has a sidecar however early the
    /// failure came, recording the bytes fsynced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_part_gets_its_deferred_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept.part");
        let sc = test_sidecar(1 << 20);
        let file = File::create(&path).unwrap();
        let mut w = PartWriter::start(
            file,
            path.clone(),
            0,
            Sha256::new(),
            SidecarPlan::Deferred(sc.clone()),
        );
        assert!(w.write(Box::new(vec![7u8; 1000])).await);
        w.keep().await.unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 1000);
        let got = read_sidecar(&path).expect("a kept part has a sidecar");
        assert_eq!(got.durable_bytes, 1000);
        assert_eq!(got.etag, sc.etag);
    }

    /// A kept part whose bytes changed since (a flipped byte, or a planted
    /// part with a sidecar of its own) has no trusted prefix.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_part_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept.part");
        let file = File::create(&path).unwrap();
        let mut w = PartWriter::start(
            file,
            path.clone(),
            0,
            Sha256::new(),
            SidecarPlan::Deferred(test_sidecar(1 << 20)),
        );
        assert!(w.write(Box::new(vec![7u8; 5000])).await);
        w.keep().await.unwrap();
        let sc = read_sidecar(&path).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(sc.trusted_prefix(&mut f).unwrap().0, 5000);
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(b"X", 1234).unwrap();
        assert_eq!(sc.trusted_prefix(&mut f).unwrap().0, 0, "a flipped byte");
        let planted = Sidecar {
            durable_sha256: None,
            written_sha256: None,
            ..sc
        };
        assert_eq!(planted.trusted_prefix(&mut f).unwrap().0, 0, "no digest");
    }

    /// A slow server's bytes reach the part (where a resume after a crash
    /// finds them) without waiting for a full batch to gather.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trickle_reaches_the_disk_without_waiting_for_a_full_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.part");
        let file = File::create(&path).unwrap();
        let mut w = PartWriter::start(file, path.clone(), 0, Sha256::new(), SidecarPlan::None);
        assert!(w.write(Box::new(vec![1u8; 100])).await);
        tokio::time::sleep(GATHER_FOR * 2).await;
        assert!(w.write(Box::new(vec![2u8; 100])).await);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::metadata(&path).unwrap().len() < 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "200 bytes gathered for {:?} never reached the part",
                GATHER_FOR * 2
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let (_, size, _) = w.finish().await.unwrap();
        assert_eq!(size, 200);
    }
}
