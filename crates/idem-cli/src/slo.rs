//! `idem slo check`: each SLI of slo/idem.yaml computed from the ledger
//! over a window, without Prometheus. One-sided: better than the objective
//! passes. Exits 4 on a breach.

use crate::commands::open_store;
use crate::{Global, SloCheckArgs};
use anyhow::{bail, Context};
use idem_core::ports::Store;
use idem_core::{Clock, Job, JobState};
use idem_worker::SystemClock;
use serde::Deserialize;
use serde_json::json;

/// Exit code: an SLO is breached.
pub(crate) const EXIT_BREACH: u8 = 4;

const BUILTIN_SPEC: &str = include_str!("../../../slo/idem.yaml");

#[derive(Deserialize)]
struct Spec {
    slos: Vec<Slo>,
}

#[derive(Deserialize)]
struct Slo {
    name: String,
    objective: f64,
    #[serde(default)]
    threshold_seconds: Option<f64>,
}

/// Parses `30s`, `15m`, `6h`, `7d` (or plain seconds).
pub(crate) fn parse_window(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad window {s:?}: want e.g. 1h, 30m, 7d"))?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad window {s:?}: unit must be s, m, h or d"),
    };
    Ok(n * mul)
}

struct Outcome {
    sli: Option<f64>,
    good: u64,
    total: u64,
    detail: String,
}

