//! idem-origin: a small, deliberately hostile HTTP/1.1 origin on 127.0.0.1,
//! for idem's tests, benchmarks and `idem demo`.
//!
//! Hand-written on std threads rather than hyper so every fault is exact to
//! the byte: a body cut at a chosen offset, a trickle, a reset, a lie in
//! `Content-Length`. Behaviour is chosen by the path's first segment:
//!
//! | path | behaviour |
//! | --- | --- |
//! | `/f/NAME` | normal: HEAD, GET, `Range` with `If-Range`, `ETag`, `Last-Modified` |
//! | `/slow/NAME` | trickles the body (1 KiB every `?ms=` milliseconds, default 20; `?ms=` trickles in any mode) |
//! | `/reset/NAME` | sends half the body, then drops the connection |
//! | `/trunc/NAME` | declares the full `Content-Length`, sends half, closes |
//! | `/status/CODE/NAME` | answers `CODE` (with `Retry-After: ?retry_after=`, default 1) |
//! | `/redirect/N/NAME` | a chain of N redirects ending at `/f/NAME` |
//! | `/loop/NAME` | redirects forever between two URLs |
//! | `/private/NAME` | redirects to a private address (10.255.255.1) |
//! | `/nohead/NAME` | HEAD answers 405; GET works |
//! | `/type/NAME` | serves the body as `text/html` |
//! | `/notype/NAME` | sends no `Content-Type` at all |
//! | `/twotypes/NAME` | sends two `Content-Type` fields: the file's type, then `text/html` |
//! | `/changing/NAME` | content and `ETag` change on every request |
//! | `/noval/NAME` | sends neither `ETag` nor `Last-Modified`, and answers conditional requests in full |
//! | `/norange/NAME` | ignores `Range`, always 200 with the full body |
//! | `/chunked/NAME` | HEAD gives the length; GET answers 200 in `Transfer-Encoding: chunked`, without one (and ignores `Range`) |
//! | `/auth/NAME` | answers 401 unless the request carries `Authorization: Bearer letmein` |
//! | `/xredirect/PORT/NAME` | redirects to `/f/NAME` on `127.0.0.1:PORT`: another origin |
//!
//! The last request's headers are kept per path-and-query
//! ([`Origin::headers`]). [`Proxy`] is a forward HTTP proxy that counts
//! what it carries.
//!
//! `?digest=right` or `?digest=wrong` (any mode) adds `Repr-Digest:
//! sha-256=:…:` with the body's SHA-256 or another's; `?digest=legacy-wrong`
//! sends a wrong `Digest: SHA-256=…` instead.
//!
//! A GET or HEAD with `If-None-Match` naming the current `ETag` (or, without
//! it, `If-Modified-Since` naming the `Last-Modified` date) is answered `304
//! Not Modified`; [`Origin::put`] changes a file and so its `ETag`.
//!
//! `?delay_ms=N` (any mode) waits N milliseconds before answering: a slow
//! host. `?rate_limit=N` (any mode) answers `429` with `Retry-After: 1` to a
//! request that finds N or more requests arrived in the second before it
//! ([`Origin::throttled`] counts them): a host that throttles. The origin counts the requests it is answering at once
//! ([`Origin::max_in_flight`]), to check a client's per-host limit.
//!
//! Faulty modes misbehave for the first `?fail=K` requests to that exact
//! URL (default: always), then serve normally, so recovery can be tested;
//! body faults (`reset`, `trunc`) count GETs only.
//! Every request is counted per path-and-query.
//!
//! ## Example
//!
//! ```
//! use idem_origin::{content, Origin};
//!
//! let origin = Origin::start([("a.pdf".to_owned(), content(1, 4096))])?;
//! let url = origin.url("/trunc/a.pdf?fail=1"); // cut short once, then served whole
//! assert!(url.starts_with("http://127.0.0.1:"));
//! assert_eq!(origin.count("/trunc/a.pdf?fail=1"), 0);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod proxy;
pub use proxy::Proxy;

