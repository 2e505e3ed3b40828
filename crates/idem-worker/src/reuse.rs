//! Reuse by URL: content another job finalized under the same URL,
//! found at lease time and checked against this job's own expectations.

use crate::Engine;
use idem_core::ports::{GetResponse, Store};
use idem_core::{spec::media_type_matches, HeadInfo, Http, Job, JobState};
use std::path::Path;

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// Whether `stored` can stand in for `job`'s download: without a request
    /// while its fetch is at most `reuse_max_age_ms` old, else if a
    /// conditional GET with its validators answers 304.
    pub(crate) async fn reusable(&self, job: &Job, stored: Stored) -> Reuse<H::Body> {
        let age_ms = self.now().millis_since(stored.fetched_at);
        if age_ms < self.cfg.reuse_max_age_ms {
            return Reuse::Yes(stored);
        }
        let Some(head) = stored
            .head
            .clone()
            .filter(|h| h.etag.is_some() || h.last_modified.is_some())
        else {
            return Reuse::No;
        };
        self.host_pace(&job.url().host()).await;
        match self
            .http
            .revalidate(job.url().as_str(), &self.headers_of(job), &head)
            .await
        {
            Ok(None) => Reuse::Yes(stored),
            Ok(Some(r)) => Reuse::Changed(r),
            Err(e) => {
                tracing::debug!(url = %job.url().redacted(), error = %e, "revalidation failed; fetching");
                Reuse::No
            }
        }
    }
}

/// A job a worker leased as it finished its last, and what is known to be
/// held under its URL.
pub(crate) type Next = (Job, Option<Stored>);

/// Content already held under a job's URL: another job's finalized blob.
pub(crate) struct Stored {
    pub(crate) of: idem_core::JobKey,
    pub(crate) blob: idem_core::BlobInfo,
    /// The other job's HEAD facts (its validators) and when it finished.
    head: Option<HeadInfo>,
    fetched_at: idem_core::Timestamp,
}

/// What a job may do with the content another job finalized under its URL.
pub(crate) enum Reuse<B> {
    /// Reuse it: fresh enough, or the server said 304 Not Modified.
    Yes(Stored),
    /// The server answered the conditional GET in full: new content, to be
    /// fetched from this response.
    Changed(GetResponse<B>),
    /// Fetch as usual (no validators to ask with, or the question failed).
    No,
}

/// Blocking: the content another job finalized under `job`'s URL whose
/// blob is still on disk, if it passes `job`'s own checks: its expected
/// digest, its expected type (against the type the other job's server
/// declared), and the blob's size on disk. Otherwise the job is fetched and
/// checked as any other. Looked up in the lease's trip off the runtime; a
/// failed lookup counts as none (publishing still stores content once).
pub(crate) fn duplicate_of<S: Store + ?Sized>(store: &S, root: &Path, job: &Job) -> Option<Stored> {
    if job.state != JobState::Leased {
        return None;
    }
    if job.url_index > 0 {
        return None;
    }
    let prev = store.finalized_by_url(job.spec.url.as_str()).ok()??;
    // A job finalized from one of its mirrors holds what the mirror
    // served, not what this URL serves.
    if prev.url_index != 0 {
        return None;
    }
    let blob = prev.blob.filter(|_| prev.key != job.key)?;
    if job.spec.sha256.is_some_and(|want| want != blob.sha256) {
        return None;
    }
    if let Some(want) = job.spec.content_type.as_deref() {
        let declared = prev.head.as_ref().and_then(|h| h.content_type.as_deref());
        if !declared.is_some_and(|ct| media_type_matches(want, ct)) {
            return None;
        }
    }
    // A regular file of the recorded size (a symlink or a truncated file
    // is not the blob that was verified).
    let on_disk = std::fs::symlink_metadata(root.join(&blob.path)).ok()?;
    (on_disk.is_file() && on_disk.len() == blob.size).then(|| Stored {
        of: prev.key,
        blob,
        fetched_at: prev.finished_at.unwrap_or(prev.updated_at),
        head: prev.head,
    })
}
