//! Leasing: which due jobs a worker takes, within every host's budget, and
//! what taking one changes.

use super::{refused, stamp};
use crate::hosts::{self, HostRoom};
use crate::job::{transition, Command, Job};
use crate::ledger;
use crate::ports::{Applied, LeaseRequest, StoreError};
use crate::spec::JobKey;
use crate::time::Timestamp;
use crate::tx::Tx;

/// Leases up to `req.limit` jobs: due ones in lease order within the host
/// budget, then (room left) the jobs of owners known dead; a suspect only
/// by an isolated lease, one at a time.
pub(super) fn lease<T: Tx + ?Sized>(
    tx: &mut T,
    req: &LeaseRequest,
    now: Timestamp,
) -> Result<Applied<Vec<Job>>, StoreError> {
    if tx.paused(hosts::ALL_HOSTS)? {
        return Ok(Applied {
            value: Vec::new(),
            events: Vec::new(),
        });
    }
    let mut keys = if req.isolated {
        tx.due_suspect(now)?.into_iter().collect()
    } else {
        pick_due(tx, req, now)?
    };
    if keys.len() < req.limit && !req.dead_owners.is_empty() && !req.isolated {
        for owner in &req.dead_owners {
            for key in tx.held_by(owner, now)? {
                if keys.len() >= req.limit {
                    break;
                }
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    let mut leased = Vec::with_capacity(keys.len());
    let mut events = Vec::new();
    for key in keys {
        let old = tx.job(&key)?.ok_or(StoreError::NotFound(key))?;
        // A suspect or a dead owner's job waits while its host is paused.
        if tx.paused(&old.spec.url.host())? {
            continue;
        }
        let mut job = old.clone();
        if let Some(l) = job.lease.as_mut() {
            if req.dead_owners.contains(&l.owner) {
                // Its holder is gone: the lease is as good as expired.
                l.expires_at = l.expires_at.min(now);
            }
        }
        let t = transition(
            &job,
            Command::Acquire {
                owner: req.owner.clone(),
                ttl_ms: req.ttl_ms,
                isolated: req.isolated,
            },
            now,
        )
        .map_err(|e| refused(key, e))?;
        tx.update_job(&old, &t.job)?;
        events.extend(t.events);
        if let Some(l) = &t.job.lease {
            // The previous holders' unfinished ops died with their epochs
            // (a first lease has no previous holder).
            let n = if l.epoch.0 <= 1 {
                0
            } else {
                tx.abandon_ops_before(&key, l.epoch, now)?
            };
            events.extend(ledger::abandoned_event(Some(key), n));
            leased.push(t.job);
        }
    }
    Ok(Applied {
        value: leased,
        events: stamp(events, now),
    })
}

/// Due jobs in lease order, a window at a time, within the host budget; a
/// host found full is left out of the next window, so a long queue of one
/// full host's jobs does not hide the others'.
fn pick_due<T: Tx + ?Sized>(
    tx: &mut T,
    req: &LeaseRequest,
    now: Timestamp,
) -> Result<Vec<JobKey>, StoreError> {
    let mut room = HostRoom::new(req.per_host, req.host_interval_ms, &req.host_rules);
    let mut paced: Vec<(String, u64)> = Vec::new();
    let mut keys: Vec<JobKey> = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    let window = hosts::scan_for(req.limit);
    loop {
        let candidates = tx.due(now, window, &left_out)?;
        let seen = candidates.len();
        let mut hosts_of: Vec<(JobKey, String)> = Vec::new();
        let picked = hosts::pick_by_host_room(
            candidates
                .into_iter()
                .filter(|(k, _)| !keys.contains(k))
                .inspect(|(k, h)| hosts_of.push((*k, h.clone()))),
            req.limit - keys.len(),
            &mut room,
            |host| {
                // A host cooling down (or waiting for its next request
                // slot), or paused, is as good as full.
                if tx.paused(host)? || tx.cooldown(host)?.is_some_and(|t| t > now) {
                    return Ok(usize::MAX);
                }
                tx.live_on_host(host, now)
            },
        )?;
        for k in &picked {
            let host = hosts_of.iter().find(|(h, _)| h == k).map(|(_, h)| h);
            if let Some(host) = host {
                if let Some(gap) = room.interval_ms(host) {
                    paced.push((host.clone(), gap));
                }
            }
        }
        keys.extend(picked);
        let full = room.full();
        if keys.len() >= req.limit || seen < window || full.len() == left_out.len() {
            // A paced host's next lease waits for its next slot, whoever
            // asks: its jobs are due, but not before then.
            for (host, gap) in paced {
                tx.extend_cooldown(&host, now.plus_ms(gap))?;
            }
            return Ok(keys);
        }
        left_out = full;
    }
}
