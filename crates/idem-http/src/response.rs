//! What a response's headers say: HEAD's facts, a declared digest, the
//! error a status means; and a job's headers as a request's map.

use idem_core::ports::{FetchError, FetchErrorKind};
use idem_core::{Digest32, HeadInfo};
use reqwest::header::{self, HeaderMap, HeaderValue};

/// A job's headers as a map; a name or value the plan should have refused
/// is a policy refusal, not a panic.
pub(crate) fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, FetchError> {
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        let name = header::HeaderName::from_bytes(n.as_bytes());
        let value = HeaderValue::from_str(v);
        match (name, value) {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                map.insert(name, value);
            }
            _ => {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!("header {n:?}: not a valid HTTP header"),
                ))
            }
        }
    }
    Ok(map)
}

pub(crate) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The response's media type. Several `Content-Type` fields that disagree
/// are kept together (`a, b`), so no expected type matches them: a server
/// that sends two cannot have the check read only the first.
pub(crate) fn content_type(h: &HeaderMap) -> Option<String> {
    let mut all: Vec<String> = Vec::new();
    for v in h.get_all(header::CONTENT_TYPE) {
        let v = String::from_utf8_lossy(v.as_bytes()).trim().to_owned();
        if !v.is_empty() && !all.contains(&v) {
            all.push(v);
        }
    }
    (!all.is_empty()).then(|| all.join(", "))
}

pub(crate) fn head_info(resp: &reqwest::Response) -> HeadInfo {
    let h = resp.headers();
    HeadInfo {
        status: resp.status().as_u16(),
        etag: header_str(h, header::ETAG),
        last_modified: header_str(h, header::LAST_MODIFIED),
        content_length: header_str(h, header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        content_type: content_type(h),
        accept_ranges: header_str(h, header::ACCEPT_RANGES).is_some_and(|v| v.contains("bytes")),
        sha256: declared_sha256(h, resp.status().as_u16()),
    }
}

/// The SHA-256 of the whole representation, as the server declared it:
/// `Repr-Digest` (RFC 9530), `Content-Digest` on a full (200) answer, whose
/// content is then the whole representation, or `Digest` (RFC 3230). A
/// value that does not parse is ignored, as an unknown algorithm is.
pub(crate) fn declared_sha256(h: &HeaderMap, status: u16) -> Option<Digest32> {
    let sf = |name: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|item| {
                let (alg, val) = item.split_once('=')?;
                let b64 = val.trim().strip_prefix(':')?.strip_suffix(':')?;
                alg.trim()
                    .eq_ignore_ascii_case("sha-256")
                    .then(|| digest_of_base64(b64))
                    .flatten()
            })
    };
    let legacy = || {
        h.get_all("digest")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|item| {
                let (alg, val) = item.split_once('=')?;
                alg.trim()
                    .eq_ignore_ascii_case("sha-256")
                    .then(|| digest_of_base64(val.trim()))
                    .flatten()
            })
    };
    sf("repr-digest")
        .or_else(|| (status == 200).then(|| sf("content-digest")).flatten())
        .or_else(legacy)
}

/// 32 bytes from standard base64 (with or without padding), if that is
/// what `text` holds.
pub(crate) fn digest_of_base64(text: &str) -> Option<Digest32> {
    let mut bits = 0u32;
    let mut n = 0u32;
    let mut out = Vec::with_capacity(32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    let bytes: [u8; 32] = out.try_into().ok()?;
    Some(Digest32::from_bytes(bytes))
}

/// A non-success status as an error, with `Retry-After` when given.
pub(crate) fn status_error(resp: &reqwest::Response, url: &str) -> FetchError {
    let status = resp.status();
    let mut e = FetchError::new(
        FetchErrorKind::Status(status.as_u16()),
        format!("{url}: HTTP {status}"),
    );
    if let Some(ra) = header_str(resp.headers(), header::RETRY_AFTER) {
        e.retry_after_ms = idem_core::retry::parse_retry_after_secs(&ra).or_else(|| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            idem_core::retry::retry_after_from_date(&ra, idem_core::Timestamp::from_millis(now_ms))
        });
    }
    e
}
