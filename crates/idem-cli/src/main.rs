//! `idem`: the operator's CLI. Parses raw arguments, validates them into a
//! config, then builds the store, HTTP client and engine.
//!
//! Logs go to stderr through `tracing` (`IDEM_LOG` sets the level).
//!
//! Exit codes: 0 ok; 1 error; 2 usage; 3 finished, but some jobs failed (or
//! some input lines were rejected, or `verify` found a problem); 4 an SLO is
//! breached; 130 interrupted.

/// `println!` that tolerates a closed stdout (see [`out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

mod alone;
mod cancel;
mod commands;
mod demo;
mod duration;
mod hosts;
mod input;
mod ledger;
mod out;
mod plan;
mod run;
mod sink;
mod slo;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code: finished, but some jobs failed or some input was rejected.
pub const EXIT_PARTIAL: u8 = 3;
/// Exit code: stopped by SIGINT or SIGTERM before finishing.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser, Debug)]
#[command(
    name = "idem",
    version,
    args_override_self = true,
    term_width = 100,
    about = "Idempotent, crash-safe, multi-worker artifact downloading.",
    long_about = "Idempotent, crash-safe, multi-worker artifact downloading.\n\n\
        Plan downloads into a ledger, run workers (as many processes as you like, \
        killed and restarted at will), and every artifact is fetched, verified and \
        published exactly once into a content-addressed store.\n\n\
        Typical use:\n  \
        idem plan urls.jsonl        # record what to fetch (re-planning is a no-op)\n  \
        idem run --concurrency 16   # fetch until every job is finished\n  \
        idem status                 # counts by state, leases, failures\n  \
        idem export > manifest.jsonl\n\n\
        Exit codes: 0 ok, 1 error, 2 usage, 3 finished but some jobs failed \
        (or some input lines were rejected, or idem verify found a problem), \
        4 an SLO is breached (idem slo check), 130 interrupted."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// The ledger: a SQLite file (created if absent), or a PostgreSQL
    /// database shared by workers on many hosts
    /// (postgres://user:password@host:5432/db; the password is never shown).
    #[arg(long, global = true, env = "IDEM_DB", default_value = "idem.db")]
    db: PathBuf,
    /// The output directory: blobs/ and tmp/ live here.
    #[arg(long, global = true, env = "IDEM_OUT", default_value = "artifacts")]
    out: PathBuf,
    /// Lower SQLite durability to synchronous=NORMAL: faster, but the last
    /// commits may roll back after a power loss (never after a crash of idem
    /// itself); effects are then redone.
    #[arg(long, global = true, conflicts_with = "strict_sync")]
    unsafe_fast_sync: bool,
    /// Fsync every ledger commit, a job's intermediate steps included. By
    /// default those (lease, op starts, results that lead to the next step)
    /// reach the disk with the next durable commit, which every finished,
    /// failed or rescheduled job is; after a power loss the ledger is then a
    /// prefix of its history and those steps are redone.
    #[arg(long, global = true)]
    strict_sync: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Record jobs from JSON Lines or CSV files (`-` for stdin).
    ///
    /// Each line: {"work_id": ..., "artifact_id": ..., "url": ...} with optional
    /// "sha256" (expected digest), "content_type" (expected media type),
    /// "urls" (further URLs of the same artifact, tried in order when one
    /// fails; alone, the first is the URL) and "headers" (request headers
    /// sent to the URL's origin only, values never shown).
    /// CSV needs a header naming those columns (a `urls` cell holds URLs
    /// separated by spaces; headers are JSON only). Re-planning a job is a
    /// no-op; the same work_id/artifact_id with other URLs is a conflict,
    /// reported and not applied. Bad lines are reported with file and line,
    /// and skipped.
    Plan(PlanArgs),
    /// Download every due job until all are finished.
    ///
    /// Waits out retry delays and dead workers' leases, then takes their jobs
    /// over. Run several at once (on one host or, with a shared ledger, several):
    /// each job is worked by one holder at a time.
    Run(Box<RunArgs>),
    /// Counts by state, leases, due jobs, failures, and the busiest hosts.
    Status(JsonFlag),
    /// One job: its spec, state, lease, attempts and operation ledger.
    Show(ShowArgs),
    /// Repair what crashes left: expired leases, dead ops, orphaned part
    /// files, blobs published but not committed, and (--blobs) finished jobs
    /// whose blob is gone.
    ///
    /// Every `idem run` does the same at its start, except the blob check,
    /// which walks the whole ledger: a following run checks a slice of it at
    /// each periodic pass (--reconcile-every).
    Reconcile(ReconcileArgs),
    /// Check the ledger and the store: SQLite's integrity check of the
    /// ledger, then every finished job's blob read back against the size and
    /// SHA-256 recorded for it. Exits 3 if anything is wrong.
    ///
    /// It reads every blob, so it takes as long as reading the store. With
    /// --repair, a blob that fails is moved to <out>/quarantine/ and its jobs
    /// are re-queued for the next run to fetch again.
    Verify(VerifyArgs),
    /// Try failed jobs again, as a new attempt series.
    Retry(RetryArgs),
    /// End jobs that are not finished: each fails with the reason
    /// `cancelled`. A worker holding one stops at its next write (it is
    /// fenced) and publishes nothing. `idem retry` brings one back.
    Cancel(CancelArgs),
    /// Stop leasing new jobs, on every host or one (--host), for every
    /// worker of the ledger, on any machine. Workers notice within their
    /// next lease call (a poll, at most a second apart when idle); jobs
    /// already held finish. Stored in the ledger: it outlasts restarts until
    /// `idem resume`. `idem status` shows what is paused.
    Pause(PauseArgs),
    /// Lift a pause made by `idem pause` (the same --host, or none).
    Resume(PauseArgs),
    /// Drop what finished jobs no longer need: the operation records of
    /// every job that finished (finalized, skipped as a duplicate, or
    /// failed) more than --older-than ago.
    ///
    /// Each job keeps its row: its state, blob (digest, size, path), HEAD
    /// validators, attempts, last error and times, so status, export,
    /// verify, URL reuse, `idem slo check` and re-planning (still a no-op)
    /// are unchanged, and the counts status reports are kept. A job that is
    /// not finished is never touched. On a SQLite ledger the freed space
    /// goes back to the file system. Safe while workers run; each batch of
    /// jobs is one short write.
    ///
    /// Typical use: idem prune --older-than 604800
    Prune(PruneArgs),
    /// Write the manifest of every job (stdout).
    Export(ExportArgs),
    /// See idem work in under a minute: a local origin, faults, a killed
    /// worker, recovery, exactly-once. Needs no network.
    Demo(DemoArgs),
    /// Service level objectives.
    #[command(subcommand)]
    Slo(SloCmd),
    /// Copy every job, with its state and operation ledger, from the ledger
    /// --db names into another one (--to): to move a SQLite ledger to a
    /// PostgreSQL database shared by many hosts.
    ///
    /// Stop every worker first: the copy refuses a ledger with live leases.
    /// Jobs whose key the destination already holds are left as they are,
    /// so a copy interrupted half-way can be run again.
    ///
    /// Typical use: idem --db idem.db copy-ledger --to postgres://idem@db/corpus
    CopyLedger(CopyArgs),
    /// Internal: lease and complete jobs with a null effect (no network):
    /// the ledger path alone, for the multi-process test and benchmarks.
    #[command(hide = true)]
    LedgerDrill(DrillArgs),
}

