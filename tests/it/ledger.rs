//! Several real processes on one SQLite ledger: every job completed exactly
//! once, none lost, no `SQLITE_BUSY` surfaced.

use crate::support::{count, text, Env};
use std::collections::BTreeMap;

#[test]
fn processes_share_one_ledger_exactly_once() {
    let env = Env::new();
    let lines: Vec<serde_json::Value> = (0..2000)
        .map(|i| serde_json::json!({"work_id": "w", "artifact_id": format!("a{i}"), "url": format!("https://example.org/{i}")}))
        .collect();
    env.plan(&lines);
    let procs: Vec<_> = (0..4)
        .map(|p| {
            env.idem()
                .args([
                    "ledger-drill",
                    "--print-keys",
                    "--batch",
                    if p % 2 == 0 { "1" } else { "8" },
                    "--threads",
                    "2",
                ])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for c in procs {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a worker failed (busy surfaced?): {}",
            text(&out)
        );
        for k in String::from_utf8_lossy(&out.stdout).lines() {
            *seen.entry(k.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2000, "no job lost");
    assert!(seen.values().all(|n| *n == 1), "each job completed once");
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 2000);
    assert_eq!(st["fenced_writes"], 0);
}
