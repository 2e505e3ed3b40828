//! idem-worker: the engine. A tokio driver that leases jobs from a store,
//! runs HEAD, stream and finalize through the ports, renews leases while it
//! works, and reconciles what crashes leave behind.
//!
//! The driver loop, written once:
//!
//! 1. reconcile (expired leases, dead ops, orphaned parts, lost commits);
//! 2. lease up to `concurrency − in_flight` due jobs (taking over the jobs
//!    of dead local processes at once);
//! 3. run each leased job on its own task, from its last committed step;
//!    a task that finalizes its job leases the next one in that same
//!    write and goes on with it, so a busy run rarely leases in step 2;
//! 4. when nothing is leasable and nothing is in flight: stop if every job
//!    is terminal (unless following), else wait for the next due job.
//!
//! Store calls are blocking (SQLite); they run on tokio's blocking pool and
//! are never held across network or disk I/O.
//!
//! ## Example
//!
//! ```no_run
//! use idem_core::{Clock, JobSpec, Store};
//! use idem_store_sqlite::{Options, SqliteStore};
//! use idem_worker::{Engine, EngineConfig, NullSink, SystemClock};
//! use std::sync::Arc;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(SqliteStore::open("idem.db", &Options::default())?);
//! let spec = JobSpec::new("W1", "pdf", "https://example.org/w1.pdf", None, None)?;
//! store.plan(&[spec], 5, SystemClock.now())?;
//! let http = Arc::new(idem_http::HttpClient::new(idem_http::Policy::default())?);
//! let cfg = EngineConfig { out_dir: "artifacts".into(), ..EngineConfig::default() };
//! let engine = Arc::new(Engine::new(store, http, cfg, Arc::new(NullSink))?);
//! let summary = tokio::runtime::Runtime::new()?.block_on(engine.run())?;
//! println!("{} finalized", summary.finalized);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/` has the same with events printed by a sink of your own, and
//! an engine over an `Http` of your own. Depends on idem-core, tokio,
//! tracing and libc; any `Store` and `Http` implementation plugs in.

mod blobs;
pub mod drill;
mod drive;
mod durable;
pub mod files;
mod finalize;
mod head;
mod hooks;
mod isolate;
pub mod owner;
mod part_writer;
pub mod reconcile;
mod reuse;
mod small;
mod stream;
pub mod verify;

use idem_core::ports::{LeaseRequest, Store, StoreError};
use idem_core::{Clock, Event, Http, JobState, RetryPolicy, WorkerId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

pub use files::OutDir;
pub use isolate::{ChildEnd, Isolator};
pub use owner::SystemClock;
pub use reconcile::{BlobCheck, ReconcileOptions, ReconcileReport};

/// Receives every event the engine's transitions produce.
pub trait EventSink: Send + Sync {
    fn emit(&self, events: &[Event]);
}

/// A sink that drops events.
#[derive(Debug, Default)]
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&self, _: &[Event]) {}
}

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub out_dir: PathBuf,
    /// Jobs in flight in this process.
    pub concurrency: usize,
    /// Requests in flight per host.
    pub per_host: usize,
    /// Most requests started per second per host, if limited: leases of
    /// one host's jobs are spaced by its inverse across every worker that
    /// shares the ledger, and this process spaces its own requests too.
    pub per_host_rate: Option<f64>,
    /// Per-host overrides of `per_host` and `per_host_rate`, and headers
    /// sent to matching hosts.
    pub host_rules: Arc<idem_core::hosts::HostRules>,
    pub lease_ttl_ms: u64,
    pub retry: RetryPolicy,
    /// Keep polling for new jobs instead of stopping when all are terminal.
    pub follow: bool,
    /// How often to look for due jobs when idle.
    pub poll_ms: u64,
    /// Seed of the backoff jitter.
    pub seed: u64,
    /// Largest body accepted (also enforced by the HTTP adapter).
    pub max_bytes: Option<u64>,
    /// (bytes per second, window in seconds): an attempt whose body arrives
    /// slower than this over a whole window is cut off and retried later.
    pub min_speed: Option<(u64, u64)>,
    /// Under `follow`, how often the reconciler runs again (a blob deleted
    /// from the store, a part left by a crashed neighbour); `None`: only at
    /// start.
    pub reconcile_every_ms: Option<u64>,
    /// Send a HEAD before each fresh job's GET. By default a fresh job sends
    /// only the GET and takes HEAD's facts (length, type, validators) from
    /// its headers: one round trip and one request per file.
    pub probe_head: bool,
    /// A job whose URL another job finalized reuses that blob without a
    /// request while that fetch is at most this old; older, it asks the
    /// server first with a conditional GET (the fetch's validators): 304
    /// reuses it, anything else is fetched as new content, and a fetch with
    /// no validators is simply fetched again.
    pub reuse_max_age_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("artifacts"),
            concurrency: 8,
            per_host: 2,
            per_host_rate: None,
            host_rules: Arc::default(),
            lease_ttl_ms: 60_000,
            retry: RetryPolicy::default(),
            follow: false,
            poll_ms: 200,
            seed: 0x1de3,
            max_bytes: None,
            min_speed: Some((1024, 60)),
            probe_head: false,
            reconcile_every_ms: Some(300_000),
            reuse_max_age_ms: 86_400_000,
        }
    }
}

