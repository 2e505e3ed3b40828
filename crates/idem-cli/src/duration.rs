//! Durations on the command line: a bare number in the flag's own unit (as
//! the flags have always taken), or a number with a unit: `500ms`, `30s`,
//! `2m`, `1h`, `7d`.

/// Milliseconds in `s`, a bare number being `bare_ms` milliseconds each.
fn parse(s: &str, bare_ms: u64) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let per_ms = match unit.trim() {
        "" => bare_ms,
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?} is not a duration (a number, or one with ms, s, m, h or d: 500ms, 30s, 2m)"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per_ms))
        .ok_or_else(|| {
            format!(
                "{s:?} is not a duration (a number, or one with ms, s, m, h or d: 500ms, 30s, 2m)"
            )
        })
}

/// A duration in whole seconds; a bare number is seconds.
pub(crate) fn secs(s: &str) -> Result<u64, String> {
    let ms = parse(s, 1_000)?;
    if !ms.is_multiple_of(1_000) {
        return Err(format!("{s:?}: this flag takes whole seconds"));
    }
    Ok(ms / 1_000)
}

/// A lease's time-to-live in whole seconds: from a second to a day.
pub(crate) fn lease_ttl_secs(s: &str) -> Result<u64, String> {
    let n = secs(s)?;
    if (1..=86_400).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{s:?}: a lease lives from 1s to 1d"))
    }
}

/// A duration in milliseconds; a bare number is milliseconds.
pub(crate) fn millis(s: &str) -> Result<u64, String> {
    parse(s, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_numbers() {
        assert_eq!(secs("60"), Ok(60));
        assert_eq!(secs("30s"), Ok(30));
        assert_eq!(secs("2m"), Ok(120));
        assert_eq!(secs("1h"), Ok(3600));
        assert_eq!(secs("7d"), Ok(604_800));
        assert_eq!(secs("2000ms"), Ok(2));
        assert!(secs("1500ms").is_err(), "not whole seconds");
        assert_eq!(millis("1000"), Ok(1000));
        assert_eq!(millis("500ms"), Ok(500));
        assert_eq!(millis("5m"), Ok(300_000));
        for bad in ["", "s", "1.5s", "-1", "3 weeks", "10x"] {
            assert!(secs(bad).is_err(), "{bad:?}");
        }
    }
}
