//! The progress report's nine events from real processes over a run's
//! whole life: plan, run, kill -9, run again, SIGTERM, run to the end.

use crate::support::{job, terminal, Env};
use idem_origin::{content, Origin};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The events of a JSON Lines file.
fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_runs_life_emits_the_nine_progress_events_and_its_leases_balance() {
    let env = Env::new();
    let n = 6;
    // 320 KB (large enough to be streamed, HEAD recorded first) trickled
    // 1 KiB every 9 ms: about 3 s a body, longer than a heartbeat (a third
    // of the 3 s TTL).
    let o =
        Origin::start((0..n).map(|i| (format!("e{i}"), content(i as u64 + 5, 320_000)))).unwrap();
    let lines: Vec<_> = (0..n)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/slow/e{i}?ms=9"))))
        .collect();
    let plan = env.write_plan(&lines);
    let planned = env.path("plan-events.jsonl");
    for _ in 0..2 {
        let out = env
            .idem()
            .arg("plan")
            .arg(&plan)
            .arg("--events")
            .arg(&planned)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", crate::support::text(&out));
    }
    let run = |file: &Path, signal: Option<&str>| {
        let mut child = env
            .run_cmd()
            .args(["--concurrency", "4", "--events"])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if let Some(sig) = signal {
            // Strike once a body is streaming (its HEAD recorded), however
            // slowly the machine starts the run.
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline
                && !events(file)
                    .iter()
                    .any(|e| e["event"] == "operation_started" && e["op"] == "stream")
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
            crate::crash::signal(child.id(), sig);
        }
        let _ = child.wait();
    };
    let runs = [
        env.path("killed.jsonl"),
        env.path("stopped.jsonl"),
        env.path("last.jsonl"),
    ];
    run(&runs[0], Some("-KILL"));
    run(&runs[1], Some("-TERM"));
    run(&runs[2], None);
    let st = env.status();
    assert_eq!(terminal(&st), n as u64, "{st}");

    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for f in std::iter::once(&planned).chain(&runs) {
        for e in events(f) {
            *seen
                .entry(e["event"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    for name in [
        "job_planned",
        "job_leased",
        "job_state_changed",
        "lease_renewed",
        "lease_released",
        "operation_started",
        "operation_completed",
        "crash_recovery_event",
        "idempotency_replay",
    ] {
        assert!(seen.contains_key(name), "no {name} event: {seen:?}");
    }
    // Reuse on the real path, not only re-plans: a holder taking over a job
    // left mid-stream (by the SIGTERMed worker, or the killed one once its
    // HEAD was durable) kept its HEAD facts.
    let reused = runs[1..]
        .iter()
        .flat_map(|f| events(f))
        .filter(|e| {
            e["event"] == "idempotency_replay" && e["op"] == "head" && e["reason"] == "takeover"
        })
        .count();
    assert!(reused > 0, "no takeover reuse: {seen:?}");
    let replans = events(&planned)
        .iter()
        .filter(|e| e["event"] == "idempotency_replay" && e["reason"] == "replan")
        .count();
    assert_eq!(replans, n, "each re-planned job is reported once");

    // Every lease ends in one event; the killed run may lose the events of
    // the instant it died (at most its four jobs in flight).
    let count = |name: &str| -> i64 {
        runs.iter()
            .flat_map(|f| events(f))
            .filter(|e| e["event"] == name)
            .count() as i64
    };
    let acquired = count("job_leased");
    let ended =
        count("lease_released") + count("lease_expired") + st["leases"]["live"].as_i64().unwrap();
    assert!(
        (acquired - ended).abs() <= 4,
        "acquired {acquired}, ended {ended}"
    );
}
