//! Observability for real: a run's `/metrics` passes `promtool check
//! metrics` and exposes the catalogue; the events log carries every event
//! from real transitions. Snapshots pin the exposition and the event shapes.

use crate::support::{job, text, Env};
use idem_origin::{content, Origin};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> Option<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    let body = s.split_once("\r\n\r\n")?.1.to_owned();
    Some(body)
}

/// `promtool check metrics` accepts `body`.
fn promtool_check_metrics(body: &str) {
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{body}",
        text(&out)
    );
}

fn have_promtool() -> bool {
    std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_run_serves_metrics_that_promtool_accepts_and_logs_every_event() {
    let env = Env::new();
    let o = Origin::start((0..6).map(|i| (format!("m{i}.pdf"), content(i + 1, 30_000)))).unwrap();
    o.put("dup.pdf", content(1, 30_000));
    env.plan(&[
        job("w", "a0", &o.url("/f/m0.pdf")),
        job("w", "a1", &o.url("/status/503/m1.pdf?fail=1&retry_after=0")),
        job("w", "a2", &o.url("/f/dup.pdf")),
        job("w", "a3", &o.url("/f/missing.pdf")),
        job("w", "a4", &o.url("/slow/m4.pdf?ms=40")),
        job("w", "a5", &o.url("/f/m5.pdf")),
    ]);
    // A conflict, for key_conflict.
    let p = env.write_plan(&[job("w", "a0", &o.url("/f/other.pdf"))]);
    let _ = env.idem().arg("plan").arg(&p).output();
    let port = free_port();
    let events = env.path("events.jsonl");
    let mut child = env
        .run_cmd()
        .args([
            "--follow",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--lease-ttl",
            "1",
        ])
        .arg("--events")
        .arg(&events)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until every job is terminal, then scrape once more.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut body = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        if let Some(b) = scrape(port) {
            body = b;
            let st = env.status();
            if crate::support::terminal(&st) == 6 {
                std::thread::sleep(Duration::from_millis(2500));
                body = scrape(port).unwrap_or(body);
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        body.contains("idem_jobs_finished_total"),
        "no metrics scraped: {body}"
    );
    // Every catalogue metric appears with its declared type.
    let types: BTreeMap<String, String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' ').map(|(n, t)| (n.to_owned(), t.to_owned())))
        .collect();
    for m in idem_telemetry_catalogue() {
        assert!(types.contains_key(m), "{m} missing from the exposition");
    }
    insta::assert_snapshot!(
        "exposition_types",
        types
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        body.contains("le=\"120\""),
        "an SLO threshold is a bucket edge"
    );
    assert!(
        body.contains("le=\"0.1\""),
        "an SLO threshold is a bucket edge"
    );
    if have_promtool() {
        promtool_check_metrics(&body);
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install promtool (.ci/run does)"
        );
        eprintln!(
            "skipped promtool check metrics: promtool not installed (apt-get install prometheus)"
        );
    }
    // The events log: every line is JSON with a timestamp; the real run
    // produced these kinds, each with a stable set of fields.
    let text = std::fs::read_to_string(&events).unwrap();
    let mut shapes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["timestamp"].as_i64().is_some(), "{line}");
        let name = v["event"].as_str().unwrap().to_owned();
        shapes
            .entry(name)
            .or_default()
            .extend(v.as_object().unwrap().keys().cloned());
    }
    for must in [
        "job_leased",
        "job_state_changed",
        "lease_renewed",
        "operation_started",
        "operation_completed",
        "duplicate_detected",
        "retry_scheduled",
        "job_failed",
        "lease_call",
    ] {
        assert!(
            shapes.contains_key(must),
            "no {must} event in {:?}",
            shapes.keys()
        );
    }
    let shown: Vec<String> = shapes
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect();
    insta::assert_snapshot!("event_shapes", shown.join("\n"));
}

fn idem_telemetry_catalogue() -> Vec<&'static str> {
    // Counters and gauges always appear (pre-registered or sampled);
    // histograms once observed, which this run does.
    vec![
        "idem_jobs_finished_total",
        "idem_leases_acquired_total",
        "idem_operations_completed_total",
        "idem_crash_recoveries_total",
        "idem_writes_fenced_total",
        "idem_downloaded_bytes_total",
        "idem_queue_jobs",
        "idem_queue_oldest_due_age_seconds",
        "idem_operation_duration_seconds",
        "idem_lease_acquire_duration_seconds",
        "idem_plan_to_finish_seconds",
        "idem_replays_total",
        "idem_retries_scheduled_total",
        "idem_jobs_failed_total",
        "idem_duplicates_total",
    ]
}

/// The value of every sample of `name` in a scrape, as (labels, value).
fn samples(body: &str, name: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series[name.len()..].to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The dashboard query over `metric`, as the generated dashboards have it.
fn dashboard_query(metric: &str) -> String {
    let queries = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../slo/dashboard-queries.yaml"),
    )
    .unwrap();
    queries
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .map(|e| e.trim_matches('\'').to_owned())
        .find(|e| e.contains(metric) && !e.contains("rate("))
        .unwrap_or_else(|| panic!("no dashboard query over {metric}"))
}

