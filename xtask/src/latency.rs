//! `cargo xtask bench latency` (also run by `bench download`): many small
//! files from an origin that waits 50 ms before every answer, the way a
//! remote host 50 ms away costs a round trip per request. Every tool runs
//! 16 transfers at once. Reported: files/s, and the requests each tool
//! sent per file, as the origin counted them (goal for idem: 1.0).

use anyhow::{bail, Result};
use idem_origin::{content, Origin};
use std::path::Path;
use std::process::Command as Proc;
use std::time::Instant;

const PARALLEL: &str = "16";

fn line(case: &str, tool: &str, n: usize, wall: f64, requests: u64) {
    println!(
        "{case:<28} {tool:<14} {:>8.1} files/s  {:>5.2} requests/file  wall {wall:>6.2} s",
        n as f64 / wall,
        requests as f64 / n as f64
    );
}

pub(crate) fn bench(root: &Path, quick: bool) -> Result<()> {
    let idem = crate::bench::release_idem(root)?;
    let n = if quick { 300 } else { 1000 };
    let case = format!("{n} x 16 KiB, 50 ms/request");
    println!("== latency-bound: {case}, {PARALLEL} transfers at once for every tool ==");
    let scratch = tempfile::tempdir()?;
    let s = scratch.path();
    let origin = Origin::start([])?;
    let urls: Vec<String> = (0..n)
        .map(|i| {
            origin.put(&format!("l{i}.bin"), content(5000 + i as u64, 16 << 10));
            origin.url(&format!("/f/l{i}.bin?delay_ms=50"))
        })
        .collect();

    // idem: plan, then run; the origin counts what it was sent.
    let plan: String = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("{{\"work_id\":\"l\",\"artifact_id\":\"{i}\",\"url\":\"{u}\"}}\n"))
        .collect();
    std::fs::write(s.join("plan.jsonl"), plan)?;
    let db = s.join("idem.db");
    if !Proc::new(&idem)
        .arg("--db")
        .arg(&db)
        .arg("plan")
        .arg(s.join("plan.jsonl"))
        .output()?
        .status
        .success()
    {
        bail!("idem plan failed");
    }
    let before = origin.total();
    let t = Instant::now();
    let out = Proc::new(&idem)
        .arg("--db")
        .arg(&db)
        .arg("--out")
        .arg(s.join("idem-out"))
        .args([
            "run",
            "--allow-loopback",
            "--json",
            "--concurrency",
            PARALLEL,
            "--per-host",
            PARALLEL,
        ])
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("idem run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    line(&case, "idem", n, wall, origin.total() - before);

    // curl --parallel: one process, 16 transfers at once, one file each.
    let cfg: String = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("url = \"{u}\"\noutput = \"{}/curl/{i}\"\n", s.display()))
        .collect();
    std::fs::create_dir_all(s.join("curl"))?;
    std::fs::write(s.join("curl.cfg"), cfg)?;
    let before = origin.total();
    let t = Instant::now();
    let ok = Proc::new("curl")
        .args(["--parallel", "--parallel-max", PARALLEL, "-s", "-S", "-K"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .arg(s.join("curl.cfg"))
        .status()?;
    let wall = t.elapsed().as_secs_f64();
    if ok.success() {
        line(&case, "curl --parallel", n, wall, origin.total() - before);
    }

    // aria2c, when installed: 16 downloads at once, one connection each.
    if crate::bench::have("aria2c") {
        let list: String = urls
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{u}\n  out={i}\n"))
            .collect();
        std::fs::write(s.join("aria2.txt"), list)?;
        let before = origin.total();
        let t = Instant::now();
        let ok = Proc::new("aria2c")
            .args([
                "-q",
                "-j",
                PARALLEL,
                "-x",
                "1",
                "--allow-overwrite=true",
                "-d",
            ])
            .arg(s.join("aria2"))
            .arg("-i")
            .arg(s.join("aria2.txt"))
            .status()?;
        let wall = t.elapsed().as_secs_f64();
        if ok.success() {
            line(&case, "aria2c -j16", n, wall, origin.total() - before);
        }
    } else {
        println!("{case:<28} aria2c         (not installed; skipped)");
    }
    Ok(())
}
