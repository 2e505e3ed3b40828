//! Per-host settings from the command line: `--host-limit` rules and a
//! `--host-config` file, merged into the engine's host rules.

use anyhow::{bail, Context};
use idem_core::hosts::HostRule;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One `--host-limit PATTERN=CONCURRENCY[,RATE]`.
pub(crate) fn parse_host_limit(s: &str) -> Result<HostRule, String> {
    let (pattern, limits) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected PATTERN=CONCURRENCY[,RATE], as in export.arxiv.org=1,0.25")
    })?;
    check_pattern(pattern)?;
    let (n, rate) = match limits.split_once(',') {
        Some((n, r)) => (n, Some(r)),
        None => (limits, None),
    };
    let per_host: usize = n.trim().parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
        format!("{s:?}: the concurrency {n:?} is not a whole number of at least 1")
    })?;
    let interval_ms = rate
        .map(|r| interval_of(r.trim()).map_err(|e| format!("{s:?}: {e}")))
        .transpose()?;
    Ok(HostRule {
        pattern: pattern.trim().to_owned(),
        per_host: Some(per_host),
        interval_ms,
        headers: Vec::new(),
    })
}

/// The pause between requests for a rate in requests per second.
fn interval_of(rate: &str) -> Result<u64, String> {
    let r: f64 = rate
        .parse()
        .ok()
        .filter(|r: &f64| *r > 0.0 && r.is_finite())
        .ok_or_else(|| {
            format!("the rate {rate:?} is not a positive number of requests per second")
        })?;
    Ok(rate_interval_ms(r))
}

/// The pause between requests, in milliseconds, for `rate` a second.
pub(crate) fn rate_interval_ms(rate: f64) -> u64 {
    (1000.0 / rate).ceil() as u64
}

fn check_pattern(p: &str) -> Result<(), String> {
    let p = p.trim();
    let body = p.strip_prefix("*.").unwrap_or(p);
    let ok = p == "*"
        || (!body.is_empty()
            && body
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-.[]:".contains(&c)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host pattern {p:?}: expected a host (example.org), a domain and its subdomains (*.example.org), or *"
        ))
    }
}

/// One host's settings in a `--host-config` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    per_host: Option<usize>,
    /// Requests per second.
    rate: Option<f64>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Reads a `--host-config` file: a JSON object from host pattern to
/// `{"per_host": N, "rate": R, "headers": {"Name": "value"}}`, every field
/// optional.
pub(crate) fn read_host_config(path: &Path) -> anyhow::Result<Vec<HostRule>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read host config {}", path.display()))?;
    let rules: BTreeMap<String, FileRule> = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "host config {}: line {}: {e} (expected {{\"PATTERN\": {{\"per_host\": N, \"rate\": R, \"headers\": {{...}}}}}})",
            path.display(),
            e.line()
        )
    })?;
    let mut out = Vec::with_capacity(rules.len());
    for (pattern, r) in rules {
        let at = |e: String| anyhow::anyhow!("host config {}: {pattern:?}: {e}", path.display());
        check_pattern(&pattern).map_err(at)?;
        if r.per_host == Some(0) {
            bail!(
                "host config {}: {pattern:?}: per_host must be at least 1",
                path.display()
            );
        }
        let interval_ms = r
            .rate
            .map(|x| interval_of(&x.to_string()))
            .transpose()
            .map_err(at)?;
        let headers = r
            .headers
            .iter()
            .map(|(n, v)| idem_core::spec::check_header(n, v).map_err(|e| at(e.to_string())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        out.push(HostRule {
            pattern,
            per_host: r.per_host,
            interval_ms,
            headers,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_limits_parse_and_bad_ones_say_why() {
        let r = parse_host_limit("export.arxiv.org=1,0.25").unwrap();
        assert_eq!((r.per_host, r.interval_ms), (Some(1), Some(4000)));
        let r = parse_host_limit("*.example.org=4").unwrap();
        assert_eq!((r.per_host, r.interval_ms), (Some(4), None));
        for bad in ["x", "x=0", "x=1,0", "x=1,-2", "a b=1", "=1"] {
            assert!(parse_host_limit(bad).is_err(), "{bad}");
        }
    }
}