/// Two workers on one ledger both export its gauges; the dashboard's own
/// queries, evaluated by promtool over both scrapes, give the ledger's
/// totals once, not once per worker.
#[test]
fn two_workers_on_one_ledger_count_its_jobs_once_on_the_dashboard() {
    if !have_promtool() {
        assert!(std::env::var_os("CI").is_none(), "CI must install promtool");
        eprintln!("skipped: promtool not installed");
        return;
    }
    let env = Env::new();
    let n = 12;
    let o = Origin::start((0..n).map(|i| (format!("d{i}"), content(i + 3, 5_000)))).unwrap();
    let lines: Vec<_> = (0..n)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/d{i}"))))
        .collect();
    env.plan(&lines);
    let ports = [free_port(), free_port()];
    let mut workers: Vec<_> = ports
        .iter()
        .map(|p| {
            env.run_cmd()
                .args(["--follow", "--metrics-addr", &format!("127.0.0.1:{p}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = |st: &serde_json::Value| crate::support::count(st, "finalized") == n;
    while !finished(&env.status()) {
        assert!(Instant::now() < deadline, "the jobs never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both have sampled the finished ledger (they sample every 2 s).
    std::thread::sleep(Duration::from_millis(4_500));
    let bodies: Vec<String> = ports.iter().map(|p| scrape(*p).expect("scrape")).collect();
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let mut series = String::new();
    for (i, body) in bodies.iter().enumerate() {
        for metric in ["idem_queue_jobs", "idem_leases_live"] {
            let got = samples(body, metric);
            assert!(!got.is_empty(), "worker {i} exports {metric}");
            for (labels, value) in got {
                let labels = labels.replacen('{', &format!("{{instance=\"w{i}\","), 1);
                series.push_str(&format!(
                    "      - series: '{metric}{labels}'\n        values: '{value}'\n"
                ));
            }
        }
    }
    let jobs_query = dashboard_query("idem_queue_jobs");
    let live_query = dashboard_query("idem_leases_live");
    let st = env.status();
    let mut expected = String::new();
    for (state, count) in st["by_state"].as_object().unwrap() {
        expected.push_str(&format!(
            "          - labels: '{{state=\"{state}\"}}'\n            value: {count}\n"
        ));
    }
    let test = format!(
        "rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n      - expr: '{jobs_query}'\n        eval_time: 0m\n        exp_samples:\n{expected}      - expr: '{live_query}'\n        eval_time: 0m\n        exp_samples:\n          - labels: '{{}}'\n            value: 0\n"
    );
    let file = env.path("dashboard-test.yaml");
    std::fs::write(&file, &test).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{test}", text(&out));
}

/// A fresh worker's first scrape (nothing has happened yet) already has
/// every counter and gauge of the catalogue whose label values are known,
/// so rate() and absent() work from the start.
#[test]
fn a_fresh_worker_exports_every_counter_and_gauge_from_the_first_scrape() {
    let env = Env::new();
    env.plan(&[]);
    let port = free_port();
    let mut child = env
        .run_cmd()
        .args(["--follow", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The ledger gauges are sampled every 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Some(b) = scrape(port).filter(|b| b.contains("idem_leases_live{")) {
            break b;
        }
        assert!(Instant::now() < deadline, "no metrics served");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    // Label values that are open sets appear with their first event.
    let open = [
        "idem_state_transitions_total",
        "idem_retries_scheduled_total",
    ];
    let missing: Vec<&str> = idem_telemetry::CATALOGUE
        .iter()
        .filter(|m| m.kind != idem_telemetry::Kind::Histogram && !open.contains(&m.name))
        .map(|m| m.name)
        .filter(|name| {
            !body.lines().any(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missing from the first scrape: {missing:?}\n{body}"
    );
    assert!(body.contains("idem_jobs_failed_total{reason=\"poison\"} 0"));
}

/// A batch run shorter than any scrape interval keeps its metrics: the
/// textfile holds its final counts after it exits, in a form promtool
/// accepts.
#[test]
fn a_batch_run_leaves_its_final_metrics_in_a_textfile() {
    let env = Env::new();
    let o = Origin::start((0..5).map(|i| (format!("t{i}"), content(i + 9, 2_000)))).unwrap();
    let lines: Vec<_> = (0..5)
        .map(|i| job("w", &format!("a{i}"), &o.url(&format!("/f/t{i}"))))
        .collect();
    env.plan(&lines);
    let file = env.path("idem.prom");
    let out = env
        .run_cmd()
        .arg("--metrics-textfile")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let body = std::fs::read_to_string(&file).expect("the textfile is written");
    assert!(
        body.lines()
            .any(|l| l == "idem_jobs_finished_total{outcome=\"finalized\"} 5"),
        "{body}"
    );
    assert!(
        body.lines().any(|l| l.starts_with("idem_queue_jobs{")
            && l.contains("state=\"finalized\"")
            && l.ends_with(" 5")),
        "the ledger's final sample: {body}"
    );
    assert!(
        !env.path("idem.prom.tmp").exists(),
        "replaced atomically, nothing left beside it"
    );
    if have_promtool() {
        promtool_check_metrics(&body);
    }
}

/// `idem plan` has no server to scrape: its planned jobs and key conflicts
/// reach Prometheus through its textfile.
#[test]
fn plan_writes_planned_jobs_and_conflicts_to_a_textfile() {
    let env = Env::new();
    let file = env.path("plan.prom");
    let p = env.write_plan(&[
        job("w", "a", "https://example.org/a.pdf"),
        job("w", "b", "https://example.org/b.pdf"),
    ]);
    let out = env
        .idem()
        .arg("plan")
        .arg(&p)
        .arg("--metrics-textfile")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let p = env.write_plan(&[job("w", "a", "https://example.org/other.pdf")]);
    let _ = env
        .idem()
        .arg("plan")
        .arg(&p)
        .arg("--metrics-textfile")
        .arg(&file)
        .output()
        .unwrap();
    let body = std::fs::read_to_string(&file).unwrap();
    assert!(
        body.lines().any(|l| l == "idem_key_conflicts_total 1"),
        "{body}"
    );
    assert!(
        body.lines().any(|l| l.starts_with("idem_queue_jobs{")
            && l.contains("state=\"planned\"")
            && l.ends_with(" 2")),
        "{body}"
    );
}

/// Counts of an events file: (leases acquired, released, expired).
fn lease_events(path: &std::path::Path) -> (i64, i64, i64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut n = (0, 0, 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["event"].as_str() {
            Some("job_leased") => n.0 += 1,
            Some("lease_released") => {
                assert!(
                    ["finished", "failed", "stopped"].contains(&v["reason"].as_str().unwrap_or("")),
                    "{line}"
                );
                n.1 += 1;
            }
            Some("lease_expired") => n.2 += 1,
            _ => {}
        }
    }
    n
}

/// Every lease ends in exactly one event: over runs stopped by SIGTERM and
/// run to the end, leases acquired = released + expired + live; a SIGKILL
/// can lose at most the events of the moment it struck.
#[test]
fn every_lease_ends_in_exactly_one_event() {
    let env = Env::new();
    let n = 24;
    let o =
        Origin::start((0..n).map(|i| (format!("l{i}"), content(i as u64 + 17, 40_000)))).unwrap();
    let lines: Vec<_> = (0..n)
        .map(|i| {
            let url = match i % 4 {
                0 => o.url(&format!("/slow/l{i}?ms=15")),
                1 => o.url(&format!("/status/503/l{i}?fail=1&retry_after=0")),
                2 => o.url(&format!("/missing-{i}")),
                _ => o.url(&format!("/f/l{i}")),
            };
            job("w", &format!("a{i}"), &url)
        })
        .collect();
    env.plan(&lines);
    let run_until = |events: &std::path::Path, sig: Option<&str>| {
        let mut child = env
            .run_cmd()
            .args(["--concurrency", "4", "--events"])
            .arg(events)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if let Some(sig) = sig {
            std::thread::sleep(Duration::from_millis(700));
            crate::crash::signal(child.id(), sig);
        }
        let _ = child.wait();
    };
    let graceful = [env.path("e1.jsonl"), env.path("e2.jsonl")];
    run_until(&graceful[0], Some("-TERM"));
    run_until(&graceful[1], None);
    let st = env.status();
    assert_eq!(crate::support::terminal(&st), n as u64, "{st}");
    let (acq, rel, exp) = graceful
        .iter()
        .map(|p| lease_events(p))
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let live = st["leases"]["live"].as_i64().unwrap();
    assert!(acq > n as i64, "retries and the stop lease again: {acq}");
    assert_eq!(
        acq,
        rel + exp + live,
        "acquired {acq} released {rel} expired {exp} live {live}"
    );

    // Again from the start of a fresh ledger, killed with SIGKILL once.
    let env2 = Env::new();
    env2.plan(&lines);
    let files = [env2.path("k1.jsonl"), env2.path("k2.jsonl")];
    let run2 = |events: &std::path::Path, kill: bool| {
        let mut child = env2
            .run_cmd()
            .args(["--concurrency", "4", "--events"])
            .arg(events)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if kill {
            std::thread::sleep(Duration::from_millis(700));
            crate::crash::signal(child.id(), "-KILL");
        }
        let _ = child.wait();
    };
    run2(&files[0], true);
    run2(&files[1], false);
    let st = env2.status();
    assert_eq!(crate::support::terminal(&st), n as u64, "{st}");
    let (acq, rel, exp) = files
        .iter()
        .map(|p| lease_events(p))
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let ended = rel + exp + st["leases"]["live"].as_i64().unwrap();
    assert!(
        (acq - ended).abs() <= 4,
        "acquired {acq}, ended {ended}: off by more than the killed worker's in-flight jobs"
    );
}
