//! Reuse by URL revalidates: past `--reuse-max-age`, a job whose URL
//! another job finalized asks the server (a conditional GET with the
//! recorded validators) before it takes that blob.

use crate::support::{job, text, Env};
use idem_origin::{content, Origin};

fn run(env: &Env, max_age: &str) {
    let out = env
        .run_cmd()
        .args(["--reuse-max-age", max_age])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn sha(env: &Env, job: &str) -> String {
    env.show(job)["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn an_old_fetch_is_revalidated_and_a_changed_file_is_fetched_as_new() {
    let env = Env::new();
    let o = Origin::start([
        ("p.pdf".to_owned(), content(7, 40_000)),
        ("q.pdf".to_owned(), content(8, 40_000)),
    ])
    .unwrap();
    let url = o.url("/f/p.pdf");
    env.plan(&[job("w", "a", &url)]);
    run(&env, "86400");
    assert_eq!(o.gets("/f/p.pdf"), 1);

    // Fresh enough: reused with no request at all.
    env.plan(&[job("w", "fresh", &url)]);
    run(&env, "86400");
    assert_eq!(env.show("w/fresh")["state"], "skipped_duplicate");
    assert_eq!(
        o.gets("/f/p.pdf"),
        1,
        "a fresh fetch is reused without asking"
    );

    // Too old (any age is, at 0): asked, 304, reused.
    env.plan(&[job("w", "unchanged", &url)]);
    run(&env, "0");
    let j = env.show("w/unchanged");
    assert_eq!(j["state"], "skipped_duplicate", "{j}");
    assert_eq!(o.gets("/f/p.pdf"), 2, "one conditional GET");
    assert_eq!(sha(&env, "w/unchanged"), sha(&env, "w/a"));

    // The file changed behind the URL: the answer is the new content.
    o.put("p.pdf", content(9, 50_000));
    env.plan(&[job("w", "changed", &url)]);
    run(&env, "0");
    let j = env.show("w/changed");
    assert_eq!(j["state"], "finalized", "{j}");
    assert_eq!(
        o.gets("/f/p.pdf"),
        3,
        "the conditional GET's body was the download"
    );
    assert_ne!(sha(&env, "w/changed"), sha(&env, "w/a"));
    assert_eq!(j["size"], 50_000);

    // A server that gave no validators cannot be asked: fetched again.
    let noval = o.url("/noval/q.pdf");
    env.plan(&[job("w", "nv1", &noval)]);
    run(&env, "0");
    env.plan(&[job("w", "nv2", &noval)]);
    run(&env, "0");
    assert_eq!(
        o.gets("/noval/q.pdf"),
        2,
        "fetched again, not reused blindly"
    );
    assert_eq!(sha(&env, "w/nv2"), sha(&env, "w/nv1"));
}
