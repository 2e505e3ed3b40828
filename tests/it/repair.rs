//! Repairs that race: several `idem run` and `idem reconcile` processes
//! started at once on one damaged ledger each exit 0, every job ends as it
//! should, and each repair is counted once across them.

use crate::support::{count, job, json_of, text, Env};
use idem_origin::{content, Origin};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The repair counts of a reconcile report.
const KINDS: [&str; 5] = [
    "expired_leases",
    "abandoned_ops",
    "parts_removed",
    "blobs_healed",
    "blobs_missing_requeued",
];

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Every kind of damage at once: finished jobs whose blobs are gone, parts
/// of no job, and a worker killed (an abort right after a publish) with
/// leases live, streams started and a publish uncommitted. Returns the
/// damage made, kind by kind, as `KINDS` counts it.
fn damage(env: &Env, o: &Origin) -> [u64; 5] {
    let done: Vec<_> = (0..20)
        .map(|i| {
            let name = format!("done{i}.pdf");
            o.put(&name, content(100 + i, 5_000 + i as usize));
            job("w", &format!("done{i}"), &o.url(&format!("/f/{name}")))
        })
        .collect();
    env.plan(&done);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Slow bodies still streaming when a fast one's publish aborts the
    // worker: their leases stay live under a dead owner.
    let mut lines = vec![job("w", "healed", &o.url("/f/healed.pdf"))];
    o.put("healed.pdf", content(99, 4_000));
    for i in 0..6 {
        let name = format!("slow{i}.pdf");
        o.put(&name, content(200 + i, 1 << 20));
        lines.push(job(
            "w",
            &format!("slow{i}"),
            &o.url(&format!("/f/{name}?ms=2")),
        ));
    }
    env.plan(&lines);
    let crash = env
        .run_cmd()
        .args([
            "--concurrency",
            "8",
            "--per-host",
            "8",
            "--lease-ttl",
            "600",
        ])
        .env("IDEM_CRASHPOINT", "after_publish")
        .output()
        .unwrap();
    assert!(
        !crash.status.success(),
        "the crash point aborts: {}",
        text(&crash)
    );
    std::fs::remove_dir_all(env.out.join("blobs/sha256")).unwrap();
    // The healed job's blob is back where its publish put it.
    let healed = content(99, 4_000);
    let h = idem_core::Digest32::of(&healed).to_hex();
    let dir = env.out.join("blobs/sha256").join(&h[..2]).join(&h[2..4]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&h), &healed).unwrap();
    for i in 0..5u8 {
        let stray = env
            .out
            .join("tmp")
            .join(format!("{}.part", format!("{i:02x}").repeat(32)));
        std::fs::write(stray, b"nobody's").unwrap();
    }
    let st = env.status();
    let live = st["leases"]["live"].as_u64().unwrap();
    let mut started = 0;
    for l in &lines {
        let j = env.show(&format!("w/{}", l["artifact_id"].as_str().unwrap()));
        started += j["ops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|op| op["status"] == "started")
            .count() as u64;
    }
    let healed_job = env.show("w/healed");
    assert_eq!(
        healed_job["state"],
        "streaming",
        "the publish was not committed: {healed_job}\n{}",
        text(&crash)
    );
    assert!(live >= 2 && started >= 1, "live {live}, started {started}");
    [live, started, 5, 1, 20]
}

#[test]
fn reconcilers_and_workers_started_together_repair_each_thing_once() {
    let o = Origin::start([]).unwrap();
    let template = Env::new();
    let made = damage(&template, &o);
    let orders: [[&str; 4]; 3] = [
        ["run", "reconcile", "run", "reconcile"],
        ["reconcile", "reconcile", "reconcile", "run"],
        ["run", "run", "run", "reconcile"],
    ];
    for order in orders {
        let env = Env::new();
        copy_tree(template.dir.path(), env.dir.path());
        let procs: Vec<_> = order
            .iter()
            .map(|kind| {
                let mut c = if *kind == "run" {
                    env.run_cmd()
                } else {
                    let mut c = env.idem();
                    c.args(["reconcile", "--blobs", "--json"]);
                    c
                };
                c.stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sums = [0u64; 5];
        for (kind, p) in order.iter().zip(procs) {
            let out = p.wait_with_output().unwrap();
            assert!(Instant::now() < deadline);
            assert!(out.status.success(), "{order:?}: {kind}: {}", text(&out));
            let v = json_of(&out);
            let report = if *kind == "run" {
                &v["run"]["reconcile"]
            } else {
                &v
            };
            for (sum, k) in sums.iter_mut().zip(KINDS) {
                *sum += report[k]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{k} in {report}"));
            }
        }
        for ((k, got), want) in KINDS.iter().zip(sums).zip(made) {
            assert_eq!(got, want, "{order:?}: {k} summed over the processes");
        }
        // A run finishes what the reconcilers re-queued.
        let finish = env.run_cmd().output().unwrap();
        assert!(finish.status.success(), "{}", text(&finish));
        let st = env.status();
        assert_eq!(count(&st, "finalized"), 27, "{order:?}: {st}");
        assert_eq!(st["leases"]["live"], 0);
    }
}
