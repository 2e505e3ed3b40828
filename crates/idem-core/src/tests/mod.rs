//! Core tests: scenario scripts with snapshot traces, the prior art's
//! defects as regression cases, and property tests over random interleavings.

mod props;
mod retries;
mod scenarios;
mod units;

use crate::event::Event;
use crate::job::{Command, Epoch, Job, JobError, WorkerId};
use crate::ledger::{OpDecision, OpKey, OpKind, OpResult};
use crate::ports::{LeaseRequest, Store, StoreError};
use crate::spec::{JobKey, JobSpec};
use crate::time::Timestamp;
use crate::MemStore;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Drives a [`MemStore`] on a virtual clock and writes a readable trace:
/// every call, its result, and the events it produced.
pub(crate) struct Sim {
    pub(crate) store: MemStore,
    pub(crate) now: Timestamp,
    pub(crate) trace: String,
    names: BTreeMap<JobKey, String>,
}

impl Sim {
    pub(crate) fn new() -> Self {
        Self {
            store: MemStore::new(),
            now: Timestamp::from_millis(1_000_000),
            trace: String::new(),
            names: BTreeMap::new(),
        }
    }

    pub(crate) fn at(&mut self, secs: i64) -> &mut Self {
        self.now = Timestamp::from_millis(1_000_000 + secs * 1000);
        self
    }

    fn name(&self, k: &JobKey) -> String {
        self.names
            .get(k)
            .cloned()
            .unwrap_or_else(|| k.to_hex()[..8].to_owned())
    }

    fn line(&mut self, s: String) {
        let t = (self.now.as_millis() - 1_000_000) / 1000;
        let _ = writeln!(self.trace, "t={t:<4} {s}");
    }

    fn events(&mut self, events: &[Event]) {
        for e in events {
            let mut v = serde_json::to_value(&e.kind).expect("events serialise");
            let obj = v.as_object_mut().expect("events are objects");
            let name = obj
                .remove("event")
                .and_then(|n| n.as_str().map(str::to_owned))
                .unwrap_or_default();
            let mut parts = Vec::new();
            for (k, val) in obj.iter() {
                let shown = match val.as_str() {
                    Some(s) if s.len() == 64 => {
                        JobKey::parse_hex(s).map_or_else(|_| s.to_owned(), |jk| self.name(&jk))
                    }
                    Some(s) => s.to_owned(),
                    None => val.to_string(),
                };
                parts.push(format!("{k}={shown}"));
            }
            let _ = writeln!(self.trace, "         ~ {name} {}", parts.join(" "));
        }
    }

    pub(crate) fn plan(&mut self, name: &str, work: &str, artifact: &str, url: &str) -> JobKey {
        let spec = JobSpec::new(work, artifact, url, None, None).expect("valid spec");
        let key = spec.key();
        self.names.entry(key).or_insert_with(|| name.to_owned());
        let r = self.store.plan(&[spec], 3, self.now).expect("plan");
        let outcome = serde_json::to_value(&r.value[0]).expect("serialise");
        self.line(format!(
            "plan {name} {url} -> {}",
            outcome["outcome"].as_str().unwrap_or("?")
        ));
        self.events(&r.events);
        key
    }

    pub(crate) fn lease(&mut self, owner: &str, limit: usize, ttl_s: u64) -> Vec<(JobKey, Epoch)> {
        self.lease_as(owner, limit, ttl_s, false)
    }

    /// A lease of one suspect, for a worker that runs it alone.
    pub(crate) fn lease_alone(&mut self, owner: &str, ttl_s: u64) -> Vec<(JobKey, Epoch)> {
        self.lease_as(owner, 1, ttl_s, true)
    }

