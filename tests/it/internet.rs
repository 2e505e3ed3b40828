//! The real internet's needs, end to end: mirrors tried in order, request
//! headers that stay with their origin and never show, per-host settings,
//! a host's request rate held across processes, and proxies from the
//! environment.

use crate::support::{count, job, json_of, text, Env};
use idem_origin::{content, Origin, Proxy};
use serde_json::json;
use std::net::Ipv4Addr;

/// Runs `n` workers on `env`'s ledger at once, each with `args`, and waits
/// until each has finished cleanly.
fn run_workers(env: &Env, n: usize, args: &[&str]) {
    let workers: Vec<_> = (0..n)
        .map(|_| {
            env.run_cmd()
                .args(args)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
}

#[test]
fn mirrors_are_tried_in_order_and_the_one_that_served_is_named() {
    let env = Env::new();
    let o = Origin::start([("a.pdf".to_owned(), content(1, 3000))]).unwrap();
    let busy = o.url("/status/503/a.pdf?retry_after=0");
    let gone = o.url("/f/gone.pdf");
    let good = o.url("/f/a.pdf");
    let lines = [
        json!({"work_id": "w", "artifact_id": "m", "url": busy, "urls": [gone, good]}),
        json!({"work_id": "w", "artifact_id": "only-urls", "urls": [gone, good]}),
        json!({"work_id": "w", "artifact_id": "none-serve", "urls": [gone, o.url("/f/gone2.pdf")]}),
    ];
    let plan = env.write_plan(&lines);
    let out = env
        .idem()
        .args(["plan", "--max-attempts", "2"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = env.run_cmd().output().unwrap();
    let st = env.status();
    // The second job's content is the first's: held once.
    assert_eq!(
        (count(&st, "finalized"), count(&st, "skipped_duplicate")),
        (1, 1),
        "{}\n{st}",
        text(&out)
    );
    assert_eq!(count(&st, "failed"), 1, "{st}");
    assert_eq!(env.show("w/only-urls")["served_url"], json!(good));
    // A retryable failure spends the URL's attempts first; a 404 moves on
    // at once.
    assert_eq!(o.count("/status/503/a.pdf?retry_after=0"), 2);
    assert_eq!(o.count("/f/gone.pdf"), 3, "once for each job that lists it");
    let shown = env.show("w/m");
    assert_eq!(shown["served_url"], json!(good), "{shown}");
    assert_eq!(shown["url_index"], 2);
    assert_eq!(shown["urls"].as_array().unwrap().len(), 3);
    let failed = env.show("w/none-serve");
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .starts_with("http_404"),
        "{failed}"
    );
    assert_eq!(failed["served_url"], json!(null));
    let exported = env.idem().args(["export"]).output().unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let m = rows.iter().find(|r| r["artifact_id"] == "m").unwrap();
    assert_eq!(m["served_url"], json!(good), "{m}");
    // Re-planning the same list is a no-op; another list is a conflict.
    let again = env.idem().arg("plan").arg(&plan).output().unwrap();
    assert!(again.status.success(), "{}", text(&again));
    let changed =
        env.write_plan(&[json!({"work_id": "w", "artifact_id": "m", "url": busy, "urls": [good]})]);
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&changed)
        .output()
        .unwrap();
    assert_eq!(json_of(&out)["conflicts"], 1, "{}", text(&out));
}

#[test]
fn headers_reach_their_origin_only_and_their_values_never_show() {
    let env = Env::new();
    let other = Origin::start([("g.pdf".to_owned(), content(3, 2000))]).unwrap();
    let o = Origin::start([
        ("f.pdf".to_owned(), content(2, 2000)),
        ("g.pdf".to_owned(), content(3, 2000)),
    ])
    .unwrap();
    let secret = json!({"Authorization": "Bearer letmein", "X-Api-Key": "k-very-secret"});
    let hop = format!("/xredirect/{}/g.pdf", other.addr().port());
    env.plan(&[
        json!({"work_id": "w", "artifact_id": "auth", "url": o.url("/auth/f.pdf"), "headers": secret}),
        json!({"work_id": "w", "artifact_id": "hop", "url": o.url(&hop), "headers": secret}),
        job("w", "bare", &o.url("/auth/f.pdf?bare=1")),
    ]);
    let events = env.path("events.jsonl");
    let out = env
        .run_cmd()
        .arg("--events")
        .arg(&events)
        .args(["--user-agent", "corpus-builder/2.1"])
        .output()
        .unwrap();
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 2, "{}\n{st}", text(&out));
    assert_eq!(
        env.show("w/bare")["state"],
        "failed",
        "no credentials, no file"
    );
    let seen = o.headers("/auth/f.pdf").expect("asked");
    assert_eq!(seen["authorization"], "Bearer letmein");
    assert_eq!(seen["user-agent"], "corpus-builder/2.1");
    let first = o.headers(&hop).expect("asked");
    assert_eq!(first["x-api-key"], "k-very-secret");
    let there = other.headers("/f/g.pdf").expect("redirected there");
    assert!(
        !there.contains_key("authorization") && !there.contains_key("x-api-key"),
        "headers followed a redirect to another origin: {there:?}"
    );
    // Nothing idem prints or writes shows a value.
    let shown = env
        .idem()
        .args(["show", "--json", "w/auth"])
        .output()
        .unwrap();
    let shown_text = env.idem().args(["show", "w/auth"]).output().unwrap();
    let exported = env.idem().arg("export").output().unwrap();
    let mut all = String::new();
    for o in [&out, &shown, &shown_text, &exported] {
        all.push_str(&text(o));
    }
    all.push_str(&std::fs::read_to_string(&events).unwrap());
    for value in ["letmein", "k-very-secret"] {
        assert!(!all.contains(value), "{value} shown:\n{all}");
    }
    assert_eq!(json_of(&shown)["headers"]["Authorization"], "***");
}

#[test]
fn a_host_config_gives_headers_and_limits_by_host() {
    let env = Env::new();
    let o = Origin::start_on(Ipv4Addr::new(127, 0, 0, 2), []).unwrap();
    let mut lines = Vec::new();
    for i in 0..6 {
        o.put(&format!("h{i}.pdf"), content(10 + i, 1500));
        lines.push(job(
            "w",
            &format!("h{i}"),
            &o.url(&format!("/auth/h{i}.pdf?delay_ms=300")),
        ));
    }
    env.plan(&lines);
    let config = env.path("hosts.json");
    std::fs::write(
        &config,
        r#"{"127.0.0.2": {"per_host": 1, "headers": {"Authorization": "Bearer letmein"}}, "*": {"per_host": 8}}"#,
    )
    .unwrap();
    let out = env
        .run_cmd()
        .args(["--concurrency", "6", "--per-host", "4", "--host-config"])
        .arg(&config)
        .output()
        .unwrap();
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 6, "{}\n{st}", text(&out));
    assert_eq!(o.max_in_flight(), 1, "the host's own budget holds");
    // A --host-limit for the same pattern overrides the budget, not the
    // file's headers.
    let mut more = Vec::new();
    for i in 6..10 {
        o.put(&format!("h{i}.pdf"), content(10 + i, 1500));
        more.push(job(
            "w",
            &format!("h{i}"),
            &o.url(&format!("/auth/h{i}.pdf?delay_ms=300")),
        ));
    }
    env.plan(&more);
    let out = env
        .run_cmd()
        .args([
            "--concurrency",
            "6",
            "--host-limit",
            "127.0.0.2=2",
            "--host-config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 10, "{}\n{st}", text(&out));
    assert_eq!(
        o.max_in_flight(),
        2,
        "the limit's budget, the file's headers"
    );
    let bad = env.path("bad.json");
    std::fs::write(&bad, r#"{"127.0.0.2": {"per_hots": 1}}"#).unwrap();
    let out = env
        .run_cmd()
        .arg("--host-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("per_hots"), "{}", text(&out));
    assert_eq!(
        count(&env.status(), "finalized"),
        10,
        "the ledger is as it was"
    );
}

#[test]
fn four_workers_share_one_host_rate_and_one_override() {
    let env = Env::new();
    let paced = Origin::start_on(Ipv4Addr::new(127, 0, 0, 2), []).unwrap();
    let narrow = Origin::start_on(Ipv4Addr::new(127, 0, 0, 3), []).unwrap();
    let mut lines = Vec::new();
    for i in 0..8 {
        paced.put(&format!("p{i}.pdf"), content(20 + i, 1000));
        lines.push(job(
            "w",
            &format!("p{i}"),
            &paced.url(&format!("/f/p{i}.pdf")),
        ));
        narrow.put(&format!("n{i}.pdf"), content(40 + i, 1000));
        lines.push(job(
            "w",
            &format!("n{i}"),
            &narrow.url(&format!("/f/n{i}.pdf?delay_ms=400")),
        ));
    }
    env.plan(&lines);
    run_workers(
        &env,
        4,
        &[
            "--concurrency",
            "4",
            "--per-host",
            "4",
            "--host-limit",
            "127.0.0.2=4,2",
            "--host-limit",
            "127.0.0.3=1",
        ],
    );
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 16, "{st}");
    assert_eq!(
        narrow.max_in_flight(),
        1,
        "four workers, one slot for 127.0.0.3"
    );
    // Two requests a second for the fleet: eight leases of that host span
    // at least 3.5 s; the requests at least 2 s, allowing for the time
    // between a lease and its request on a loaded machine.
    let t = paced.arrivals_ms();
    assert_eq!(t.len(), 8, "one request per file");
    let span = t.iter().max().unwrap() - t.iter().min().unwrap();
    assert!(
        span >= 2_000,
        "8 requests at 2/s across 4 workers took {span} ms: {t:?}"
    );
}

#[test]
fn a_proxy_from_the_environment_carries_requests_and_the_policy_still_judges_targets() {
    let env = Env::new();
    let o = Origin::start_on(
        Ipv4Addr::new(127, 0, 0, 2),
        [("x.pdf".to_owned(), content(5, 4000))],
    )
    .unwrap();
    let proxy = Proxy::start().unwrap();
    env.plan(&[job("w", "x", &o.url("/f/x.pdf"))]);
    // The target is on loopback: without --allow-loopback the proxy is never asked.
    let refused = env
        .idem()
        .args(["run", "--json"])
        .env("HTTP_PROXY", proxy.url())
        .output()
        .unwrap();
    assert_eq!(env.show("w/x")["state"], "failed", "{}", text(&refused));
    assert!(proxy.seen().is_empty(), "{:?}", proxy.seen());
    let out = env.idem().args(["retry", "--failed"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = env
        .run_cmd()
        .env("HTTP_PROXY", proxy.url())
        .output()
        .unwrap();
    assert_eq!(env.show("w/x")["state"], "finalized", "{}", text(&out));
    assert_eq!(proxy.seen(), [o.url("/f/x.pdf")]);
    // NO_PROXY names the host: straight there.
    env.plan(&[job("w", "y", &o.url("/f/x.pdf?again=1"))]);
    let out = env
        .run_cmd()
        .env("HTTP_PROXY", proxy.url())
        .env("NO_PROXY", "localhost, 127.0.0.2")
        .output()
        .unwrap();
    assert_eq!(
        env.show("w/y")["state"],
        "skipped_duplicate",
        "{}",
        text(&out)
    );
    assert_eq!(
        o.count("/f/x.pdf?again=1"),
        1,
        "fetched, as the same content"
    );
    assert_eq!(proxy.seen().len(), 1, "{:?}", proxy.seen());
}

#[test]
fn a_throttling_host_costs_no_attempts_and_a_shared_rate_avoids_it() {
    // Unpaced, four workers run into the host's limit; its 429s cost the
    // jobs no attempt, so every job finishes with one attempt allowed.
    let env = Env::new();
    let o = Origin::start_on(Ipv4Addr::new(127, 0, 0, 2), []).unwrap();
    let mut lines = Vec::new();
    for i in 0..12 {
        o.put(&format!("t{i}.pdf"), content(60 + i, 1000));
        lines.push(job(
            "w",
            &format!("t{i}"),
            &o.url(&format!("/f/t{i}.pdf?rate_limit=3")),
        ));
    }
    let plan = env.write_plan(&lines);
    let out = env
        .idem()
        .args(["plan", "--max-attempts", "1"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    run_workers(&env, 4, &["--concurrency", "4", "--per-host", "8"]);
    let st = env.status();
    assert!(
        o.throttled() > 0,
        "the host never throttled: the test proves nothing"
    );
    assert_eq!(count(&st, "finalized"), 12, "{st}");
    // Paced below the host's limit, the fleet is never told to slow down.
    let env = Env::new();
    let o = Origin::start_on(Ipv4Addr::new(127, 0, 0, 3), []).unwrap();
    let mut lines = Vec::new();
    for i in 0..6 {
        o.put(&format!("u{i}.pdf"), content(80 + i, 1000));
        lines.push(job(
            "w",
            &format!("u{i}"),
            &o.url(&format!("/f/u{i}.pdf?rate_limit=3")),
        ));
    }
    env.plan(&lines);
    run_workers(
        &env,
        4,
        &[
            "--concurrency",
            "4",
            "--per-host",
            "8",
            "--per-host-rate",
            "1",
        ],
    );
    assert_eq!(count(&env.status(), "finalized"), 6);
    assert_eq!(
        o.throttled(),
        0,
        "a shared rate of 1/s stays under a limit of 3/s"
    );
}

#[test]
fn a_blob_a_mirror_served_is_never_reused_for_the_url_that_failed() {
    let env = Env::new();
    let o = Origin::start([("a.pdf".to_owned(), content(7, 3000))]).unwrap();
    let gone = o.url("/f/gone.pdf");
    env.plan(&[json!({"work_id": "w", "artifact_id": "first", "urls": [gone, o.url("/f/a.pdf")]})]);
    let out = env.run_cmd().output().unwrap();
    assert_eq!(env.show("w/first")["state"], "finalized", "{}", text(&out));
    // Another job of the URL that failed: its own fetch decides.
    env.plan(&[job("w", "second", &gone)]);
    let out = env.run_cmd().output().unwrap();
    let second = env.show("w/second");
    assert_eq!(second["state"], "failed", "{second}\n{}", text(&out));
    assert_eq!(o.count("/f/gone.pdf"), 2);
}
