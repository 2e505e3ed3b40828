//! `cargo xtask bench`: idem's figures beside a baseline run in the same
//! invocation, as ratios. Never a timed test: numbers are printed, and
//! recorded by hand in docs/benchmarks.md with the command that made them.
//!
//! - `store`: planning and the durable per-job ledger path, against raw
//!   rusqlite loops doing the minimum equivalent SQL;
//! - `download`: idem against curl (alone, followed by `sync`, and with
//!   `--parallel`), wget and aria2c on the same files from the same local
//!   origin, then the latency-bound case (`latency.rs`) and the lopsided
//!   case (`lopsided.rs`); `small` runs only its many-small-files cases.

use anyhow::{bail, Context, Result};
use idem_core::ports::Store;
use idem_core::{JobSpec, Timestamp, WorkerId};
use idem_store_sqlite::{Durability, Options, SqliteStore};
use rusqlite::params;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::Instant;

pub(crate) fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    Timestamp::from_millis(ms)
}

pub(crate) fn row(name: &str, idem: f64, base: f64, unit: &str, note: &str) {
    println!(
        "{name:<52} idem {idem:>10.0} {unit:<8} baseline {base:>10.0} {unit:<8} ratio {:>5.2}  {note}",
        idem / base.max(1e-9)
    );
}

/// Writes `n` plan lines (see [`specs`]) as JSON Lines to `path`.
pub(crate) fn write_plan(path: &Path, n: usize, tag: &str) -> Result<()> {
    let text: String = specs(n, tag)
        .iter()
        .map(|(w, a, u)| {
            format!("{{\"work_id\":\"{w}\",\"artifact_id\":\"{a}\",\"url\":\"{u}\"}}\n")
        })
        .collect();
    std::fs::write(path, text)?;
    Ok(())
}

pub(crate) fn specs(n: usize, tag: &str) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("W{}", i / 10),
                format!("{tag}-{i}"),
                format!("https://example.org/papers/{tag}/{i}.pdf"),
            )
        })
        .collect()
}

fn baseline_schema(c: &rusqlite::Connection, sync: &str) -> Result<()> {
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA cache_size=-65536;
         CREATE TABLE jobs (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, work_id TEXT NOT NULL,
            artifact_id TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL, lease_owner TEXT,
            lease_epoch INTEGER NOT NULL DEFAULT 0, lease_expires_at INTEGER, due_at INTEGER);
         CREATE INDEX jobs_due ON jobs (due_at) WHERE due_at IS NOT NULL;
         CREATE TABLE ops (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, kind TEXT NOT NULL,
            epoch INTEGER NOT NULL, status TEXT NOT NULL, result TEXT, UNIQUE (job_id, kind, epoch));"
    ))?;
    Ok(())
}

fn raw_key(w: &str, a: &str) -> [u8; 32] {
    *idem_core::job_key_of(w, a).digest().as_bytes()
}

/// Raw rusqlite: INSERT OR IGNORE in batches, keys hashed in the loop.
fn raw_plan(
    path: &Path,
    items: &[(String, String, String)],
    batch: usize,
    create: bool,
) -> Result<f64> {
    let mut c = rusqlite::Connection::open(path)?;
    if create {
        baseline_schema(&c, "FULL")?;
    } else {
        c.execute_batch("PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;")?;
    }
    let t = Instant::now();
    for chunk in items.chunks(batch) {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs (key, work_id, artifact_id, url, state, due_at) VALUES (?1, ?2, ?3, ?4, 'planned', 0)",
            )?;
            for (w, a, u) in chunk {
                st.execute(params![raw_key(w, a).as_slice(), w, a, u])?;
            }
        }
        tx.commit()?;
    }
    Ok(items.len() as f64 / t.elapsed().as_secs_f64())
}

