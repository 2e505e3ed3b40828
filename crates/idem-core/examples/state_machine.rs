//! idem-core alone: plan a job in the in-memory store, lease it, and carry
//! it through HEAD, stream and finalize with a manual clock, the way a test
//! of a new engine (or of your own store) would. Then show what a crash
//! costs: a second worker takes over an expired lease, and the op the first
//! one committed is kept, not redone.
//!
//! Run with `cargo run -p idem-core --example state_machine`.

use idem_core::{
    BlobInfo, Clock, Command, Commit, Digest32, HeadInfo, JobSpec, JobState, LeaseRequest,
    ManualClock, MemStore, OpDecision, OpKey, OpKind, OpResult, Store, StreamInfo, WorkerId,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = MemStore::new();
    let clock = ManualClock::new(idem_core::Timestamp::from_millis(1_700_000_000_000));
    let spec = JobSpec::new("W1", "pdf", "https://example.org/w1.pdf", None, None)?;
    let key = spec.key();
    store.plan(std::slice::from_ref(&spec), 3, clock.now())?;
    // Planning again is a no-op.
    store.plan(&[spec], 3, clock.now())?;

    let lease = |owner: &str, now| {
        let req = LeaseRequest {
            owner: WorkerId::new(owner),
            limit: 1,
            ttl_ms: 30_000,
            dead_owners: Vec::new(),
            commit: Commit::Durable,
            isolated: false,
            per_host: Some(2),
            host_interval_ms: None,
            host_rules: Default::default(),
        };
        store.lease(&req, now).map(|a| a.value)
    };
    let job = lease("worker-a", clock.now())?
        .pop()
        .ok_or("nothing leased")?;
    let epoch = job.lease.as_ref().ok_or("no lease")?.epoch;
    println!("leased {} by worker-a at {epoch}", job.key);

    // HEAD: begin the op, then record its result and the transition together.
    let head_op = OpKey {
        job: key,
        kind: OpKind::Head,
        epoch,
    };
    let head = HeadInfo {
        status: 200,
        content_length: Some(5),
        ..HeadInfo::default()
    };
    assert_eq!(
        store
            .begin_op(&head_op, &WorkerId::new("worker-a"), clock.now())?
            .value,
        OpDecision::Run
    );
    store.finish_op(
        &head_op,
        Ok(OpResult::Head(head.clone())),
        Some(Command::HeadDone { epoch, head }),
        clock.now(),
    )?;

    // worker-a dies here. Its lease expires; worker-b takes the job over.
    clock.advance_ms(31_000);
    let job = lease("worker-b", clock.now())?.pop().ok_or("no takeover")?;
    let epoch = job.lease.as_ref().ok_or("no lease")?.epoch;
    println!("taken over by worker-b at {epoch}, in state {}", job.state);
    assert_eq!(job.state, JobState::HeadDone, "the committed HEAD is kept");

    // Stream and finalize (a real engine writes and fsyncs the body here).
    let body = b"hello";
    let blob = BlobInfo::new(Digest32::of(body), body.len() as u64);
    store.apply(&key, Command::StreamStarted { epoch }, clock.now())?;
    let stream_op = OpKey {
        job: key,
        kind: OpKind::Stream,
        epoch,
    };
    store.begin_op(&stream_op, &WorkerId::new("worker-b"), clock.now())?;
    let streamed = StreamInfo {
        sha256: blob.sha256,
        size: blob.size,
        resumed_from: 0,
    };
    store.finish_op(
        &stream_op,
        Ok(OpResult::Stream(streamed)),
        None,
        clock.now(),
    )?;
    let fin_op = OpKey {
        job: key,
        kind: OpKind::Finalize,
        epoch,
    };
    store.begin_op(&fin_op, &WorkerId::new("worker-b"), clock.now())?;
    let done = store.finish_op(
        &fin_op,
        Ok(OpResult::Finalize(blob.clone())),
        Some(Command::Finalize { epoch, blob }),
        clock.now(),
    )?;
    println!(
        "{} is {} at {}",
        done.value.key,
        done.value.state,
        done.value.blob.map(|b| b.path).unwrap_or_default()
    );
    for ev in done.events {
        println!("  event {}", serde_json::to_string(&ev.kind)?);
    }
    Ok(())
}