/// Live counters of a run, for progress bars and summaries.
#[derive(Debug, Default)]
pub struct Progress {
    pub finalized: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub fenced: AtomicU64,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunSummary {
    pub finalized: u64,
    pub skipped_duplicate: u64,
    pub failed: u64,
    pub retries_scheduled: u64,
    pub fenced: u64,
    pub bytes_downloaded: u64,
    pub requests: u64,
    pub reconcile: ReconcileReport,
    /// Whether the run stopped early on a signal.
    pub interrupted: bool,
}

/// Why the engine could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    // The reason is in the message and deliberately not a `source`: a
    // chain printer would show it twice.
    #[error("output directory {path}: {error}")]
    OutDir {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The engine. Generic over the store and HTTP adapters it drives.
pub struct Engine<S: Store + 'static, H: Http> {
    pub(crate) store: Arc<S>,
    pub(crate) http: Arc<H>,
    pub(crate) cfg: Arc<EngineConfig>,
    pub(crate) out: OutDir,
    pub(crate) publisher: durable::Publisher,
    pub(crate) sink: Arc<dyn EventSink>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) owner: WorkerId,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) stop_notify: Arc<tokio::sync::Notify>,
    pub(crate) progress: Arc<Progress>,
    hosts: Mutex<HashMap<String, HostGate>>,
    rng_seq: AtomicU64,
    /// Owners of live leases known dead (refreshed by the run loop): their
    /// jobs may be taken over early by any lease this process makes.
    dead: Mutex<Vec<WorkerId>>,
    /// Runs suspects in child processes; without one, suspects run in this
    /// process and a death there is never attributed to them.
    isolator: Option<Arc<dyn Isolator>>,
}

/// Hosts whose gates are kept however idle; past this, idle ones are
/// forgotten.
const MAX_IDLE_HOSTS: usize = 4096;

/// Jobs a periodic reconcile pass looks at for missing blobs: a slice that
/// takes well under a second, so a ledger of millions is checked over hours.
const BLOB_CHECK_SLICE_JOBS: usize = 50_000;

#[derive(Clone)]
struct HostGate {
    permits: Arc<Semaphore>,
    /// How many permits it was made with.
    size: usize,
    next_start: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
}

