//! Sharing a worker's slots between hosts: the lease order and the host
//! budget every store applies.
//!
//! Each job gets a *host rank* when it is planned: its ordinal among the
//! jobs of its host (the first job of a host is 0, the next 1, ...). Leases
//! take due jobs in (rank, due time) order, so the queue interleaves hosts
//! the way a polite crawler's per-host queues do: a host with a million
//! jobs does not stand in front of a host with ten. And a lease skips the
//! jobs of a host that already has its budget of live leases (fleet-wide:
//! every process sharing the ledger counts), so no worker holds a lease
//! while it waits for a host's permit.

/// The name that stands for every host in a pause
/// ([`crate::exec::Write::Pause`]); no URL has it as its host.
pub const ALL_HOSTS: &str = "*";

/// Settings for the hosts a pattern matches, overriding the run's: an
/// exact host (`export.arxiv.org`), a domain and its subdomains
/// (`*.example.org`), or every host (`*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRule {
    pub pattern: String,
    /// Live leases at once on each matching host, fleet-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_host: Option<usize>,
    /// Least time between two leases of jobs on one matching host,
    /// fleet-wide (a request rate: 500 is two a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Request headers sent to a matching host (a job's own win).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl HostRule {
    /// How closely the pattern matches `host`: `None` if not at all; a
    /// higher rank wins (an exact host over a domain, a longer domain
    /// over a shorter, any domain over `*`).
    fn rank(&self, host: &str) -> Option<usize> {
        let p = self.pattern.as_str();
        if p == ALL_HOSTS {
            return Some(0);
        }
        if let Some(domain) = p.strip_prefix("*.") {
            let sub = host.len() > domain.len()
                && host.ends_with(domain)
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.';
            return (sub || host == domain).then_some(1 + domain.len());
        }
        (p == host).then_some(usize::MAX)
    }
}

/// The run's per-host settings: for each host, the rule whose pattern
/// matches it most closely (see [`HostRule`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRules {
    rules: Vec<HostRule>,
}

impl HostRules {
    /// Rules whose patterns are lower-cased; a pattern given twice keeps
    /// its last rule.
    pub fn new(rules: impl IntoIterator<Item = HostRule>) -> Self {
        let mut out: Vec<HostRule> = Vec::new();
        for mut r in rules {
            r.pattern = r.pattern.trim().to_ascii_lowercase();
            out.retain(|o| o.pattern != r.pattern);
            out.push(r);
        }
        Self { rules: out }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    /// The rule that applies to `host`, if any.
    pub fn rule_for(&self, host: &str) -> Option<&HostRule> {
        self.rules
            .iter()
            .filter_map(|r| r.rank(host).map(|k| (k, r)))
            .max_by_key(|(k, _)| *k)
            .map(|(_, r)| r)
    }

    /// Live leases allowed at once on `host`: its rule's, else `default`.
    pub fn per_host(&self, host: &str, default: Option<usize>) -> Option<usize> {
        self.rule_for(host).and_then(|r| r.per_host).or(default)
    }

    /// Least time between two leases on `host`: its rule's, else `default`.
    pub fn interval_ms(&self, host: &str, default: Option<u64>) -> Option<u64> {
        self.rule_for(host).and_then(|r| r.interval_ms).or(default)
    }

    /// The headers the rule for `host` adds to its requests.
    pub fn headers(&self, host: &str) -> &[(String, String)] {
        self.rule_for(host).map_or(&[], |r| r.headers.as_slice())
    }
}

/// The host budget of one lease call: how many more leases each host seen
/// so far may take.
#[derive(Debug)]
pub struct HostRoom<'a> {
    per_host: Option<usize>,
    interval_ms: Option<u64>,
    rules: &'a HostRules,
    room: std::collections::HashMap<String, usize>,
}

impl<'a> HostRoom<'a> {
    /// At most `per_host` live leases per host, and one lease per call on
    /// a host paced by `interval_ms`, unless `rules` say otherwise for a
    /// host; `None`: no budget.
    pub fn new(per_host: Option<usize>, interval_ms: Option<u64>, rules: &'a HostRules) -> Self {
        Self {
            per_host,
            interval_ms,
            rules,
            room: std::collections::HashMap::new(),
        }
    }

    /// The pause `host` needs between two leases, if it is paced.
    pub fn interval_ms(&self, host: &str) -> Option<u64> {
        self.rules.interval_ms(host, self.interval_ms)
    }

    /// Takes a lease on `host` if it has room, counting the leases already
    /// live there (`live(host)`, asked once per host) and those taken here.
    pub fn take<E>(
        &mut self,
        host: &str,
        live: impl FnOnce(&str) -> Result<usize, E>,
    ) -> Result<bool, E> {
        let max = self.rules.per_host(host, self.per_host);
        let paced = self.interval_ms(host).is_some();
        if max.is_none() && !paced {
            return Ok(true);
        }
        let left = match self.room.get_mut(host) {
            Some(left) => left,
            None => {
                let used = live(host)?;
                let mut left = max.unwrap_or(usize::MAX).saturating_sub(used);
                if paced && used != usize::MAX {
                    // One request slot per pause: the next lease waits for it.
                    left = left.min(1);
                }
                self.room.entry(host.to_owned()).or_insert(left)
            }
        };
        if *left == 0 {
            return Ok(false);
        }
        *left -= 1;
        Ok(true)
    }