/// A running origin. Stops when dropped.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    files: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    counts: Mutex<HashMap<String, u64>>,
    gets: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    stop: AtomicBool,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    headers: Mutex<HashMap<String, HashMap<String, String>>>,
    started: std::time::Instant,
    arrivals_ms: Mutex<Vec<u64>>,
    throttled: AtomicU64,
}

impl Origin {
    /// Starts serving `files` (name → content) on an ephemeral loopback port.
    pub fn start(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> std::io::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, files)
    }

    /// The same on another loopback address (`127.0.0.2`, ...): a second
    /// host, as a client that keys its limits by host sees it.
    pub fn start_on(
        ip: std::net::Ipv4Addr,
        files: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            files: Mutex::new(files.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
            counts: Mutex::new(HashMap::new()),
            gets: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            headers: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            arrivals_ms: Mutex::new(Vec::new()),
            throttled: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("idem-origin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = Arc::clone(&s);
                    let _ = std::thread::Builder::new()
                        .name("idem-origin-conn".into())
                        .spawn(move || serve(conn, &s));
                }
            })?;
        Ok(Self { addr, shared })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Adds or replaces a file.
    pub fn put(&self, name: &str, content: Vec<u8>) {
        lock(&self.shared.files).insert(name.to_owned(), Arc::new(content));
    }

    /// Requests seen for `path_and_query` (exactly as requested).
    pub fn count(&self, path_and_query: &str) -> u64 {
        lock(&self.shared.counts)
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    /// Requests seen in all.
    pub fn total(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// The most requests it was answering at once.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// GET requests seen for `path_and_query`.
    pub fn gets(&self, path_and_query: &str) -> u64 {
        lock(&self.shared.gets)
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    /// The headers (names lower-cased) of the last request for
    /// `path_and_query`, if there was one.
    pub fn headers(&self, path_and_query: &str) -> Option<HashMap<String, String>> {
        lock(&self.shared.headers).get(path_and_query).cloned()
    }

    /// Requests answered 429 by `?rate_limit=`.
    pub fn throttled(&self) -> u64 {
        self.shared.throttled.load(Ordering::SeqCst)
    }

    /// When each request arrived, in milliseconds since the origin started.
    pub fn arrivals_ms(&self) -> Vec<u64> {
        lock(&self.shared.arrivals_ms).clone()
    }

    /// Requests per path, for reports.
    pub fn counts(&self) -> HashMap<String, u64> {
        lock(&self.shared.counts).clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Deterministic pseudo-random content: `n` bytes from `seed`.
pub fn content(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Some(Request {
        method,
        target,
        headers,
    })
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_nodelay(true);
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut w = write_half;
    while let Some(req) = read_request(&mut reader) {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let n = {
            let mut c = lock(&s.counts);
            let e = c.entry(req.target.clone()).or_default();
            *e += 1;
            *e
        };
        let n_get = if req.method == "GET" {
            let mut c = lock(&s.gets);
            let e = c.entry(req.target.clone()).or_default();
            *e += 1;
            *e
        } else {
            0
        };
        lock(&s.headers).insert(req.target.clone(), req.headers.clone());
        let arrived_ms = s.started.elapsed().as_millis() as u64;
        let recent = {
            let mut a = lock(&s.arrivals_ms);
            let recent = a
                .iter()
                .rev()
                .take_while(|t| **t + 1000 > arrived_ms)
                .count() as u64;
            a.push(arrived_ms);
            recent
        };
        s.total.fetch_add(1, Ordering::SeqCst);
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let limit = req
            .target
            .split_once('?')
            .and_then(|(_, q)| query_param(q, "rate_limit"));
        let answered = if limit.is_some_and(|l| recent >= l) {
            s.throttled.fetch_add(1, Ordering::SeqCst);
            w.write_all(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nslow",
            )
            .map(|()| true)
        } else {
            respond(&req, n, n_get, s, &mut w)
        };
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        match answered {
            Ok(true) => {}
            _ => return,
        }
    }
}

fn query_value<'a>(q: &'a str, name: &str) -> Option<&'a str> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Standard base64 of `data`'s SHA-256, as digest headers carry it.
fn sha256_b64(data: &[u8]) -> String {
    use sha2::Digest as _;
    let bytes: [u8; 32] = sha2::Sha256::digest(data).into();
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            s.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

fn query_param(q: &str, name: &str) -> Option<u64> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn etag_of(body: &[u8]) -> String {
    // A cheap stable digest is enough to tell versions apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.iter().step_by(body.len() / 4096 + 1) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("\"{h:016x}-{}\"", body.len())
}

const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// Writes one response. Returns whether the connection may be reused.
fn respond(
    req: &Request,
    n: u64,
    n_get: u64,
    s: &Shared,
    w: &mut TcpStream,
) -> std::io::Result<bool> {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    let fail = query_param(query, "fail").unwrap_or(u64::MAX);
    if let Some(ms) = query_param(query, "delay_ms") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let faulty = n <= fail;
    let (mode, rest) = match segs.as_slice() {
        [mode, rest @ ..] => (*mode, rest.join("/")),
        _ => return simple(w, 404, "not found"),
    };
    let (name, arg) = match mode {
        "status" | "redirect" | "xredirect" => match rest.split_once('/') {
            Some((a, n)) => (n.to_owned(), a.parse::<u64>().unwrap_or(0)),
            None => return simple(w, 404, "not found"),
        },
        _ => (rest, 0),
    };
    let Some(body) = lock(&s.files).get(&name).cloned() else {
        return simple(w, 404, "no such file");
    };
    let is_head = req.method == "HEAD";
    match mode {
        "status" if faulty => {
            let ra = query_param(query, "retry_after").unwrap_or(1);
            let head = format!(
                "HTTP/1.1 {arg} Fault\r\nRetry-After: {ra}\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
            );
            w.write_all(head.as_bytes())?;
            if !is_head {
                w.write_all(b"fault")?;
            }
            return Ok(true);
        }
        "redirect" if arg > 0 => {
            let next = if arg == 1 {
                format!("/f/{name}")
            } else {
                format!("/redirect/{}/{name}", arg - 1)
            };
            return redirect(w, &next);
        }
        "loop" => {
            let next = if query.contains("b=1") {
                format!("/loop/{name}")
            } else {
                format!("/loop/{name}?b=1")
            };
            return redirect(w, &next);
        }
        "private" if faulty => return redirect(w, &format!("http://10.255.255.1/f/{name}")),
        "nohead" if is_head => return simple(w, 405, ""),
        "auth"
            if req.headers.get("authorization").map(String::as_str) != Some("Bearer letmein") =>
        {
            return simple(w, 401, "unauthorized")
        }
        "xredirect" => return redirect(w, &format!("http://127.0.0.1:{arg}/f/{name}")),
        _ => {}
    }
    let mut body: Arc<Vec<u8>> = body;
    if mode == "changing" {
        let mut b = (*body).clone();
        b.extend_from_slice(format!("version {n}").as_bytes());
        body = Arc::new(b);
    }
    let etag = etag_of(&body);
    let ctype = if mode == "type" {
        "text/html"
    } else if name.ends_with(".pdf") {
        "application/pdf"
    } else {
        "application/octet-stream"
    };
    let unchanged = match (
        req.headers.get("if-none-match"),
        req.headers.get("if-modified-since"),
    ) {
        (Some(v), _) => *v == etag,
        (None, Some(v)) => v == LAST_MODIFIED,
        _ => false,
    };
    if unchanged && mode != "noval" {
        let head = format!(
            "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nLast-Modified: {LAST_MODIFIED}\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        );
        w.write_all(head.as_bytes())?;
        return Ok(true);
    }
    // Range handling (bytes=N- or bytes=N-M), honouring If-Range.
    let mut start = 0usize;
    let mut end = body.len();
    let mut partial = false;
    if mode != "norange" && mode != "chunked" {
        if let Some(r) = req
            .headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
        {
            let if_range_ok = req
                .headers
                .get("if-range")
                .is_none_or(|v| *v == etag || v == LAST_MODIFIED);
            if let Some((a, b)) = r.split_once('-') {
                if let Ok(a) = a.parse::<usize>() {
                    if if_range_ok {
                        if a >= body.len() {
                            let head = format!(
                                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\n\r\n",
                                body.len()
                            );
                            w.write_all(head.as_bytes())?;
                            return Ok(true);
                        }
                        start = a;
                        end = b
                            .parse::<usize>()
                            .map_or(body.len(), |b| (b + 1).min(body.len()));
                        partial = true;
                    }
                }
            }
        }
    }
    let len = end - start;
    let status = if partial {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let chunked = mode == "chunked" && !is_head;
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    let ctype = match mode {
        "notype" => String::new(),
        "twotypes" => format!("Content-Type: {ctype}\r\nContent-Type: text/html\r\n"),
        _ => format!("Content-Type: {ctype}\r\n"),
    };
    let validators = if mode == "noval" {
        String::new()
    } else {
        format!("ETag: {etag}\r\nLast-Modified: {LAST_MODIFIED}\r\n")
    };
    let mut head =
        format!("HTTP/1.1 {status}\r\n{ctype}{length}\r\n{validators}Connection: keep-alive\r\n");
    if mode != "norange" && mode != "chunked" {
        head.push_str("Accept-Ranges: bytes\r\n");
    }
    if partial {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            end - 1,
            body.len()
        ));
    }
    match query_value(query, "digest") {
        Some("right") => {
            head.push_str(&format!("Repr-Digest: sha-256=:{}:\r\n", sha256_b64(&body)))
        }
        Some("wrong") => head.push_str(&format!(
            "Repr-Digest: sha-256=:{}:\r\n",
            sha256_b64(b"other")
        )),
        Some("legacy-wrong") => {
            head.push_str(&format!("Digest: SHA-256={}\r\n", sha256_b64(b"other")))
        }
        _ => {}
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if is_head {
        return Ok(true);
    }
    let slice = &body[start..end];
    // `?ms=` trickles the body in any mode; `/slow/` defaults it to 20.
    let trickle = query_param(query, "ms").or((mode == "slow").then_some(20));
    match mode {
        _ if trickle.is_some() && !(matches!(mode, "reset" | "trunc") && n_get <= fail) => {
            let ms = trickle.unwrap_or(20);
            for c in slice.chunks(1024) {
                w.write_all(c)?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(ms));
            }
            Ok(true)
        }
        "chunked" => {
            for c in slice.chunks(4096) {
                w.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                w.write_all(c)?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"0\r\n\r\n")?;
            Ok(true)
        }
        "reset" | "trunc" if n_get <= fail => {
            w.write_all(&slice[..slice.len() / 2])?;
            w.flush()?;
            if mode == "reset" {
                // Drop the connection without an orderly close of the body.
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
            Ok(false)
        }
        _ => {
            w.write_all(slice)?;
            Ok(true)
        }
    }
}

fn simple(w: &mut TcpStream, code: u16, msg: &str) -> std::io::Result<bool> {
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{msg}",
        msg.len()
    );
    w.write_all(head.as_bytes())?;
    Ok(true)
}

fn redirect(w: &mut TcpStream, to: &str) -> std::io::Result<bool> {
    let head = format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n");
    w.write_all(head.as_bytes())?;
    Ok(true)
}

/// Reads a whole response (for the origin's own tests).
pub fn raw_get(addr: SocketAddr, target: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect(addr)?;
    write!(
        c,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}
