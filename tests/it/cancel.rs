//! `idem cancel` on a job a worker is streaming: the job fails as
//! cancelled, the worker stops at its next fence check and publishes
//! nothing; finished jobs cannot be cancelled.

use crate::support::{check_blobs, job, json_of, leftovers, text, Env};
use idem_origin::{content, Origin};
use std::time::{Duration, Instant};

#[test]
fn cancelling_a_job_mid_stream_publishes_nothing() {
    let env = Env::new();
    let o = Origin::start([
        ("big".to_owned(), content(5, 400_000)),
        ("s0".to_owned(), content(6, 3_000)),
        ("s1".to_owned(), content(7, 3_000)),
    ])
    .unwrap();
    env.plan(&[
        job("w", "big", &o.url("/slow/big?ms=20")),
        job("w", "s0", &o.url("/f/s0")),
        job("w", "s1", &o.url("/f/s1")),
    ]);
    let run = env
        .run_cmd()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.show("w/big")["state"] != "streaming" {
        assert!(Instant::now() < deadline, "never streaming");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = env
        .idem()
        .args(["cancel", "--json", "w/big"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_of(&out)["cancelled"], 1);
    let done = run.wait_with_output().unwrap();
    let shown = env.show("w/big");
    assert_eq!(shown["state"], "failed", "{shown}\n{}", text(&done));
    assert!(
        shown["last_error"]
            .as_str()
            .unwrap()
            .starts_with("cancelled"),
        "{shown}"
    );
    assert_eq!(
        check_blobs(&env.out),
        2,
        "the cancelled body was not published"
    );
    let rec = env.idem().arg("reconcile").output().unwrap();
    assert!(rec.status.success(), "{}", text(&rec));
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
    let st = env.status();
    assert_eq!(st["failures_by_reason"]["cancelled"], 1, "{st}");
    // A finished job cannot be cancelled; a cancelled one can be retried.
    let again = env.idem().args(["cancel", "w/s0"]).output().unwrap();
    assert_eq!(again.status.code(), Some(3), "{}", text(&again));
    let retry = env.idem().args(["retry", "w/big"]).output().unwrap();
    assert!(retry.status.success(), "{}", text(&retry));
    assert_eq!(env.show("w/big")["state"], "planned");
}