    fn lease_as(
        &mut self,
        owner: &str,
        limit: usize,
        ttl_s: u64,
        isolated: bool,
    ) -> Vec<(JobKey, Epoch)> {
        let req = LeaseRequest {
            owner: WorkerId::new(owner),
            limit,
            ttl_ms: ttl_s * 1000,
            dead_owners: vec![],
            commit: crate::Commit::Durable,
            isolated,
            per_host: None,
            host_interval_ms: None,
            host_rules: Default::default(),
        };
        let r = self.store.lease(&req, self.now).expect("lease");
        let got: Vec<(JobKey, Epoch)> = r
            .value
            .iter()
            .map(|j| (j.key, j.lease.as_ref().map(|l| l.epoch).unwrap_or_default()))
            .collect();
        let shown: Vec<String> = got
            .iter()
            .map(|(k, e)| format!("{}@{e}", self.name(k)))
            .collect();
        let alone = if isolated { " alone" } else { "" };
        self.line(format!(
            "lease{alone} {owner} limit={limit} -> [{}]",
            shown.join(", ")
        ));
        self.events(&r.events);
        got
    }

    pub(crate) fn apply(
        &mut self,
        who: &str,
        key: JobKey,
        cmd: Command,
    ) -> Result<Job, StoreError> {
        let label = cmd.name();
        let r = self.store.apply(&key, cmd, self.now);
        let n = self.name(&key);
        match &r {
            Ok(a) => {
                self.line(format!("{who} {label} {n} -> {}", a.value.state));
                let ev = a.events.clone();
                self.events(&ev);
            }
            Err(e) => self.line(format!("{who} {label} {n} -> REFUSED {e}")),
        }
        r.map(|a| a.value)
    }

    pub(crate) fn begin(
        &mut self,
        who: &str,
        key: JobKey,
        kind: OpKind,
        epoch: Epoch,
    ) -> Result<OpDecision, StoreError> {
        let op = OpKey {
            job: key,
            kind,
            epoch,
        };
        let r = self.store.begin_op(&op, &WorkerId::new(who), self.now);
        let n = self.name(&key);
        match &r {
            Ok(a) => {
                let d = match &a.value {
                    OpDecision::Run => "run".to_owned(),
                    OpDecision::Replay { result, .. } => format!(
                        "replay {}",
                        serde_json::to_string(result).unwrap_or_default()
                    ),
                };
                self.line(format!("{who} begin {kind} {n}@{epoch} -> {d}"));
                let ev = a.events.clone();
                self.events(&ev);
            }
            Err(e) => self.line(format!("{who} begin {kind} {n}@{epoch} -> REFUSED {e}")),
        }
        r.map(|a| a.value)
    }

    pub(crate) fn finish(
        &mut self,
        who: &str,
        key: JobKey,
        kind: OpKind,
        epoch: Epoch,
        outcome: Result<OpResult, JobError>,
        then: Option<Command>,
    ) -> Result<Job, StoreError> {
        let op = OpKey {
            job: key,
            kind,
            epoch,
        };
        let r = self.store.finish_op(&op, outcome, then, self.now);
        let n = self.name(&key);
        match &r {
            Ok(a) => {
                self.line(format!(
                    "{who} finish {kind} {n}@{epoch} -> {}",
                    a.value.state
                ));
                let ev = a.events.clone();
                self.events(&ev);
            }
            Err(e) => self.line(format!("{who} finish {kind} {n}@{epoch} -> REFUSED {e}")),
        }
        r.map(|a| a.value)
    }

    pub(crate) fn abandon(&mut self) -> u64 {
        let r = self.store.abandon_dead_ops(self.now).expect("abandon");
        self.line(format!("reconcile abandon_dead_ops -> {}", r.value));
        let ev = r.events.clone();
        self.events(&ev);
        r.value
    }

    pub(crate) fn job(&self, key: JobKey) -> Job {
        self.store.job(&key).expect("job").expect("exists")
    }

    pub(crate) fn note(&mut self, s: &str) {
        let _ = writeln!(self.trace, "# {s}");
    }
}
