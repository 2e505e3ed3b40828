//! Every command against a PostgreSQL ledger, and workers on three hosts
//! (each in its own UTS and PID namespace) sharing it while one is killed
//! with SIGKILL and one is stopped past its lease. Runs when `IDEM_PG_URL`
//! is set.

use crate::support::{check_blobs, count, job, json_of, leftovers, text, Env};
use idem_origin::{content, Origin};
use std::process::{Command, Stdio};

const SECRET: &str = "hunter2-never-shown";

fn all_text(outs: &[std::process::Output]) -> String {
    outs.iter().map(text).collect()
}

#[test]
fn every_command_works_with_a_postgres_url() {
    let Some(env) = Env::postgres(SECRET) else {
        eprintln!("IDEM_PG_URL is not set: skipped");
        return;
    };
    let o =
        Origin::start((0..12).map(|i| (format!("d{i}"), content(i + 1, 3_000 + 700 * i as usize))))
            .unwrap();
    let mut lines: Vec<_> = (0..12)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/d{i}"))))
        .collect();
    lines.push(job("w", "gone", &o.url("/missing")));
    let mut outs = vec![env.plan(&lines)];
    let again = env.plan(&lines);
    assert!(text(&again).contains("existing 13"), "{}", text(&again));
    outs.push(again);
    let run = env.run_cmd().output().unwrap();
    assert_eq!(json_of(&run)["run"]["finalized"], 12, "{}", text(&run));
    outs.push(run);
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 12);
    assert_eq!(count(&st, "failed"), 1);
    assert_eq!(check_blobs(&env.out), 12);
    let shown = env.show("w/a3");
    assert_eq!(shown["state"], "finalized");
    assert_eq!(shown["ops"].as_array().unwrap().len(), 3);
    for args in [
        &["export", "--format", "jsonl"][..],
        &["reconcile", "--json"],
        &["verify", "--json"],
        &["slo", "check", "--json"],
        &["status"],
    ] {
        let out = env.idem().args(args).output().unwrap();
        // `slo check` exits 4 when an SLO is missed: the 404 is a failure.
        let ok = out.status.success() || (args[0] == "slo" && out.status.code() == Some(4));
        assert!(ok, "idem {args:?}: {}", text(&out));
        outs.push(out);
    }
    let export = String::from_utf8_lossy(&outs[3].stdout).into_owned();
    assert_eq!(export.lines().count(), 13, "{export}");
    let retry = env.idem().args(["retry", "w/gone"]).output().unwrap();
    assert!(retry.status.success(), "{}", text(&retry));
    outs.push(retry);
    assert_eq!(count(&env.status(), "planned"), 1, "retried");
    // A refused connection names the ledger without its password.
    let mut bad = env.idem();
    let db = env.db.to_string_lossy().replace(":5432/", ":1/");
    bad.arg("--db").arg(db).arg("status");
    let refused = bad.output().unwrap();
    assert!(!refused.status.success());
    outs.push(refused);
    assert!(!all_text(&outs).contains(SECRET), "the password leaked");
}

