//! The CLI's contract: help that teaches, JSON shapes, exit codes, and bad
//! input refused with a message that names the line or the file.

use crate::support::{job, json_of, text, Env, IDEM};
use std::process::Command;

#[test]
fn help_is_stable() {
    for args in [
        vec!["--help"],
        vec!["plan", "--help"],
        vec!["run", "--help"],
        vec!["status", "--help"],
    ] {
        let out = Command::new(IDEM).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let name = format!("help_{}", args.join("_").replace("--", ""));
        insta::assert_snapshot!(name, String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = Command::new(IDEM)
        .args(["run", "--concurency", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurency"));
    let out = Command::new(IDEM)
        .args(["run", "--concurrency", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn contradictory_durability_flags_are_a_usage_error() {
    let out = Command::new(IDEM)
        .args(["status", "--strict-sync", "--unsafe-fast-sync"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--strict-sync") && err.contains("--unsafe-fast-sync"),
        "{err}"
    );
}

#[test]
fn malformed_lines_are_named_and_skipped() {
    let env = Env::new();
    let p = env.path("mixed.jsonl");
    std::fs::write(
        &p,
        concat!(
            "{\"work_id\":\"w\",\"artifact_id\":\"ok1\",\"url\":\"https://example.org/1\"}\n",
            "this is not json\n",
            "{\"work_id\":\"w\",\"artifact_id\":\"noturl\",\"url\":\"ftp://example.org/x\"}\n",
            "{\"work_id\":\"w\",\"url\":\"https://example.org/3\"}\n",
            "\n",
            "{\"work_id\":\"w\",\"artifact_id\":\"ok2\",\"url\":\"https://example.org/2\",\"sha256\":\"xyz\"}\n",
            "{\"work_id\":\"w\",\"artifact_id\":\"ok3\",\"url\":\"https://example.org/3\"}\n",
        ),
    )
    .unwrap();
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let r = json_of(&out);
    assert_eq!(r["planned"], 2);
    assert_eq!(r["rejected"], 4);
    let lines: Vec<u64> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 3, 4, 6]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mixed.jsonl:2:"), "{stderr}");
    assert!(
        stderr.contains("mixed.jsonl:3:") && stderr.contains("ftp"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mixed.jsonl:4:") && stderr.contains("artifact_id"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mixed.jsonl:6:") && stderr.contains("sha256"),
        "{stderr}"
    );
    // --strict applies nothing.
    let env2 = Env::new();
    let out = env2
        .idem()
        .args(["plan", "--strict"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!env2.db.exists(), "strict mode created no ledger");
}

#[test]
fn binary_and_oversized_lines_are_named_not_fatal() {
    let env = Env::new();
    let p = env.path("odd.jsonl");
    let mut data = Vec::new();
    data.extend_from_slice(
        b"{\"work_id\":\"w\",\"artifact_id\":\"a\",\"url\":\"https://example.org/a\"}\n",
    );
    data.extend_from_slice(b"\xff\xfe not utf-8\n");
    data.extend_from_slice(&vec![b'x'; 2 << 20]);
    data.extend_from_slice(
        b"\n{\"work_id\":\"w\",\"artifact_id\":\"b\",\"url\":\"https://example.org/b\"}\n",
    );
    std::fs::write(&p, data).unwrap();
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let r = json_of(&out);
    assert_eq!(r["planned"], 2);
    let errs: Vec<(u64, String)> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0].0, 2);
    assert!(errs[0].1.contains("UTF-8"));
    assert_eq!(errs[1].0, 3);
    assert!(errs[1].1.contains("longer than"));
}

#[test]
fn csv_input_and_stdin() {
    let env = Env::new();
    let p = env.path("jobs.csv");
    std::fs::write(&p, "work_id,artifact_id,url,sha256\nw,a1,https://example.org/1,\nw,a2,https://example.org/2,\nw,,https://example.org/3,\n").unwrap();
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    let r = json_of(&out);
    assert_eq!(r["planned"], 2, "{}", text(&out));
    assert_eq!(r["errors"][0]["line"], 4);
    let mut child = env
        .idem()
        .args(["plan", "--json", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"{\"work_id\":\"w\",\"artifact_id\":\"a3\",\"url\":\"https://example.org/3\"}\n",
        )
        .unwrap();
    let r = json_of(&child.wait_with_output().unwrap());
    assert_eq!(r["planned"], 1);
}

#[test]
fn key_conflict_is_reported_with_both_urls_and_not_applied() {
    let env = Env::new();
    env.plan(&[job("w", "a", "https://example.org/one.pdf")]);
    let p = env.write_plan(&[job("w", "a", "https://example.org/two.pdf")]);
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let r = json_of(&out);
    assert_eq!(r["conflicts"], 1);
    assert_eq!(
        r["conflict_details"][0]["existing_url"],
        "https://example.org/one.pdf"
    );
    assert_eq!(
        r["conflict_details"][0]["proposed_url"],
        "https://example.org/two.pdf"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("one.pdf") && stderr.contains("two.pdf"),
        "{stderr}"
    );
    assert_eq!(env.show("w/a")["url"], "https://example.org/one.pdf");
}

#[test]
fn missing_files_and_foreign_ledgers_are_refused() {
    let env = Env::new();
    let out = env
        .idem()
        .args(["plan", "/no/such/file.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/no/such/file.jsonl"),
        "{}",
        text(&out)
    );
    let notes = env.path("notes.txt");
    std::fs::write(&notes, "my notes\n").unwrap();
    let out = Command::new(IDEM)
        .arg("--db")
        .arg(&notes)
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("notes.txt") && stderr.contains("not an idem ledger"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "my notes\n",
        "left untouched"
    );
    let out = env.idem().args(["show", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn status_json_shape() {
    let env = Env::new();
    env.plan(&[
        job("w", "a", "https://example.org/1"),
        job("w", "b", "https://example.org/2"),
    ]);
    let st = env.status();
    let mut keys: Vec<&String> = st.as_object().unwrap().keys().collect();
    keys.sort();
    insta::assert_snapshot!(format!(
        "{keys:?}\n{}",
        serde_json::to_string_pretty(&st["by_state"]).unwrap()
    ));
    assert_eq!(st["total"], 2);
    assert_eq!(st["due_now"], 2);
}

#[test]
fn export_manifest_shapes() {
    let env = Env::new();
    env.plan(&[job("w", "a", "https://example.org/1")]);
    let out = env.idem().args(["export"]).output().unwrap();
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let mut keys: Vec<&String> = line.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "artifact_id",
            "attempts",
            "job_key",
            "last_error",
            "path",
            "served_url",
            "sha256",
            "size",
            "state",
            "url",
            "work_id"
        ]
    );
    let out = env
        .idem()
        .args(["export", "--format", "csv"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(
            "work_id,artifact_id,url,job_key,state,sha256,size,path,attempts,last_error,served_url\n"
        ),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2);
}

/// docs/cli.md is generated from the CLI's own help; this keeps it true.
/// Regenerate with `IDEM_UPDATE_DOCS=1 cargo test -p idem-cli --test it cli_reference`.
#[test]
fn cli_reference_is_current() {
    let mut md = String::from(
        "# idem CLI reference\n\n<!-- Generated from `idem --help` by the test `cli_reference_is_current`; do not edit. -->\n\n",
    );
    let commands: [&[&str]; 13] = [
        &[],
        &["plan"],
        &["run"],
        &["status"],
        &["show"],
        &["reconcile"],
        &["verify"],
        &["retry"],
        &["cancel"],
        &["export"],
        &["slo", "check"],
        &["copy-ledger"],
        &["demo"],
    ];
    for cmd in commands {
        let out = Command::new(IDEM).args(cmd).arg("--help").output().unwrap();
        assert!(out.status.success());
        let title = if cmd.is_empty() {
            "idem".to_owned()
        } else {
            format!("idem {}", cmd.join(" "))
        };
        md.push_str(&format!(
            "## `{title}`\n\n```text\n{}```\n\n",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
    if std::env::var_os("IDEM_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &md).unwrap();
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(current == md, "docs/cli.md is stale: run `IDEM_UPDATE_DOCS=1 cargo test -p idem-cli --test it cli_reference`");
}

/// The structure of a JSON value: keys and value types, with values
/// (timestamps, keys, digests) left out so the snapshot is stable.
fn shape(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let t = match v {
                    Value::Object(_) => "object",
                    Value::Array(_) => "array",
                    Value::String(_) => "string",
                    Value::Number(_) => "number",
                    Value::Bool(_) => "bool",
                    Value::Null => "null",
                };
                out.push_str(&format!("{pad}{k}: {t}\n"));
                match v {
                    Value::Object(_) => shape(v, indent + 1, out),
                    Value::Array(a) if a.first().is_some_and(Value::is_object) => {
                        shape(&a[0], indent + 1, out)
                    }
                    _ => {}
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

#[test]
fn json_output_shapes() {
    let env = Env::new();
    let o =
        idem_origin::Origin::start([("a.pdf".to_owned(), idem_origin::content(1, 5000))]).unwrap();
    let p = env.write_plan(&[
        job("w", "a", &o.url("/f/a.pdf")),
        job("w", "b", &o.url("/f/gone.pdf")),
    ]);
    let mut all = String::new();
    let mut add = |name: &str, out: std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: {e}: {}", text(&out)));
        all.push_str(&format!("== {name}\n"));
        shape(&v, 1, &mut all);
    };
    add(
        "plan --json",
        env.idem()
            .args(["plan", "--json"])
            .arg(&p)
            .output()
            .unwrap(),
    );
    add("run --json", env.run_cmd().output().unwrap());
    add(
        "status --json",
        env.idem().args(["status", "--json"]).output().unwrap(),
    );
    add(
        "show --json",
        env.idem().args(["show", "--json", "w/a"]).output().unwrap(),
    );
    add(
        "reconcile --json",
        env.idem().args(["reconcile", "--json"]).output().unwrap(),
    );
    add(
        "retry --json",
        env.idem()
            .args(["retry", "--json", "--failed"])
            .output()
            .unwrap(),
    );
    add(
        "slo check --json",
        env.idem()
            .args(["slo", "check", "--json"])
            .output()
            .unwrap(),
    );
    let line = env.idem().args(["export"]).output().unwrap();
    let first = line.stdout.split(|b| *b == b'\n').next().unwrap().to_vec();
    add(
        "export (one line)",
        std::process::Output {
            stdout: first,
            ..line
        },
    );
    insta::assert_snapshot!(all);
}

/// An output directory that cannot be used is named, with the reason given
/// once, and the run stops before touching the ledger's jobs.
#[test]
fn an_unusable_output_directory_is_named_once() {
    let env = Env::new();
    env.plan(&[job("w", "a", "https://example.org/1")]);
    let file = env.path("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(IDEM)
        .arg("--db")
        .arg(&env.db)
        .arg("--out")
        .arg(&file)
        .args(["run", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not-a-dir"), "{stderr}");
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");
    assert_eq!(
        env.status()["by_state"]["planned"],
        1,
        "the job is untouched"
    );
}

#[test]
fn durations_take_units_and_bare_numbers_keep_their_unit() {
    let env = Env::new();
    let out = env
        .idem()
        .args([
            "run",
            "--json",
            "--lease-ttl",
            "2m",
            "--backoff-base-ms",
            "50ms",
            "--backoff-cap-ms",
            "1s",
        ])
        .args([
            "--read-timeout",
            "30s",
            "--reconcile-every",
            "0",
            "--reuse-max-age",
            "1d",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env
        .idem()
        .args(["prune", "--json", "--older-than", "7d"])
        .output()
        .unwrap();
    assert_eq!(json_of(&out)["older_than_s"], 604_800, "{}", text(&out));
    let out = env
        .idem()
        .args(["prune", "--json", "--older-than", "3600"])
        .output()
        .unwrap();
    assert_eq!(
        json_of(&out)["older_than_s"],
        3600,
        "a bare number is still seconds"
    );
    for bad in [
        ["--lease-ttl", "0s"],
        ["--lease-ttl", "2d"],
        ["--read-timeout", "1500ms"],
        ["--backoff-cap-ms", "soon"],
    ] {
        let out = env.idem().arg("run").args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
    }
}
