//! Proxies from the environment, decided in one place for the client and
//! for the address policy: `HTTPS_PROXY` for `https://` targets,
//! `HTTP_PROXY` for `http://` ones, `ALL_PROXY` for either when the other
//! is unset, and `NO_PROXY` for the hosts to reach directly; the
//! lower-case names win over the upper-case ones, and `HTTP_PROXY` is
//! ignored inside a CGI request (where a client can set it).

use std::net::IpAddr;

/// Which proxy, if any, carries a request.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    http: Option<reqwest::Url>,
    https: Option<reqwest::Url>,
    no_proxy: Vec<Bypass>,
}

#[derive(Clone, Debug, PartialEq)]
enum Bypass {
    All,
    Domain(String),
    Net(IpAddr, u8),
}

impl Proxies {
    /// The proxies this process's environment names.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The proxies that `var` (an environment lookup) names; a value that
    /// is not a URL is ignored, with a warning.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |lower: &str| {
            var(lower)
                .or_else(|| var(&lower.to_ascii_uppercase()))
                .filter(|v| !v.trim().is_empty())
        };
        let url = |name: &str, v: Option<String>| {
            let v = v?;
            let v = v.trim();
            // `host:port` alone means plain HTTP to that proxy.
            let full = if v.contains("://") {
                v.to_owned()
            } else {
                format!("http://{v}")
            };
            match reqwest::Url::parse(&full) {
                Ok(u) if u.host_str().is_some() && matches!(u.scheme(), "http" | "https") => {
                    Some(u)
                }
                _ => {
                    tracing::warn!(
                        variable = name,
                        "not an http:// or https:// proxy URL; ignored"
                    );
                    None
                }
            }
        };
        let cgi = var("REQUEST_METHOD").is_some();
        let all = get("all_proxy");
        let http = if cgi {
            var("http_proxy")
        } else {
            get("http_proxy")
        };
        Self {
            http: url("http_proxy", http.or_else(|| all.clone())),
            https: url("https_proxy", get("https_proxy").or(all)),
            no_proxy: get("no_proxy")
                .map(|v| v.split(',').filter_map(bypass).collect())
                .unwrap_or_default(),
        }
    }

    /// The proxy for a request to `url`, if one carries it.
    pub fn for_url(&self, url: &reqwest::Url) -> Option<&reqwest::Url> {
        let proxy = match url.scheme() {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }?;
        let host = match url.host()? {
            url::Host::Domain(d) => Host::Name(d.to_ascii_lowercase()),
            url::Host::Ipv4(v4) => Host::Ip(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Host::Ip(IpAddr::V6(v6)),
        };
        (!self.no_proxy.iter().any(|b| b.matches(&host))).then_some(proxy)
    }

    /// The proxies' own host names: the address policy is for targets,
    /// and a proxy on this machine or the local network is common.
    pub fn hosts(&self) -> Vec<String> {
        [&self.http, &self.https]
            .into_iter()
            .flatten()
            .filter_map(|u| {
                u.host_str()
                    .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }
}

enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Bypass {
    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::All, _) => true,
            (Self::Domain(d), Host::Name(h)) => {
                h == d
                    || (h.len() > d.len()
                        && h.ends_with(d.as_str())
                        && h.as_bytes()[h.len() - d.len() - 1] == b'.')
            }
            (Self::Net(net, bits), Host::Ip(ip)) => in_net(*ip, *net, *bits),
            _ => false,
        }
    }
}

/// One `NO_PROXY` entry: `*`, a domain (`example.org`, `.example.org` and
/// `*.example.org` all cover its subdomains too), an address, or a network
/// (`10.0.0.0/8`); a `:port` is ignored.
fn bypass(entry: &str) -> Option<Bypass> {
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() {
        return None;
    }
    if e == "*" {
        return Some(Bypass::All);
    }
    if let Some((net, bits)) = e.split_once('/') {
        let ip: IpAddr = net.trim_matches(['[', ']']).parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits: u8 = bits.parse().ok().filter(|b| *b <= max)?;
        return Some(Bypass::Net(ip, bits));
    }
    let bare = e.trim_matches(['[', ']']);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(Bypass::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
    }
    let host = e.rsplit_once(':').map_or(e.as_str(), |(h, p)| {
        if p.bytes().all(|c| c.is_ascii_digit()) {
            h
        } else {
            e.as_str()
        }
    });
    let domain = host.trim_start_matches("*.").trim_start_matches('.');
    (!domain.is_empty()).then(|| Bypass::Domain(domain.to_owned()))
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(vars: &[(&str, &str)]) -> Proxies {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Proxies::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.for_url(&reqwest::Url::parse(url).unwrap())
            .map(|u| u.host_str().unwrap().to_owned())
    }

    #[test]
    fn each_scheme_has_its_proxy_and_no_proxy_bypasses_it() {
        let p = proxies(&[
            ("HTTPS_PROXY", "http://secure:3128"),
            ("http_proxy", "plain:8080"),
            ("HTTP_PROXY", "http://ignored:1"),
            (
                "NO_PROXY",
                "internal.example, .corp, 10.0.0.0/8, ::1, *.lab:8443",
            ),
        ]);
        assert_eq!(via(&p, "https://a.example/x").as_deref(), Some("secure"));
        assert_eq!(via(&p, "http://a.example/x").as_deref(), Some("plain"));
        for direct in [
            "http://internal.example/",
            "http://x.internal.example/",
            "http://corp/",
            "http://a.b.corp/",
            "http://10.1.2.3/",
            "http://[::1]/",
            "https://x.lab/",
        ] {
            assert_eq!(via(&p, direct), None, "{direct}");
        }
        assert_eq!(
            via(&p, "http://notinternal.example/").as_deref(),
            Some("plain")
        );
        assert_eq!(via(&p, "http://11.0.0.1/").as_deref(), Some("plain"));
        assert_eq!(p.hosts(), ["plain", "secure"]);
    }

    #[test]
    fn all_proxy_fills_in_and_cgi_ignores_http_proxy() {
        let p = proxies(&[("ALL_PROXY", "http://all:1"), ("NO_PROXY", "*")]);
        assert_eq!(via(&p, "https://a/"), None);
        let p = proxies(&[("ALL_PROXY", "http://all:1")]);
        assert_eq!(via(&p, "https://a/").as_deref(), Some("all"));
        let p = proxies(&[("HTTP_PROXY", "http://evil:1"), ("REQUEST_METHOD", "GET")]);
        assert_eq!(via(&p, "http://a/"), None);
        let p = proxies(&[("HTTPS_PROXY", "socks5://s:1080")]);
        assert_eq!(
            via(&p, "https://a/"),
            None,
            "a scheme this client cannot speak"
        );
        assert!(proxies(&[]).is_empty());
    }
}
