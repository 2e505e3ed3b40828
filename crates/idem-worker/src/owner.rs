//! Who this process is, and whether another lease holder on this host is
//! still alive; plus the one real clock of the workspace's library crates.
//!
//! A worker id is `idem@HOST/PID/START`, where START is the process start
//! time in clock ticks since boot (from `/proc/self/stat`). A pid alone is
//! reused by the kernel; pid plus start time names one incarnation, so a
//! restarted process never inherits its predecessor's leases, and a lease
//! whose holder's (pid, start) no longer matches a live process can be taken
//! over at once instead of waiting for it to expire.

use idem_core::{Clock, Timestamp, WorkerId};

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Timestamp::from_millis(ms)
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Start time of `pid` in clock ticks since boot, if it is alive.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parens; fields after
    // the last ')' are fixed. Start time is field 22 overall.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field 22 is index 19. A zombie
    // (state Z) has exited: treat it as dead.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// This process's worker id.
pub fn this_worker() -> WorkerId {
    let pid = std::process::id();
    let start = process_start(pid).unwrap_or(0);
    WorkerId::new(format!("idem@{}/{pid}/{start}", hostname()))
}

/// Parses `idem@HOST/PID/START`.
pub fn parse_worker(id: &WorkerId) -> Option<(String, u32, u64)> {
    let rest = id.as_str().strip_prefix("idem@")?;
    let mut it = rest.rsplitn(3, '/');
    let start = it.next()?.parse().ok()?;
    let pid = it.next()?.parse().ok()?;
    let host = it.next()?.to_owned();
    Some((host, pid, start))
}

/// Is `id` a worker of this host whose process is gone?
pub fn is_dead_local(id: &WorkerId, host: &str) -> bool {
    match parse_worker(id) {
        Some((h, pid, start)) if h == host => process_start(pid) != Some(start),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = this_worker();
        let host = hostname();
        assert!(!is_dead_local(&me, &host));
        let (_, pid, start) = parse_worker(&me).unwrap();
        assert_eq!(pid, std::process::id());
        let other_incarnation = WorkerId::new(format!("idem@{host}/{pid}/{}", start + 1));
        assert!(
            is_dead_local(&other_incarnation, &host),
            "same pid, other start: dead"
        );
        let elsewhere = WorkerId::new(format!("idem@other-host/{pid}/{}", start + 1));
        assert!(
            !is_dead_local(&elsewhere, &host),
            "never judge another host's processes"
        );
        assert!(!is_dead_local(&WorkerId::new("w1"), &host));
    }
}
