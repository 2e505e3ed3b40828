//! idem-http: the reqwest adapter behind idem-core's [`Http`] port.
//!
//! It owns the fetch policy, safe by default:
//!
//! - only `http` and `https`; TLS is always verified;
//! - redirects are followed by hand, at most [`Policy::max_redirects`], and
//!   every hop is re-checked (scheme, https→http downgrade, address);
//! - private, loopback and link-local addresses are refused unless allowed,
//!   both for IP literals and for names (checked on the resolved addresses,
//!   so DNS cannot smuggle a private target in);
//! - a size cap enforced against `Content-Length` and again while streaming;
//! - `Accept-Encoding: identity`, so bytes on disk are the bytes served and
//!   Range offsets mean what they say;
//! - a per-read timeout and a connect timeout, never a total one, so a large
//!   body can take as long as it needs while a stalled one is cut off;
//! - proxies from the environment ([`proxy`]); through a proxy, a target's
//!   name is resolved here too and refused as above, while the proxy's own
//!   address is not judged (a proxy on the local network is common).
//!
//! Errors are mapped into [`FetchError`] with a kind the retry policy can
//! classify; no reqwest type leaves this crate.
//!
//! ## Example
//!
//! ```no_run
//! use idem_core::Http;
//! use idem_http::{HttpClient, Policy};
//!
//! # async fn head() -> Result<(), Box<dyn std::error::Error>> {
//! let client = HttpClient::new(Policy { max_bytes: Some(1 << 30), ..Policy::default() })?;
//! let head = client.head("https://example.org/paper.pdf", &[]).await?;
//! println!("{:?} bytes of {:?}", head.content_length, head.content_type);
//! # Ok(())
//! # }
//! ```
//!
//! Depends on idem-core, reqwest (rustls), tokio and url.

mod policy;
pub mod proxy;
mod response;

pub use policy::{address_refusal, Policy};
use policy::{GuardedResolver, RefusedAddress};

use bytes::Bytes;
use idem_core::ports::{Body, FetchError, FetchErrorKind, GetResponse, Http, Resume};
use idem_core::HeadInfo;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::StatusCode;
use response::{head_info, header_map, header_str, status_error};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The HTTP adapter. Cheap to clone; share one per process (it pools
/// connections).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    policy: Arc<Policy>,
    proxies: Arc<proxy::Proxies>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("policy", &self.policy)
            .finish()
    }
}

/// The client could not be built (TLS roots, resolver).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct BuildError(String);

impl HttpClient {
    /// A client with the proxies the environment names
    /// ([`proxy::Proxies::from_env`]).
    pub fn new(policy: Policy) -> Result<Self, BuildError> {
        Self::with_proxies(policy, proxy::Proxies::from_env())
    }

    pub fn with_proxies(policy: Policy, proxies: proxy::Proxies) -> Result<Self, BuildError> {
        let policy = Arc::new(policy);
        let proxies = Arc::new(proxies);
        let chosen = Arc::clone(&proxies);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .no_proxy()
            .proxy(reqwest::Proxy::custom(move |url| {
                chosen.for_url(url).cloned()
            }))
            .default_headers(headers)
            .user_agent(policy.user_agent.clone())
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.read_timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(32)
            .dns_resolver(GuardedResolver {
                policy: Arc::clone(&policy),
                proxy_hosts: proxies.hosts(),
            })
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        Ok(Self {
            client,
            policy,
            proxies,
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Through a proxy the client resolves no target name: resolve it here
    /// and judge its addresses, as the resolver does for direct requests.
    async fn check_proxied(&self, url: &reqwest::Url) -> Result<(), FetchError> {
        if self.policy.allow_private || self.proxies.for_url(url).is_none() {
            return Ok(());
        }
        let Some(url::Host::Domain(name)) = url.host() else {
            return Ok(());
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((name, port)).await {
            Ok(a) => a.collect(),
            // The proxy may know names this host cannot resolve.
            Err(_) => return Ok(()),
        };
        for a in addrs {
            if let Some(why) = address_refusal(a.ip(), &self.policy) {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!(
                        "{url}: {name} resolves to {} ({why} address refused; see --allow-private)",
                        a.ip()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a URL before any connection: scheme and IP-literal host.
    fn check_url(&self, url: &reqwest::Url) -> Result<(), FetchError> {
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!("{url}: scheme `{other}` refused (only http and https)"),
                ))
            }
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(url::Host::Domain(d)) => {
                if d.eq_ignore_ascii_case("localhost")
                    || d.to_ascii_lowercase().ends_with(".localhost")
                {
                    Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
                } else {
                    None
                }
            }
            None => {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!("{url}: no host"),
                ))
            }
        };
        if let Some(ip) = ip {
            if let Some(why) = address_refusal(ip, &self.policy) {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!("{url}: {why} address {ip} refused (use --allow-private to fetch from private networks)"),
                ));
            }
        }
        Ok(())
    }

