//! The small-body path: a body under the sidecar threshold fetched into
//! memory, then written, recorded and published in one hand-off.

use crate::drive::*;
use crate::files;
use crate::finalize::*;
use crate::reuse::*;
use crate::stream::*;
use crate::Engine;
use idem_core::ports::{Commit, FetchError, FetchErrorKind, GetResponse, Step, Store, StoreError};
use idem_core::{Epoch, HeadInfo, Http, Job, OpKey, OpKind};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// A small body (HEAD said under 256 KiB, so nothing would be resumed):
    /// fetched into memory, then HEAD's record, the body's and FINALIZE's
    /// start are one commit, made after the part's write and right before
    /// publishing. A job then costs three commits (lease, that one, and
    /// FINALIZE's result) and one hand-off after HEAD. `None`: the GET's
    /// answer was not small after all; nothing was recorded and the job
    /// streams as a large one (its HEAD is recorded then).
    pub(crate) async fn step_small(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        fenced: &Arc<AtomicBool>,
        (head, head_ms): (&HeadInfo, u64),
        opened: Option<GetResponse<H::Body>>,
        next: &mut Option<Next>,
    ) -> Result<Option<Job>, Abort> {
        let op = |kind| OpKey {
            job: job.key,
            kind,
            epoch,
        };
        let record = self.head_record(job.key, op(OpKind::Head), head.clone());
        self.check(fenced)?;
        let began = self.now();
        let fetched = self.fetch_small(job, fenced, opened).await;
        let timing = Timing {
            head_ms,
            body_ms: self.now().millis_since(began),
        };
        match fetched {
            Ok(Some(bytes)) => self
                .finalize(
                    job,
                    epoch,
                    Landed::Held { bytes, part: None },
                    fenced,
                    Finish::Recorded(record.to_vec(), timing),
                    next,
                )
                .await
                .map(Some),
            Ok(None) => Ok(None),
            Err(StreamErr::Abort(a)) => Err(a),
            Err(StreamErr::Fetch(e)) => self
                .fail_small(job, epoch, record, e, timing)
                .await
                .map(Some),
            Err(StreamErr::Io(e)) => Err(Abort::Store(StoreError::Backend(e.to_string()))),
        }
    }

    /// A small body's GET failed after HEAD's facts were known: HEAD's
    /// record (`record`), then STREAM begun and failed, and the attempt's
    /// end, in one durable commit.
    pub(crate) async fn fail_small(
        &self,
        job: &Job,
        epoch: Epoch,
        record: [Step; 3],
        e: FetchError,
        timing: Timing,
    ) -> Result<Job, Abort> {
        let sop = OpKey {
            job: job.key,
            kind: OpKind::Stream,
            epoch,
        };
        let error = e.to_job_error();
        let then = Some(self.fail_command(job, epoch, &error));
        let steps = record
            .into_iter()
            .chain(self.cooldown_step(job, &error))
            .chain([
                Step::BeginOp {
                    op: sop,
                    owner: self.owner.clone(),
                },
                Step::FinishOp {
                    op: sop,
                    outcome: Err(error),
                    then,
                },
            ])
            .collect();
        let now = self.now();
        let mut a = self
            .store_call(move |s| s.run_steps(steps, now, Commit::Durable))
            .await?;
        timing.apply(&mut a.events);
        let (j, _) = self.outputs(a);
        j.ok_or_else(|| Abort::Store(StoreError::Backend("steps returned no job".into())))
    }

    /// GETs a small body into memory (or reads the GET already `opened`);
    /// `None` when the answer is not small. An answer without a length
    /// (chunked) is held while it stays small.
    pub(crate) async fn fetch_small(
        &self,
        job: &Job,
        fenced: &AtomicBool,
        opened: Option<GetResponse<H::Body>>,
    ) -> Result<Option<Vec<u8>>, StreamErr> {
        let url = job.url().to_string();
        let response = match opened {
            Some(r) => r,
            None => {
                self.host_pace(&job.url().host()).await;
                self.http
                    .get(&url, &self.headers_of(job), None)
                    .await
                    .map_err(StreamErr::Fetch)?
            }
        };
        let GetResponse {
            head: got, body, ..
        } = response;
        self.check_type(job, &got).map_err(StreamErr::Fetch)?;
        let (limit, exact) = match got.content_length {
            Some(n) if n < files::SIDECAR_MIN => (n, true),
            Some(_) => return Ok(None),
            None => (files::SIDECAR_MIN, false),
        };
        let mut sink = Sink::Held {
            bytes: Vec::with_capacity(usize::try_from(limit).unwrap_or(0)),
            limit,
            exact,
        };
        if !self.read_body(&url, body, fenced, &mut sink).await? {
            return Ok(None);
        }
        match sink {
            Sink::Held { bytes, .. } if !exact || bytes.len() as u64 == limit => Ok(Some(bytes)),
            Sink::Held { bytes, .. } => Err(StreamErr::Fetch(FetchError::new(
                FetchErrorKind::Truncated,
                format!("{url}: body ended at {} of {limit} bytes", bytes.len()),
            ))),
            Sink::Writer(_) => Ok(None),
        }
    }
}
