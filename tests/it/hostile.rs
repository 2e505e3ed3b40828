//! What a hostile tester tried: files planted in the output tree, damaged
//! parts and ledgers, misspelt input, servers that declare too little or
//! too much, closed pipes, full disks, dead owners. Each check drives the
//! real binary.

use crate::crash::{is_root, kill_mid_stream, signal};
use crate::support::{check_blobs, job, json_of, last_op, leftovers, text, Env, IDEM};
use idem_core::{job_key_of, Digest32};
use idem_origin::{content, Origin};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn sha(b: &[u8]) -> String {
    Digest32::of(b).to_hex()
}

fn blob_path(out: &Path, body: &[u8]) -> PathBuf {
    let h = sha(body);
    out.join("blobs/sha256")
        .join(&h[..2])
        .join(&h[2..4])
        .join(&h)
}

/// `idem plan` with extra arguments; returns its output.
fn plan_with(env: &Env, lines: &[serde_json::Value], args: &[&str]) -> std::process::Output {
    let p = env.write_plan(lines);
    env.idem().arg("plan").args(args).arg(&p).output().unwrap()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Job B, with the URL of a finalized job A, is checked against its own
/// expected digest and type: it is reused only when they hold.
#[test]
fn reuse_by_url_checks_each_jobs_own_expectations() {
    let env = Env::new();
    let body = content(1, 40_000);
    let o = Origin::start([("a.pdf".to_owned(), body.clone())]).unwrap();
    let url = o.url("/f/a.pdf");
    env.plan(&[job("w", "first", &url)]);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let with = |a: &str, k: &str, v: &str| {
        let mut j = job("w", a, &url);
        j[k] = json!(v);
        j
    };
    let lines = [
        with("right-sha", "sha256", &sha(&body)),
        with("wrong-sha", "sha256", &sha(b"other bytes")),
        with("right-type", "content_type", "application/pdf"),
        with("wrong-type", "content_type", "text/html"),
    ];
    let p = plan_with(&env, &lines, &["--max-attempts", "1"]);
    assert!(p.status.success(), "{}", text(&p));
    let out = env.run_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    for (a, state) in [
        ("right-sha", "skipped_duplicate"),
        ("right-type", "skipped_duplicate"),
        ("wrong-sha", "failed"),
        ("wrong-type", "failed"),
    ] {
        assert_eq!(env.show(&format!("w/{a}"))["state"], state, "w/{a}");
    }
    let e = env.show("w/wrong-sha")["last_error"].to_string();
    assert!(e.contains("digest_mismatch"), "{e}");
    let e = env.show("w/wrong-type")["last_error"].to_string();
    assert!(e.contains("policy") && e.contains("text/html"), "{e}");
    // The jobs that had to be checked were asked for again: the wrong type
    // refused from the GET's headers, the wrong digest after its body.
    assert_eq!(o.gets("/f/a.pdf"), 3);
}

/// A file idem did not write, sitting at a blob's address, is not taken
/// for the content: it is moved aside and replaced. A blob replaced later
/// by a file of another size is re-queued by the reconciler; one of the
/// same size but other bytes is found by `idem verify`.
#[test]
fn files_planted_at_blob_addresses_are_never_trusted() {
    let env = Env::new();
    let body = content(2, 30_000);
    let o = Origin::start([("b.pdf".to_owned(), body.clone())]).unwrap();
    let dest = blob_path(&env.out, &body);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, b"planted").unwrap();
    env.plan(&[job("w", "b", &o.url("/f/b.pdf"))]);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/b");
    assert_eq!(j["state"], "finalized", "{j}");
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let aside: Vec<_> = std::fs::read_dir(env.out.join("quarantine"))
        .expect("a quarantine directory")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(aside, vec![b"planted".to_vec()]);

    let replace = |bytes: &[u8]| {
        std::fs::remove_file(&dest).unwrap();
        std::fs::write(&dest, bytes).unwrap();
    };
    replace(b"shorter");
    let r = env
        .idem()
        .args(["reconcile", "--blobs", "--json"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(json_of(&r)["blobs_missing_requeued"], 1, "{}", text(&r));
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), body);

    let mut same_size = body.clone();
    same_size[100] ^= 0xff;
    replace(&same_size);
    let v = env.idem().args(["verify", "--json"]).output().unwrap();
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let report = json_of(&v);
    assert_eq!(report["ledger"]["ok"], true);
    assert_eq!(
        report["blobs"]["bad"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    let v = env.idem().args(["verify", "--repair"]).output().unwrap();
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let v = env.idem().args(["verify"]).output().unwrap();
    assert!(v.status.success(), "{}", text(&v));
    assert_eq!(check_blobs(&env.out), 1);
}

fn etag_of(o: &Origin, target: &str) -> String {
    let resp = idem_origin::raw_get(o.addr(), target).unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .expect("an ETag")
        .trim()
        .to_owned()
}

/// Links planted at a part's or a sidecar's name (names anyone can
/// compute from a job's identity) are never followed: the files they point
/// to are neither written, appended to, nor made read-only.
#[test]
fn links_planted_in_tmp_are_never_followed() {
    let env = Env::new();
    let (a, b) = (content(3, 400 * 1024), content(4, 400 * 1024));
    let o = Origin::start([
        ("a.pdf".to_owned(), a.clone()),
        ("b.pdf".to_owned(), b.clone()),
    ])
    .unwrap();
    let tmp = env.out.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let victim = env.path("victim");
    let victim2 = env.path("victim2");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::write(&victim2, b"precious too").unwrap();
    let before = mode(&victim);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let part_a = tmp.join(format!("{}.part", job_key_of("w", "a").to_hex()));
    std::os::unix::fs::symlink(&victim, &part_a).unwrap();
    // A sidecar that matches the part, so a resume would append to it.
    let sidecar = json!({"url": o.url("/f/a.pdf"), "etag": etag_of(&o, "/f/a.pdf"),
        "last_modified": null, "length": a.len(), "durable_bytes": 8,
        "written_bytes": 8, "boot_id": boot.trim()});
    std::fs::write(
        tmp.join(format!("{}.part.json", job_key_of("w", "a").to_hex())),
        sidecar.to_string(),
    )
    .unwrap();
    let sidecar_b = tmp.join(format!("{}.part.json", job_key_of("w", "b").to_hex()));
    std::os::unix::fs::symlink(&victim2, &sidecar_b).unwrap();
    env.plan(&[
        job("w", "a", &o.url("/f/a.pdf")),
        job("w", "b", &o.url("/f/b.pdf")),
    ]);
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&victim2).unwrap(), b"precious too");
    assert_eq!(
        mode(&victim),
        before,
        "never chmod what idem did not create"
    );
    assert_eq!(env.show("w/a")["sha256"], sha(&a));
    assert_eq!(env.show("w/b")["sha256"], sha(&b));
    assert_eq!(check_blobs(&env.out), 2);
}