pub(crate) fn check(g: &Global, a: &SloCheckArgs) -> anyhow::Result<u8> {
    let text = match &a.spec {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading SLO spec {}", p.display()))?,
        None => BUILTIN_SPEC.to_owned(),
    };
    let spec: Spec = serde_yaml::from_str(&text).context("parsing the SLO spec")?;
    let window_s = parse_window(&a.window)?;
    let store = open_store(g)?;
    let now = SystemClock.now();
    let since = idem_core::Timestamp::from_millis(
        now.as_millis()
            .saturating_sub(i64::try_from(window_s * 1000).unwrap_or(i64::MAX)),
    );
    // The jobs that finished in the window, keeping only what the SLIs
    // need.
    let mut w = Window::default();
    store.each_finished_since(since, &mut |j| {
        if j.state.is_terminal() {
            w.add(j);
        }
    })?;
    let st = store.status(now)?;
    let mut rows = Vec::new();
    let mut all_ok = true;
    for slo in &spec.slos {
        let target = slo.objective / 100.0;
        let o = compute(&slo.name, slo.threshold_seconds, &mut w, &st);
        let status = match (&o, o.as_ref().and_then(|o| o.sli)) {
            (None, _) => "not_in_ledger",
            (Some(_), None) => "no_data",
            (Some(_), Some(v)) if v >= target => "pass",
            _ => "breach",
        };
        if status == "breach" {
            all_ok = false;
        }
        rows.push(json!({
            "name": slo.name,
            "objective": slo.objective,
            "sli": o.as_ref().and_then(|o| o.sli),
            "good": o.as_ref().map(|o| o.good),
            "total": o.as_ref().map(|o| o.total),
            "status": status,
            "ok": status != "breach",
            "detail": o.map_or_else(|| "measured only by metrics (see docs/slo.md)".to_owned(), |o| o.detail),
        }));
    }
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"window_seconds": window_s, "ok": all_ok, "slos": rows})
            )?
        );
    } else {
        outln!(
            "SLOs over the last {} (jobs finished in the window: {})",
            a.window,
            w.finished
        );
        for r in &rows {
            let sli = r["sli"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{:.3}%", v * 100.0));
            outln!(
                "  {:<28} {:<14} SLI {:>9}  objective {:>5}%  {}",
                r["name"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or(""),
                sli,
                r["objective"],
                r["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if all_ok { 0 } else { EXIT_BREACH })
}

fn ratio(good: u64, total: u64, detail: String) -> Outcome {
    Outcome {
        sli: (total > 0).then(|| good as f64 / total as f64),
        good,
        total,
        detail,
    }
}

/// What the SLIs need from the jobs that finished in the window.
#[derive(Default)]
struct Window {
    finished: u64,
    succeeded: u64,
    /// First lease → finish time (ms) of each successful job.
    success_ages_ms: Vec<u64>,
    /// Leases of these jobs that expired (their holders died), as the
    /// Prometheus rule counts `idem_leases_expired_total`, and the jobs
    /// that failed as poison for it.
    expired: u64,
    poisoned: u64,
}

impl Window {
    fn add(&mut self, j: &Job) {
        self.finished += 1;
        if j.state.is_success() {
            self.succeeded += 1;
            if let Some(f) = j.finished_at {
                let leased = j.first_leased_at.unwrap_or(j.created_at);
                self.success_ages_ms.push(f.millis_since(leased));
            }
        }
        // A death is an expired lease; an ordinary retry is not.
        self.expired += u64::from(j.holder_deaths) + u64::from(j.isolated_deaths);
        if j.state == JobState::Failed
            && j.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("poison"))
        {
            self.poisoned += 1;
        }
    }
}

fn compute(
    name: &str,
    threshold_s: Option<f64>,
    w: &mut Window,
    st: &idem_core::StatusCounts,
) -> Option<Outcome> {
    match name {
        "job_success" => Some(ratio(
            w.succeeded,
            w.finished,
            "finalized or skipped_duplicate, of jobs finished in the window".into(),
        )),
        "service_latency" => {
            let limit_ms = (threshold_s.unwrap_or(120.0) * 1000.0) as u64;
            let ages = &mut w.success_ages_ms;
            ages.sort_unstable();
            let good = ages.iter().filter(|a| **a <= limit_ms).count() as u64;
            let p95 = ages
                .get((ages.len() * 95).div_ceil(100).saturating_sub(1))
                .map(|ms| *ms as f64 / 1000.0);
            Some(ratio(
                good,
                ages.len() as u64,
                format!(
                    "p95 {} s, threshold {} s",
                    p95.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
                    limit_ms / 1000
                ),
            ))
        }
        "replay_ratio" => {
            let total = st.ops_started + st.replays;
            Some(ratio(
                st.ops_started,
                total,
                format!(
                    "{} replays of {} op requests (whole ledger)",
                    st.replays, total
                ),
            ))
        }
        "crash_recovery" => Some(ratio(
            w.expired.saturating_sub(w.poisoned),
            w.expired,
            format!(
                "expired leases whose job did not fail as poison ({} in window)",
                w.expired
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crash recovery counts expired leases (holder deaths), as the
    /// Prometheus rule does, not jobs that were merely retried.
    #[test]
    fn crash_recovery_counts_deaths_not_retries() {
        let spec = |a: &str| {
            idem_core::JobSpec::new("w", a, &format!("https://h.example/{a}"), None, None).unwrap()
        };
        let t = idem_core::Timestamp::from_millis(1);
        let mut retried = Job::planned(spec("r"), 5, t);
        retried.epoch = idem_core::Epoch(3);
        retried.state = JobState::Finalized;
        let mut survived = Job::planned(spec("s"), 5, t);
        survived.epoch = idem_core::Epoch(3);
        survived.holder_deaths = 2;
        survived.state = JobState::Finalized;
        let mut poison = Job::planned(spec("p"), 5, t);
        poison.holder_deaths = 2;
        poison.isolated_deaths = 3;
        poison.state = JobState::Failed;
        poison.last_error = Some("poison: the worker running this job alone died 3 times".into());
        let mut w = Window::default();
        for j in [&retried, &survived, &poison] {
            w.add(j);
        }
        assert_eq!((w.expired, w.poisoned), (7, 1));
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("90").unwrap(), 90);
        assert_eq!(parse_window("15m").unwrap(), 900);
        assert_eq!(parse_window("6h").unwrap(), 21_600);
        assert_eq!(parse_window("7d").unwrap(), 604_800);
        assert!(parse_window("3w").is_err());
        assert!(parse_window("h").is_err());
    }
}
