//! Hooks that abort the process at chosen instants, for the crash tests.
//! They exist only with the `test-hooks` feature, which only the
//! integration tests enable; a build without it has none of this code.
//!
//! - `IDEM_CRASHPOINT=after_stream_commit`, `after_batch_link` (parts
//!   linked into the store, not yet made durable) or `after_publish`:
//!   abort at that point of a job's finish, to hit the windows between an
//!   effect and its commit deterministically (kill -9 at random instants
//!   hits them by chance).
//! - `IDEM_TEST_POISON_URL=<text>`: abort whenever a body arrives for a URL
//!   that contains `<text>`: a job that kills every worker that runs it.

/// Aborts the process if `IDEM_CRASHPOINT` names `name`.
#[cfg(feature = "test-hooks")]
pub(crate) fn crashpoint(name: &str) {
    if std::env::var_os("IDEM_CRASHPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn crashpoint(_: &str) {}

/// Aborts the process if `url` contains `IDEM_TEST_POISON_URL`.
#[cfg(feature = "test-hooks")]
pub(crate) fn poison(url: &str) {
    if let Some(p) = std::env::var_os("IDEM_TEST_POISON_URL") {
        if p.to_str().is_some_and(|p| !p.is_empty() && url.contains(p)) {
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn poison(_: &str) {}
