//! The one integration-test binary: end-to-end checks that drive the real
//! `idem` executable against a local hostile origin, with real processes,
//! files and signals.
//!
//! Slow suites (many kill -9 trials) run when `CI` or `IDEM_SLOW_TESTS` is
//! set; the default suite runs a few trials of each.

mod cancel;
mod cli;
mod crash;
mod deaths;
mod e2e;
mod events;
mod hostile;
mod hosts;
mod internet;
mod ledger;
mod metrics;
mod pause;
mod postgres;
mod prune;
mod repair;
mod reuse;
mod support;
