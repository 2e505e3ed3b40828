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

/// The jobs to lease from `candidates` (each with its host, in lease
/// order): at most `limit`, and on each host at most `per_host` live leases
/// counting those already live (`live(host)`, asked once per host) and
/// those picked here. Without `per_host`, the first `limit`.
pub fn pick_by_host_room<T, E>(
    candidates: impl IntoIterator<Item = (T, String)>,
    limit: usize,
    per_host: Option<usize>,
    mut live: impl FnMut(&str) -> Result<usize, E>,
) -> Result<Vec<T>, E> {
    let mut picked = Vec::new();
    let mut room: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (item, host) in candidates {
        if picked.len() >= limit {
            break;
        }
        if let Some(max) = per_host {
            let left = match room.get_mut(&host) {
                Some(left) => left,
                None => {
                    let used = live(&host)?;
                    room.entry(host).or_insert(max.saturating_sub(used))
                }
            };
            if *left == 0 {
                continue;
            }
            *left -= 1;
        }
        picked.push(item);
    }
    Ok(picked)
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
}

/// Rows scanned per lease call for `limit` jobs: enough to pass over the
/// jobs of hosts that are full, bounded so a lease costs the same however
/// long the queue.
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
        let got = pick_by_host_room(rows.clone(), 10, Some(2), live).unwrap();
        assert_eq!(got, vec![1, 2, 4, 6], "slow had one live lease already");
        let got = pick_by_host_room(rows.clone(), 2, Some(2), live).unwrap();
        assert_eq!(got, vec![1, 2]);
        let got = pick_by_host_room(rows, 3, None, live).unwrap();
        assert_eq!(got, vec![1, 2, 3], "no budget: the first ones");
    }
}