    /// Sends a request, following redirects by hand so each hop is checked.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        job_headers: &[(String, String)],
        extra: &HeaderMap,
    ) -> Result<(reqwest::Response, reqwest::Url), FetchError> {
        let mut current = reqwest::Url::parse(url)
            .map_err(|e| FetchError::new(FetchErrorKind::Policy, format!("{url}: bad url: {e}")))?;
        let origin = current.origin();
        let own = header_map(job_headers)?;
        let mut seen = vec![current.clone()];
        for _ in 0..=self.policy.max_redirects {
            self.check_url(&current)?;
            self.check_proxied(&current).await?;
            // The job's headers (credentials, often) go to its own origin
            // only, as curl does: never to a host a redirect names.
            let mut headers = if current.origin() == origin {
                own.clone()
            } else {
                HeaderMap::new()
            };
            for (name, value) in extra {
                headers.insert(name, value.clone());
            }
            let resp = self
                .client
                .request(method.clone(), current.clone())
                .headers(headers)
                .send()
                .await
                .map_err(|e| map_reqwest(&e, current.as_str()))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((resp, current));
            }
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    FetchError::new(
                        FetchErrorKind::Status(resp.status().as_u16()),
                        format!("{current}: redirect without a Location"),
                    )
                })?;
            let next = current.join(loc).map_err(|e| {
                FetchError::new(
                    FetchErrorKind::Policy,
                    format!("{current}: bad redirect target {loc:?}: {e}"),
                )
            })?;
            if current.scheme() == "https" && next.scheme() == "http" {
                return Err(FetchError::new(
                    FetchErrorKind::Policy,
                    format!("{current}: redirect downgrades https to http ({next}); refused"),
                ));
            }
            if seen.contains(&next) {
                return Err(FetchError::new(
                    FetchErrorKind::TooManyRedirects,
                    format!("{url}: redirect loop at {next}"),
                ));
            }
            seen.push(next.clone());
            current = next;
        }
        Err(FetchError::new(
            FetchErrorKind::TooManyRedirects,
            format!("{url}: more than {} redirects", self.policy.max_redirects),
        ))
    }

    fn check_size(&self, url: &str, len: Option<u64>) -> Result<(), FetchError> {
        match (len, self.policy.max_bytes) {
            (Some(n), Some(max)) if n > max => Err(FetchError::new(
                FetchErrorKind::TooLarge,
                format!("{url}: Content-Length {n} is over the {max}-byte cap"),
            )),
            _ => Ok(()),
        }
    }
}

/// Finds an error of type `T` in a chain, looking through `source()` and
/// inside `io::Error`s (which hide what they wrap from `source()`).
fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        let mut inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        while let Some(i) = inner {
            if let Some(t) = i.downcast_ref::<T>() {
                return Some(t);
            }
            inner = i
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref);
        }
        src = s.source();
    }
    None
}

