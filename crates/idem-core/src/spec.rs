//! A job's identity and payload: the spec a user plans, its canonical URL,
//! and the keys derived from it.
//!
//! The job key hashes only the identity (`work_id`, `artifact_id`), so a
//! re-plan of the same artifact always lands on the same row; the payload
//! fingerprint hashes what is fetched (canonical URL, expected digest and
//! type), so a re-plan that changes the payload is detected as a conflict
//! instead of silently rewriting history.

use crate::digest::{hash_fields, BadDigest, Digest32};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest `work_id` / `artifact_id` accepted; keys are hashes, but the
/// fields are stored and shown, so absurd values are refused at the door.
pub const MAX_ID_LEN: usize = 1024;
/// Longest URL accepted (after canonicalisation).
pub const MAX_URL_LEN: usize = 8192;

/// Why a spec was refused. Each variant names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("field `{0}` is empty")]
    Empty(&'static str),
    #[error("field `{0}` contains a control character (a terminal escape, a newline or a NUL)")]
    ControlChar(&'static str),
    #[error("field `{field}` is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
    #[error("bad url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("url {url:?} has scheme `{scheme}`; only http and https are fetched")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("field `sha256`: {0}")]
    BadDigest(#[from] BadDigest),
    #[error("field `content_type` {0:?} is not a media type like `application/pdf`")]
    BadContentType(String),
    #[error("field `{field}` has more than {max} entries")]
    TooMany { field: &'static str, max: usize },
    #[error("header `{name}`: {reason}")]
    BadHeader { name: String, reason: &'static str },
}

/// Most URLs one artifact may have (its `url` and its mirrors).
pub const MAX_URLS: usize = 16;
/// Most request headers one job may carry.
pub const MAX_HEADERS: usize = 32;
/// Longest header value accepted.
pub const MAX_HEADER_VALUE_LEN: usize = 8192;

/// Headers idem sets itself (framing, ranges, encodings, proxies): a plan
/// may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "accept-encoding",
    "connection",
    "content-length",
    "host",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "range",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A request header as a plan gives it: the name checked as an HTTP token
/// (kept as written, compared without case), the value free of control
/// characters. Headers a plan may not set are refused by name.
pub fn check_header(name: &str, value: &str) -> Result<(String, String), SpecError> {
    let name = name.trim();
    let bad = |reason| SpecError::BadHeader {
        name: name.chars().take(64).collect(),
        reason,
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
    {
        return Err(bad(
            "not a header name (letters, digits and !#$%&'*+-.^_`|~)",
        ));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(bad("idem sets this header itself"));
    }
    let value = value.trim();
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Err(bad("value longer than 8192 bytes"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad("value holds a control character (a newline, a NUL)"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// A URL in canonical form: lower-case scheme and host, no default port, no
/// fragment, percent-encoding normalised, query kept as given.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CanonicalUrl(String);

impl CanonicalUrl {
    pub fn parse(raw: &str) -> Result<Self, SpecError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(SpecError::Empty("url"));
        }
        let mut url = url::Url::parse(raw).map_err(|e| SpecError::BadUrl {
            url: redact_url(raw).into_owned(),
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(SpecError::UnsupportedScheme {
                    url: redact_url(raw).into_owned(),
                    scheme: other.to_owned(),
                })
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(SpecError::BadUrl {
                url: redact_url(raw).into_owned(),
                reason: "no host".into(),
            });
        }
        url.set_fragment(None);
        // Most URLs have no escapes to normalise; re-setting a component
        // re-serialises the whole URL, so only do it when something changed.
        if url.path().contains('%') {
            let path = normalise_percent(url.path());
            url.set_path(&path);
        }
        if let Some(q) = url
            .query()
            .filter(|q| q.contains('%'))
            .map(normalise_percent)
        {
            url.set_query(Some(&q));
        }
        let s = String::from(url);
        if s.len() > MAX_URL_LEN {
            return Err(SpecError::TooLong {
                field: "url",
                max: MAX_URL_LEN,
            });
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown: in logs, events, errors and reports.
    /// See [`redact_url`].
    pub fn redacted(&self) -> std::borrow::Cow<'_, str> {
        redact_url(&self.0)
    }

    /// The host (lower-case), for per-host limits. Always present: `parse`
    /// refuses URLs without one.
    pub fn host(&self) -> String {
        host_of(&self.0)
    }
}

/// The host (lower-case) of a URL string, or empty if it has none. A
/// canonical URL's host is read from its text, with no parse: planning
/// asks for every job's.
pub fn host_of(url: &str) -> String {
    let Some((_, rest)) = url.split_once("://") else {
        return String::new();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port.find(']').map_or(host_port, |i| &host_port[..=i])
    } else {
        host_port.split_once(':').map_or(host_port, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

impl fmt::Display for CanonicalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CanonicalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// `raw` with its secrets replaced by `***`: the userinfo (`user:password@`)
/// and the values of query parameters whose names say they carry a secret
/// (`token`, `access_token`, `key`, `api_key`, `sig`, `signature`,
/// `password`, `jwt`, `X-Amz-Signature`, `X-Amz-Credential`, ...), with
/// pairs separated by `&` or `;`, and the whole value of a parameter that,
/// percent-decoded, is itself a URL or query carrying such a secret. A
/// parameter named `code` is left visible: it is too often a plain
/// identifier (a product or DOI code) to hide. The ledger keeps
/// the URL whole, since it is what is fetched; everything idem prints or
/// writes elsewhere shows this form. Works on any string, parsed or not,
/// and borrows when there is nothing to hide.
pub fn redact_url(raw: &str) -> std::borrow::Cow<'_, str> {
    let after_scheme = raw.find("://").map_or(0, |i| i + 3);
    let rest = &raw[after_scheme..];
    let authority_end = rest
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| after_scheme + i);
    let userinfo_end = raw[after_scheme..authority_end]
        .rfind('@')
        .map(|i| after_scheme + i);
    let query = raw[authority_end..]
        .find('?')
        .map(|i| authority_end + i + 1);
    let query_end = query.map(|q| raw[q..].find('#').map_or(raw.len(), |i| q + i));
    let secret_query = match (query, query_end) {
        (Some(q), Some(e)) => query_pairs(&raw[q..e]).any(|(p, _)| is_secret_pair(p)),
        _ => false,
    };
    if userinfo_end.is_none() && !secret_query {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..after_scheme]);
    match userinfo_end {
        Some(at) => {
            out.push_str("***");
            out.push_str(&raw[at..authority_end]);
        }
        None => out.push_str(&raw[after_scheme..authority_end]),
    }
    match (query, query_end) {
        (Some(q), Some(e)) if secret_query => {
            out.push_str(&raw[authority_end..q]);
            for (pair, sep) in query_pairs(&raw[q..e]) {
                match pair.split_once('=') {
                    Some((name, _)) if is_secret_pair(pair) => {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
                out.push_str(sep);
            }
            out.push_str(&raw[e..]);
        }
        _ => out.push_str(&raw[authority_end..]),
    }
    std::borrow::Cow::Owned(out)
}

/// `text` with every URL in it passed through [`redact_url`]: for error
/// details and messages that quote URLs (an HTTP client's error names the
/// URL it failed on). A URL runs from its scheme to the first whitespace,
/// quote, angle bracket or closing parenthesis, less trailing punctuation.
pub fn redact_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("://") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |j| j + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')' | '`'))
            .map_or(rest.len(), |j| i + j);
        // Punctuation that ends a sentence ends the URL too (`{url}: HTTP 404`).
        let end = start
            + rest[start..end]
                .trim_end_matches([':', ',', ';', '.'])
                .len();
        out.push_str(&rest[..start]);
        let url = redact_url(&rest[start..end]);
        changed |= matches!(url, std::borrow::Cow::Owned(_));
        out.push_str(&url);
        rest = &rest[end..];
    }
    if !changed {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Whether a `name=value` query pair's name marks its value as a secret.
/// The `name=value` pairs of a query with the separator after each (`&`,
/// or `;` as some servers use; empty after the last).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = Some(query);
    std::iter::from_fn(move || {
        let q = rest?;
        match q.find(['&', ';']) {
            Some(i) => {
                rest = Some(&q[i + 1..]);
                Some((&q[..i], &q[i..=i]))
            }
            None => {
                rest = None;
                Some((q, ""))
            }
        }
    })
}

/// Whether a query pair carries a secret: its name says so, or its value,
/// percent-decoded, is itself a URL or query that carries one (a
/// `redirect=https%3A%2F%2F...%3Ftoken%3D...` parameter).
fn is_secret_pair(pair: &str) -> bool {
    let Some((_, value)) = pair.split_once('=') else {
        return false;
    };
    if is_secret_param(pair) {
        return true;
    }
    if !value.contains('%') {
        return false;
    }
    let decoded = percent_decode(value);
    if decoded.contains("://") {
        return matches!(redact_url(&decoded), std::borrow::Cow::Owned(_));
    }
    let inner = decoded.split_once('?').map_or(decoded.as_str(), |(_, q)| q);
    let secret = query_pairs(inner).any(|(p, _)| p.contains('=') && is_secret_pair(p));
    secret
}

/// `%XX` escapes decoded (bytes that are not UTF-8 are replaced).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            out.push((hex(b[i + 1]) << 4) | hex(b[i + 2]));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_secret_param(pair: &str) -> bool {
    const NAMES: &[&str] = &[
        "auth",
        "authorization",
        "key",
        "apikey",
        "credential",
        "pass",
        "passwd",
        "password",
        "pwd",
        "jwt",
        "secret",
        "session",
        "sessionid",
        "session_id",
        "sig",
        "signature",
        "token",
        "x-amz-credential",
        "x-amz-security-token",
        "x-amz-signature",
        "x-goog-credential",
        "x-goog-signature",
    ];
    const SUFFIXES: &[&str] = &[
        "token",
        "secret",
        "signature",
        "password",
        "_key",
        "-key",
        "jwt",
        "apikey",
    ];
    let name = pair
        .split_once('=')
        .map_or(pair, |(n, _)| n)
        .to_ascii_lowercase();
    NAMES.contains(&name.as_str()) || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Decodes escapes of unreserved characters (RFC 3986 §6.2.2.2) and
/// upper-cases the hex of the escapes that must stay, so `%7e`, `%7E` and `~`
/// all become `~` and `%2f` becomes `%2F`.
fn normalise_percent(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let (h, l) = (b[i + 1], b[i + 2]);
            if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                let v = (hex(h) << 4) | hex(l);
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    out.push(v as char);
                } else {
                    out.push('%');
                    out.push(h.to_ascii_uppercase() as char);
                    out.push(l.to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// The deterministic idempotency key of a job: SHA-256 over its versioned
/// identity.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobKey(Digest32);

/// SHA-256 over a job's canonical payload.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(Digest32);

macro_rules! digest_newtype {
    ($t:ident) => {
        impl $t {
            pub const fn from_digest(d: Digest32) -> Self {
                Self(d)
            }
            pub const fn digest(&self) -> &Digest32 {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                self.0.to_hex()
            }
            pub fn parse_hex(s: &str) -> Result<Self, BadDigest> {
                Digest32::parse_hex(s).map(Self)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}
digest_newtype!(JobKey);
digest_newtype!(Fingerprint);

/// What a user asks idem to fetch. Construct with [`JobSpec::new`], which
/// validates and canonicalises every field. Its `Debug` form shows header
/// names only, and URLs without their secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub work_id: String,
    pub artifact_id: String,
    pub url: CanonicalUrl,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Further URLs of the same artifact, tried in order after `url` when
    /// it fails (see [`crate::Job::url`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<CanonicalUrl>,
    /// Request headers sent with this job's requests, to its URL's origin
    /// only (never after a redirect to another). Not part of the
    /// fingerprint: a credential may change while the artifact does not.
    /// Values are secrets: shown only as `***`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, _)| (n.as_str(), "***"))
            .collect();
        let mirrors: Vec<std::borrow::Cow<'_, str>> =
            self.mirrors.iter().map(CanonicalUrl::redacted).collect();
        f.debug_struct("JobSpec")
            .field("work_id", &self.work_id)
            .field("artifact_id", &self.artifact_id)
            .field("url", &self.url.redacted())
            .field("sha256", &self.sha256)
            .field("content_type", &self.content_type)
            .field("mirrors", &mirrors)
            .field("headers", &headers)
            .finish()
    }
}

/// Version tags baked into every key; bump them only with a migration.
const JOB_KEY_DOMAIN: &str = "idem/job-key/v1";
const FINGERPRINT_DOMAIN: &str = "idem/payload/v1";

impl JobSpec {
    pub fn new(
        work_id: &str,
        artifact_id: &str,
        url: &str,
        sha256: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<Self, SpecError> {
        let work_id = check_id("work_id", work_id)?;
        let artifact_id = check_id("artifact_id", artifact_id)?;
        let url = CanonicalUrl::parse(url)?;
        let sha256 = match sha256.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => Some(Digest32::parse_hex(s)?),
            None => None,
        };
        let content_type = match content_type.map(str::trim).filter(|s| !s.is_empty()) {
            Some(t) => Some(check_media_type(t)?),
            None => None,
        };
        Ok(Self {
            work_id,
            artifact_id,
            url,
            sha256,
            content_type,
            mirrors: Vec::new(),
            headers: Vec::new(),
        })
    }

    /// The spec with further URLs for the same artifact, tried in order
    /// after `url`; a URL given twice is kept once.
    pub fn with_mirrors<'a>(
        mut self,
        urls: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, SpecError> {
        for raw in urls {
            let u = CanonicalUrl::parse(raw)?;
            if u != self.url && !self.mirrors.contains(&u) {
                self.mirrors.push(u);
            }
            if self.mirrors.len() + 1 > MAX_URLS {
                return Err(SpecError::TooMany {
                    field: "urls",
                    max: MAX_URLS,
                });
            }
        }
        Ok(self)
    }

    /// The spec with request headers (see [`check_header`]); a name given
    /// twice keeps its last value.
    pub fn with_headers<'a>(
        mut self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SpecError> {
        for (n, v) in headers {
            let (n, v) = check_header(n, v)?;
            self.headers.retain(|(m, _)| !m.eq_ignore_ascii_case(&n));
            self.headers.push((n, v));
            if self.headers.len() > MAX_HEADERS {
                return Err(SpecError::TooMany {
                    field: "headers",
                    max: MAX_HEADERS,
                });
            }
        }
        Ok(self)
    }

    /// Every URL of the artifact, in the order they are tried.
    pub fn urls(&self) -> impl Iterator<Item = &CanonicalUrl> {
        std::iter::once(&self.url).chain(&self.mirrors)
    }

    pub fn key(&self) -> JobKey {
        job_key_of(&self.work_id, &self.artifact_id)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint_of(
            self.url.as_str(),
            self.sha256.as_ref(),
            self.content_type.as_deref(),
            &self.mirrors,
        )
    }
}

/// The fingerprint of a spec's payload (its canonical URL, expected digest
/// and expected type, and its mirrors in order), without building the
/// spec: a store may keep them and derive this. A spec without mirrors
/// hashes only the first three.
pub fn fingerprint_of(
    canonical_url: &str,
    sha256: Option<&Digest32>,
    content_type: Option<&str>,
    mirrors: &[CanonicalUrl],
) -> Fingerprint {
    let sha = sha256.map(Digest32::to_hex).unwrap_or_default();
    let mut fields: Vec<&[u8]> = vec![
        canonical_url.as_bytes(),
        sha.as_bytes(),
        content_type.unwrap_or("").as_bytes(),
    ];
    fields.extend(mirrors.iter().map(|m| m.as_str().as_bytes()));
    Fingerprint(hash_fields(FINGERPRINT_DOMAIN, &fields))
}

/// The job key of `work_id/artifact_id` (trimmed, as [`JobSpec::new`] does),
/// without building a full spec: for `idem show W/A`.
pub fn job_key_of(work_id: &str, artifact_id: &str) -> JobKey {
    JobKey(hash_fields(
        JOB_KEY_DOMAIN,
        &[work_id.trim().as_bytes(), artifact_id.trim().as_bytes()],
    ))
}

fn check_id(field: &'static str, v: &str) -> Result<String, SpecError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(SpecError::Empty(field));
    }
    if v.len() > MAX_ID_LEN {
        return Err(SpecError::TooLong {
            field,
            max: MAX_ID_LEN,
        });
    }
    // Ids are printed by `show`, `export` and conflict reports: a control
    // character there could drive the operator's terminal.
    if v.chars().any(char::is_control) {
        return Err(SpecError::ControlChar(field));
    }
    Ok(v.to_owned())
}

fn check_media_type(t: &str) -> Result<String, SpecError> {
    let lower = t.to_ascii_lowercase();
    let essence = lower.split(';').next().unwrap_or("").trim();
    let ok = essence.split_once('/').is_some_and(|(a, b)| {
        let tok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+*".contains(&c))
        };
        tok(a) && tok(b)
    });
    if ok {
        Ok(essence.to_owned())
    } else {
        Err(SpecError::BadContentType(t.to_owned()))
    }
}

/// Does a server's `Content-Type` satisfy the expected media type? Parameters
/// (`; charset=...`) and case are ignored.
pub fn media_type_matches(expected: &str, got: &str) -> bool {
    // Several types in one value (`a, b`: a server that sent two fields)
    // are no answer.
    if got.contains(',') {
        return false;
    }
    let essence = got.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(expected)
}
