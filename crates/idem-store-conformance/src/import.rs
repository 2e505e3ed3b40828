//! Copying a ledger: jobs and their ops arrive as they were.

use crate::{do_finish, do_head, lease, plan_n, t};
use idem_core::ports::Store;
use idem_core::{Command, JobError, JobSpec, MemStore};

/// Jobs in every kind of state, copied from a [`MemStore`], read back the
/// same; copying again changes nothing; new plans rank after them.
pub fn import_copies_jobs_and_ops_as_they_are(s: &dyn Store) {
    let src = MemStore::new();
    let keys = plan_n(&src, 6, t(0));
    let held = lease(&src, "w1", 4, 60, t(1));
    let (k0, e0) = held[0];
    do_head(&src, k0, e0, "w1", t(2));
    do_finish(&src, k0, e0, "w1", t(3));
    let (k1, e1) = held[1];
    src.apply(
        &k1,
        Command::Fail {
            epoch: e1,
            error: JobError::permanent("http_404", "gone"),
            retry_at: None,
        },
        t(3),
    )
    .unwrap();
    let (k2, e2) = held[2];
    do_head(&src, k2, e2, "w1", t(3));
    let all: Vec<_> = keys
        .iter()
        .map(|k| (src.job(k).unwrap().unwrap(), src.ops(k).unwrap()))
        .collect();
    assert_eq!(s.import(&all, t(4)).unwrap(), (6, 0));
    for k in &keys {
        assert_eq!(s.job(k).unwrap(), src.job(k).unwrap(), "job {k}");
        assert_eq!(s.ops(k).unwrap(), src.ops(k).unwrap(), "ops of {k}");
    }
    let (a, b) = (s.status(t(5)).unwrap(), src.status(t(5)).unwrap());
    assert_eq!(
        (a.by_state, a.live_leases, a.due_now, a.ops_started),
        (b.by_state, b.live_leases, b.due_now, b.ops_started)
    );
    assert_eq!(s.import(&all, t(6)).unwrap(), (0, 6), "copied once");
    // The copied lease is live: only the two jobs never leased are due.
    let got = lease(s, "w2", 10, 60, t(6));
    assert_eq!(got.len(), 2);
    // A job planned after the copy ranks after the copied ones of its host.
    let late = JobSpec::new("work", "late", "https://example.org/late.pdf", None, None).unwrap();
    s.plan(std::slice::from_ref(&late), 3, t(7)).unwrap();
    let rank = s.job(&late.key()).unwrap().unwrap().host_rank;
    assert_eq!(rank, 6);
}