fn idem_plan(store: &SqliteStore, items: &[(String, String, String)], batch: usize) -> Result<f64> {
    let t = Instant::now();
    for chunk in items.chunks(batch) {
        let specs: Vec<JobSpec> = chunk
            .iter()
            .map(|(w, a, u)| JobSpec::new(w, a, u, None, None))
            .collect::<Result<_, _>>()?;
        store.plan(&specs, 5, now())?;
    }
    Ok(items.len() as f64 / t.elapsed().as_secs_f64())
}

/// The minimum SQL of one job's life, one transaction per job.
fn raw_job_loop(path: &Path, jobs: usize, sync: &str) -> Result<f64> {
    let mut c = rusqlite::Connection::open(path)?;
    baseline_schema(&c, sync)?;
    {
        let tx = c.transaction()?;
        for (w, a, u) in specs(jobs, "raw") {
            tx.execute(
                "INSERT INTO jobs (key, work_id, artifact_id, url, state, due_at) VALUES (?1, ?2, ?3, ?4, 'planned', 0)",
                params![raw_key(&w, &a).as_slice(), w, a, u],
            )?;
        }
        tx.commit()?;
    }
    let t = Instant::now();
    loop {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id: Option<(i64, i64)> = tx
            .query_row(
                "UPDATE jobs SET state='leased', lease_owner='w', lease_epoch=lease_epoch+1, lease_expires_at=?1, due_at=?1
                 WHERE id = (SELECT id FROM jobs WHERE due_at <= ?2 ORDER BY due_at, id LIMIT 1) RETURNING id, lease_epoch",
                params![i64::MAX / 2, 1i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok();
        let Some((id, epoch)) = id else { break };
        for (kind, result) in [
            ("head", r#"{"status":200}"#),
            ("stream", r#"{"size":32}"#),
            ("finalize", r#"{"path":"x"}"#),
        ] {
            tx.execute(
                "INSERT INTO ops (job_id, kind, epoch, status, result) VALUES (?1, ?2, ?3, 'committed', ?4)",
                params![id, kind, epoch, result],
            )?;
        }
        tx.execute("UPDATE jobs SET state='finalized', lease_owner=NULL, due_at=NULL WHERE id=?1 AND lease_epoch=?2", params![id, epoch])?;
        tx.commit()?;
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

fn idem_job_loop(
    dir: &Path,
    jobs: usize,
    durability: Durability,
    workers: usize,
    batch: usize,
) -> Result<f64> {
    let path = dir.join(format!("idem-{jobs}-{durability:?}-{workers}-{batch}.db"));
    let store = SqliteStore::open(
        &path,
        &Options {
            durability,
            ..Options::default()
        },
    )?;
    let all: Vec<JobSpec> = specs(jobs, "job")
        .iter()
        .map(|(w, a, u)| JobSpec::new(w, a, u, None, None))
        .collect::<Result<_, _>>()?;
    for chunk in all.chunks(10_000) {
        store.plan(chunk, 5, now())?;
    }
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let store = &store;
                s.spawn(move || -> Result<()> {
                    let owner = WorkerId::new(format!("bench-{w}"));
                    idem_worker::drill::run_worker(store, &owner, batch, now, |_| {})?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

pub(crate) fn release_idem(root: &Path) -> Result<PathBuf> {
    let st = Proc::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["build", "--release", "--quiet", "-p", "idem-cli"])
        .status()
        .context("building idem (release)")?;
    if !st.success() {
        bail!("cargo build --release -p idem-cli failed");
    }
    Ok(target_dir(root)?.join("release/idem"))
}

/// The build's target directory, honouring `CARGO_TARGET_DIR` (and
/// `build.target-dir`): cargo is asked.
pub(crate) fn target_dir(root: &Path) -> Result<PathBuf> {
    let meta = Proc::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    let v: serde_json::Value =
        serde_json::from_slice(&meta.stdout).context("parsing cargo metadata")?;
    Ok(v["target_directory"]
        .as_str()
        .map_or_else(|| root.join("target"), PathBuf::from))
}

/// N `idem ledger-drill` processes on one ledger.
fn idem_processes(idem: &Path, dir: &Path, jobs: usize, procs: usize) -> Result<f64> {
    let db = dir.join(format!("procs-{procs}.db"));
    let plan = dir.join("procs-plan.jsonl");
    write_plan(&plan, jobs, "proc")?;
    let ok = Proc::new(idem)
        .arg("--db")
        .arg(&db)
        .arg("plan")
        .arg(&plan)
        .output()?;
    if !ok.status.success() {
        bail!("plan failed: {}", String::from_utf8_lossy(&ok.stderr));
    }
    let t = Instant::now();
    let children: Vec<_> = (0..procs)
        .map(|_| {
            Proc::new(idem)
                .arg("--db")
                .arg(&db)
                .args(["ledger-drill", "--batch", "8"])
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in children {
        if !c.wait()?.success() {
            bail!("ledger-drill failed");
        }
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

pub(crate) fn store(root: &Path, quick: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let n_plan = if quick { 20_000 } else { 100_000 };
    let n_jobs = if quick { 1_000 } else { 5_000 };
    println!(
        "== store (SQLite, this machine: {} cores) ==",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let items = specs(n_plan, "plan");
    for batch in [1_000usize, 10_000] {
        let raw_db = dir.path().join(format!("raw-plan-{batch}.db"));
        let base = raw_plan(&raw_db, &items, batch, true)?;
        let store = SqliteStore::open(
            dir.path().join(format!("idem-plan-{batch}.db")),
            &Options::default(),
        )?;
        let idem = idem_plan(&store, &items, batch)?;
        row(
            &format!("plan {n_plan} new jobs, {batch}/txn"),
            idem,
            base,
            "jobs/s",
            "FULL",
        );
        let base_re = raw_plan(&raw_db, &items, batch, false)?;
        let idem_re = idem_plan(&store, &items, batch)?;
        row(
            &format!("re-plan {n_plan} existing jobs, {batch}/txn"),
            idem_re,
            base_re,
            "jobs/s",
            "no-op",
        );
    }
    // FULL: every acknowledged write fsynced, a job's intermediate records
    // riding the next fsync (the default); STRICT: every commit fsynced.
    for (durability, sync) in [
        (Durability::Full, "FULL"),
        (Durability::Strict, "STRICT"),
        (Durability::Normal, "NORMAL"),
    ] {
        // The raw loop commits once per job: FULL is its durable setting.
        let base = raw_job_loop(
            &dir.path().join(format!("raw-jobs-{sync}.db")),
            n_jobs,
            if durability == Durability::Normal {
                "NORMAL"
            } else {
                "FULL"
            },
        )?;
        let one = idem_job_loop(dir.path(), n_jobs, durability, 1, 1)?;
        row(
            &format!("lease+3 ops+complete, 1 worker, {sync}"),
            one,
            base,
            "jobs/s",
            "raw: 1 txn/job",
        );
        let many = idem_job_loop(dir.path(), n_jobs * 4, durability, 16, 8)?;
        row(
            &format!("lease+3 ops+complete, 16 workers, {sync}"),
            many,
            base,
            "jobs/s",
            "group commit, lease 8",
        );
    }
    let idem = release_idem(root)?;
    let base = raw_job_loop(&dir.path().join("raw-jobs-procs.db"), n_jobs, "FULL")?;
    for procs in [1usize, 2] {
        let r = idem_processes(&idem, dir.path(), n_jobs, procs)?;
        row(
            &format!("lease+3 ops+complete, {procs} process(es), FULL"),
            r,
            base,
            "jobs/s",
            "ledger-drill",
        );
    }
    Ok(())
}

pub(crate) fn probe() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let r = idem_job_loop(dir.path(), 4000, Durability::Full, 16, 8)?;
    println!("16 workers: {r:.0} jobs/s");
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Empties `dir` (keeping it), so the next tool writes fresh files.
fn clear(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir)?;
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// One tool's run: wall seconds, CPU seconds, peak RSS in KiB.
struct Timed {
    wall: f64,
    cpu: f64,
    rss_kib: u64,
}

/// Runs `cmd` under GNU time for CPU and peak RSS.
fn timed(cmd: &mut Proc, scratch: &Path) -> Result<Timed> {
    let tfile = scratch.join("time.txt");
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    // Every tool starts with nothing left to write back: otherwise the
    // previous tool's hundreds of dirty megabytes go to the disk during the
    // next run, and a tool that fsyncs (idem) waits behind them.
    let _ = Proc::new("sync").status();
    let t = Instant::now();
    let out = Proc::new("/usr/bin/time")
        .arg("-f")
        .arg("%U %S %M")
        .arg("-o")
        .arg(&tfile)
        .arg(&prog)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("running {prog:?} under /usr/bin/time"))?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{prog:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(&tfile)?;
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok(Timed {
        wall,
        cpu: f.first().unwrap_or(&0.0) + f.get(1).unwrap_or(&0.0),
        rss_kib: f.get(2).copied().unwrap_or(0.0) as u64,
    })
}

pub(crate) fn have(tool: &str) -> bool {
    Proc::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn report(case: &str, tool: &str, t: &Timed, files: usize, bytes: u64) {
    println!(
        "{case:<28} {tool:<10} {:>8.1} MB/s {:>9.1} files/s  cpu {:>6.2} s  rss {:>6.1} MiB  wall {:>6.2} s",
        bytes as f64 / 1e6 / t.wall,
        files as f64 / t.wall,
        t.cpu,
        t.rss_kib as f64 / 1024.0,
        t.wall
    );
}

/// nginx serving `dir` on 127.0.0.1, stopped on drop.
struct Nginx {
    child: std::process::Child,
    conf: PathBuf,
    prefix: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(prefix: &Path, www: &Path) -> Result<Self> {
        // A free port: bound and released; nginx takes it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let tmp = prefix.join("nginx-tmp");
        std::fs::create_dir_all(&tmp)?;
        let t = tmp.display();
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {pid};\nerror_log {err};\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n\
                   client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  fastcgi_temp_path {t}/fastcgi;\n\
                   uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n  default_type application/octet-stream;\n\
                   server {{ listen 127.0.0.1:{port}; location /f/ {{ alias {www}/; }} }}\n}}\n",
                pid = prefix.join("nginx.pid").display(),
                err = prefix.join("nginx-error.log").display(),
                www = www.display(),
            ),
        )?;
        let child = Proc::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(prefix)
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let me = Self {
            child,
            conf,
            prefix: prefix.to_path_buf(),
            port,
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not start listening on port {port}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(me)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Proc::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.prefix)
            .args(["-s", "stop"])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// The server every tool downloads from.
enum Server {
    Nginx(Nginx),
    InProcess(idem_origin::Origin),
}

impl Server {
    fn url(&self, path: &str) -> String {
        match self {
            Self::Nginx(n) => n.url(path),
            Self::InProcess(o) => o.url(path),
        }
    }
}

/// `small`: only the many-small-files cases; each case runs `rounds` times.
pub(crate) fn download(root: &Path, quick: bool, small: bool, rounds: usize) -> Result<()> {
    let idem = release_idem(root)?;
    // Best effort: the bench installs its baselines and its server where it
    // can (Debian packages).
    for (tool, package) in [("aria2c", "aria2"), ("nginx", "nginx-light")] {
        if !have(tool) {
            let _ = Proc::new("sh")
                .args([
                    "-c",
                    &format!("apt-get install -y -qq {package} >/dev/null 2>&1"),
                ])
                .status();
        }
    }
    // nginx (sendfile, its own process) unless asked for the in-process
    // test origin, which at 1 GiB caps every tool near 300 MB/s.
    let use_nginx =
        have("nginx") && std::env::var_os("IDEM_BENCH_ORIGIN").is_none_or(|v| v != "test");
    let big = if quick { 256 << 20 } else { 1 << 30 };
    let mut cases: Vec<(String, usize, usize)> = vec![
        (format!("(a) 1 x {} MiB", big >> 20), 1, big),
        ("(b) 200 x 1 MiB".to_owned(), 200, 1 << 20),
        ("(c) 1000 x 1 KiB".to_owned(), 1000, 1 << 10),
    ];
    if small {
        cases.remove(0);
    }
    println!(
        "== download (from {} on 127.0.0.1; idem hashes, fsyncs, renames, commits; the others only write) ==",
        if use_nginx { "nginx" } else { "the in-process test origin" }
    );
    for (case, n, size) in cases {
        let scratch = tempfile::tempdir()?;
        let s = scratch.path();
        let origin = if use_nginx {
            let www = s.join("www");
            std::fs::create_dir_all(&www)?;
            for i in 0..n {
                std::fs::write(
                    www.join(format!("f{i}.bin")),
                    idem_origin::content(i as u64 + 1, size),
                )?;
            }
            Server::Nginx(Nginx::start(s, &www)?)
        } else {
            Server::InProcess(idem_origin::Origin::start((0..n).map(|i| {
                (
                    format!("f{i}.bin"),
                    idem_origin::content(i as u64 + 1, size),
                )
            }))?)
        };
        let urls: Vec<String> = (0..n)
            .map(|i| origin.url(&format!("/f/f{i}.bin")))
            .collect();
        let bytes = (n * size) as u64;
        std::fs::write(s.join("urls.txt"), urls.join("\n") + "\n")?;
        // Each round gives every tool fresh output folders; tools alternate,
        // so drift on a shared machine reaches them all.
        let mut ratios = Vec::new();
        for round in 0..rounds {
            std::fs::create_dir_all(s.join("curl"))?;
            clear(&s.join("curl"))?;
            // curl: one process, sequential, connection reused.
            let cfg: String = urls
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    format!(
                        "url = \"{u}\"\noutput = \"{}\"\n",
                        s.join(format!("curl/{i}")).display()
                    )
                })
                .collect();
            std::fs::create_dir_all(s.join("curl"))?;
            std::fs::write(s.join("curl.cfg"), cfg)?;
            let t = timed(
                Proc::new("curl").args(["-s", "-K"]).arg(s.join("curl.cfg")),
                s,
            )?;
            report(&case, "curl", &t, n, bytes);
            // curl + sync: the same transfers, then every byte made durable
            // (one sync for the lot), which is what idem promises per file.
            clear(&s.join("curl"))?;
            let curl_sync = timed(
                Proc::new("sh").arg("-c").arg(format!(
                    "curl -s -K '{}' && sync",
                    s.join("curl.cfg").display()
                )),
                s,
            )?;
            report(&case, "curl + sync", &curl_sync, n, bytes);
            clear(&s.join("curl"))?;
            let curl_par = timed(
                Proc::new("curl")
                    .args(["-s", "--parallel", "--parallel-max", "16", "-K"])
                    .arg(s.join("curl.cfg")),
                s,
            )?;
            report(&case, "curl -Z16", &curl_par, n, bytes);
            std::fs::create_dir_all(s.join("wget"))?;
            clear(&s.join("wget"))?;
            let t = timed(
                Proc::new("wget")
                    .args(["-q", "-i"])
                    .arg(s.join("urls.txt"))
                    .arg("-P")
                    .arg(s.join("wget")),
                s,
            )?;
            report(&case, "wget", &t, n, bytes);
            if have("aria2c") {
                std::fs::create_dir_all(s.join("aria"))?;
                clear(&s.join("aria"))?;
                let t = timed(
                    Proc::new("aria2c")
                        .args([
                            "-q",
                            "-j",
                            "16",
                            "--allow-overwrite=true",
                            "--auto-file-renaming=false",
                            "--file-allocation=none",
                            "-i",
                        ])
                        .arg(s.join("urls.txt"))
                        .arg("-d")
                        .arg(s.join("aria")),
                    s,
                )?;
                report(&case, "aria2c -j16", &t, n, bytes);
            } else {
                println!("{case:<28} aria2c     (not installed; skipped)");
            }
            let plan: String = urls
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    format!("{{\"work_id\":\"b\",\"artifact_id\":\"{i}\",\"url\":\"{u}\"}}\n")
                })
                .collect();
            std::fs::write(s.join("plan.jsonl"), plan)?;
            let db = s.join(format!("idem{round}.db"));
            let out = s.join(format!("idem-out{round}"));
            let p = Proc::new(&idem)
                .arg("--db")
                .arg(&db)
                .arg("plan")
                .arg(s.join("plan.jsonl"))
                .output()?;
            if !p.status.success() {
                bail!("idem plan failed");
            }
            let conc = if n == 1 { "1" } else { "16" };
            let t = timed(
                Proc::new(&idem)
                    .arg("--db")
                    .arg(&db)
                    .arg("--out")
                    .arg(&out)
                    .args([
                        "run",
                        "--allow-loopback",
                        "--json",
                        "--concurrency",
                        conc,
                        "--per-host",
                        "16",
                    ]),
                s,
            )?;
            report(&case, &format!("idem -c{conc}"), &t, n, bytes);
            println!(
                "{case:<28} ratios     idem / (curl + sync) {:.2}, idem / curl -Z16 {:.2}",
                curl_sync.wall / t.wall,
                curl_par.wall / t.wall
            );
            ratios.push((curl_sync.wall / t.wall, curl_par.wall / t.wall));
        }
        if rounds > 1 {
            let mut a: Vec<f64> = ratios.iter().map(|r| r.0).collect();
            let mut b: Vec<f64> = ratios.iter().map(|r| r.1).collect();
            println!(
                "{case:<28} medians    idem / (curl + sync) {:.2}, idem / curl -Z16 {:.2} over {rounds} rounds",
                median(&mut a),
                median(&mut b)
            );
        }
        let threads = if n == 1 { 1 } else { 16 };
        let bodies: Vec<Vec<u8>> = (0..n)
            .map(|i| idem_origin::content(i as u64 + 1, size))
            .collect();
        let wall = disk_floor(&s.join("floor"), &bodies, threads)?;
        println!(
            "{case:<28} {:<10} {:>8.1} MB/s {:>9.1} files/s  (write + fsync from memory, in this process)",
            "disk floor",
            bytes as f64 / 1e6 / wall,
            n as f64 / wall,
        );
        let wall = store_floor(&s.join("store-floor"), &bodies, threads)?;
        println!(
            "{case:<28} {:<10} {:>8.1} MB/s {:>9.1} files/s  (the same, published into idem's blob tree)",
            "store floor",
            bytes as f64 / 1e6 / wall,
            n as f64 / wall,
        );
        for layout in [Layout::TwoLevels, Layout::TopMade, Layout::OneLevel] {
            let wall = layout_floor(&s.join(format!("{layout:?}")), &bodies, threads, layout)?;
            println!(
                "{case:<28} {:<10} {:>8.1} MB/s {:>9.1} files/s  (written, linked under {layout:?}, one syncfs)",
                "batched",
                bytes as f64 / 1e6 / wall,
                n as f64 / wall,
            );
        }
    }
    Ok(())
}

/// The durability floor for a case: the same files of the same size
/// written from memory and each fsynced (with its directory), by as many
/// threads as idem runs workers; no network, no hashing, no ledger. What
/// the disk allows idem at best, since idem fsyncs every body before
/// acknowledging it and the other tools do not. Returns wall seconds.
fn disk_floor(dir: &Path, bodies: &[Vec<u8>], threads: usize) -> Result<f64> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    timed_floor(bodies.len(), threads, |i| {
        let mut f = std::fs::File::create(dir.join(format!("f{i}")))?;
        f.write_all(&bodies[i])?;
        f.sync_all()?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })
}

/// [`disk_floor`] through idem's own file path: each body written to its
/// part file and fsynced, then published into `blobs/sha256/<aa>/<bb>/`
/// by `idem_worker::files::publish` (directories created durably, a hard
/// link, the part's name removed, the directory fsynced). Digests are
/// computed before the clock starts. The gap between the two floors is
/// what the content-addressed layout costs on this filesystem.
fn store_floor(dir: &Path, bodies: &[Vec<u8>], threads: usize) -> Result<f64> {
    use idem_worker::files;
    use std::io::Write as _;
    let out = idem_worker::OutDir::prepare(dir)?;
    let digests: Vec<idem_core::Digest32> =
        bodies.iter().map(|b| idem_core::Digest32::of(b)).collect();
    timed_floor(bodies.len(), threads, |i| {
        let part = out.part_path(&idem_core::job_key_of("floor", &i.to_string()));
        let mut f = std::fs::File::create(&part)?;
        f.write_all(&bodies[i])?;
        f.sync_all()?;
        files::publish(&out, &part, digests[i], bodies[i].len() as u64)?;
        Ok(())
    })
}

/// The store layout's cost on a fresh store, durability batched as idem
/// batches it: every body written to a part, linked under `layout`'s
/// directories (created without fsyncs), then one `sync -f` (`syncfs`) of
/// the filesystem. Returns wall seconds, the directories made included.
fn layout_floor(dir: &Path, bodies: &[Vec<u8>], threads: usize, layout: Layout) -> Result<f64> {
    use std::io::Write as _;
    let tmp = dir.join("tmp");
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&tmp)?;
    std::fs::create_dir_all(&blobs)?;
    let hex: Vec<String> = bodies
        .iter()
        .map(|b| idem_core::Digest32::of(b).to_hex())
        .collect();
    let _ = Proc::new("sync").status();
    let t = Instant::now();
    if layout == Layout::TopMade {
        for i in 0..256 {
            std::fs::create_dir(blobs.join(format!("{i:02x}")))?;
        }
    }
    timed_floor(bodies.len(), threads, |i| {
        let part = tmp.join(format!("{i}.part"));
        let mut f = std::fs::File::create(&part)?;
        f.write_all(&bodies[i])?;
        let h = &hex[i];
        let d = match layout {
            Layout::TwoLevels | Layout::TopMade => blobs.join(&h[..2]).join(&h[2..4]),
            Layout::OneLevel => blobs.join(&h[..2]),
        };
        std::fs::create_dir_all(&d)?;
        std::fs::hard_link(&part, d.join(h))?;
        Ok(())
    })?;
    let st = Proc::new("sync").arg("-f").arg(dir).status()?;
    if !st.success() {
        bail!("sync -f failed");
    }
    for i in 0..bodies.len() {
        std::fs::remove_file(tmp.join(format!("{i}.part")))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// `<aa>/<bb>/<hex>`, every directory made when first needed (idem's).
    TwoLevels,
    /// The same, the 256 `<aa>` directories made up front.
    TopMade,
    /// `<aa>/<hex>`.
    OneLevel,
}

/// Runs `one(i)` for every `i < n` on `threads` threads after a `sync`
/// (so no earlier tool's writeback is in the way); returns wall seconds.
fn timed_floor(n: usize, threads: usize, one: impl Fn(usize) -> Result<()> + Sync) -> Result<f64> {
    let _ = Proc::new("sync").status();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        one(i)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("floor writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}
