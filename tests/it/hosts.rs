//! Host-aware leasing: a slow host's jobs never hold the fast host's back,
//! and a host's budget holds across every process sharing the ledger.
//! Checked by order and by the origins' own counts, never by the clock.

use crate::support::{count, job, text, Env};
use idem_core::job_key_of;
use idem_origin::{content, Origin};
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The order in which jobs were finalized, from an events file.
fn finish_order(events: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(events)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "job_state_changed" && e["to"] == "finalized")
        .filter_map(|e| e["job_key"].as_str().map(str::to_owned))
        .collect()
}

/// A lopsided plan: `slow` jobs on a host that waits `delay_ms` per request,
/// planned first, then `fast` jobs on another host.
fn lopsided(
    env: &Env,
    slow: usize,
    fast: usize,
    delay_ms: u64,
) -> (Origin, Origin, HashMap<String, bool>) {
    let s = Origin::start_on(Ipv4Addr::new(127, 0, 0, 2), []).unwrap();
    let f = Origin::start([]).unwrap();
    let mut lines = Vec::new();
    let mut is_fast = HashMap::new();
    for i in 0..slow {
        s.put(&format!("s{i}.pdf"), content(i as u64, 2000));
        lines.push(job(
            "w",
            &format!("s{i}"),
            &s.url(&format!("/f/s{i}.pdf?delay_ms={delay_ms}")),
        ));
        is_fast.insert(job_key_of("w", &format!("s{i}")).to_hex(), false);
    }
    for i in 0..fast {
        f.put(&format!("f{i}.pdf"), content(1000 + i as u64, 3000));
        lines.push(job("w", &format!("f{i}"), &f.url(&format!("/f/f{i}.pdf"))));
        is_fast.insert(job_key_of("w", &format!("f{i}")).to_hex(), true);
    }
    env.plan(&lines);
    (s, f, is_fast)
}

/// How many slow jobs had finished when the last fast one did.
fn slow_before_last_fast(order: &[String], is_fast: &HashMap<String, bool>) -> usize {
    let last_fast = order
        .iter()
        .rposition(|k| is_fast[k.as_str()])
        .expect("fast jobs finished");
    order[..last_fast]
        .iter()
        .filter(|k| !is_fast[k.as_str()])
        .count()
}

#[test]
fn a_slow_host_does_not_hold_the_fast_one_back() {
    let env = Env::new();
    let (slow, fast, is_fast) = lopsided(&env, 6, 100, 3000);
    let events = env.path("events.jsonl");
    let out = env
        .run_cmd()
        .args(["--concurrency", "16", "--per-host", "2", "--events"])
        .arg(&events)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(count(&env.status(), "finalized"), 106);
    let order = finish_order(&events);
    let n = slow_before_last_fast(&order, &is_fast);
    // Two slow jobs at a time, each three seconds: the fast host's 100
    // jobs are done before the slow host's second pair.
    assert!(n <= 2, "{n} slow jobs finished before the fast host's last");
    assert!(
        slow.max_in_flight() <= 2,
        "slow host saw {} at once",
        slow.max_in_flight()
    );
    assert!(
        fast.max_in_flight() <= 2,
        "fast host saw {} at once",
        fast.max_in_flight()
    );
}

#[test]
fn the_host_budget_holds_across_processes() {
    let env = Env::new();
    let (slow, fast, is_fast) = lopsided(&env, 6, 100, 3000);
    let events = env.path("events.jsonl");
    let workers: Vec<_> = (0..4)
        .map(|_| {
            env.run_cmd()
                .args(["--concurrency", "4", "--per-host", "2", "--events"])
                .arg(&events)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(count(&env.status(), "finalized"), 106);
    assert!(
        slow.max_in_flight() <= 2,
        "four workers, one budget: the slow host saw {} at once",
        slow.max_in_flight()
    );
    assert!(
        fast.max_in_flight() <= 2,
        "fast host saw {}",
        fast.max_in_flight()
    );
    let n = slow_before_last_fast(&finish_order(&events), &is_fast);
    assert!(n <= 2, "{n} slow jobs finished before the fast host's last");
}

/// A host that answers 429 with `Retry-After` cools down for every worker,
/// not only for the job it answered: its other jobs wait until then, and
/// `idem status` says so.
#[test]
fn a_throttling_host_cools_down_for_everyone() {
    let env = Env::new();
    let o = Origin::start([]).unwrap();
    let mut lines = Vec::new();
    for i in 0..4 {
        o.put(&format!("t{i}.pdf"), content(300 + i, 2000));
        let path = if i == 0 {
            format!("/status/429/t{i}.pdf?fail=1&retry_after=3")
        } else {
            format!("/f/t{i}.pdf")
        };
        lines.push(job("w", &format!("t{i}"), &o.url(&path)));
    }
    env.plan(&lines);
    let events = env.path("events.jsonl");
    let child = env
        .run_cmd()
        .args(["--concurrency", "4", "--per-host", "1", "--events"])
        .arg(&events)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen_cooling = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen_cooling && std::time::Instant::now() < deadline {
        let st = crate::support::json_of(&env.idem().args(["status", "--json"]).output().unwrap());
        seen_cooling = st["hosts"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["cooling_down_until"].is_number()));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        seen_cooling,
        "idem status never showed the host cooling down"
    );
    assert_eq!(count(&env.status(), "finalized"), 4);
    let all: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let key = |a: &str| job_key_of("w", a).to_hex();
    let throttled_at = all
        .iter()
        .find(|e| e["event"] == "retry_scheduled" && e["job_key"] == key("t0"))
        .and_then(|e| e["timestamp"].as_i64())
        .expect("t0 was told to retry");
    for a in ["t1", "t2", "t3"] {
        let leased = all
            .iter()
            .find(|e| e["event"] == "job_leased" && e["job_key"] == key(a))
            .and_then(|e| e["timestamp"].as_i64())
            .expect("leased");
        assert!(
            leased >= throttled_at + 2500,
            "{a} leased {} ms after the host asked for 3 s",
            leased - throttled_at
        );
    }
}
