//! Unit checks of keys, URL canonicalisation, the retry policy and parsing.

use crate::job::{ErrorClass, JobError};
use crate::retry::{classify_status, parse_http_date, RetryPolicy, SplitMix64};
use crate::spec::{CanonicalUrl, JobSpec, SpecError};
use crate::{job_key_of, redact_text, redact_url, Timestamp};

#[test]
fn canonical_urls() {
    let cases = [
        (
            "HTTP://Example.COM:80/a/b?x=1&a=2#frag",
            "http://example.com/a/b?x=1&a=2",
        ),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:8443/p", "https://example.com:8443/p"),
        (
            "https://h/%7euser/%2f%41?q=%7e%2F",
            "https://h/~user/%2FA?q=~%2F",
        ),
        ("  https://h/a b  ", "https://h/a%20b"),
        ("https://h/?b=2&a=1", "https://h/?b=2&a=1"),
    ];
    for (raw, want) in cases {
        assert_eq!(CanonicalUrl::parse(raw).unwrap().as_str(), want, "{raw}");
    }
}

#[test]
fn urls_are_shown_without_their_secrets() {
    let cases = [
        ("https://example.org/a/b?x=1", "https://example.org/a/b?x=1"),
        ("https://user:pw@example.org/a", "https://***@example.org/a"),
        ("https://TOKEN@example.org", "https://***@example.org"),
        (
            "https://h/f.pdf?id=7&token=abc&X-Amz-Signature=f00#top",
            "https://h/f.pdf?id=7&token=***&X-Amz-Signature=***#top",
        ),
        (
            "https://h/?api_key=k&page=2",
            "https://h/?api_key=***&page=2",
        ),
        ("https://h/?access_token=t", "https://h/?access_token=***"),
        // A name alone, or a secret-looking word in the path, is left be.
        ("https://h/token/key?token", "https://h/token/key?token"),
        ("https://u:p@h:8080/?sig=1", "https://***@h:8080/?sig=***"),
        ("https://h/?jwt=e.y.J&a=1", "https://h/?jwt=***&a=1"),
        ("https://h/?a=1;token=t;b=2", "https://h/?a=1;token=***;b=2"),
        (
            "https://h/login?next=https%3A%2F%2Fo%2Fx%3Ftoken%3Dsecret&page=1",
            "https://h/login?next=***&page=1",
        ),
        (
            "https://h/?next=%2Fx%3Fpassword%3Dpw",
            "https://h/?next=***",
        ),
        // Decoded but harmless: kept as it is.
        (
            "https://h/?next=%2Fx%3Fpage%3D2",
            "https://h/?next=%2Fx%3Fpage%3D2",
        ),
        // `code` is an identifier far more often than a secret.
        ("https://h/?code=ABC-12", "https://h/?code=ABC-12"),
    ];
    for (raw, want) in cases {
        assert_eq!(redact_url(raw), want, "{raw}");
    }
    let url = CanonicalUrl::parse("https://u:p@h/x?key=s").unwrap();
    assert_eq!(
        url.as_str(),
        "https://u:p@h/x?key=s",
        "the URL fetched keeps them"
    );
    assert_eq!(url.redacted(), "https://***@h/x?key=***");
    assert_eq!(
        redact_text("error sending request for url (https://u:p@h/x?token=t): reset"),
        "error sending request for url (https://***@h/x?token=***): reset"
    );
    assert_eq!(
        redact_text("https://h/x?token=t: HTTP 404, then http://a:b@c/."),
        "https://h/x?token=***: HTTP 404, then http://***@c/."
    );
    assert_eq!(redact_text("no url here: a@b"), "no url here: a@b");
    let e = JobError::retryable("timeout", "https://u:p@h/x: timed out");
    assert_eq!(e.detail, "https://***@h/x: timed out");
    let bad = CanonicalUrl::parse("ftp://u:p@h/x")
        .unwrap_err()
        .to_string();
    assert!(!bad.contains("u:p"), "{bad}");
}

#[test]
fn bad_urls_say_what_is_wrong() {
    assert!(matches!(
        CanonicalUrl::parse("ftp://h/x"),
        Err(SpecError::UnsupportedScheme { .. })
    ));
    assert!(matches!(
        CanonicalUrl::parse("file:///etc/passwd"),
        Err(SpecError::UnsupportedScheme { .. })
    ));
    assert!(matches!(
        CanonicalUrl::parse("not a url"),
        Err(SpecError::BadUrl { .. })
    ));
    assert!(matches!(
        CanonicalUrl::parse(""),
        Err(SpecError::Empty("url"))
    ));
    let e = JobSpec::new("w", "a", "http://h/x", Some("abc"), None).unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");
    let e = JobSpec::new("w", "", "http://h/x", None, None).unwrap_err();
    assert_eq!(e, SpecError::Empty("artifact_id"));
    let e = JobSpec::new("w", "a", "http://h/x", None, Some("pdf")).unwrap_err();
    assert!(matches!(e, SpecError::BadContentType(_)));
    for id in ["w\x1b[2J", "a\nb", "x\u{0}y", "del\u{7f}", "c1\u{9b}31m"] {
        let e = JobSpec::new(id, "a", "http://h/x", None, None).unwrap_err();
        assert_eq!(e, SpecError::ControlChar("work_id"), "{id:?}");
        let e = JobSpec::new("w", id, "http://h/x", None, None).unwrap_err();
        assert_eq!(e, SpecError::ControlChar("artifact_id"), "{id:?}");
    }
    assert!(JobSpec::new("W\u{e9}tude", "pdf \u{2014} main", "http://h/x", None, None).is_ok());
}

