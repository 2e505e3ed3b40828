//! A forward HTTP proxy for the tests of proxy support: it carries
//! absolute-form requests to their hosts and records what it carried.

use super::{lock, read_request, simple};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A forward HTTP proxy on 127.0.0.1 for `http://` targets (absolute-form
/// requests), one upstream connection per request. Stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("idem-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = Arc::clone(&s);
                    let _ = std::thread::Builder::new()
                        .name("idem-proxy-conn".into())
                        .spawn(move || proxy_conn(conn, &s));
                }
            })?;
        Ok(Self { addr, seen, stop })
    }

    /// `http://127.0.0.1:PORT`, for `HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The absolute URLs it was asked for, in order.
    pub fn seen(&self) -> Vec<String> {
        lock(&self.seen).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Carries a client's requests one at a time: each to its target's host
/// on a new connection, whose whole answer (the upstream closes after it)
/// goes back to the client.
fn proxy_conn(conn: TcpStream, seen: &Mutex<Vec<String>>) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader) {
        let Some(rest) = req.target.strip_prefix("http://") else {
            let _ = simple(&mut w, 400, "absolute http:// URLs only");
            return;
        };
        lock(seen).push(req.target.clone());
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let Ok(mut up) = TcpStream::connect(authority) else {
            let _ = simple(&mut w, 502, "upstream unreachable");
            return;
        };
        let mut head = format!("{} {path} HTTP/1.1\r\n", req.method);
        for (k, v) in &req.headers {
            if k != "connection" && k != "proxy-connection" {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut answer = Vec::new();
        let sent = up
            .write_all(head.as_bytes())
            .and_then(|()| up.shutdown(std::net::Shutdown::Write))
            .and_then(|()| up.read_to_end(&mut answer));
        if sent.is_err() || w.write_all(&answer).is_err() {
            return;
        }
    }
}