/// A worker process that believes it runs on `host`: its own UTS and PID
/// namespaces, so hostnames differ and pids collide.
fn worker_on(env: &Env, host: &str, extra: &[&str]) -> std::process::Child {
    let mut args: Vec<String> = vec![
        crate::support::IDEM.to_owned(),
        "--db".into(),
        env.db.to_string_lossy().into_owned(),
        "--out".into(),
        env.out.to_string_lossy().into_owned(),
        "run".into(),
        "--allow-loopback".into(),
        "--concurrency".into(),
        "8".into(),
        "--lease-ttl".into(),
        "2".into(),
        "--backoff-base-ms".into(),
        "50".into(),
        "--backoff-cap-ms".into(),
        "300".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Command::new("unshare")
        .args([
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
        ])
        .arg(format!("hostname {host} && exec \"$@\""))
        .arg("sh")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare runs")
}

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--uts", "--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn workers_on_three_hosts_share_one_ledger_through_kill_and_stop() {
    let Some(env) = Env::postgres(SECRET) else {
        eprintln!("IDEM_PG_URL is not set: skipped");
        return;
    };
    assert!(
        can_unshare(),
        "this test needs unshare (UTS and PID namespaces)"
    );
    let n: usize = if crate::support::slow_tests() {
        2_000
    } else {
        400
    };
    let o = Origin::start((0..n).map(|i| {
        (
            format!("d{i}"),
            content(i as u64 + 7, 2_000 + (i % 50) * 301),
        )
    }))
    .unwrap();
    // Slow answers (so the kill and the stop land mid-run), and some bodies
    // cut or reset once.
    let url = |i: usize| {
        let mode = match i % 10 {
            3 => "reset",
            7 => "trunc",
            _ => "f",
        };
        o.url(&format!("/{mode}/d{i}?delay_ms=60&fail=1"))
    };
    let mut lines: Vec<_> = (0..n)
        .map(|i| job("w", &format!("a{i}"), &url(i)))
        .collect();
    lines.push(job("w", "gone", &o.url("/missing")));
    env.plan(&lines);
    let mut a = worker_on(&env, "host-a", &[]);
    let mut b = worker_on(&env, "host-b", &[]);
    let mut c = worker_on(&env, "host-c", &[]);
    // Let all three work, then kill one and freeze another past its lease.
    let until = |f: &dyn Fn(u64) -> bool| {
        for _ in 0..600 {
            if f(count(&env.status(), "finalized")) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no progress");
    };
    until(&|done| done >= n as u64 / 5);
    let b_pid = b.id();
    let c_pid = c.id();
    // unshare's child (the worker, pid 1 of its namespace) dies with it.
    unsafe_free_kill(b_pid, "KILL");
    let stopped = child_of(c_pid);
    unsafe_free_kill(stopped, "STOP");
    std::thread::sleep(std::time::Duration::from_millis(3_500));
    unsafe_free_kill(stopped, "CONT");
    let _ = b.wait();
    until(&|done| done >= n as u64);
    for w in [&mut a, &mut c] {
        let st = w.wait().unwrap();
        assert!(st.code().is_some(), "{st:?}");
    }
    let rec = env.idem().args(["reconcile", "--json"]).output().unwrap();
    assert!(rec.status.success(), "{}", text(&rec));
    let st = env.status();
    assert_eq!(count(&st, "finalized"), n as u64, "{st}");
    assert_eq!(count(&st, "failed"), 1, "only the missing file fails");
    assert_eq!(check_blobs(&env.out), n);
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
}

fn unsafe_free_kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// The worker `unshare --fork` started (its only child).
fn child_of(pid: u32) -> u32 {
    for _ in 0..50 {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            if let Some(c) = s.split_whitespace().next().and_then(|c| c.parse().ok()) {
                return c;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("unshare {pid} has no child")
}

/// Restarts the local PostgreSQL cluster, when this machine runs one and
/// lets us (root, `pg_ctlcluster`).
fn restart_postgres() -> bool {
    let Ok(versions) = std::fs::read_dir("/etc/postgresql") else {
        return false;
    };
    let Some(version) = versions.flatten().next().map(|d| d.file_name()) else {
        return false;
    };
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect"])
        .arg(version)
        .args(["main", "restart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_postgres_restart_mid_run_loses_nothing_and_repeats_nothing() {
    let Some(env) = Env::postgres_with(SECRET, true) else {
        eprintln!("IDEM_PG_URL is not set: skipped");
        return;
    };
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !is_root || !std::path::Path::new("/etc/postgresql").exists() {
        eprintln!("needs root and a local PostgreSQL cluster to restart: skipped");
        return;
    }
    let n = 300;
    let o =
        Origin::start((0..n).map(|i| (format!("d{i}"), content(i as u64 + 11, 1_500 + i * 13))))
            .unwrap();
    let lines: Vec<_> = (0..n)
        .map(|i| {
            job(
                "w",
                &format!("a{i}"),
                &o.url(&format!("/f/d{i}?delay_ms=40")),
            )
        })
        .collect();
    env.plan(&lines);
    let run = env
        .run_cmd()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(restart_postgres(), "pg_ctlcluster restart failed");
    let out = run.wait_with_output().unwrap();
    let st = env.status();
    assert_eq!(count(&st, "finalized"), n as u64, "{st}\n{}", text(&out));
    assert_eq!(check_blobs(&env.out), n);
    // Nothing done twice: one FINALIZE committed per job.
    let ops = env
        .idem()
        .args(["export", "--format", "jsonl"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ops.stdout).lines().count(), n);
    for i in (0..n).step_by(37) {
        let shown = env.show(&format!("w/a{i}"));
        let finals = shown["ops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["kind"] == "finalize" && o["status"] == "committed")
            .count();
        assert_eq!(finals, 1, "{shown}");
    }
}

#[test]
fn a_sqlite_ledger_moves_to_postgres_and_the_run_carries_on_there() {
    let Some(pg) = Env::postgres(SECRET) else {
        eprintln!("IDEM_PG_URL is not set: skipped");
        return;
    };
    let lite = Env::new();
    let o = Origin::start(
        (0..10).map(|i| (format!("d{i}"), content(i + 31, 4_000 + 100 * i as usize))),
    )
    .unwrap();
    let mut lines: Vec<_> = (0..8)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/d{i}"))))
        .collect();
    lines.push(job("w", "gone", &o.url("/missing")));
    lite.plan(&lines);
    let run = lite.run_cmd().output().unwrap();
    assert_eq!(json_of(&run)["run"]["finalized"], 8, "{}", text(&run));
    // Planned after the run: still to do when the ledger moves.
    lines.push(job("w", "late", &o.url("/f/d9")));
    lite.plan(&lines);
    let copy = lite
        .idem()
        .args(["copy-ledger", "--json", "--to"])
        .arg(&pg.db)
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", text(&copy));
    assert_eq!(json_of(&copy)["copied"], 10);
    assert!(!text(&copy).contains(SECRET));
    let manifest = |e: &Env| {
        let out = e
            .idem()
            .args(["export", "--format", "jsonl"])
            .output()
            .unwrap();
        let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(
        manifest(&lite),
        manifest(&pg),
        "the same jobs, as they were"
    );
    assert_eq!(lite.show("w/a3")["ops"], pg.show("w/a3")["ops"]);
    // Copying again copies nothing.
    let again = lite
        .idem()
        .args(["copy-ledger", "--json", "--to"])
        .arg(&pg.db)
        .output()
        .unwrap();
    assert_eq!(json_of(&again)["existing"], 10, "{}", text(&again));
    // The run goes on from PostgreSQL, on the same output tree: only the
    // job still planned is fetched.
    let before = o.total();
    let mut cmd = Command::new(crate::support::IDEM);
    cmd.arg("--db").arg(&pg.db).arg("--out").arg(&lite.out);
    cmd.args(["run", "--allow-loopback", "--json"]);
    let run = cmd.output().unwrap();
    assert_eq!(json_of(&run)["run"]["finalized"], 1, "{}", text(&run));
    assert_eq!(o.total() - before, 1, "only the late job was fetched");
    assert_eq!(check_blobs(&lite.out), 9);
}