    /// The hosts seen to be full: a store's next look at its queue may
    /// leave them out.
    pub fn full(&self) -> Vec<String> {
        self.room
            .iter()
            .filter(|(_, left)| **left == 0)
            .map(|(h, _)| h.clone())
            .collect()
    }
}

/// The jobs to lease from `candidates` (each with its host, in lease
/// order): at most `limit`, within `room`'s budget.
pub fn pick_by_host_room<T, E>(
    candidates: impl IntoIterator<Item = (T, String)>,
    limit: usize,
    room: &mut HostRoom<'_>,
    mut live: impl FnMut(&str) -> Result<usize, E>,
) -> Result<Vec<T>, E> {
    let mut picked = Vec::new();
    for (item, host) in candidates {
        if picked.len() >= limit {
            break;
        }
        if room.take(&host, &mut live)? {
            picked.push(item);
        }
    }
    Ok(picked)
}

/// Longest a host's own `Retry-After` cools it down for.
pub const MAX_COOLDOWN_MS: u64 = 15 * 60 * 1000;

/// How long after its first lease a job's throttled answers (see
/// [`is_throttled`]) cost it no attempt: a host that keeps asking to be left
/// alone delays its jobs this long before they start to fail.
pub const MAX_THROTTLED_WAIT_MS: u64 = 6 * 60 * 60 * 1000;

/// Whether `error` is a host asking to be left alone for a while: a 429 or
/// 503 carrying a `Retry-After` of more than nothing. It says nothing
/// against the job.
pub fn is_throttled(error: &crate::JobError) -> bool {
    matches!(error.reason.as_str(), "http_429" | "http_503")
        && error.retry_after_ms.is_some_and(|ms| ms > 0)
}

/// When a host that answered with `error` may be asked again, if it asked
/// to be left alone: a 429 or 503 carrying `Retry-After` (capped at
/// [`MAX_COOLDOWN_MS`]). The whole fleet holds off that host until then,
/// not only the job that was told.
pub fn cooldown_after(error: &crate::JobError, now: crate::Timestamp) -> Option<crate::Timestamp> {
    let wait = error
        .retry_after_ms
        .filter(|_| matches!(error.reason.as_str(), "http_429" | "http_503"))?;
    Some(now.plus_ms(wait.min(MAX_COOLDOWN_MS)))
}

/// How busy one host is, for `idem status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostLoad {
    pub host: String,
    /// Unfinished jobs due now and not held.
    pub due: u64,
    /// Jobs held under a live lease.
    pub in_flight: u64,
    /// Unfinished jobs in all.
    pub unfinished: u64,
    /// Until when the host asked to be left alone, if that is still ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooling_down_until: Option<crate::Timestamp>,
}

/// Rows a store reads at a time, per lease call for `limit` jobs, before it
/// looks again leaving out the hosts it found full.
pub fn scan_for(limit: usize) -> usize {
    limit.saturating_mul(8).saturating_add(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_hosts_are_passed_over_and_counts_include_live_leases() {
        let rows = [
            (1, "slow"),
            (2, "fast"),
            (3, "slow"),
            (4, "fast"),
            (5, "slow"),
            (6, "other"),
        ]
        .map(|(i, h)| (i, h.to_owned()));
        let live = |h: &str| Ok::<_, ()>(usize::from(h == "slow"));
        let none = HostRules::default();
        let mut room = HostRoom::new(Some(2), None, &none);
        let got = pick_by_host_room(rows.clone(), 10, &mut room, live).unwrap();
        assert_eq!(got, vec![1, 2, 4, 6], "slow had one live lease already");
        let mut full = room.full();
        full.sort();
        assert_eq!(full, ["fast", "slow"]);
        let got = pick_by_host_room(
            rows.clone(),
            2,
            &mut HostRoom::new(Some(2), None, &none),
            live,
        )
        .unwrap();
        assert_eq!(got, vec![1, 2]);
        let got = pick_by_host_room(rows.clone(), 3, &mut HostRoom::new(None, None, &none), live)
            .unwrap();
        assert_eq!(got, vec![1, 2, 3], "no budget: the first ones");
        let rules = HostRules::new([
            HostRule {
                pattern: "SLOW".into(),
                per_host: Some(1),
                ..HostRule::default()
            },
            HostRule {
                pattern: "*".into(),
                per_host: Some(5),
                ..HostRule::default()
            },
        ]);
        let got = pick_by_host_room(
            rows.clone(),
            10,
            &mut HostRoom::new(Some(2), None, &rules),
            live,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![2, 4, 6],
            "slow's own budget is 1 (used), the others 5"
        );
        let got =
            pick_by_host_room(rows, 10, &mut HostRoom::new(None, Some(500), &none), live).unwrap();
        assert_eq!(got, vec![1, 2, 6], "a paced host takes one lease per call");
    }

    #[test]
    fn the_closest_pattern_wins() {
        let rule = |p: &str, n| HostRule {
            pattern: p.into(),
            per_host: Some(n),
            ..HostRule::default()
        };
        let rules = HostRules::new([
            rule("*", 1),
            rule("*.example.org", 2),
            rule("*.a.example.org", 3),
            rule("b.example.org", 4),
        ]);
        let got = |h: &str| rules.per_host(h, None);
        assert_eq!(got("example.org"), Some(2));
        assert_eq!(got("x.a.example.org"), Some(3));
        assert_eq!(got("b.example.org"), Some(4));
        assert_eq!(got("notexample.org"), Some(1));
        assert_eq!(HostRules::default().per_host("h", Some(7)), Some(7));
    }
}