#[derive(Subcommand, Debug)]
enum SloCmd {
    /// Compute each SLI from the ledger over a window and compare it with its
    /// objective (better than the objective passes). Exits 4 on a breach.
    Check(SloCheckArgs),
}

#[derive(Args, Debug)]
struct SloCheckArgs {
    /// The SLO spec (default: the one built in, slo/idem.yaml).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// How far back to look: 30m, 6h, 1d, 7d…
    #[arg(long, default_value = "1d")]
    window: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CopyArgs {
    /// The destination ledger: a SQLite file or a postgres:// URL.
    #[arg(long)]
    to: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DrillArgs {
    /// Jobs leased per call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Worker threads in this process.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print each completed job key on stdout.
    #[arg(long)]
    print_keys: bool,
}

#[derive(Args, Debug)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Input files (`.jsonl` or `.csv`), or `-` for stdin.
    #[arg(required = true)]
    files: Vec<String>,
    /// Apply nothing if any line is malformed.
    #[arg(long)]
    strict: bool,
    /// Ignore JSON fields and CSV columns that are not plan fields. By
    /// default they are an error naming the nearest field, since a
    /// misspelt `sha256` would otherwise run the job unverified.
    #[arg(long)]
    allow_unknown_fields: bool,
    /// Attempts allowed per job before it fails for good.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Jobs per transaction.
    #[arg(long, default_value_t = 10_000, hide = true)]
    batch: usize,
    /// Write job_planned, key_conflict and idempotency_replay (a job planned again) events as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    /// Write metrics (jobs planned, key conflicts, the ledger's counts) to
    /// this file at exit, replaced atomically: for node_exporter's textfile
    /// collector.
    #[arg(long, value_name = "FILE")]
    metrics_textfile: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Jobs worked at once by this process.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Jobs in flight per host, across every worker sharing the ledger: a
    /// worker leases a job only while its host has room, and works it back
    /// to back (HEAD, GET) in one of the host's slots.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    per_host: u32,
    /// Most requests started per second per host, across every worker
    /// sharing the ledger (default: unlimited): leases of a host's jobs
    /// are spaced by 1/RATE seconds, whoever takes them.
    #[arg(long)]
    per_host_rate: Option<f64>,
    /// Per-host limits overriding --per-host and --per-host-rate, as
    /// PATTERN=CONCURRENCY[,RATE]: `export.arxiv.org=1,0.25` (one job at a
    /// time, one request every 4 s), `*.example.org=8` (that domain and its
    /// subdomains), `*` (every other host). Repeat for several; the closest
    /// pattern wins. Give every worker the same limits.
    #[arg(long = "host-limit", value_name = "PATTERN=N[,RATE]", value_parser = crate::hosts::parse_host_limit)]
    host_limits: Vec<idem_core::hosts::HostRule>,
    /// A JSON file of per-host settings: {"PATTERN": {"per_host": N,
    /// "rate": R, "headers": {"Name": "value"}}}; the headers go to
    /// matching hosts (a plan line's own headers win). A --host-limit for
    /// the same pattern overrides the file's limits, not its headers.
    #[arg(long, value_name = "FILE")]
    host_config: Option<PathBuf>,
    /// The User-Agent header of every request (a plan line's or a host
    /// config's `User-Agent` header wins).
    #[arg(long, default_value = concat!("idem/", env!("CARGO_PKG_VERSION")))]
    user_agent: String,
    /// Refuse bodies larger than this (bytes, or with a K/M/G/T suffix);
    /// checked on Content-Length and while streaming. 0 disables the cap.
    #[arg(long, default_value = "32G", value_parser = parse_size)]
    max_bytes: u64,
    /// Abort an attempt (and retry it later) when a body arrives slower
    /// than this many bytes per second over --min-speed-window.
    #[arg(long, default_value = "1K", value_parser = parse_size)]
    min_speed: u64,
    /// The window of --min-speed (seconds, or 90s, 2m; 0 disables the
    /// check).
    #[arg(long, default_value = "60", value_parser = crate::duration::secs)]
    min_speed_window: u64,
    /// Lease time-to-live (seconds, or 30s, 2m; at most a day); leases are
    /// renewed every third of it while working.
    #[arg(long, default_value = "60", value_parser = crate::duration::lease_ttl_secs)]
    lease_ttl: u64,
    /// Allow private, loopback and link-local addresses (refused by default).
    #[arg(long)]
    allow_private: bool,
    /// Allow loopback addresses only (local origins, tests).
    #[arg(long)]
    allow_loopback: bool,
    /// Write every event as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics while running
    /// (for example 127.0.0.1:9464). Loopback only unless
    /// --metrics-allow-remote is given.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Write the same metrics to this file every 5 s and once more at exit,
    /// replaced atomically: for node_exporter's textfile collector
    /// (`--collector.textfile.directory`, a file ending in `.prom`). Keeps a
    /// batch run's metrics, which a scrape of --metrics-addr can miss.
    #[arg(long, value_name = "FILE")]
    metrics_textfile: Option<PathBuf>,
    /// Allow --metrics-addr on a non-loopback address.
    #[arg(long)]
    metrics_allow_remote: bool,
    /// Keep polling for new jobs instead of stopping when all are finished.
    #[arg(long)]
    follow: bool,
    /// With --follow, run the reconciler again this often (seconds, or 5m,
    /// 1h): parts left by crashed workers, expired leases, and the blobs of
    /// the next 50,000 jobs, so blobs gone from the store are found by
    /// walking the ledger a slice at a time; 0: only at start, without the
    /// blobs.
    #[arg(long, default_value = "300", value_name = "DURATION", value_parser = crate::duration::secs)]
    reconcile_every: u64,
    /// A job whose URL another job already finalized reuses that blob with
    /// no request while that fetch is at most this old; older, it first asks
    /// the server with a conditional GET (If-None-Match / If-Modified-Since):
    /// 304 reuses it, a full answer is downloaded as new content, and a
    /// server that gave no validators is downloaded again. 0: always ask.
    /// Seconds, or 12h, 7d.
    #[arg(long, default_value = "86400", value_name = "DURATION", value_parser = crate::duration::secs)]
    reuse_max_age: u64,
    /// First retry delay ceiling (milliseconds, or 500ms, 2s; full jitter,
    /// doubling).
    #[arg(long, default_value = "1000", value_parser = crate::duration::millis)]
    backoff_base_ms: u64,
    /// Longest retry delay (milliseconds, or 30s, 5m).
    #[arg(long, default_value = "300000", value_parser = crate::duration::millis)]
    backoff_cap_ms: u64,
    /// Send a HEAD before each fresh job's GET, for origins whose GET
    /// headers differ from their HEAD's. By default a fresh job costs one
    /// request: its GET's headers (length, type, validators) are recorded
    /// as HEAD's, and a wrong type or an oversize length is refused before
    /// any of the body is read.
    #[arg(long)]
    head: bool,
    /// Idle timeout of a body read (seconds, or 30s, 2m).
    #[arg(long, default_value = "30", value_parser = crate::duration::secs)]
    read_timeout: u64,
    /// Print the summary as JSON (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Internal: run only this job (key), held by --alone-owner under
    /// --alone-epoch; how a worker runs a suspect in a child process.
    #[arg(long, hide = true, requires_all = ["alone_epoch", "alone_owner"])]
    alone_job: Option<String>,
    #[arg(long, hide = true)]
    alone_epoch: Option<u64>,
    #[arg(long, hide = true)]
    alone_owner: Option<String>,
}

#[derive(Args, Debug)]
struct ShowArgs {
    /// A job key (64 hex digits) or `work_id/artifact_id`.
    job: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReconcileArgs {
    /// Report what would be repaired; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also look for every finished job's blob on disk and re-queue a job
    /// whose blob is gone or has another size. This walks the whole
    /// ledger; `idem verify` also reads every blob back.
    #[arg(long)]
    blobs: bool,
    /// Write the repairs' events as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Move each bad blob to <out>/quarantine/ and re-queue its jobs.
    #[arg(long)]
    repair: bool,
    /// Write the re-queues' events as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RetryArgs {
    /// Retry every failed job.
    #[arg(long, conflicts_with = "jobs")]
    failed: bool,
    /// Job keys or `work_id/artifact_id`.
    #[arg(required_unless_present = "failed")]
    jobs: Vec<String>,
    /// Write the retries' events (job_state_changed) as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CancelArgs {
    /// Job keys or `work_id/artifact_id`.
    #[arg(required = true)]
    jobs: Vec<String>,
    /// Write the cancellations' events (job_failed, lease_released) as JSON Lines to this file (appends).
    #[arg(long)]
    events: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// Prune jobs that finished at least this long ago (seconds, or 12h,
    /// 7d; default: a week; 0: every finished job).
    #[arg(long, default_value = "604800", value_name = "DURATION", value_parser = crate::duration::secs)]
    older_than: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PauseArgs {
    /// One host (as in its URLs, e.g. `example.org` or `example.org:8080`);
    /// without it, every host.
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    format: ExportFormat,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Where the demo's ledger and artifacts go (created; reused if present).
    #[arg(long, default_value = "idem-demo")]
    dir: PathBuf,
    /// Artifacts to serve.
    #[arg(long, default_value_t = 300)]
    artifacts: usize,
    #[arg(long)]
    json: bool,
}

/// Parses a byte count: `1048576`, `512K`, `100M`, `32G`, `1T` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size (use bytes, or a number with K, M, G or T)"))
}

/// Logs (progress lines, warnings from the engine) go to stderr through
/// `tracing`; `IDEM_LOG` sets the level (error, warn, info, debug, trace;
/// default info).
fn init_logs() {
    let level = std::env::var("IDEM_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

fn main() -> ExitCode {
    init_logs();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            });
        }
    };
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader of stdout went away (`idem export | head`): nothing
        // is wrong with the work, and nobody is left to tell.
        Err(e) if out::is_closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let g = cli.global;
    match cli.command {
        Cmd::Plan(a) => plan::plan(&g, &a),
        Cmd::Run(a) => run::run(&g, &a),
        Cmd::Status(a) => commands::status(&g, a.json),
        Cmd::Show(a) => commands::show(&g, &a),
        Cmd::Reconcile(a) => commands::reconcile(&g, &a),
        Cmd::Verify(a) => commands::verify(&g, &a),
        Cmd::Retry(a) => commands::retry(&g, &a),
        Cmd::Cancel(a) => cancel::cancel(&g, &a),
        Cmd::Pause(a) => cancel::pause(&g, &a, true),
        Cmd::Resume(a) => cancel::pause(&g, &a, false),
        Cmd::Prune(a) => cancel::prune(&g, &a),
        Cmd::Export(a) => commands::export(&g, &a),
        Cmd::Demo(a) => demo::run(&g, &a),
        Cmd::Slo(SloCmd::Check(a)) => slo::check(&g, &a),
        Cmd::LedgerDrill(a) => commands::ledger_drill(&g, &a),
        Cmd::CopyLedger(a) => ledger::copy(&g, &a),
    }
}
