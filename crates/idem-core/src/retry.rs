//! Retry policy: which errors are worth another try, and when.
//!
//! Backoff is exponential with full jitter (delay uniform in
//! `[0, min(cap, base·2^attempt)]`), drawn from a seeded generator passed in,
//! so schedules are reproducible in tests. A server's `Retry-After` is a
//! floor, capped so a hostile server cannot park a job for a year.

use crate::job::{ErrorClass, JobError};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// A small, fast, seedable generator (SplitMix64). Good enough for jitter;
/// not for anything secret.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    pub fn below_inclusive(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        // Rejection-free and bias is negligible for delays in milliseconds.
        self.next_u64() % (max + 1)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_ms: u64,
    pub cap_ms: u64,
    /// The most a `Retry-After` may delay a job.
    pub retry_after_cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_ms: 1_000,
            cap_ms: 5 * 60_000,
            retry_after_cap_ms: 15 * 60_000,
        }
    }
}

impl RetryPolicy {
    /// The jittered delay before attempt `attempt + 1` (`attempt` ≥ 1).
    pub fn backoff_ms(&self, attempt: u32, rng: &mut SplitMix64) -> u64 {
        let exp = attempt.saturating_sub(1).min(32);
        let ceiling = self.base_ms.saturating_mul(1u64 << exp).min(self.cap_ms);
        rng.below_inclusive(ceiling)
    }

    /// When to try again after `error` on attempt `attempts`, or `None` to
    /// give up (permanent error, or attempts exhausted).
    pub fn decide(
        &self,
        attempts: u32,
        error: &JobError,
        rng: &mut SplitMix64,
        now: Timestamp,
    ) -> Option<Timestamp> {
        // A throttled answer may cost no attempt (the transition decides):
        // its retry is always scheduled.
        let spent = attempts >= self.max_attempts && !crate::hosts::is_throttled(error);
        if error.class == ErrorClass::Permanent || spent {
            return None;
        }
        let jitter = self.backoff_ms(attempts, rng);
        let floor = error
            .retry_after_ms
            .map_or(0, |ra| ra.min(self.retry_after_cap_ms));
        Some(now.plus_ms(jitter.max(floor)))
    }
}

/// The class of an HTTP status that ended an attempt.
pub fn classify_status(status: u16) -> ErrorClass {
    match status {
        408 | 429 | 500..=599 => ErrorClass::Retryable,
        _ => ErrorClass::Permanent,
    }
}

/// Parses `Retry-After` delta-seconds. HTTP-dates need a clock to turn into
/// a delay, so the adapter converts those with [`retry_after_from_date`].
pub fn parse_retry_after_secs(value: &str) -> Option<u64> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.saturating_mul(1000))
}

/// `Retry-After` given as an HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`),
/// as a delay from `now`.
pub fn retry_after_from_date(value: &str, now: Timestamp) -> Option<u64> {
    let t = parse_http_date(value)?;
    Some(t.millis_since(now))
}

/// Parses an IMF-fixdate (the only form servers must send, RFC 9110 §5.6.7).
pub fn parse_http_date(value: &str) -> Option<Timestamp> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == mon)? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, s) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(Timestamp::from_millis(
        ((days * 86_400) + h * 3600 + m * 60 + s) * 1000,
    ))
}
