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

/// The host budget of one lease call: how many more leases each host seen
/// so far may take.
#[derive(Debug)]
pub struct HostRoom {
    per_host: Option<usize>,
    room: std::collections::HashMap<String, usize>,
}

impl HostRoom {
    /// At most `per_host` live leases per host; `None`: no budget.
    pub fn new(per_host: Option<usize>) -> Self {
        Self {
            per_host,
            room: std::collections::HashMap::new(),
        }
    }

    /// Takes a lease on `host` if it has room, counting the leases already
    /// live there (`live(host)`, asked once per host) and those taken here.
    pub fn take<E>(
        &mut self,
        host: &str,
        live: impl FnOnce(&str) -> Result<usize, E>,
    ) -> Result<bool, E> {
        let Some(max) = self.per_host else {
            return Ok(true);
        };
        let left = match self.room.get_mut(host) {
            Some(left) => left,
            None => {
                let used = live(host)?;
                self.room
                    .entry(host.to_owned())
                    .or_insert(max.saturating_sub(used))
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
    room: &mut HostRoom,
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

/// When a host that answered with `error` may be asked again, if it asked
/// to be left alone: a 429 or 503 carrying `Retry-After` (capped at
/// [`MAX_COOLDOWN_MS`]). The whole fleet holds off that host until then,
/// not only the job that was told.
pub fn cooldown_after(error: &crate::JobError, now: crate::Timestamp) -> Option<crate::Timestamp> {
    let throttled = matches!(error.reason.as_str(), "http_429" | "http_503");
    let wait = error.retry_after_ms.filter(|_| throttled)?;
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
        let mut room = HostRoom::new(Some(2));
        let got = pick_by_host_room(rows.clone(), 10, &mut room, live).unwrap();
        assert_eq!(got, vec![1, 2, 4, 6], "slow had one live lease already");
        let mut full = room.full();
        full.sort();
        assert_eq!(full, ["fast", "slow"]);
        let got = pick_by_host_room(rows.clone(), 2, &mut HostRoom::new(Some(2)), live).unwrap();
        assert_eq!(got, vec![1, 2]);
        let got = pick_by_host_room(rows, 3, &mut HostRoom::new(None), live).unwrap();
        assert_eq!(got, vec![1, 2, 3], "no budget: the first ones");
    }
}