fn map_reqwest(e: &reqwest::Error, url: &str) -> FetchError {
    if let Some(r) = find_in_chain::<RefusedAddress>(e) {
        return FetchError::new(FetchErrorKind::Policy, format!("{url}: {r}"));
    }
    // A certificate or protocol refusal will not get better by retrying.
    if let Some(tls) = find_in_chain::<rustls::Error>(e) {
        return FetchError::new(FetchErrorKind::Policy, format!("{url}: TLS refused: {tls}"));
    }
    let io_kind = find_in_chain::<std::io::Error>(e).map(std::io::Error::kind);
    let detail = format!("{url}: {}", error_chain(e));
    let kind = if e.is_timeout() || io_kind == Some(std::io::ErrorKind::TimedOut) {
        FetchErrorKind::Timeout
    } else if e.is_connect() {
        FetchErrorKind::Connect
    } else if matches!(
        io_kind,
        Some(
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        )
    ) {
        FetchErrorKind::Reset
    } else if e.is_body() || e.is_decode() || io_kind == Some(std::io::ErrorKind::UnexpectedEof) {
        FetchErrorKind::Truncated
    } else {
        FetchErrorKind::Other
    };
    FetchError::new(kind, detail)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// A response body, with the size cap enforced as bytes arrive.
pub struct ResponseBody {
    resp: reqwest::Response,
    url: String,
    seen: u64,
    /// Total allowed for this body (cap minus the resume offset).
    cap: Option<u64>,
}

impl Body for ResponseBody {
    type Chunk = Bytes;

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        let chunk = self
            .resp
            .chunk()
            .await
            .map_err(|e| map_reqwest(&e, &self.url))?;
        if let Some(c) = &chunk {
            self.seen += c.len() as u64;
            if let Some(cap) = self.cap {
                if self.seen > cap {
                    return Err(FetchError::new(
                        FetchErrorKind::TooLarge,
                        format!(
                            "{}: body passed the size cap ({cap} bytes) while streaming",
                            self.url
                        ),
                    ));
                }
            }
        }
        Ok(chunk)
    }
}

impl Http for HttpClient {
    type Body = ResponseBody;

    async fn head(&self, url: &str, headers: &[(String, String)]) -> Result<HeadInfo, FetchError> {
        let (resp, final_url) = self
            .send(reqwest::Method::HEAD, url, headers, &HeaderMap::new())
            .await?;
        let status = resp.status();
        // Servers that refuse HEAD: take the headers of a GET instead, and
        // drop its body unread.
        let resp = if matches!(
            status,
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ) {
            // The GET goes where the HEAD ended; the job's headers only if
            // that is still the job's origin.
            let same = reqwest::Url::parse(url).is_ok_and(|u| u.origin() == final_url.origin());
            let own: &[(String, String)] = if same { headers } else { &[] };
            self.send(
                reqwest::Method::GET,
                final_url.as_str(),
                own,
                &HeaderMap::new(),
            )
            .await?
            .0
        } else {
            resp
        };
        if !resp.status().is_success() {
            return Err(status_error(&resp, url));
        }
        let info = head_info(&resp);
        self.check_size(url, info.content_length)?;
        Ok(info)
    }

