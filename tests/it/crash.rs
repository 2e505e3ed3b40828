//! Crash is a normal event: kill -9 a worker at random instants, pause one
//! past its lease, fill its disk; afterwards the ledger and the store must be
//! exactly as if nothing had happened.

use crate::support::{
    check_blobs, count, job, json_of, last_op, leftovers, slow_tests, terminal, text, Env,
};
use idem_core::SplitMix64;
use idem_origin::{content, Origin};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A mixed catalogue: plain, slow, faulty once, and identical content.
pub(crate) fn catalogue(o: &Origin, n: usize) -> (Vec<serde_json::Value>, usize) {
    let mut lines = Vec::new();
    let mut distinct = BTreeSet::new();
    for i in 0..n {
        let name = format!("d{i}.pdf");
        let seed = if i % 9 == 8 { 1 } else { i as u64 + 1 };
        let size = if i % 9 == 8 {
            20_000
        } else {
            20_000 + (i * 37_717) % 380_000
        };
        let body = content(seed, size);
        distinct.insert(body.clone());
        o.put(&name, body);
        let path = match i % 6 {
            0 => format!("/slow/{name}?ms=2"),
            1 => format!("/trunc/{name}?fail=1"),
            2 => format!("/status/503/{name}?fail=1&retry_after=0"),
            _ => format!("/f/{name}"),
        };
        lines.push(job("w", &format!("a{i}"), &o.url(&path)));
    }
    (lines, distinct.len())
}

