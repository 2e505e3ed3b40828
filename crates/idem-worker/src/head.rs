//! A job's first step: HEAD's facts, from a HEAD request or from the
//! fresh job's GET headers, checked (type, size cap) and recorded.

use crate::drive::*;
use crate::files;
use crate::reuse::*;
use crate::stream::*;
use crate::Engine;
use idem_core::ports::{Commit, FetchError, FetchErrorKind, Step, StepOutput, Store, StoreError};
use idem_core::{
    spec::media_type_matches, Command, Epoch, HeadInfo, Http, Job, OpDecision, OpKey, OpKind,
    OpResult,
};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

impl<S: Store + 'static, H: Http> Engine<S, H> {
    /// HEAD, recorded once it is done: it changes nothing anywhere, so
    /// there is no intent to record (or lease to prove) before it, and its
    /// begin, result and the move to streaming share one commit.
    pub(crate) async fn step_head(
        self: &Arc<Self>,
        job: &Job,
        epoch: Epoch,
        fenced: &Arc<AtomicBool>,
        dup: Option<Stored>,
        next: &mut Option<Next>,
    ) -> Result<
        (
            Job,
            Option<(OpKey, OpDecision)>,
            Option<std::io::Result<Prepared>>,
        ),
        Abort,
    > {
        let url = job.url().to_string();
        let op = OpKey {
            job: job.key,
            kind: OpKind::Head,
            epoch,
        };
        // Content we already hold under this URL needs no request while
        // its fetch is fresh; older, the server is asked if it changed.
        let mut answered = None;
        if let Some(stored) = dup {
            match self.reusable(job, stored).await {
                Reuse::Yes(Stored { of, blob, .. }) => {
                    let cmd = Command::Duplicate {
                        epoch,
                        blob,
                        of: Some(of),
                    };
                    return Ok((self.apply(job.key, cmd).await?, None, None));
                }
                Reuse::Changed(r) => answered = Some(r),
                Reuse::No => {}
            }
        }
        // A fresh job with no part to resume sends one GET, whose headers
        // stand in for HEAD's: one round trip, one request against the
        // host's budget. HEAD first only when asked (`probe_head`), or when
        // a part may be resumed (a ranged GET needs its validators first).
        let get_first = !self.cfg.probe_head && self.out.parts_of(&job.key, epoch.0).is_empty();
        let began = self.now();
        if answered.is_none() || !get_first {
            self.host_pace(&job.url().host()).await;
        }
        let (res, mut opened) = if let Some(r) = answered.filter(|_| get_first) {
            (Ok(r.head.clone()), Some(r))
        } else if get_first {
            match self.http.get(&url, &self.headers_of(job), None).await {
                Ok(r) => (Ok(r.head.clone()), Some(r)),
                Err(e) => (Err(e), None),
            }
        } else {
            (self.http.head(&url, &self.headers_of(job)).await, None)
        };
        let elapsed_ms = self.now().millis_since(began);
        let begin = Step::BeginOp {
            op,
            owner: self.owner.clone(),
        };
        let (steps, sop) = match res.and_then(|h| self.check_head(job, h)) {
            Ok(head) if head.content_length.is_some_and(|n| n < files::SIDECAR_MIN) => {
                if let Some(j) = self
                    .step_small(job, epoch, fenced, (&head, elapsed_ms), opened.take(), next)
                    .await?
                {
                    return Ok((j, None, None));
                }
                let sop = OpKey {
                    job: job.key,
                    kind: OpKind::Stream,
                    epoch,
                };
                let steps = self
                    .head_record(job.key, op, head)
                    .into_iter()
                    .chain([Step::BeginOp {
                        op: sop,
                        owner: self.owner.clone(),
                    }])
                    .collect();
                (steps, Some(sop))
            }
            Ok(head) => {
                // HEAD's record, the move to streaming and STREAM's start.
                let sop = OpKey {
                    job: job.key,
                    kind: OpKind::Stream,
                    epoch,
                };
                let finish = Step::FinishOp {
                    op,
                    outcome: Ok(OpResult::Head(head.clone())),
                    then: Some(Command::HeadDone { epoch, head }),
                };
                let steps = [begin, finish]
                    .into_iter()
                    .chain(self.stream_start(job.key, sop))
                    .collect();
                (steps, Some(sop))
            }
            Err(e) => {
                let error = e.to_job_error();
                let then = Some(self.fail_command(job, epoch, &error));
                let cooldown = self.cooldown_step(job, &error);
                let finish = Step::FinishOp {
                    op,
                    outcome: Err(error),
                    then,
                };
                let steps = std::iter::once(begin)
                    .chain(cooldown)
                    .chain([finish])
                    .collect();
                (steps, None)
            }
        };
        let now = self.now();
        // A failed HEAD ends the attempt: durable, as `fail` is.
        let commit = if sop.is_some() {
            Commit::Deferred
        } else {
            Commit::Durable
        };
        // When streaming starts, its part is prepared in the same trip.
        let prep = sop.map(|sop| {
            let (out, key, url) = (self.out.clone(), job.key, url.clone());
            move |head: &HeadInfo| prepare_part(&out, key, sop.epoch, &url, head, None)
        });
        let (mut a, prepared) = self
            .store_call(move |s| {
                let a = s.run_steps(steps, now, commit)?;
                let run = matches!(a.value.last(), Some(StepOutput::Decision(OpDecision::Run)));
                let head = a.value.iter().find_map(|o| match o {
                    StepOutput::Job(j) => j.head.clone(),
                    StepOutput::Decision(_) | StepOutput::Leased(_) => None,
                });
                let prepared = match (prep, head) {
                    (Some(prep), Some(head)) if run => Some(prep(&head)),
                    _ => None,
                };
                Ok((a, prepared))
            })
            .await?;
        // The op was recorded after the fact; its duration is the request's.
        Timing {
            head_ms: elapsed_ms,
            body_ms: 0,
        }
        .apply(&mut a.events);
        let (j, d) = self.outputs(a);
        let j =
            j.ok_or_else(|| Abort::Store(StoreError::Backend("steps returned no job".into())))?;
        // The GET sent in HEAD's place streams into the part just prepared.
        if let (Some(resp), Some(OpDecision::Run)) = (opened, &d) {
            let mut chosen = None;
            let streamed = self
                .stream(
                    &j,
                    epoch,
                    fenced,
                    &mut chosen,
                    prepared,
                    Begin::Opened(resp),
                )
                .await;
            let j = self
                .after_stream(&j, epoch, fenced, streamed, chosen, next)
                .await?;
            return Ok((j, None, None));
        }
        Ok((j, sop.zip(d), prepared))
    }

    /// HEAD begun and finished with `head`, and the move to streaming.
    pub(crate) fn head_record(
        &self,
        key: idem_core::JobKey,
        op: OpKey,
        head: HeadInfo,
    ) -> [Step; 3] {
        [
            Step::BeginOp {
                op,
                owner: self.owner.clone(),
            },
            Step::FinishOp {
                op,
                outcome: Ok(OpResult::Head(head.clone())),
                then: Some(Command::HeadDone {
                    epoch: op.epoch,
                    head,
                }),
            },
            Step::Apply {
                key,
                cmd: Command::StreamStarted { epoch: op.epoch },
            },
        ]
    }

    /// A response's content type against the job's expected one.
    /// An expected type is checked against what the server declared; a
    /// response that declares none does not pass.
    pub(crate) fn check_type(&self, job: &Job, got: &HeadInfo) -> Result<(), FetchError> {
        let Some(want) = job.spec.content_type.as_deref() else {
            return Ok(());
        };
        match got.content_type.as_deref() {
            Some(ct) if media_type_matches(want, ct) => Ok(()),
            Some(ct) => Err(FetchError::new(
                FetchErrorKind::Policy,
                format!("{}: content type {ct:?}, expected {want:?}", job.url()),
            )),
            None => Err(FetchError::new(
                FetchErrorKind::Policy,
                format!(
                    "{}: the server declared no content type, expected {want:?}",
                    job.url()
                ),
            )),
        }
    }

    pub(crate) fn check_head(&self, job: &Job, head: HeadInfo) -> Result<HeadInfo, FetchError> {
        self.check_type(job, &head)?;
        if let (Some(len), Some(max)) = (head.content_length, self.cfg.max_bytes) {
            if len > max {
                return Err(FetchError::new(
                    FetchErrorKind::TooLarge,
                    format!(
                        "{}: Content-Length {len} is over the {max}-byte cap",
                        job.url()
                    ),
                ));
            }
        }
        Ok(head)
    }
}
