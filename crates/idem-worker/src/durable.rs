//! Publishing with batched durability: bodies that finish together are
//! linked into the store and made durable by one step for all of them.
//!
//! A body is written to its part without an fsync and handed to
//! [`Publisher::publish`], which queues it and parks. The first caller to
//! find no leader becomes one: it takes the whole queue, links every part
//! at its content address, makes the lot durable with one `syncfs` of the
//! output filesystem (the bodies, the new directories and the links), then
//! removes the parts' names and answers every caller. Callers arriving
//! meanwhile form the next batch. Nobody is answered before the `syncfs`
//! that covers their blob returned, so nothing is committed, counted or
//! reported before it is durable.
//!
//! A crash before the `syncfs` can leave a link to a body that is not (or
//! not wholly) on disk, with nothing in the ledger naming it: whoever next
//! finds a file at that address checks its size and digest before
//! trusting it ([`files::link_blob`], the reconciler's heal), and makes it
//! durable before committing.
//!
//! `syncfs` covers a whole filesystem, so it is used only where the kernel
//! is known to implement it for a local disk; elsewhere (NFS, FUSE, any
//! other) each caller fsyncs its own part and directory, one at a time.

use crate::files::{self, OutDir, Published};
use idem_core::Digest32;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, PoisonError};

/// Publishes parts into an output directory's blob store.
pub(crate) struct Publisher {
    out: OutDir,
    /// One `syncfs` per batch; otherwise one fsync per part and directory.
    batched: bool,
    state: Mutex<Queue>,
    done: Condvar,
}

/// A written part waiting to be published.
struct Item {
    part: PathBuf,
    sha256: Digest32,
    size_bytes: u64,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(u64, Item)>,
    answers: HashMap<u64, io::Result<Published>>,
    leading: bool,
    next_ticket: u64,
}

impl Publisher {
    pub(crate) fn new(out: OutDir) -> Self {
        let batched = batches(&out);
        Self {
            out,
            batched,
            state: Mutex::new(Queue::default()),
            done: Condvar::new(),
        }
    }

    /// Whether durability is batched with `syncfs` on this output directory.
    pub(crate) fn is_batched(&self) -> bool {
        self.batched
    }

    /// Blocking: publishes a written (not necessarily fsynced) part under
    /// its content address, durably; returns once the blob, its directory
    /// entries and its data survive a power loss.
    pub(crate) fn publish(
        &self,
        part: PathBuf,
        sha256: Digest32,
        size_bytes: u64,
    ) -> io::Result<Published> {
        if !self.batched {
            files::open_regular(&part, std::fs::OpenOptions::new().read(true))?.sync_all()?;
            return files::publish(&self.out, &part, sha256, size_bytes);
        }
        let item = Item {
            part,
            sha256,
            size_bytes,
        };
        let mut q = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push((ticket, item));
        loop {
            if let Some(answer) = q.answers.remove(&ticket) {
                return answer;
            }
            if !q.leading && !q.waiting.is_empty() {
                q.leading = true;
                let batch = std::mem::take(&mut q.waiting);
                drop(q);
                let answers = self.run_batch(batch);
                q = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                q.answers.extend(answers);
                q.leading = false;
                self.done.notify_all();
                continue;
            }
            q = self.done.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Links every part, makes them all durable at once, then drops the
    /// parts' names.
    fn run_batch(&self, batch: Vec<(u64, Item)>) -> Vec<(u64, io::Result<Published>)> {
        let mut linked: Vec<(u64, Item, io::Result<Published>)> = batch
            .into_iter()
            .map(|(t, item)| {
                let r =
                    files::link_blob(&self.out, &item.part, item.sha256, item.size_bytes, false);
                (t, item, r)
            })
            .collect();
        crate::hooks::crashpoint("after_batch_link");
        if let Err(e) = sync_filesystem(&self.out) {
            let (kind, text) = (e.kind(), e.to_string());
            for (_, _, r) in &mut linked {
                if r.is_ok() {
                    *r = Err(io::Error::new(kind, format!("syncfs: {text}")));
                }
            }
        }
        linked
            .into_iter()
            .map(|(t, item, r)| {
                if r.is_ok() {
                    files::remove_part(&item.part);
                }
                (t, r)
            })
            .collect()
    }
}

/// Makes everything written under `out` durable: one `syncfs`.
#[cfg(target_os = "linux")]
fn sync_filesystem(out: &OutDir) -> io::Result<()> {
    let dir = std::fs::File::open(out.root())?;
    rustix::fs::syncfs(&dir).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem(_: &OutDir) -> io::Result<()> {
    Err(io::Error::other("syncfs is Linux's"))
}

/// Whether the output directory is on a local filesystem whose `syncfs`
/// flushes and waits for every file's data and metadata.
#[cfg(target_os = "linux")]
fn batches(out: &OutDir) -> bool {
    const LOCAL: [i64; 7] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0xF2F5_2010, // f2fs
        0x2FC1_2FC1, // zfs
        0x794C_7630, // overlayfs (its upper filesystem)
    ];
    if std::env::var_os("IDEM_SYNC").is_some_and(|v| v == "per-file") {
        return false;
    }
    std::fs::File::open(out.root())
        .ok()
        .and_then(|d| rustix::fs::fstatfs(&d).ok())
        // `f_type`'s integer type differs between targets.
        .is_some_and(|st| {
            #[allow(clippy::unnecessary_cast)]
            let magic = st.f_type as i64;
            LOCAL.contains(&magic)
        })
}

#[cfg(not(target_os = "linux"))]
fn batches(_: &OutDir) -> bool {
    false
}