    async fn get(
        &self,
        url: &str,
        headers: &[(String, String)],
        resume: Option<&Resume>,
    ) -> Result<GetResponse<ResponseBody>, FetchError> {
        let mut extra = HeaderMap::new();
        if let Some(r) = resume.filter(|r| r.offset > 0) {
            let range = format!("bytes={}-", r.offset);
            extra.insert(
                header::RANGE,
                HeaderValue::from_str(&range)
                    .map_err(|e| FetchError::new(FetchErrorKind::Other, e.to_string()))?,
            );
            if let Some(v) = r
                .if_range
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                extra.insert(header::IF_RANGE, v);
            }
        }
        let (resp, _) = self
            .send(reqwest::Method::GET, url, headers, &extra)
            .await?;
        self.opened(url, resp, resume)
    }

    async fn revalidate(
        &self,
        url: &str,
        headers: &[(String, String)],
        recorded: &HeadInfo,
    ) -> Result<Option<GetResponse<ResponseBody>>, FetchError> {
        let mut extra = HeaderMap::new();
        let conditions = [
            (header::IF_NONE_MATCH, recorded.etag.as_deref()),
            (header::IF_MODIFIED_SINCE, recorded.last_modified.as_deref()),
        ];
        for (name, value) in conditions {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                extra.insert(name, v);
            }
        }
        let (resp, _) = self
            .send(reqwest::Method::GET, url, headers, &extra)
            .await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        self.opened(url, resp, None).map(Some)
    }
}

impl HttpClient {
    /// A GET's response as a [`GetResponse`]: its facts, where its body
    /// starts (checked against `resume`), within the size cap.
    fn opened(
        &self,
        url: &str,
        resp: reqwest::Response,
        resume: Option<&Resume>,
    ) -> Result<GetResponse<ResponseBody>, FetchError> {
        let status = resp.status();
        let head = head_info(&resp);
        let offset = match (status, resume) {
            (StatusCode::PARTIAL_CONTENT, Some(r)) => {
                let cr = header_str(resp.headers(), header::CONTENT_RANGE).unwrap_or_default();
                let want = format!("bytes {}-", r.offset);
                if !cr.starts_with(&want) {
                    return Err(FetchError::new(
                        FetchErrorKind::Other,
                        format!(
                            "{url}: asked for bytes from {} but got Content-Range {cr:?}",
                            r.offset
                        ),
                    ));
                }
                r.offset
            }
            (s, _) if s.is_success() && s != StatusCode::PARTIAL_CONTENT => 0,
            _ => return Err(status_error(&resp, url)),
        };
        let total = head.content_length.map(|n| n + offset);
        self.check_size(url, total)?;
        let cap = self.policy.max_bytes.map(|m| m.saturating_sub(offset));
        Ok(GetResponse {
            head,
            offset,
            body: ResponseBody {
                resp,
                url: url.to_owned(),
                seen: 0,
                cap,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::declared_sha256;
    use idem_core::Digest32;

    #[test]
    fn refusals_are_found_inside_nested_io_errors() {
        let refused = RefusedAddress("x resolves to 10.0.0.1".into());
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let outer = std::io::Error::other(inner);
        let found = find_in_chain::<RefusedAddress>(&outer).expect("found through two io::Errors");
        assert!(found.0.contains("10.0.0.1"));
        let plain = std::io::Error::other("nothing special");
        assert!(find_in_chain::<RefusedAddress>(&plain).is_none());
        assert_eq!(
            find_in_chain::<std::io::Error>(&outer).map(std::io::Error::kind),
            Some(std::io::ErrorKind::Other)
        );
    }

    #[test]
    fn declared_digests_are_read_from_each_header() {
        let sha = Digest32::of(b"hello");
        // The SHA-256 of "hello" in base64, as a server would send it.
        let b64 = "LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=";
        let with = |name: &str, value: String| {
            let mut h = HeaderMap::new();
            h.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            h
        };
        let repr = with("repr-digest", format!("sha-512=:AAAA:, sha-256=:{b64}:"));
        assert_eq!(declared_sha256(&repr, 206), Some(sha));
        let content = with("content-digest", format!("sha-256=:{b64}:"));
        assert_eq!(declared_sha256(&content, 200), Some(sha));
        assert_eq!(
            declared_sha256(&content, 206),
            None,
            "a part's digest is the part's"
        );
        let legacy = with("digest", format!("MD5=abc, SHA-256={b64}"));
        assert_eq!(declared_sha256(&legacy, 200), Some(sha));
        assert_eq!(
            declared_sha256(&with("digest", "SHA-256=short".into()), 200),
            None
        );
    }
}
