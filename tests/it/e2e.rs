//! The progress report's scenarios for real (plan → run → status against a
//! local origin), and every fault mode of the hostile origin.

use crate::support::{check_blobs, count, job, json_of, leftovers, text, Env};
use idem_origin::{content, Origin};
use serde_json::json;

fn origin(n: usize, size: usize) -> Origin {
    Origin::start((0..n).map(|i| (format!("doc-{i}.pdf"), content(i as u64 + 1, size + i * 97))))
        .unwrap()
}

#[test]
fn full_lifecycle_replay_and_ordering() {
    let env = Env::new();
    let o = origin(12, 20_000);
    let lines: Vec<_> = (0..12)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/doc-{i}.pdf"))))
        .collect();
    env.plan(&lines);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let run = json_of(&out);
    assert_eq!(run["run"]["finalized"], 12);
    let st = env.status();
    assert_eq!(st["total"], 12);
    assert_eq!(count(&st, "finalized"), 12);
    assert_eq!(check_blobs(&env.out), 12);
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
    // Each artifact: one request, a GET whose headers stand in for HEAD's.
    for i in 0..12 {
        assert_eq!(o.count(&format!("/f/doc-{i}.pdf")), 1, "doc-{i}");
        assert_eq!(o.gets(&format!("/f/doc-{i}.pdf")), 1, "doc-{i}");
    }
    // Operation ledger in order, each committed once under epoch 1.
    let shown = env.show("w/a3");
    assert_eq!(shown["state"], "finalized");
    let kinds: Vec<_> = shown["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["kind"].clone(), o["status"].clone(), o["epoch"].clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (json!("head"), json!("committed"), json!(1)),
            (json!("stream"), json!("committed"), json!(1)),
            (json!("finalize"), json!("committed"), json!(1))
        ]
    );
    let path = shown["path"].as_str().unwrap();
    assert!(env.out.join(path).exists());
    // Replay: a second run over finished jobs sends no request at all.
    let before = o.total();
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(o.total(), before, "a finished ledger makes no requests");
    // Re-planning is a no-op.
    let p = env.write_plan(&lines);
    let r = json_of(
        &env.idem()
            .args(["plan", "--json"])
            .arg(&p)
            .output()
            .unwrap(),
    );
    assert_eq!(
        (r["planned"].as_u64(), r["existing"].as_u64()),
        (Some(0), Some(12))
    );
}

#[test]
fn two_workers_share_a_ledger_and_fetch_each_artifact_once() {
    let env = Env::new();
    let o = origin(40, 30_000);
    let lines: Vec<_> = (0..40)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/doc-{i}.pdf"))))
        .collect();
    env.plan(&lines);
    let a = env.run_cmd().args(["--concurrency", "4"]).spawn().unwrap();
    let b = env.run_cmd().args(["--concurrency", "4"]).spawn().unwrap();
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(count(&env.status(), "finalized"), 40);
    for i in 0..40 {
        assert_eq!(
            o.count(&format!("/f/doc-{i}.pdf")),
            1,
            "doc-{i} fetched more than once"
        );
    }
    assert_eq!(check_blobs(&env.out), 40);
}

