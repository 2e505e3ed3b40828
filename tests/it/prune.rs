//! `idem prune` on real ledgers: a worker killed with SIGKILL mid-download
//! leaves unfinished jobs whose ops survive the prune and are reused; the
//! finished jobs lose theirs and keep everything else; the space comes
//! back.

use crate::support::{count, job, json_of, text, Env};
use idem_origin::{content, Origin};
use std::time::{Duration, Instant};

fn prune(env: &Env, older_than_s: u64) -> serde_json::Value {
    let out = env
        .idem()
        .args(["prune", "--json", "--older-than"])
        .arg(older_than_s.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    json_of(&out)
}

#[test]
fn prune_keeps_unfinished_jobs_ops_and_every_jobs_result() {
    let env = Env::new();
    let o = Origin::start(
        (0..6)
            .map(|i| (format!("f{i}"), content(i + 1, 2_000)))
            .chain((0..2).map(|i| (format!("s{i}"), content(i + 50, 400_000)))),
    )
    .unwrap();
    let mut lines: Vec<_> = (0..6)
        .map(|i| job("w", &format!("f{i}"), &o.url(&format!("/f/f{i}"))))
        .collect();
    // Trickled 1 KiB every 50 ms: still streaming when the worker dies.
    lines.extend((0..2).map(|i| job("w", &format!("s{i}"), &o.url(&format!("/slow/s{i}?ms=50")))));
    env.plan(&lines);
    let mut worker = env
        .run_cmd()
        .args(["--concurrency", "8"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = env.status();
        if count(&st, "finalized") == 6 && count(&st, "streaming") == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached 6 done, 2 streaming: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.kill().unwrap();
    worker.wait().unwrap();

    let before = env.status();
    assert_eq!(
        prune(&env, 3600)["ops_deleted"],
        0,
        "nothing finished an hour ago"
    );
    let p = prune(&env, 0);
    assert_eq!(p["ops_deleted"], 18, "three ops for each finished job: {p}");
    assert!(
        p["ledger_bytes_after"].as_u64().unwrap() <= p["ledger_bytes_before"].as_u64().unwrap()
    );
    let after = env.status();
    for field in [
        "by_state",
        "ops_started",
        "replays",
        "fenced_writes",
        "total",
    ] {
        assert_eq!(before[field], after[field], "{field}: {before} / {after}");
    }

    let done = env.show("w/f0");
    assert_eq!(done["ops"], serde_json::json!([]), "{done}");
    assert_eq!(done["state"], "finalized");
    assert!(done["sha256"].is_string(), "the result stays: {done}");
    let live = env.show("w/s0");
    assert!(
        live["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "head" && o["status"] == "committed"),
        "an unfinished job keeps its ops: {live}"
    );

    // Re-planning is a no-op; the next run finishes the two interrupted
    // jobs and fetches nothing that is done.
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(env.path("plan.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let planned = json_of(&out);
    assert_eq!(planned["existing"], 8, "{planned}");
    let hits = o.count("/f/f0");
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(count(&env.status(), "finalized"), 8);
    assert_eq!(o.count("/f/f0"), hits, "a pruned job is not fetched again");
    let out = env.idem().args(["verify", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn prune_gives_the_space_back() {
    let env = Env::new();
    let lines: Vec<_> = (0..3000)
        .map(|i| {
            job(
                "w",
                &format!("a{i}"),
                &format!("https://h{}.example.org/doc/{i}.pdf", i % 40),
            )
        })
        .collect();
    env.plan(&lines);
    let out = env
        .idem()
        .args(["--unsafe-fast-sync", "ledger-drill", "--batch", "16"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let p = prune(&env, 0);
    assert_eq!(p["ops_deleted"], 9000, "{p}");
    let (was, now) = (
        p["ledger_bytes_before"].as_u64().unwrap(),
        p["ledger_bytes_after"].as_u64().unwrap(),
    );
    assert!(
        now * 10 < was * 8,
        "at least a fifth given back: {was} -> {now}"
    );
    assert_eq!(count(&env.status(), "finalized"), 3000);
}