#[test]
fn keys_depend_on_identity_and_fingerprints_on_payload() {
    let a = JobSpec::new("w", "a", "http://h/1", None, None).unwrap();
    let b = JobSpec::new("w", "a", "http://h/2", None, None).unwrap();
    let c = JobSpec::new("w", "b", "http://h/1", None, None).unwrap();
    assert_eq!(a.key(), b.key());
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.key(), c.key());
    assert_eq!(a.key(), job_key_of("w", "a"));
    // Length-prefixed fields: moving a boundary changes the key.
    assert_ne!(job_key_of("ab", "c"), job_key_of("a", "bc"));
    let d = JobSpec::new(
        "w",
        "a",
        "http://h/1",
        Some(&"AB".repeat(32)),
        Some("Application/PDF"),
    )
    .unwrap();
    assert_ne!(a.fingerprint(), d.fingerprint());
    assert_eq!(d.content_type.as_deref(), Some("application/pdf"));
    // Keys are stable across releases: a change here breaks every ledger.
    insta::assert_snapshot!(a.key().to_hex(), @"7db2f6441bc2917bbba85a07b91b9cd126551ccf68391a278f1578d02078bd9c");
}

#[test]
fn status_classes() {
    for s in [408, 429, 500, 502, 503, 504] {
        assert_eq!(classify_status(s), ErrorClass::Retryable, "{s}");
    }
    for s in [400, 401, 403, 404, 410, 451] {
        assert_eq!(classify_status(s), ErrorClass::Permanent, "{s}");
    }
}

#[test]
fn backoff_is_full_jitter_bounded_and_seeded() {
    let p = RetryPolicy {
        max_attempts: 5,
        base_ms: 1000,
        cap_ms: 8000,
        retry_after_cap_ms: 60_000,
    };
    let mut rng = SplitMix64::new(7);
    for attempt in 1..=10u32 {
        let ceiling = (1000u64 << (attempt - 1).min(20)).min(8000);
        for _ in 0..200 {
            assert!(p.backoff_ms(attempt, &mut rng) <= ceiling);
        }
    }
    let a: Vec<u64> = (1..6)
        .map(|i| p.backoff_ms(i, &mut SplitMix64::new(42)))
        .collect();
    let b: Vec<u64> = (1..6)
        .map(|i| p.backoff_ms(i, &mut SplitMix64::new(42)))
        .collect();
    assert_eq!(a, b, "same seed, same schedule");
}

#[test]
fn retry_decisions() {
    let p = RetryPolicy {
        max_attempts: 3,
        base_ms: 1000,
        cap_ms: 8000,
        retry_after_cap_ms: 60_000,
    };
    let now = Timestamp::from_millis(0);
    let mut rng = SplitMix64::new(1);
    let retryable = JobError::retryable("http_503", "");
    assert!(p.decide(1, &retryable, &mut rng, now).is_some());
    assert!(
        p.decide(3, &retryable, &mut rng, now).is_none(),
        "attempts exhausted"
    );
    assert!(p
        .decide(1, &JobError::permanent("http_404", ""), &mut rng, now)
        .is_none());
    let mut ra = JobError::retryable("http_429", "");
    ra.retry_after_ms = Some(30_000);
    let at = p.decide(1, &ra, &mut rng, now).unwrap();
    assert!(at.as_millis() >= 30_000, "Retry-After honoured");
    ra.retry_after_ms = Some(86_400_000);
    let at = p.decide(1, &ra, &mut rng, now).unwrap();
    assert_eq!(at.as_millis(), 60_000, "Retry-After capped");
}

#[test]
fn http_dates() {
    let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
    assert_eq!(t.as_millis(), 784_111_777_000);
    assert!(parse_http_date("yesterday").is_none());
}

#[test]
fn hosts_are_read_from_canonical_urls() {
    for (url, host) in [
        ("https://example.org/a?b#c", "example.org"),
        ("http://u:p@Example.ORG:8080/x", "example.org"),
        ("http://[::1]:9/x", "[::1]"),
        ("https://127.0.0.2/f/x?delay_ms=5", "127.0.0.2"),
        ("https://h?x", "h"),
    ] {
        let parsed = CanonicalUrl::parse(url).unwrap();
        assert_eq!(parsed.host(), host, "{url}");
        assert_eq!(
            crate::spec::host_of(parsed.as_str()),
            url::Url::parse(parsed.as_str())
                .unwrap()
                .host_str()
                .unwrap(),
            "{url}"
        );
    }
}

#[test]
fn a_specs_debug_form_hides_header_values_and_url_secrets() {
    let spec = JobSpec::new("w", "a", "https://h/x?token=t0ps3cret", None, None)
        .unwrap()
        .with_headers([("Authorization", "Bearer hunter2")])
        .unwrap();
    let shown = format!("{spec:?}");
    assert!(shown.contains("Authorization"), "{shown}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("t0ps3cret"),
        "{shown}"
    );
}
