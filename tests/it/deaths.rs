//! Crashes are not the job's fault: workers killed again and again never
//! fail an innocent job, and a job that kills its workers is found out by
//! running it alone, and fails as `poison`.

use crate::crash::catalogue;
use crate::support::{check_blobs, count, job, slow_tests, text, Env};
use idem_core::SplitMix64;
use idem_origin::{content, Origin};
use std::time::{Duration, Instant};

/// Hundreds of jobs, a worker SIGKILLed at a random instant again and
/// again, then one run to the end: the only failures are the origin's 404s.
#[test]
fn a_crash_loop_never_fails_an_innocent_job() {
    let env = Env::new();
    let o = Origin::start([]).unwrap();
    let (mut lines, distinct) = catalogue(&o, 390);
    for i in 0..10 {
        lines.push(job(
            "w",
            &format!("gone{i}"),
            &o.url(&format!("/f/gone{i}.pdf")),
        ));
    }
    env.plan(&lines);
    let kills = if slow_tests() { 40 } else { 8 };
    let mut rng = SplitMix64::new(0xDEAD);
    for _ in 0..kills {
        let mut child = env
            .run_cmd()
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + rng.below_inclusive(900)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let out = env
        .run_cmd()
        .args(["--concurrency", "16", "--per-host", "8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let st = env.status();
    assert_eq!(count(&st, "failed"), 10, "only the 404s fail: {st}");
    assert_eq!(st["failures_by_reason"]["http_404"], 10, "{st}");
    assert_eq!(
        count(&st, "finalized") + count(&st, "skipped_duplicate"),
        390,
        "{st}"
    );
    assert_eq!(check_blobs(&env.out), distinct);
}

/// A job whose body kills every worker that fetches it (a test-only hook
/// aborts the process), among 100 healthy jobs and three workers restarted
/// as they die: it is run alone in a child process, fails as `poison` after
/// its isolated deaths, and every other job finishes. Few workers die: once
/// it is a suspect, only the children it runs in do.
#[test]
fn a_job_that_kills_its_workers_fails_as_poison() {
    let env = Env::new();
    let o = Origin::start([("poison.pdf".to_owned(), content(1, 300 * 1024))]).unwrap();
    let mut lines = vec![job("w", "poison", &o.url("/f/poison.pdf"))];
    for i in 0..100 {
        let name = format!("ok{i}.pdf");
        o.put(&name, content(10 + i, 5000 + i as usize));
        lines.push(job("w", &format!("ok{i}"), &o.url(&format!("/f/{name}"))));
    }
    env.plan(&lines);
    let spawn = || {
        env.run_cmd()
            .env("IDEM_TEST_POISON_URL", "poison.pdf")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut workers: Vec<_> = (0..3).map(|_| Some(spawn())).collect();
    let mut deaths = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while workers.iter().any(Option::is_some) {
        assert!(Instant::now() < deadline, "workers still running");
        for w in &mut workers {
            let Some(child) = w.as_mut() else { continue };
            let Some(status) = child.try_wait().unwrap() else {
                continue;
            };
            if status.code().is_none() {
                deaths += 1;
                *w = Some(spawn());
            } else {
                *w = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 100, "{st}");
    assert_eq!(st["failures_by_reason"]["poison"], 1, "{st}");
    let p = env.show("w/poison");
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        p["last_error"].as_str().unwrap().starts_with("poison:"),
        "{p}"
    );
    assert_eq!(p["deaths"]["isolated"], 3, "{p}");
    assert!(
        deaths <= idem_core::SUSPECT_AFTER_DEATHS + 1,
        "{deaths} workers died; once a suspect, only its children should"
    );
    assert!(deaths >= 1, "the hook never fired");
    assert_eq!(check_blobs(&env.out), 100);
}

/// Graceful stops spend no attempt: a long download stopped by SIGTERM
/// more times than it has attempts (a rolling deploy) still finishes.
#[test]
fn graceful_stops_spend_no_attempts() {
    let env = Env::new();
    let body = content(3, 400 * 1024);
    let o = Origin::start([("long.pdf".to_owned(), body.clone())]).unwrap();
    let p = env.write_plan(&[job("w", "long", &o.url("/slow/long.pdf?ms=10"))]);
    assert!(env
        .idem()
        .args(["plan", "--max-attempts", "2"])
        .arg(&p)
        .status()
        .unwrap()
        .success());
    for stop in 0..4 {
        let child = env
            .run_cmd()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // This process holds the job (its signal handler is in place by
        // then) and is streaming it.
        let me = format!("/{}/", child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !env.show("w/long")["lease"]["owner"]
            .as_str()
            .is_some_and(|o| o.contains(&me))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        crate::crash::signal(child.id(), "-TERM");
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "stop {stop}");
        let j = env.show("w/long");
        assert_ne!(j["state"], "failed", "stop {stop}: {j}");
        assert_eq!(
            j["attempts"], 0,
            "stop {stop}: a stop is not an attempt: {j}"
        );
    }
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/long");
    assert_eq!(j["state"], "finalized", "{j}");
    assert_eq!(j["sha256"], idem_core::Digest32::of(&body).to_hex());
}