fn check_converged(env: &Env, o: &Origin, jobs: usize, distinct: usize) {
    let st = env.status();
    assert_eq!(st["total"], jobs as u64);
    assert_eq!(terminal(&st), jobs as u64, "every job terminal: {st}");
    assert_eq!(count(&st, "failed"), 0, "no job fails: {st}");
    assert_eq!(
        check_blobs(&env.out),
        distinct,
        "each distinct content stored once"
    );
    // Each job's FINALIZE committed exactly once (duplicates by URL never
    // reach it; this catalogue has none).
    for i in 0..jobs {
        let j = env.show(&format!("w/a{i}"));
        let commits = j["ops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["kind"] == "finalize" && o["status"] == "committed")
            .count();
        assert_eq!(commits, 1, "job a{i} finalized {commits} times: {j}");
    }
    let r = env.idem().args(["reconcile", "--json"]).output().unwrap();
    assert!(r.status.success(), "{}", text(&r));
    assert!(
        leftovers(&env.out).is_empty(),
        "parts left: {:?}",
        leftovers(&env.out)
    );
    let before = o.total();
    let again = env.run_cmd().output().unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(o.total(), before, "a further run sends no request");
}

fn crash_trials(trials: u64) {
    for trial in 0..trials {
        let env = Env::new();
        let o = Origin::start([]).unwrap();
        let (lines, distinct) = catalogue(&o, 24);
        env.plan(&lines);
        let mut rng = SplitMix64::new(0xC4A5 + trial);
        let kills = 1 + rng.below_inclusive(1);
        for _ in 0..kills {
            let mut child = env
                .run_cmd()
                .args(["--concurrency", "6"])
                .arg("--events")
                .arg(env.path("events.jsonl"))
                .spawn()
                .unwrap();
            let delay = 30 + rng.below_inclusive(1200);
            std::thread::sleep(Duration::from_millis(delay));
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let out = env
            .run_cmd()
            .args(["--concurrency", "6"])
            .arg("--events")
            .arg(env.path("events.jsonl"))
            .output()
            .unwrap();
        assert!(out.status.success(), "trial {trial}: {}", text(&out));
        check_converged(&env, &o, lines.len(), distinct);
    }
}

#[test]
fn kill_nine_at_random_instants() {
    crash_trials(if slow_tests() { 20 } else { 3 });
}

#[test]
fn resume_after_kill_fetches_only_the_rest() {
    let env = Env::new();
    let body = content(42, 600 * 1024);
    let o = Origin::start([("big.pdf".to_owned(), body.clone())]).unwrap();
    // 600 chunks at 5 ms: about 3 s.
    env.plan(&[job("w", "big", &o.url("/slow/big.pdf?ms=5"))]);
    // Kill once a good share of the body is on disk.
    kill_mid_stream(&env, 200 * 1024);
    // The layout an operator sees: <out>/tmp/<job key>.part and its sidecar.
    let key = env.show("w/big")["job_key"].as_str().unwrap().to_owned();
    let left = leftovers(&env.out);
    assert!(left.contains(&format!("{key}.part")), "{left:?}");
    assert!(left.contains(&format!("{key}.part.json")), "{left:?}");
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = json_of(&out);
    let fetched = run["run"]["bytes_downloaded"].as_u64().unwrap();
    assert!(
        fetched < body.len() as u64 - 100 * 1024,
        "resumed: fetched {fetched} of {}",
        body.len()
    );
    let j = env.show("w/big");
    assert_eq!(j["state"], "finalized");
    assert_eq!(j["sha256"], idem_core::Digest32::of(&body).to_hex());
    let stream = last_op(&j, "stream");
    assert!(
        stream["result"]["resumed_from"].as_u64().unwrap() > 0,
        "{stream}"
    );
    assert_eq!(check_blobs(&env.out), 1);
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let s = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

#[test]
fn paused_worker_is_fenced_and_publishes_nothing() {
    let env = Env::new();
    let body = content(77, 300 * 1024);
    let o = Origin::start([("slow.pdf".to_owned(), body.clone())]).unwrap();
    env.plan(&[job("w", "slow", &o.url("/slow/slow.pdf?ms=8"))]);
    let a = env
        .run_cmd()
        .args(["--lease-ttl", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&env.out).iter().all(|f| !f.ends_with(".part")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(a.id(), "-STOP");
    std::thread::sleep(Duration::from_millis(1500));
    // B takes over once A's lease has expired; A is alive (stopped), so its
    // locked part is left alone and B starts its own.
    let b = env.run_cmd().args(["--lease-ttl", "5"]).output().unwrap();
    assert!(b.status.success(), "{}", text(&b));
    assert_eq!(env.show("w/slow")["state"], "finalized");
    signal(a.id(), "-CONT");
    let a_out = a.wait_with_output().unwrap();
    let a_json = json_of(&a_out);
    assert_eq!(
        a_json["run"]["fenced"],
        1,
        "A noticed it was fenced: {}",
        text(&a_out)
    );
    assert_eq!(a_json["run"]["finalized"], 0, "A published nothing");
    let j = env.show("w/slow");
    assert_eq!(j["epoch"], 2);
    assert_eq!(j["sha256"], idem_core::Digest32::of(&body).to_hex());
    let commits = j["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "finalize" && o["status"] == "committed")
        .count();
    assert_eq!(commits, 1);
    assert!(env.status()["fenced_writes"].as_u64().unwrap() >= 1);
    assert_eq!(check_blobs(&env.out), 1);
    let r = env.idem().args(["reconcile"]).output().unwrap();
    assert!(r.status.success());
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn disk_full_is_a_clear_retryable_error_and_the_ledger_survives() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let env = Env::new();
    std::fs::create_dir_all(&env.out).unwrap();
    let out = env.out.to_str().unwrap().to_owned();
    let m = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", &out])
        .status();
    if !m.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(out);
    let o = Origin::start([
        ("big.pdf".to_owned(), content(5, 600 * 1024)),
        ("small.pdf".to_owned(), content(6, 10_000)),
    ])
    .unwrap();
    let p = env.write_plan(&[
        job("w", "big", &o.url("/f/big.pdf")),
        job("w", "small", &o.url("/f/small.pdf")),
    ]);
    assert!(env
        .idem()
        .args(["plan", "--max-attempts", "2"])
        .arg(&p)
        .status()
        .unwrap()
        .success());
    // One at a time, big first: its failure must not take the small one down.
    let r = env.run_cmd().args(["--concurrency", "1"]).output().unwrap();
    assert_eq!(r.status.code(), Some(3), "{}", text(&r));
    let big = env.show("w/big");
    assert_eq!(big["state"], "failed");
    let err = big["last_error"].as_str().unwrap();
    assert!(
        err.starts_with("io:") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(
        env.show("w/small")["state"],
        "finalized",
        "other jobs go on"
    );
    assert_eq!(env.status()["total"], 2, "ledger intact");
}

#[test]
fn sigterm_stops_gracefully_and_releases_leases() {
    let env = Env::new();
    let o = Origin::start([("slow.pdf".to_owned(), content(5, 400 * 1024))]).unwrap();
    env.plan(&[job("w", "slow", &o.url("/slow/slow.pdf?ms=10"))]);
    let child = env
        .run_cmd()
        .args(["--lease-ttl", "600"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&env.out).iter().all(|f| !f.ends_with(".part")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), "-TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "interrupted: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopping"),
        "{}",
        text(&out)
    );
    let st = env.status();
    assert_eq!(
        st["leases"]["live"], 0,
        "the lease was released, not left to expire: {st}"
    );
    // The next run picks it up at once (no 600 s wait) and finishes it.
    let again = env.run_cmd().output().unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(env.show("w/slow")["state"], "finalized");
    assert_eq!(check_blobs(&env.out), 1);
}

/// Starts a run, kills it once `min_part` bytes of a part are on disk.
pub(crate) fn kill_mid_stream(env: &Env, min_part: u64) {
    let mut child = env
        .run_cmd()
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let size: u64 = std::fs::read_dir(env.out.join("tmp"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        if size > min_part || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A body cut off early (a reset well within its first 100 ms, before its
/// sidecar was due) is resumed with `Range` by the retry: the failed
/// attempt keeps its part, with a sidecar.
#[test]
fn a_body_reset_early_is_resumed_by_the_retry() {
    let env = Env::new();
    let body = content(31, 600 * 1024);
    let o = Origin::start([("r.pdf".to_owned(), body.clone())]).unwrap();
    env.plan(&[job("w", "r", &o.url("/reset/r.pdf?fail=1"))]);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/r");
    assert_eq!(j["state"], "finalized", "{j}");
    assert_eq!(j["sha256"], idem_core::Digest32::of(&body).to_hex());
    let stream = last_op(&j, "stream");
    assert_eq!(stream["status"], "committed", "{stream}");
    assert!(
        stream["result"]["resumed_from"].as_u64().unwrap() > 0,
        "the retry fetched the whole body again: {stream}"
    );
    assert_eq!(o.gets("/reset/r.pdf?fail=1"), 2);
    assert_eq!(check_blobs(&env.out), 1);
}

#[test]
fn a_server_that_ignores_range_gets_a_clean_restart() {
    let env = Env::new();
    let body = content(11, 500 * 1024);
    let o = Origin::start([("nr.pdf".to_owned(), body.clone())]).unwrap();
    env.plan(&[job("w", "nr", &o.url("/norange/nr.pdf?ms=4"))]);
    kill_mid_stream(&env, 150 * 1024);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/nr");
    assert_eq!(
        j["sha256"],
        idem_core::Digest32::of(&body).to_hex(),
        "the 200 answer to a range request restarted the file"
    );
    let stream = last_op(&j, "stream");
    assert_eq!(stream["result"]["resumed_from"], 0, "{stream}");
    assert_eq!(check_blobs(&env.out), 1);
}

#[test]
fn content_changed_since_the_crash_is_fetched_afresh() {
    let env = Env::new();
    let o = Origin::start([("v.pdf".to_owned(), content(1, 500 * 1024))]).unwrap();
    env.plan(&[job("w", "v", &o.url("/f/v.pdf?ms=4"))]);
    kill_mid_stream(&env, 150 * 1024);
    let v2 = content(2, 480 * 1024);
    o.put("v.pdf", v2.clone());
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/v");
    assert_eq!(
        j["sha256"],
        idem_core::Digest32::of(&v2).to_hex(),
        "no splice of old and new content"
    );
    assert_eq!(check_blobs(&env.out), 1);
}

/// Crash right after publishing, before the commit: the blob is on disk but
/// the ledger says streaming. The reconciler heals it without a request.
#[test]
fn a_publish_whose_commit_was_lost_is_healed_by_the_reconciler() {
    let env = Env::new();
    let o = Origin::start([("h.pdf".to_owned(), content(21, 50_000))]).unwrap();
    env.plan(&[job("w", "h", &o.url("/f/h.pdf"))]);
    let crashed = env
        .run_cmd()
        .args(["--lease-ttl", "1"])
        .env("IDEM_CRASHPOINT", "after_publish")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the crash point aborted the run");
    assert_eq!(env.show("w/h")["state"], "streaming");
    assert_eq!(check_blobs(&env.out), 1, "the blob was published");
    std::thread::sleep(Duration::from_millis(1200));
    let before = o.total();
    let r = json_of(&env.idem().args(["reconcile", "--json"]).output().unwrap());
    assert_eq!(r["blobs_healed"], 1, "{r}");
    let j = env.show("w/h");
    assert_eq!(j["state"], "finalized");
    // The heal is recorded as its holder would have: FINALIZE committed
    // once, with the blob.
    let fin = last_op(&j, "finalize");
    assert_eq!(fin["status"], "committed", "{j}");
    assert_eq!(fin["result"]["sha256"], j["sha256"], "{j}");
    assert_eq!(o.total(), before, "healed without a request");
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
}

/// Crash while a batch of bodies is linked into the store but not yet made
/// durable, and before any of them is committed: the next run heals each
/// linked blob (made durable first) without a request, fetches the rest,
/// and leaves no part behind; identical bodies end as one blob.
#[test]
fn a_crash_inside_a_publish_batch_is_repaired_without_refetching() {
    let env = Env::new();
    let mut files = Vec::new();
    let mut lines = Vec::new();
    for i in 0..12u64 {
        // Two jobs share each body: duplicates in one batch, or across two.
        let body = content(300 + i / 2, 2_000 + (i / 2) as usize * 100);
        let name = format!("b{i}.pdf");
        files.push((name.clone(), body));
        lines.push(job("w", &format!("b{i}"), &format!("/f/{name}")));
    }
    let o = Origin::start(files).unwrap();
    for l in &mut lines {
        let path = l["url"].as_str().unwrap().to_owned();
        l["url"] = o.url(&path).into();
    }
    env.plan(&lines);
    let crashed = env
        .run_cmd()
        .args(["--lease-ttl", "1", "--concurrency", "8", "--per-host", "8"])
        .env("IDEM_CRASHPOINT", "after_batch_link")
        .output()
        .unwrap();
    assert!(!crashed.status.success(), "the crash point aborted the run");
    assert!(
        check_blobs(&env.out) >= 1,
        "a batch was linked before the crash"
    );
    let st = env.status();
    assert_eq!(
        count(&st, "finalized") + count(&st, "skipped_duplicate"),
        0,
        "{st}"
    );
    // The jobs to heal: STREAM committed, and its blob linked.
    let mut linked_paths = Vec::new();
    for i in 0..12 {
        let j = env.show(&format!("w/b{i}"));
        let stream = j["ops"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .find(|op| op["kind"] == "stream" && op["status"] == "committed")
            .cloned();
        if let Some(sha) = stream
            .as_ref()
            .and_then(|op| op["result"]["sha256"].as_str())
        {
            let blob = env
                .out
                .join("blobs/sha256")
                .join(&sha[..2])
                .join(&sha[2..4])
                .join(sha);
            if blob.exists() {
                linked_paths.push((format!("/f/b{i}.pdf"), o.count(&format!("/f/b{i}.pdf"))));
            }
        }
    }
    assert!(!linked_paths.is_empty(), "a committed stream was linked");
    std::thread::sleep(Duration::from_millis(1200));
    let evp = env.out.join("../ev.jsonl");
    let out = env.run_cmd().arg("--events").arg(&evp).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r = &json_of(&out)["run"]["reconcile"];
    assert_eq!(r["blobs_healed"], linked_paths.len() as u64, "{r}");
    let st = env.status();
    let states: Vec<String> = (0..12)
        .map(|i| {
            let j = env.show(&format!("w/b{i}"));
            format!("b{i} {} {}", j["state"], j["sha256"])
        })
        .collect();
    assert_eq!(
        count(&st, "finalized"),
        6,
        "{st} {states:#?} {linked_paths:?} {} {}",
        text(&out),
        std::fs::read_to_string(&evp).unwrap()
    );
    assert_eq!(count(&st, "skipped_duplicate"), 6, "{st}");
    assert_eq!(check_blobs(&env.out), 6);
    for (path, before) in &linked_paths {
        assert_eq!(
            o.count(path),
            *before,
            "{path} was healed, not fetched again"
        );
    }
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
}

/// Crash right after STREAM's commit, before publishing: the next holder
/// adopts the complete part and publishes it without fetching again.
#[test]
fn a_committed_stream_is_published_by_the_next_holder_without_a_refetch() {
    let env = Env::new();
    let body = content(22, 400 * 1024);
    let o = Origin::start([("s.pdf".to_owned(), body.clone())]).unwrap();
    env.plan(&[job("w", "s", &o.url("/f/s.pdf"))]);
    let crashed = env
        .run_cmd()
        .env("IDEM_CRASHPOINT", "after_stream_commit")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    let gets_before = o.gets("/f/s.pdf");
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/s");
    assert_eq!(j["state"], "finalized");
    assert_eq!(j["sha256"], idem_core::Digest32::of(&body).to_hex());
    assert_eq!(
        o.gets("/f/s.pdf"),
        gets_before,
        "the body was not fetched again"
    );
    assert_eq!(check_blobs(&env.out), 1);
}

/// A finalized job whose blob disappeared is re-queued by `idem reconcile
/// --blobs` and fetched again; a worker's start does not walk the finished
/// jobs to look.
#[test]
fn a_missing_blob_is_requeued_and_restored() {
    let env = Env::new();
    let o = Origin::start([("m.pdf".to_owned(), content(23, 30_000))]).unwrap();
    env.plan(&[job("w", "m", &o.url("/f/m.pdf"))]);
    assert!(env.run_cmd().output().unwrap().status.success());
    let path = env.out.join(env.show("w/m")["path"].as_str().unwrap());
    std::fs::remove_file(&path).unwrap();
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        json_of(&out)["run"]["reconcile"]["blobs_checked"],
        0,
        "{}",
        text(&out)
    );
    assert_eq!(
        env.show("w/m")["state"],
        "finalized",
        "a start does not look"
    );
    let reconcile = |dry: bool| {
        let mut c = env.idem();
        c.args(["reconcile", "--blobs", "--json"]);
        if dry {
            c.arg("--dry-run");
        }
        json_of(&c.output().unwrap())
    };
    let dry = reconcile(true);
    assert_eq!(dry["blobs_missing_requeued"], 1, "{dry}");
    assert_eq!(dry["blobs_checked"], 1, "{dry}");
    assert_eq!(
        env.show("w/m")["state"],
        "finalized",
        "dry run changes nothing"
    );
    assert_eq!(reconcile(false)["blobs_missing_requeued"], 1);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.show("w/m")["state"], "finalized");
    assert!(path.exists(), "restored");
    assert_eq!(check_blobs(&env.out), 1);
}
