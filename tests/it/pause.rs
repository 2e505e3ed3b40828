//! `idem pause` and `idem resume` while four worker processes run: no new
//! lease while paused (jobs already held finish), all work done after the
//! resume.

use crate::support::{count, job, json_of, text, Env};
use idem_origin::{content, Origin};
use std::path::Path;
use std::time::{Duration, Instant};

fn leases_in(files: &[std::path::PathBuf]) -> usize {
    files
        .iter()
        .map(|f: &std::path::PathBuf| {
            std::fs::read_to_string(Path::new(f))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("\"event\":\"job_leased\""))
                .count()
        })
        .sum()
}

#[test]
fn pause_stops_new_leases_for_every_worker_until_resume() {
    let env = Env::new();
    let n = 16;
    // 40 KB trickled 1 KiB every 20 ms: under a second a job, two at a time
    // (the host's budget), so the run lasts several seconds.
    let o =
        Origin::start((0..n).map(|i| (format!("p{i}"), content(i as u64 + 40, 40_000)))).unwrap();
    let lines: Vec<_> = (0..n)
        .map(|i| job("w", &format!("p{i}"), &o.url(&format!("/slow/p{i}?ms=20"))))
        .collect();
    env.plan(&lines);
    let files: Vec<_> = (0..4).map(|i| env.path(&format!("w{i}.jsonl"))).collect();
    let mut workers: Vec<_> = files
        .iter()
        .map(|f| {
            env.run_cmd()
                .arg("--events")
                .arg(f)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leases_in(&files) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.idem().args(["pause", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_of(&out)["paused"], serde_json::json!(["*"]));
    // Held jobs finish (each under a second); then nothing new is leased.
    std::thread::sleep(Duration::from_millis(2500));
    let st = env.status();
    assert_eq!(st["paused"], serde_json::json!(["*"]), "{st}");
    assert_eq!(st["leases"]["live"], 0, "held jobs finished: {st}");
    let leased = leases_in(&files);
    let done = count(&st, "finalized");
    assert!(done < n as u64, "the pause struck before the end: {st}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(leases_in(&files), leased, "no lease while paused");
    assert_eq!(count(&env.status(), "finalized"), done);
    for w in &mut workers {
        assert!(w.try_wait().unwrap().is_none(), "a paused batch run waits");
    }

    let out = env.idem().args(["resume", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_of(&out)["paused"], serde_json::json!([]));
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
    let st = env.status();
    assert_eq!(count(&st, "finalized"), n as u64, "{st}");
}
