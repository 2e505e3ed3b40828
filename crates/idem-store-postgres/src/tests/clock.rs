//! Leases go by the database's clock: a worker whose clock is an hour off
//! neither steals a live lease nor keeps an expired one.

use super::url;
use crate::{Options, PgStore};
use idem_core::ports::{LeaseRequest, Store};
use idem_core::{Commit, JobSpec, Timestamp, WorkerId};

fn store() -> Option<PgStore> {
    let url = url()?;
    let schema = format!("idem_clock_{}", std::process::id());
    let opts = Options {
        schema: Some(schema),
        ..Options::default()
    };
    Some(PgStore::connect(&url, &opts).expect("connect"))
}

fn lease(s: &PgStore, owner: &str, ttl_ms: u64, now: Timestamp) -> usize {
    let req = LeaseRequest {
        owner: WorkerId::new(owner),
        limit: 10,
        ttl_ms,
        dead_owners: vec![],
        commit: Commit::Durable,
        isolated: false,
        per_host: None,
        host_interval_ms: None,
        host_rules: Default::default(),
    };
    s.lease(&req, now).expect("lease").value.len()
}

#[test]
fn skewed_worker_clocks_change_no_lease() {
    let Some(s) = store() else { return };
    let real = Timestamp::from_millis(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_millis(),
        )
        .expect("fits"),
    );
    let hour_ms = 3_600_000;
    let slow = Timestamp::from_millis(real.as_millis() - 3_600_000);
    let spec = JobSpec::new("w", "a", "https://clock.example/a", None, None).unwrap();
    // Planned "an hour from now" by a fast clock: due at once all the same.
    s.plan(&[spec], 3, real.plus_ms(hour_ms)).unwrap();
    assert_eq!(lease(&s, "slow", 60_000, slow), 1);
    // A worker an hour ahead must not see that live lease as expired.
    assert_eq!(lease(&s, "fast", 60_000, real.plus_ms(hour_ms)), 0);
    let job = s.scan(None, None, 1).unwrap().remove(0);
    let lease_left_ms = job.lease.unwrap().expires_at.millis_since(real);
    assert!(
        lease_left_ms <= 61_000,
        "the lease runs from the database's now, not the slow worker's: {lease_left_ms} ms"
    );

    // A short lease expires by the database's clock, whatever a slow
    // worker's clock says.
    let spec = JobSpec::new("w", "b", "https://clock.example/b", None, None).unwrap();
    s.plan(&[spec], 3, real).unwrap();
    assert_eq!(lease(&s, "slow", 200, slow), 1);
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        lease(&s, "other", 60_000, slow),
        1,
        "expired by the database's clock"
    );
}
