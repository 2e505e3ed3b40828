//! The PostgreSQL store against the shared conformance suite, on the
//! server `IDEM_PG_URL` names (each case in a schema of its own); skipped,
//! saying so, when it is unset.

use crate::{Options, PgStore};

pub(crate) fn url() -> Option<String> {
    std::env::var("IDEM_PG_URL").ok().filter(|u| !u.is_empty())
}

/// A fresh ledger in a new schema, driven by the caller's clock as the
/// suite's explicit times require.
pub(crate) fn fresh() -> Option<Box<PgStore>> {
    let Some(url) = url() else {
        eprintln!("IDEM_PG_URL is not set: PostgreSQL case skipped");
        return None;
    };
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let schema = format!(
        "idem_t{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let opts = Options {
        schema: Some(schema),
        caller_clock: true,
        pool_size: 4,
        ..Options::default()
    };
    Some(Box::new(PgStore::connect(&url, &opts).expect("connect")))
}

mod conformance {
    idem_store_conformance::conformance_tests!(optional: super::fresh());
}

/// Two handles (two pools) on one ledger, racing on real threads.
pub(crate) fn pair() -> Option<(Box<PgStore>, Box<PgStore>)> {
    let url = url()?;
    let first = fresh()?;
    let opts = Options {
        schema: first.schema().map(str::to_owned),
        caller_clock: true,
        pool_size: 4,
        ..Options::default()
    };
    let second = Box::new(PgStore::connect(&url, &opts).expect("connect"));
    Some((first, second))
}

mod races {
    idem_store_conformance::conformance_races!(optional: super::pair());
}

mod clock;
mod refusals;