/// A misspelt field or column is an error naming it and the field meant,
/// not a job run without the check it asked for.
#[test]
fn misspelled_fields_and_columns_are_refused_by_name() {
    let env = Env::new();
    let url = "https://example.org/x.pdf";
    let digest = "ab".repeat(32);
    let mut upper = job("w", "upper", url);
    upper["SHA256"] = json!(digest);
    let mut short = job("w", "short", url);
    short["sha"] = json!(digest);
    let lines = [job("w", "ok", url), upper, short];
    let out = plan_with(&env, &lines, &["--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let r = json_of(&out);
    assert_eq!(
        (r["planned"].as_u64(), r["rejected"].as_u64()),
        (Some(1), Some(2)),
        "{r}"
    );
    let errors = r["errors"].to_string();
    for want in [
        "unknown field `SHA256`",
        "unknown field `sha`",
        "did you mean `sha256`",
    ] {
        assert!(errors.contains(want), "{want}: {errors}");
    }
    assert_eq!(r["errors"][0]["line"], 2);
    // Unknown fields may be allowed, on purpose.
    let lax = Env::new();
    let out = plan_with(&lax, &lines[1..], &["--json", "--allow-unknown-fields"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_of(&out)["planned"], 2);

    let csv = env.path("plan.csv");
    std::fs::write(
        &csv,
        format!("work_id,artifact_id,url,SHA256\nw,c,{url},{digest}\n"),
    )
    .unwrap();
    let out = env.idem().arg("plan").arg(&csv).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plan.csv:1:") && err.contains("`SHA256`") && err.contains("`sha256`"),
        "{err}"
    );
    assert_eq!(env.status()["total"], 1, "nothing from the CSV was applied");
}

/// A kept part whose bytes changed after idem wrote them is not resumed:
/// the download starts over and the blob holds the server's bytes.
#[test]
fn a_damaged_part_is_restarted_not_resumed() {
    let env = Env::new();
    let body = content(5, 600 * 1024);
    let o = Origin::start([("d.pdf".to_owned(), body.clone())]).unwrap();
    env.plan(&[job("w", "d", &o.url("/f/d.pdf?ms=4"))]);
    kill_mid_stream(&env, 200 * 1024);
    let part = env
        .out
        .join("tmp")
        .join(format!("{}.part", job_key_of("w", "d").to_hex()));
    let mut bytes = std::fs::read(&part).unwrap();
    assert!(bytes.len() > 2000);
    bytes[1000] ^= 0xff;
    std::fs::write(&part, &bytes).unwrap();
    let out = env.run_cmd().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j = env.show("w/d");
    assert_eq!(j["sha256"], sha(&body), "the damaged bytes were resumed");
    assert_eq!(last_op(&j, "stream")["result"]["resumed_from"], 0, "{j}");
}

/// Waits for `child` to exit, killing it after `secs`.
fn wait_or_kill(mut child: std::process::Child, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A ledger path that is not a regular file is refused (a FIFO would hang,
/// a device would get files made beside it), and a ledger damaged inside
/// is refused by `run` and explained by `verify`.
#[test]
fn ledgers_that_are_not_sound_files_are_refused() {
    let env = Env::new();
    let out = std::process::Command::new(IDEM)
        .args(["--db", "/dev/null", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{}",
        text(&out)
    );
    let fifo = env.path("fifo.db");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let child = std::process::Command::new(IDEM)
        .arg("--db")
        .arg(&fifo)
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_kill(child, 20);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    let lines: Vec<_> = (0..3000)
        .map(|i| job("w", &format!("a{i}"), &format!("https://example.org/{i}")))
        .collect();
    env.plan(&lines);
    // Damage a page well inside the file, not its header.
    let mut db = std::fs::read(&env.db).unwrap();
    assert!(db.len() > 40 * 4096, "{}", db.len());
    for b in &mut db[20 * 4096..21 * 4096] {
        *b = 0x5a;
    }
    std::fs::write(&env.db, &db).unwrap();
    let run = env.run_cmd().output().unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("quick check"),
        "{}",
        text(&run)
    );
    let v = env.idem().args(["verify", "--json"]).output().unwrap();
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    assert_eq!(json_of(&v)["ledger"]["ok"], false);
}

/// The ledger (it holds URLs whole, secrets included) is its owner's only;
/// blobs lose their write bits but keep what the umask allows.
#[test]
fn the_ledger_is_private_and_blobs_follow_the_umask() {
    let env = Env::new();
    let o = Origin::start([("u.pdf".to_owned(), content(6, 5000))]).unwrap();
    env.plan(&[job("w", "u", &o.url("/f/u.pdf"))]);
    assert_eq!(mode(&env.db), 0o600);
    let cmd = format!(
        "umask 077; exec '{IDEM}' --db '{}' --out '{}' run --allow-loopback --json",
        env.db.display(),
        env.out.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let blob = blob_path(&env.out, &content(6, 5000));
    assert_eq!(
        mode(&blob),
        0o400,
        "read-only, and no more than the umask allows"
    );
    for side in ["-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{side}", env.db.display()));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

/// Secrets in shapes the first rules missed stay out of every output.
#[test]
fn secrets_in_other_shapes_are_never_shown() {
    let env = Env::new();
    let o = Origin::start([("s.pdf".to_owned(), content(7, 3000))]).unwrap();
    let urls = [
        o.url("/f/s.pdf?jwt=jwtjwtjwt"),
        o.url("/f/s.pdf?a=1;token=semisemi"),
        o.url("/f/s.pdf?next=https%3A%2F%2Fidp%2Fcb%3Ftoken%3Dnestednested"),
    ];
    let lines: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| job("w", &format!("s{i}"), u))
        .collect();
    let events = env.path("events.jsonl");
    let p = env.write_plan(&lines);
    let plan = env
        .idem()
        .arg("plan")
        .arg(&p)
        .arg("--events")
        .arg(&events)
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}", text(&plan));
    let run = env.run_cmd().arg("--events").arg(&events).output().unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let mut shown = vec![
        text(&plan),
        text(&run),
        std::fs::read_to_string(&events).unwrap(),
    ];
    for args in [
        vec!["show", "w/s0"],
        vec!["show", "w/s1"],
        vec!["show", "--json", "w/s2"],
        vec!["export"],
    ] {
        let out = env.idem().args(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        shown.push(text(&out));
    }
    let all = shown.join("\n");
    for secret in ["jwtjwtjwt", "semisemi", "nestednested"] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
}

/// IPv6 forms that reach a refused IPv4 address are refused by policy.
#[test]
fn ipv6_forms_of_refused_addresses_are_refused() {
    let env = Env::new();
    let o = Origin::start([("p.pdf".to_owned(), content(8, 3000))]).unwrap();
    let port = o.addr().port();
    let lines = [
        job(
            "w",
            "compat",
            &format!("http://[::127.0.0.1]:{port}/f/p.pdf"),
        ),
        job(
            "w",
            "6to4",
            &format!("http://[2002:a9fe:a9fe::1]:{port}/f/p.pdf"),
        ),
        job(
            "w",
            "sitelocal",
            &format!("http://[fec0::1]:{port}/f/p.pdf"),
        ),
        job(
            "w",
            "nat64",
            &format!("http://[64:ff9b:1::a00:1]:{port}/f/p.pdf"),
        ),
    ];
    let p = plan_with(&env, &lines, &["--max-attempts", "1"]);
    assert!(p.status.success(), "{}", text(&p));
    let out = env.run_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    for a in ["compat", "6to4", "sitelocal", "nat64"] {
        let j = env.show(&format!("w/{a}"));
        assert!(
            j["last_error"].as_str().unwrap().starts_with("policy:"),
            "{a}: {j}"
        );
    }
    assert_eq!(o.total(), 0);
}

/// A reader that closes stdout early ends the output, not the command.
#[test]
fn a_closed_stdout_ends_output_quietly() {
    let env = Env::new();
    let o = Origin::start([("c.pdf".to_owned(), content(9, 3000))]).unwrap();
    env.plan(&[job("w", "c", &o.url("/f/c.pdf"))]);
    let cmds = [
        env.run_cmd(),
        env.idem().arg("status").taken(),
        env.idem().args(["show", "w/c"]).taken(),
        env.idem().arg("export").taken(),
    ];
    for mut cmd in cmds {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{cmd:?}: {err}"
        );
    }
}

/// A command built through `&mut` builder calls, as a value.
trait Taken {
    fn taken(&mut self) -> std::process::Command;
}

impl Taken for std::process::Command {
    fn taken(&mut self) -> std::process::Command {
        std::mem::replace(self, std::process::Command::new(IDEM))
    }
}

/// Bad lines carrying megabytes are counted and shown cut, not echoed
/// whole or all kept in memory.
#[test]
fn huge_bad_lines_are_counted_and_cut() {
    let env = Env::new();
    let long = "a".repeat(1_000_000);
    let p = env.path("huge.jsonl");
    let mut text_in = String::new();
    for i in 0..150 {
        text_in.push_str(&json!({"work_id": "w", "artifact_id": format!("h{i}"), "url": format!("ftp://x/{long}")}).to_string());
        text_in.push('\n');
    }
    std::fs::write(&p, text_in).unwrap();
    let out = env
        .idem()
        .args(["plan", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "exit {:?}", out.status.code());
    assert!(
        out.stderr.len() < 200_000,
        "{} bytes of stderr",
        out.stderr.len()
    );
    assert!(
        out.stdout.len() < 200_000,
        "{} bytes of stdout",
        out.stdout.len()
    );
    assert_eq!(json_of(&out)["rejected"], 150);
}

/// A plan that fails on its second file still says what the first applied.
#[test]
fn a_plan_stopped_by_a_missing_file_reports_what_it_applied() {
    let env = Env::new();
    let lines: Vec<_> = (0..10)
        .map(|i| job("w", &format!("g{i}"), &format!("https://example.org/{i}")))
        .collect();
    let good = env.write_plan(&lines);
    let out = env
        .idem()
        .arg("plan")
        .arg(&good)
        .arg(env.path("missing.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("planned 10"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"),
        "{}",
        text(&out)
    );
    assert_eq!(env.status()["total"], 10);
}

/// Ids with control characters (terminal escapes) are refused at plan,
/// with the line named.
#[test]
fn control_characters_in_ids_are_refused_at_plan() {
    let env = Env::new();
    let lines = [
        job("w\u{1b}[2J", "a", "https://example.org/1"),
        job("w", "b\nc", "https://example.org/2"),
        job("w", "ok", "https://example.org/3"),
    ];
    let out = plan_with(&env, &lines, &["--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let r = json_of(&out);
    assert_eq!(r["planned"], 1);
    assert_eq!(r["errors"][0]["line"], 1);
    assert!(r["errors"].to_string().contains("control character"), "{r}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\u{1b}'));
}

/// An events file that cannot be written stops the command with an error
/// naming it, instead of losing every event silently.
#[test]
fn an_unwritable_events_file_is_an_error() {
    let env = Env::new();
    let o = Origin::start([("e.pdf".to_owned(), content(10, 3000))]).unwrap();
    let p = env.write_plan(&[job("w", "e", &o.url("/f/e.pdf"))]);
    let plan = env
        .idem()
        .arg("plan")
        .arg(&p)
        .args(["--events", "/dev/full"])
        .output()
        .unwrap();
    assert_eq!(plan.status.code(), Some(1), "{}", text(&plan));
    assert!(
        String::from_utf8_lossy(&plan.stderr).contains("cannot write events"),
        "{}",
        text(&plan)
    );
    let run = env
        .run_cmd()
        .args(["--events", "/dev/full"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("/dev/full"),
        "{}",
        text(&run)
    );
}

/// An expected type is not met by a server that declares none, nor by one
/// that declares two.
#[test]
fn expected_types_need_one_declared_type() {
    let env = Env::new();
    let o = Origin::start([("t.pdf".to_owned(), content(11, 3000))]).unwrap();
    let typed = |a: &str, path: &str| {
        let mut j = job("w", a, &o.url(path));
        j["content_type"] = json!("application/pdf");
        j
    };
    let lines = [
        typed("none", "/notype/t.pdf"),
        typed("two", "/twotypes/t.pdf"),
        typed("one", "/f/t.pdf"),
    ];
    let p = plan_with(&env, &lines, &["--max-attempts", "1"]);
    assert!(p.status.success(), "{}", text(&p));
    let out = env.run_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(env.show("w/one")["state"], "finalized");
    for a in ["none", "two"] {
        let j = env.show(&format!("w/{a}"));
        assert_eq!(j["state"], "failed", "{a}: {j}");
        assert!(
            j["last_error"].as_str().unwrap().starts_with("policy:"),
            "{j}"
        );
    }
}

/// `idem reconcile` frees the leases of a worker killed on this host at
/// once, not when they expire.
#[test]
fn reconcile_frees_a_killed_local_workers_leases() {
    let env = Env::new();
    let o = Origin::start([("k.pdf".to_owned(), content(12, 300 * 1024))]).unwrap();
    env.plan(&[job("w", "k", &o.url("/slow/k.pdf?ms=50"))]);
    let mut child = env
        .run_cmd()
        .args(["--lease-ttl", "600"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.status()["leases"]["live"] != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let r = env.idem().args(["reconcile", "--json"]).output().unwrap();
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(json_of(&r)["expired_leases"], 1, "{}", text(&r));
    assert_eq!(env.status()["leases"]["live"], 0);
}

/// A worker paused past its lease and fenced when it wakes removes the
/// part it was writing: nothing is left for a reconciler.
#[test]
fn a_fenced_worker_leaves_no_part_behind() {
    let env = Env::new();
    let o = Origin::start([("f.pdf".to_owned(), content(13, 300 * 1024))]).unwrap();
    env.plan(&[job("w", "f", &o.url("/slow/f.pdf?ms=8"))]);
    let a = env
        .run_cmd()
        .args(["--lease-ttl", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leftovers(&env.out).iter().all(|f| !f.ends_with(".part")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(a.id(), "-STOP");
    std::thread::sleep(Duration::from_millis(1500));
    let b = env.run_cmd().args(["--lease-ttl", "5"]).output().unwrap();
    assert!(b.status.success(), "{}", text(&b));
    signal(a.id(), "-CONT");
    let a_out = a.wait_with_output().unwrap();
    assert_eq!(json_of(&a_out)["run"]["fenced"], 1, "{}", text(&a_out));
    assert!(leftovers(&env.out).is_empty(), "{:?}", leftovers(&env.out));
    assert_eq!(check_blobs(&env.out), 1);
}

/// A local error no retry can get past (the output is read-only) fails the
/// job at once, without fetching its body again and again.
#[test]
fn a_read_only_output_fails_at_once() {
    let env = Env::new();
    let o = Origin::start([("r.pdf".to_owned(), content(14, 3000))]).unwrap();
    std::fs::create_dir_all(env.out.join("tmp")).unwrap();
    std::fs::create_dir_all(env.out.join("blobs/sha256")).unwrap();
    let out_dir = env.out.to_str().unwrap().to_owned();
    struct Unmount(Option<String>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = std::process::Command::new("umount").arg(p).status();
            }
        }
    }
    let mut guard = Unmount(None);
    if is_root() {
        // Root ignores permission bits; a read-only mount binds it too.
        let ok = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["--bind", &out_dir, &out_dir]) {
            eprintln!("skipped: cannot bind-mount here");
            return;
        }
        guard.0 = Some(out_dir.clone());
        assert!(ok(&["-o", "remount,bind,ro", &out_dir]));
    } else {
        for d in ["tmp", "blobs/sha256"] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(env.out.join(d), std::fs::Permissions::from_mode(0o555))
                .unwrap();
        }
    }
    let p = plan_with(
        &env,
        &[job("w", "r", &o.url("/f/r.pdf"))],
        &["--max-attempts", "4"],
    );
    assert!(p.status.success(), "{}", text(&p));
    let out = env.run_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let j = env.show("w/r");
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(j["last_error"].as_str().unwrap().starts_with("io:"), "{j}");
    assert_eq!(o.gets("/f/r.pdf"), 1);
    drop(guard);
}

/// A SHA-256 the server declares (`Repr-Digest`, or the older `Digest`) is
/// checked even when the plan gave none: a body that hashes otherwise is
/// corrupt, retried, and then failed as `digest_mismatch`.
#[test]
fn a_digest_the_server_declares_is_checked() {
    let env = Env::new();
    let o = Origin::start([
        ("small.pdf".to_owned(), content(15, 5000)),
        ("big.pdf".to_owned(), content(16, 400 * 1024)),
    ])
    .unwrap();
    let lines = [
        job("w", "small-right", &o.url("/f/small.pdf?digest=right")),
        job("w", "small-wrong", &o.url("/f/small.pdf?digest=wrong")),
        job(
            "w",
            "small-legacy",
            &o.url("/f/small.pdf?digest=legacy-wrong"),
        ),
        job("w", "big-right", &o.url("/f/big.pdf?digest=right")),
        job("w", "big-wrong", &o.url("/f/big.pdf?digest=wrong")),
    ];
    let p = plan_with(&env, &lines, &["--max-attempts", "2"]);
    assert!(p.status.success(), "{}", text(&p));
    let out = env.run_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    for a in ["small-right", "big-right"] {
        let j = env.show(&format!("w/{a}"));
        assert!(
            j["state"] == "finalized" || j["state"] == "skipped_duplicate",
            "{a}: {j}"
        );
    }
    for a in ["small-wrong", "small-legacy", "big-wrong"] {
        let j = env.show(&format!("w/{a}"));
        assert_eq!(j["state"], "failed", "{a}: {j}");
        let e = j["last_error"].as_str().unwrap();
        assert!(
            e.starts_with("digest_mismatch") && e.contains("declared by the server"),
            "{e}"
        );
        assert_eq!(j["attempts"], 2, "retried once: {j}");
    }
    assert_eq!(check_blobs(&env.out), 2);
}
