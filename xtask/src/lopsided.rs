//! `cargo xtask bench lopsided` (also the last case of `bench download`):
//! a slow host and a fast one in one plan, the slow one's jobs first.
//!
//! The slow host (127.0.0.2) waits 500 ms before every answer; the fast one
//! (127.0.0.1) answers at once. idem runs with `--concurrency 16
//! --per-host 2`. Reported: when the fast host's last job finished and
//! when the whole run did, beside each host's jobs run alone (their
//! floors). Goals: the fast host within 1.5x its floor, the whole run
//! within 1.1x the slower floor.

use anyhow::{bail, Result};
use idem_origin::{content, Origin};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command as Proc;
use std::time::Instant;

/// One run: wall seconds, and seconds from its start to the last job of
/// `fast_prefix` finalized (if any was).
fn run(idem: &Path, dir: &Path, lines: &[String], fast_prefix: &str) -> Result<(f64, Option<f64>)> {
    std::fs::create_dir_all(dir)?;
    let plan = dir.join("plan.jsonl");
    std::fs::write(&plan, lines.concat())?;
    let db = dir.join("idem.db");
    let ok = Proc::new(idem)
        .arg("--db")
        .arg(&db)
        .arg("plan")
        .arg(&plan)
        .output()?;
    if !ok.status.success() {
        bail!("idem plan failed: {}", String::from_utf8_lossy(&ok.stderr));
    }
    let events = dir.join("events.jsonl");
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let t = Instant::now();
    let out = Proc::new(idem)
        .arg("--db")
        .arg(&db)
        .arg("--out")
        .arg(dir.join("out"))
        .args([
            "run",
            "--allow-loopback",
            "--json",
            "--concurrency",
            "16",
            "--per-host",
            "2",
        ])
        .arg("--events")
        .arg(&events)
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("idem run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let fast_keys: std::collections::HashSet<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["artifact_id"]
                .as_str()
                .is_some_and(|a| a.starts_with(fast_prefix))
        })
        .map(|v| {
            idem_core::job_key_of(
                v["work_id"].as_str().unwrap_or(""),
                v["artifact_id"].as_str().unwrap_or(""),
            )
            .to_hex()
        })
        .collect();
    let last_fast_ms = std::fs::read_to_string(&events)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "job_state_changed" && e["to"] == "finalized")
        .filter(|e| e["job_key"].as_str().is_some_and(|k| fast_keys.contains(k)))
        .filter_map(|e| e["timestamp"].as_i64())
        .max();
    let fast = last_fast_ms.map(|ms| (ms as f64 - started_ms as f64).max(0.0) / 1000.0);
    Ok((wall, fast))
}

pub(crate) fn bench(root: &Path, quick: bool) -> Result<()> {
    let idem = crate::bench::release_idem(root)?;
    let (slow_n, fast_n) = if quick { (40, 200) } else { (200, 1000) };
    let slow = Origin::start_on(Ipv4Addr::new(127, 0, 0, 2), [])?;
    let fast = Origin::start([])?;
    let line = |o: &Origin, a: String, q: &str| {
        // Distinct content per job: no job is another's duplicate.
        let seed = a
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
        o.put(&format!("{a}.bin"), content(seed, 4096));
        format!(
            "{{\"work_id\":\"l\",\"artifact_id\":\"{a}\",\"url\":\"{}\"}}\n",
            o.url(&format!("/f/{a}.bin{q}"))
        )
    };
    let slow_lines: Vec<String> = (0..slow_n)
        .map(|i| line(&slow, format!("slow{i}"), "?delay_ms=500"))
        .collect();
    let fast_lines: Vec<String> = (0..fast_n)
        .map(|i| line(&fast, format!("fast{i}"), ""))
        .collect();
    let scratch = tempfile::tempdir()?;
    println!(
        "== lopsided: {slow_n} jobs on a host that waits 500 ms per request, then {fast_n} on a fast host; --concurrency 16 --per-host 2 =="
    );
    let (slow_floor, _) = run(&idem, &scratch.path().join("slow"), &slow_lines, "fast")?;
    let (fast_floor, _) = run(&idem, &scratch.path().join("fast"), &fast_lines, "fast")?;
    let both: Vec<String> = slow_lines.iter().chain(&fast_lines).cloned().collect();
    let (wall, fast_last) = run(&idem, &scratch.path().join("both"), &both, "fast")?;
    let fast_last = fast_last.unwrap_or(wall);
    println!(
        "{:<44} {fast_last:>8.2} s   floor (fast host alone) {fast_floor:>8.2} s   ratio {:>5.2}  goal <= 1.50",
        "fast host's last job finished after",
        fast_last / fast_floor.max(1e-9)
    );
    let slower = slow_floor.max(fast_floor);
    println!(
        "{:<44} {wall:>8.2} s   floor (slower host alone) {slower:>6.2} s   ratio {:>5.2}  goal <= 1.10",
        "whole run",
        wall / slower.max(1e-9)
    );
    Ok(())
}
