//! Helpers: a scratch directory with a ledger and an output tree, a builder
//! for `idem` commands pointed at them, and checks over the output tree.

use idem_core::Digest32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub(crate) const IDEM: &str = env!("CARGO_BIN_EXE_idem");

pub(crate) fn slow_tests() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("IDEM_SLOW_TESTS").is_some()
}

pub(crate) struct Env {
    /// Keeps a PostgreSQL restart out while this env uses the server.
    _pg_guard: Option<PgGuard>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) db: PathBuf,
    pub(crate) out: PathBuf,
    /// A scratch PostgreSQL database this env made: (server URL, name).
    pg: Option<(String, String)>,
}

/// Held by every test that uses the PostgreSQL server: shared, or alone by
/// a test that restarts the server.
static PG: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum PgGuard {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// Runs one statement with `psql` against `url`.
pub(crate) fn psql(url: &str, sql: &str) {
    let st = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .stdout(Stdio::null())
        .status()
        .expect("psql runs");
    assert!(st.success(), "psql: {sql}");
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((server, name)) = &self.pg {
            let st = Command::new("psql")
                .args([
                    server.as_str(),
                    "-qAtc",
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            drop(st);
        }
    }
}

impl Env {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("idem.db");
        let out = dir.path().join("artifacts");
        Self {
            _pg_guard: None,
            dir,
            db,
            out,
            pg: None,
        }
    }

    /// An env whose ledger is a fresh PostgreSQL database on the server
    /// `IDEM_PG_URL` names, reached with `password` in its URL (the server
    /// trusts the connection; the password is there to be kept secret).
    /// `None` when `IDEM_PG_URL` is unset.
    pub(crate) fn postgres(password: &str) -> Option<Self> {
        Self::postgres_with(password, false)
    }

    /// [`Env::postgres`], with the server to itself when `alone` (no other
    /// test uses it meanwhile: this one may restart it).
    pub(crate) fn postgres_with(password: &str, alone: bool) -> Option<Self> {
        let server = std::env::var("IDEM_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        let guard = if alone {
            PgGuard::Alone(
                PG.write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        } else {
            PgGuard::Shared(PG.read().unwrap_or_else(std::sync::PoisonError::into_inner))
        };
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "idem_it_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        psql(&server, &format!("CREATE DATABASE {name}"));
        let (base, _) = server.rsplit_once('/').expect("a URL with a database");
        let (_, rest) = base.split_once("://").expect("a URL");
        let (user, host) = match rest.rsplit_once('@') {
            Some((info, host)) => (info.split(':').next().unwrap_or("postgres"), host),
            None => ("postgres", rest),
        };
        let mut env = Self::new();
        env.db = PathBuf::from(format!("postgres://{user}:{password}@{host}/{name}"));
        env.pg = Some((server, name));
        env._pg_guard = Some(guard);
        Some(env)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `idem --db … --out …` with no stdin.
    pub(crate) fn idem(&self) -> Command {
        let mut c = Command::new(IDEM);
        c.arg("--db").arg(&self.db).arg("--out").arg(&self.out);
        c.stdin(Stdio::null());
        c
    }

    /// `idem run` with test-friendly defaults: loopback allowed, fast retries.
    pub(crate) fn run_cmd(&self) -> Command {
        let mut c = self.idem();
        c.args([
            "run",
            "--allow-loopback",
            "--backoff-base-ms",
            "50",
            "--backoff-cap-ms",
            "300",
            "--lease-ttl",
            "3",
            "--json",
        ]);
        c
    }

    pub(crate) fn write_plan(&self, lines: &[serde_json::Value]) -> PathBuf {
        let p = self.path("plan.jsonl");
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub(crate) fn plan(&self, lines: &[serde_json::Value]) -> Output {
        let p = self.write_plan(lines);
        let out = self.idem().arg("plan").arg(&p).output().unwrap();
        assert!(out.status.success(), "plan failed: {}", text(&out));
        out
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        json_of(&self.idem().args(["status", "--json"]).output().unwrap())
    }

    pub(crate) fn show(&self, job: &str) -> serde_json::Value {
        json_of(&self.idem().args(["show", "--json", job]).output().unwrap())
    }
}

/// The latest op of `kind` in `idem show --json` output.
pub(crate) fn last_op(job: &serde_json::Value, kind: &str) -> serde_json::Value {
    job["ops"]
        .as_array()
        .expect("show has ops")
        .iter()
        .rev()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} op in {job}"))
        .clone()
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub(crate) fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

pub(crate) fn job(w: &str, a: &str, url: &str) -> serde_json::Value {
    serde_json::json!({"work_id": w, "artifact_id": a, "url": url})
}

/// Every file under `blobs/` has the SHA-256 its name says; returns how many.
pub(crate) fn check_blobs(out: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![out.join("blobs")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.file_name().unwrap().to_str().unwrap().to_owned();
                let sha = Digest32::of(&std::fs::read(&p).unwrap());
                assert_eq!(
                    sha.to_hex(),
                    name,
                    "blob {} does not match its name",
                    p.display()
                );
                n += 1;
            }
        }
    }
    n
}

/// Files left in `tmp/`.
pub(crate) fn leftovers(out: &Path) -> Vec<String> {
    std::fs::read_dir(out.join("tmp"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn count(status: &serde_json::Value, state: &str) -> u64 {
    status["by_state"][state].as_u64().unwrap_or(0)
}

pub(crate) fn terminal(status: &serde_json::Value) -> u64 {
    ["finalized", "skipped_duplicate", "failed"]
        .iter()
        .map(|s| count(status, s))
        .sum()
}