impl<S: Store + 'static, H: Http> Engine<S, H> {
    pub fn new(
        store: Arc<S>,
        http: Arc<H>,
        cfg: EngineConfig,
        sink: Arc<dyn EventSink>,
    ) -> Result<Self, EngineError> {
        let out = OutDir::prepare(&cfg.out_dir).map_err(|error| EngineError::OutDir {
            path: cfg.out_dir.clone(),
            error,
        })?;
        Ok(Self {
            store,
            http,
            publisher: durable::Publisher::new(out.clone()),
            out,
            sink,
            clock: Arc::new(SystemClock),
            owner: owner::this_worker(),
            stop: Arc::new(AtomicBool::new(false)),
            stop_notify: Arc::new(tokio::sync::Notify::new()),
            progress: Arc::new(Progress::default()),
            hosts: Mutex::new(HashMap::new()),
            rng_seq: AtomicU64::new(cfg.seed),
            dead: Mutex::new(Vec::new()),
            isolator: None,
            cfg: Arc::new(cfg),
        })
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Runs suspects (jobs whose holders keep dying) through `iso`, each
    /// alone in a child process, so that a job that kills its worker is
    /// told from one that was only there when workers died.
    pub fn with_isolator(mut self, iso: Arc<dyn Isolator>) -> Self {
        self.isolator = Some(iso);
        self
    }

    /// Acts as `owner`: a child process running a job its parent leased
    /// (see [`Isolator`]).
    pub fn with_owner(mut self, owner: WorkerId) -> Self {
        self.owner = owner;
        self
    }

    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }

    /// A handle that stops the run gracefully: no new leases; in-flight jobs
    /// release their leases at the next safe point.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: Arc::clone(&self.stop),
            notify: Arc::clone(&self.stop_notify),
        }
    }

    pub fn owner(&self) -> &WorkerId {
        &self.owner
    }

    pub(crate) fn now(&self) -> idem_core::Timestamp {
        self.clock.now()
    }

    pub(crate) fn emit(&self, events: &[Event]) {
        if !events.is_empty() {
            self.sink.emit(events);
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Runs a blocking store call off the async threads.
    pub(crate) async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    pub(crate) fn next_seed(&self) -> u64 {
        self.rng_seq
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }

    /// A lease of up to `limit` jobs for this process, taking over the
    /// jobs of owners known dead. Deferred: a lease is an intermediate
    /// record (and a lease step commits as its whole write does).
    /// `isolated`: one suspect, for this process to run alone.
    fn lease_request(&self, limit: usize, isolated: bool) -> LeaseRequest {
        LeaseRequest {
            isolated,
            per_host: Some(self.cfg.per_host.max(1)),
            host_interval_ms: self.default_interval_ms(),
            host_rules: Arc::clone(&self.cfg.host_rules),
            owner: self.owner.clone(),
            limit,
            ttl_ms: self.cfg.lease_ttl_ms,
            dead_owners: self
                .dead
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            commit: idem_core::Commit::Deferred,
        }
    }

    /// The lease a worker adds to the write that finishes its job, so its
    /// next job costs no write of its own; none once the run is stopping.
    pub(crate) fn successor_request(&self) -> Option<LeaseRequest> {
        (!self.stopping()).then(|| self.lease_request(1, false))
    }

    /// Reports a lease call: how many jobs it took and how long it took;
    /// `successor`: made in the write that finished the previous job.
    pub(crate) fn emit_lease_call(&self, jobs: usize, asked: std::time::Instant, successor: bool) {
        self.emit(&[idem_core::EventKind::LeaseCall {
            owner: self.owner.clone(),
            jobs: jobs as u64,
            elapsed_ms: u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX),
            successor,
        }
        .at(self.now())]);
    }

    /// The gate of `host`, made on first use. The map is bounded: past
    /// `MAX_IDLE_HOSTS` entries, the hosts with nothing in flight and no
    /// pacing pending are forgotten, so a service that meets a million hosts
    /// keeps only the busy ones.
    fn host_gate(&self, host: &str) -> HostGate {
        let mut hosts = self
            .hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if hosts.len() > MAX_IDLE_HOSTS && !hosts.contains_key(host) {
            let now = tokio::time::Instant::now();
            hosts.retain(|_, g| {
                g.permits.available_permits() < g.size
                    || g.next_start.try_lock().map_or(true, |t| *t > now)
            });
        }
        hosts
            .entry(host.to_owned())
            .or_insert_with(|| {
                let size = self.host_budget(host);
                HostGate {
                    permits: Arc::new(Semaphore::new(size)),
                    size,
                    next_start: Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now())),
                }
            })
            .clone()
    }

    /// Jobs at once on `host`: its rule's budget, else `per_host`.
    fn host_budget(&self, host: &str) -> usize {
        self.cfg
            .host_rules
            .per_host(host, Some(self.cfg.per_host))
            .unwrap_or(1)
            .max(1)
    }

    /// The pause between two requests to a host from `per_host_rate`.
    fn default_interval_ms(&self) -> Option<u64> {
        self.cfg
            .per_host_rate
            .filter(|r| *r > 0.0)
            .map(|r| (1000.0 / r).ceil() as u64)
    }

    /// The headers a request for `job` carries: its host's rule's, then the
    /// job's own (which win over a rule's of the same name).
    pub(crate) fn headers_of(&self, job: &idem_core::Job) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .cfg
            .host_rules
            .headers(&job.url().host())
            .iter()
            .filter(|(n, _)| {
                !job.spec
                    .headers
                    .iter()
                    .any(|(m, _)| m.eq_ignore_ascii_case(n))
            })
            .cloned()
            .collect();
        all.extend(job.spec.headers.iter().cloned());
        all
    }

    /// Waits for one of `host`'s slots (`per_host` jobs at a time), held
    /// for a job's whole life.
    pub(crate) async fn host_slot(&self, host: &str) -> tokio::sync::OwnedSemaphorePermit {
        self.host_gate(host)
            .permits
            .acquire_owned()
            .await
            .expect("host semaphores are never closed")
    }

    /// Waits until a request to `host` may start (`per_host_rate`), and
    /// counts it.
    pub(crate) async fn host_pace(&self, host: &str) {
        if let Some(gap) = self
            .cfg
            .host_rules
            .interval_ms(host, self.default_interval_ms())
        {
            let gate = self.host_gate(host);
            let interval = Duration::from_millis(gap);
            let mut next = gate.next_start.lock().await;
            let now = tokio::time::Instant::now();
            if *next > now {
                tokio::time::sleep_until(*next).await;
            }
            *next = (*next).max(now) + interval;
        }
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Refreshes the owners of live leases that are dead processes on this
    /// host.
    async fn refresh_dead_owners(&self) {
        let dead = self.dead_owners().await;
        *self
            .dead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = dead;
    }

    /// Owners of live leases that are dead processes on this host.
    async fn dead_owners(&self) -> Vec<WorkerId> {
        let now = self.now();
        let owners = self
            .store_call(move |s| s.lease_owners(now))
            .await
            .unwrap_or_default();
        let host = owner::hostname();
        owners
            .into_iter()
            .filter(|o| *o != self.owner && owner::is_dead_local(o, &host))
            .collect()
    }

    /// Runs until every job is terminal (or, following, until stopped).
    pub async fn run(self: &Arc<Self>) -> Result<RunSummary, EngineError> {
        let reconcile = self.reconcile(&ReconcileOptions::default()).await?;
        let mut reconciled = tokio::time::Instant::now();
        // The periodic passes check finished jobs' blobs a slice at a time,
        // walking the ledger round and round.
        let mut blob_check_from = None;
        let mut tasks = tokio::task::JoinSet::new();
        let mut dead_check = tokio::time::Instant::now();
        let mut isolated_running = false;
        self.refresh_dead_owners().await;
        let poll = Duration::from_millis(self.cfg.poll_ms.max(10));
        loop {
            while let Some(r) = tasks.try_join_next() {
                if let Err(e) = r {
                    tracing::error!(error = %e, "a job task failed");
                }
            }
            if self.stopping() {
                break;
            }
            // A service that runs for weeks repairs as it goes, not only at
            // its start: its events and summary count what it repairs.
            if let Some(every) = self.cfg.reconcile_every_ms.filter(|_| self.cfg.follow) {
                if reconciled.elapsed() >= Duration::from_millis(every) {
                    reconciled = tokio::time::Instant::now();
                    let opts = ReconcileOptions {
                        dry_run: false,
                        blobs: BlobCheck::Slice {
                            after: blob_check_from,
                            jobs: BLOB_CHECK_SLICE_JOBS,
                        },
                    };
                    match self.reconcile(&opts).await {
                        Ok(r) => blob_check_from = r.blob_check_next,
                        Err(e) => {
                            tracing::warn!(error = %e, "reconcile failed; the next one retries")
                        }
                    }
                }
            }
            // A suspect runs alone: while it does, this process leases
            // nothing else.
            if tasks.is_empty() {
                isolated_running = false;
            }
            let room = if isolated_running {
                0
            } else {
                self.cfg.concurrency.saturating_sub(tasks.len())
            };
            let mut leased_any = false;
            // Refreshed whether or not there is room: workers that lease
            // their own next jobs use it too.
            if dead_check.elapsed() > Duration::from_secs(2) {
                self.refresh_dead_owners().await;
                dead_check = tokio::time::Instant::now();
            }
            if room > 0 {
                let mut leased = self.lease_some(room, false).await;
                // Nothing else to do: run one suspect, alone, so that a death
                // while it runs is the suspect's doing.
                if matches!(&leased, Ok(jobs) if jobs.is_empty()) && tasks.is_empty() {
                    leased = self.lease_some(1, true).await;
                    isolated_running = matches!(&leased, Ok(jobs) if !jobs.is_empty());
                }
                match leased {
                    Ok(jobs) => {
                        for (job, dup) in jobs {
                            leased_any = true;
                            let me = Arc::clone(self);
                            let alone = job.lease.as_ref().filter(|l| l.isolated).map(|l| l.epoch);
                            match (alone, self.isolator.clone()) {
                                (Some(epoch), Some(iso)) => {
                                    tasks.spawn(me.run_in_child(iso, job.key, epoch));
                                }
                                _ => {
                                    tasks.spawn(async move { me.run_job(job, dup).await });
                                }
                            }
                        }
                    }
                    Err(e) if e.is_transient() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if leased_any {
                continue;
            }
            if tasks.is_empty() && !self.cfg.follow {
                let now = self.now();
                let st = self.store_call(move |s| s.status(now)).await?;
                let live: u64 = st.unfinished();
                if live == 0 {
                    break;
                }
            }
            // Wait for a task to finish, a stop, or the next poll.
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = self.stop_notify.notified() => {}
                Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "a job task failed");
                    }
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a job task failed");
            }
        }
        let p = &self.progress;
        Ok(RunSummary {
            finalized: p.finalized.load(Ordering::SeqCst),
            skipped_duplicate: p.duplicates.load(Ordering::SeqCst),
            failed: p.failed.load(Ordering::SeqCst),
            retries_scheduled: p.retried.load(Ordering::SeqCst),
            fenced: p.fenced.load(Ordering::SeqCst),
            bytes_downloaded: p.bytes.load(Ordering::SeqCst),
            requests: p.requests.load(Ordering::SeqCst),
            reconcile,
            interrupted: self.stopping(),
        })
    }

    /// Leases up to `limit` jobs (`isolated`: one suspect, to run alone),
    /// each with the content already held under its URL.
    async fn lease_some(
        &self,
        limit: usize,
        isolated: bool,
    ) -> Result<Vec<(idem_core::Job, Option<reuse::Stored>)>, StoreError> {
        let req = self.lease_request(limit, isolated);
        let now = self.now();
        let asked = std::time::Instant::now();
        let root = self.out.root().to_path_buf();
        let (applied, dups) = self
            .store_call(move |s| {
                let a = s.lease(&req, now)?;
                let dups: Vec<_> = a
                    .value
                    .iter()
                    .map(|j| reuse::duplicate_of(s, &root, j))
                    .collect();
                Ok((a, dups))
            })
            .await?;
        self.emit_lease_call(applied.value.len(), asked, false);
        self.emit(&applied.events);
        Ok(applied.value.into_iter().zip(dups).collect())
    }

    /// Counts a job's terminal outcome.
    pub(crate) fn count_outcome(&self, state: JobState) {
        let c = match state {
            JobState::Finalized => &self.progress.finalized,
            JobState::SkippedDuplicate => &self.progress.duplicates,
            JobState::Failed => &self.progress.failed,
            JobState::Planned => &self.progress.retried,
            _ => return,
        };
        c.fetch_add(1, Ordering::SeqCst);
    }
}

/// Stops a running engine gracefully.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Stopper {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}