#[test]
fn duplicates_are_stored_once() {
    let env = Env::new();
    let body = content(7, 50_000);
    let o = Origin::start([
        ("a.pdf".to_owned(), body.clone()),
        ("mirror.pdf".to_owned(), body),
    ])
    .unwrap();
    env.plan(&[
        job("w", "first", &o.url("/f/a.pdf")),
        job("w", "same-content", &o.url("/f/mirror.pdf")),
    ]);
    let out = env.run_cmd().args(["--concurrency", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Same URL as a finalized job: skipped without any request.
    env.plan(&[job("w", "same-url", &o.url("/f/a.pdf"))]);
    let before = o.total();
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(o.total(), before, "URL duplicate made a request");
    let st = env.status();
    assert_eq!(count(&st, "finalized"), 1);
    assert_eq!(count(&st, "skipped_duplicate"), 2);
    assert_eq!(check_blobs(&env.out), 1, "identical content is stored once");
    let a = env.show("w/first");
    for other in ["w/same-content", "w/same-url"] {
        assert_eq!(
            env.show(other)["path"],
            a["path"],
            "{other} points at the stored blob"
        );
    }
}

#[test]
fn lease_is_renewed_through_a_long_download() {
    let env = Env::new();
    let o = Origin::start([("long.pdf".to_owned(), content(3, 160 * 1024))]).unwrap();
    // 160 chunks at 25 ms: about 4 s, well past a 1 s lease.
    env.plan(&[job("w", "long", &o.url("/slow/long.pdf?ms=25"))]);
    let out = env.run_cmd().args(["--lease-ttl", "1"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/long");
    assert_eq!(j["state"], "finalized");
    assert_eq!(j["attempts"], 1, "the lease never lapsed");
    assert_eq!(j["epoch"], 1);
}

#[test]
fn failed_job_is_retried_by_the_operator() {
    let env = Env::new();
    let o = Origin::start([("here.pdf".to_owned(), content(1, 1000))]).unwrap();
    env.plan(&[job("w", "late", &o.url("/f/late.pdf"))]);
    let out = env.run_cmd().output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "finished with a failed job: {}",
        text(&out)
    );
    let j = env.show("w/late");
    assert_eq!(j["state"], "failed");
    assert!(
        j["last_error"].as_str().unwrap().starts_with("http_404"),
        "{j}"
    );
    assert_eq!(env.status()["failures_by_reason"]["http_404"], 1);
    o.put("late.pdf", content(9, 4000));
    let r = env.idem().args(["retry", "--failed"]).output().unwrap();
    assert!(r.status.success(), "{}", text(&r));
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.show("w/late")["state"], "finalized");
}

/// One job per fault mode; each ends where it must.
#[test]
fn every_fault_mode_ends_correctly() {
    let env = Env::new();
    let names = [
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o",
    ];
    let o = Origin::start(
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("{n}.pdf"), content(i as u64 + 100, 40_000 + i))),
    )
    .unwrap();
    o.put("big.pdf", content(5, 300_000));
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        ("trunc", "/trunc/a.pdf?fail=1".into(), "finalized", None),
        ("reset", "/reset/b.pdf?fail=2".into(), "finalized", None),
        (
            "503",
            "/status/503/c.pdf?fail=1&retry_after=1".into(),
            "finalized",
            None,
        ),
        (
            "429",
            "/status/429/d.pdf?fail=2&retry_after=0".into(),
            "finalized",
            None,
        ),
        ("redirects", "/redirect/3/e.pdf".into(), "finalized", None),
        ("loop", "/loop/f.pdf".into(), "failed", Some("redirects")),
        ("private", "/private/g.pdf".into(), "failed", Some("policy")),
        ("nohead", "/nohead/h.pdf".into(), "finalized", None),
        ("norange", "/norange/i.pdf".into(), "finalized", None),
        ("slow", "/slow/j.pdf?ms=2".into(), "finalized", None),
        (
            "always-503",
            "/status/503/k.pdf?retry_after=0".into(),
            "failed",
            Some("http_503"),
        ),
        ("gone", "/f/nothing.pdf".into(), "failed", Some("http_404")),
        ("too-big", "/f/big.pdf".into(), "failed", Some("too_large")),
        ("changing", "/changing/l.pdf".into(), "finalized", None),
        ("chunked", "/chunked/o.pdf".into(), "finalized", None),
    ];
    let mut lines: Vec<_> = cases
        .iter()
        .map(|(id, path, _, _)| job("w", id, &o.url(path)))
        .collect();
    lines.push(json!({"work_id": "w", "artifact_id": "wrong-type", "url": o.url("/type/m.pdf"), "content_type": "application/pdf"}));
    lines.push(json!({"work_id": "w", "artifact_id": "bad-digest", "url": o.url("/f/n.pdf"), "sha256": "00".repeat(32)}));
    let p = env.write_plan(&lines);
    let plan = env
        .idem()
        .args(["plan", "--max-attempts", "3"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}", text(&plan));
    let out = env
        .run_cmd()
        .args(["--max-bytes", "200000", "--concurrency", "8"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "some jobs fail by design: {}",
        text(&out)
    );
    let mut expect: Vec<(&str, &str, Option<&str>)> =
        cases.iter().map(|(id, _, st, r)| (*id, *st, *r)).collect();
    expect.push(("wrong-type", "failed", Some("policy")));
    expect.push(("bad-digest", "failed", Some("digest_mismatch")));
    for (id, state, reason) in expect {
        let j = env.show(&format!("w/{id}"));
        assert_eq!(j["state"], state, "{id}: {j}");
        if let Some(r) = reason {
            let e = j["last_error"].as_str().unwrap_or("");
            assert!(
                e.starts_with(r),
                "{id}: last_error {e:?} should start with {r}"
            );
        }
    }
    // The private redirect was refused before any connection: the origin saw
    // only the redirect requests themselves.
    assert!(o.count("/private/g.pdf") >= 1);
    // Permanent failures are not retried: one HEAD each.
    assert_eq!(o.count("/f/nothing.pdf"), 1);
    // A small body sent without a length is held all the same: one GET.
    assert_eq!(o.gets("/chunked/o.pdf"), 1);
    assert_eq!(check_blobs(&env.out), 10);
    let r = env.idem().args(["reconcile", "--json"]).output().unwrap();
    assert!(r.status.success(), "{}", text(&r));
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
}

#[test]
fn a_trickling_server_is_cut_off_by_the_minimum_speed() {
    let env = Env::new();
    let o = Origin::start([("trickle.pdf".to_owned(), content(8, 64 * 1024))]).unwrap();
    // 1 KiB every 300 ms: about 3.4 KB/s, never idle long enough for the read timeout.
    let p = env.write_plan(&[job("w", "t", &o.url("/slow/trickle.pdf?ms=300"))]);
    assert!(env
        .idem()
        .args(["plan", "--max-attempts", "1"])
        .arg(&p)
        .output()
        .unwrap()
        .status
        .success());
    let out = env
        .run_cmd()
        .args(["--min-speed", "8K", "--min-speed-window", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let j = env.show("w/t");
    assert_eq!(j["state"], "failed");
    let e = j["last_error"].as_str().unwrap();
    assert!(
        e.starts_with("timeout") && e.contains("below the minimum"),
        "{e}"
    );
}

#[test]
fn sizes_take_units_and_the_cap_applies_by_default_flag() {
    let env = Env::new();
    let o = Origin::start([("big.pdf".to_owned(), content(2, 3 << 20))]).unwrap();
    env.plan(&[job("w", "big", &o.url("/f/big.pdf"))]);
    let out = env.run_cmd().args(["--max-bytes", "1M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(env.show("w/big")["last_error"]
        .as_str()
        .unwrap()
        .starts_with("too_large"));
    let bad = env
        .run_cmd()
        .args(["--max-bytes", "lots"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a bad size is a usage error");
}

#[test]
fn slo_check_passes_a_good_ledger_and_flags_a_breach() {
    let env = Env::new();
    let o = origin(10, 5_000);
    let lines: Vec<_> = (0..10)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/doc-{i}.pdf"))))
        .collect();
    env.plan(&lines);
    assert!(env.run_cmd().output().unwrap().status.success());
    let ok = env
        .idem()
        .args(["slo", "check", "--json", "--window", "1h"])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let r = json_of(&ok);
    assert_eq!(r["ok"], true);
    let success = r["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "job_success")
        .unwrap()
        .clone();
    assert_eq!(
        (success["good"].as_u64(), success["total"].as_u64()),
        (Some(10), Some(10))
    );
    // One failure in eleven is 91%: below 99.5%.
    env.plan(&[job("w", "gone", &o.url("/f/nothing.pdf"))]);
    let _ = env.run_cmd().output().unwrap();
    let bad = env
        .idem()
        .args(["slo", "check", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(4),
        "a breach exits 4: {}",
        text(&bad)
    );
    let r = json_of(&bad);
    let success = r["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "job_success")
        .unwrap()
        .clone();
    assert_eq!(success["status"], "breach");
    let lease = r["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "lease_acquisition_latency")
        .unwrap()
        .clone();
    assert_eq!(lease["status"], "not_in_ledger");
}

#[test]
fn per_host_rate_spaces_requests_out() {
    let env = Env::new();
    let o = origin(6, 1_000);
    let lines: Vec<_> = (0..6)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/doc-{i}.pdf"))))
        .collect();
    env.plan(&lines);
    // 12 requests (a HEAD and a GET each, asked for with --head) at 10 per
    // second cannot take less than 1.1 s, however fast the machine.
    let started = std::time::Instant::now();
    let out = env
        .run_cmd()
        .args([
            "--per-host-rate",
            "10",
            "--concurrency",
            "6",
            "--per-host",
            "6",
            "--head",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(o.total(), 12);
}

#[test]
fn the_demo_converges() {
    let env = Env::new();
    let dir = env.path("demo");
    let out = std::process::Command::new(crate::support::IDEM)
        .args(["demo", "--json", "--artifacts", "60", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r = json_of(&out);
    assert_eq!(r["requests_on_rerun"], 0);
    assert_eq!(r["partial_files_left"], 0);
    assert!(r["verified"].as_u64().unwrap() > 40, "{r}");
    assert_eq!(
        crate::support::terminal(&r["status"]),
        r["status"]["total"].as_u64().unwrap()
    );
}

/// TLS is always verified: a self-signed certificate is refused, and the
/// job fails with a reason that names the certificate problem.
#[test]
fn an_unverifiable_certificate_is_refused() {
    let env = Env::new();
    let dir = env.path("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let gen = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output();
    if !gen.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: openssl is needed to make a self-signed certificate");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "import http.server, ssl\n\
         s = http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('{}', '{}')\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let Ok(mut server) = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("skipped: python3 is needed for the TLS origin");
        return;
    };
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && started.elapsed().as_secs() < 10
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let p = env.write_plan(&[job(
        "w",
        "tls",
        &format!("https://127.0.0.1:{port}/cert.pem"),
    )]);
    assert!(env
        .idem()
        .args(["plan", "--max-attempts", "5"])
        .arg(&p)
        .output()
        .unwrap()
        .status
        .success());
    let out = env.run_cmd().output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let j = env.show("w/tls");
    assert_eq!(j["state"], "failed");
    // Several attempts were allowed; a refused certificate uses only one.
    let e = j["last_error"].as_str().unwrap();
    assert!(e.starts_with("policy") && e.contains("TLS refused"), "{e}");
    assert_eq!(j["attempts"], 1, "not retried");
    assert!(
        std::fs::read_dir(env.out.join("blobs/sha256"))
            .unwrap()
            .next()
            .is_none(),
        "nothing published"
    );
}

/// A URL's password and token-like query values are fetched with but never
/// shown: not in plan or run output, events, `show`, `status`, `export`,
/// the stored error of a failed job, or a key conflict's report.
#[test]
fn secrets_in_urls_are_used_but_never_shown() {
    let env = Env::new();
    let o = Origin::start([("ok.pdf".to_owned(), content(3, 5000))]).unwrap();
    let with_secrets = |path: &str, q: &str| {
        o.url(path)
            .replacen("http://", "http://reader:s3cr3tpw@", 1)
            + q
    };
    let ok = with_secrets("/f/ok.pdf", "?id=7&token=t0k3nt0k3n");
    let gone = with_secrets("/f/gone.pdf", "?api_key=k3yk3yk3y");
    let events = env.path("events.jsonl");
    let mut shown = Vec::new();
    let p = env.write_plan(&[job("w", "ok", &ok), job("w", "gone", &gone)]);
    let plan = env
        .idem()
        .arg("plan")
        .arg(&p)
        .arg("--events")
        .arg(&events)
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}", text(&plan));
    shown.push(text(&plan));
    // The same job with another secret: a conflict, reported without either.
    let other = with_secrets("/f/ok.pdf", "?id=7&token=0th3r0th3r");
    let p2 = env.path("conflict.jsonl");
    std::fs::write(&p2, format!("{}\n", job("w", "ok", &other))).unwrap();
    let conflict = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p2)
        .output()
        .unwrap();
    assert_eq!(conflict.status.code(), Some(3), "{}", text(&conflict));
    shown.push(text(&conflict));
    let run = env.run_cmd().arg("--events").arg(&events).output().unwrap();
    assert_eq!(run.status.code(), Some(3), "one job fails: {}", text(&run));
    shown.push(text(&run));
    let j = env.show("w/ok");
    assert_eq!(j["state"], "finalized", "fetched with its secrets: {j}");
    let want = format!(
        "{}?id=7&token=***",
        o.url("/f/ok.pdf").replacen("http://", "http://***@", 1)
    );
    assert_eq!(j["url"], want.as_str());
    let g = env.show("w/gone");
    assert_eq!(g["state"], "failed");
    assert!(
        g["last_error"].as_str().unwrap().contains("api_key=***"),
        "{g}"
    );
    shown.push(j.to_string());
    shown.push(g.to_string());
    shown.push(env.status().to_string());
    for args in [
        vec!["show", "w/gone"],
        vec!["export"],
        vec!["export", "--format", "csv"],
    ] {
        let out = env.idem().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        shown.push(text(&out));
    }
    shown.push(std::fs::read_to_string(&events).unwrap());
    let all = shown.join("\n");
    assert!(all.contains("***@"), "the URLs are shown, redacted");
    for secret in ["s3cr3tpw", "t0k3nt0k3n", "k3yk3yk3y", "0th3r0th3r"] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
    // The origin saw the real thing: the credentials and the token.
    assert_eq!(o.gets("/f/ok.pdf?id=7&token=t0k3nt0k3n"), 1);
}

/// A follower repairs as it goes: a blob deleted from the store while
/// `idem run --follow` runs is found by its periodic reconcile, and the job
/// fetched and stored again, without a restart.
#[test]
fn a_follower_repairs_what_goes_missing() {
    let env = Env::new();
    let o = origin(2, 20_000);
    env.plan(&[
        job("w", "a0", &o.url("/f/doc-0.pdf")),
        job("w", "a1", &o.url("/f/doc-1.pdf")),
    ]);
    let mut child = env
        .run_cmd()
        .args(["--follow", "--reconcile-every", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count(&env.status(), "finalized") < 2 {
        assert!(std::time::Instant::now() < deadline, "never finished");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let path = env.out.join(env.show("w/a0")["path"].as_str().unwrap());
    std::fs::remove_file(&path).unwrap();
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    assert_eq!(env.show("w/a0")["state"], "finalized");
    assert_eq!(o.gets("/f/doc-0.pdf"), 2, "fetched again once");
    assert_eq!(check_blobs(&env.out), 2);
}
