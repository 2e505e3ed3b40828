//! The address policy: which targets a fetch may reach (private,
//! loopback and link-local addresses refused unless allowed), judged on IP
//! literals and on every address a name resolves to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// What the client may fetch, and how patiently.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Allow private (RFC 1918, ULA), loopback and link-local targets.
    pub allow_private: bool,
    /// Allow loopback targets only (127.0.0.0/8, ::1): for local origins and
    /// tests, without opening the rest of the private ranges.
    pub allow_loopback: bool,
    pub max_redirects: usize,
    /// Largest body accepted, in bytes.
    pub max_bytes: Option<u64>,
    pub connect_timeout: Duration,
    /// Longest silence between two reads of a body.
    pub read_timeout: Duration,
    pub user_agent: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_private: false,
            allow_loopback: false,
            max_redirects: 10,
            max_bytes: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            user_agent: concat!("idem/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Why an address is refused, if it is.
pub fn address_refusal(ip: IpAddr, policy: &Policy) -> Option<&'static str> {
    if policy.allow_private {
        return None;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let loopback = ip.is_loopback();
    if loopback {
        return (!policy.allow_loopback).then_some("loopback");
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if o[0] == 0 {
                Some("unspecified")
            } else if o[0] == 100 && (64..128).contains(&o[1]) {
                Some("shared (CGNAT)")
            } else if o[0] >= 224 {
                Some("multicast or reserved")
            } else if (o[0] == 192 && o[1] == 0 && matches!(o[2], 0 | 2))
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || (o[0] == 198 && o[1] == 51 && o[2] == 100)
                || (o[0] == 203 && o[1] == 0 && o[2] == 113)
            {
                Some("special-purpose (RFC 6890)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private (ULA)")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (s[0] & 0xffc0) == 0xfec0 {
                Some("site-local")
            } else if s[..6] == [0; 6] {
                // `::a.b.c.d`, deprecated; stacks still route it to the
                // embedded IPv4 address (`[::127.0.0.1]` is loopback).
                Some("IPv4-compatible")
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                // NAT64: judge the embedded IPv4 address.
                address_refusal(IpAddr::V4(v4_of(s[6], s[7])), policy)
                    .map(|_| "NAT64 of a refused IPv4 address")
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                Some("local-use NAT64")
            } else if s[0] == 0x2002 {
                // 6to4: the relay reaches the embedded IPv4 address.
                address_refusal(IpAddr::V4(v4_of(s[1], s[2])), policy)
                    .map(|_| "6to4 of a refused IPv4 address")
            } else if s[0] == 0x2001 && s[1] == 0 {
                Some("Teredo")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

/// The IPv4 address held in two 16-bit segments of an IPv6 address.
fn v4_of(hi: u16, lo: u16) -> std::net::Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    std::net::Ipv4Addr::new(a, b, c, d)
}

/// Raised by the resolver when a name resolves only to refused addresses;
/// found again in the error chain to classify it as a policy refusal.
#[derive(Debug)]
pub(crate) struct RefusedAddress(pub(crate) String);

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedAddress {}

/// Resolves with the system resolver, then drops refused addresses (a
/// proxy's own name is resolved as it is).
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<Policy>,
    pub(crate) proxy_hosts: Vec<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        let is_proxy = self
            .proxy_hosts
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if is_proxy {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match address_refusal(a.ip(), &policy) {
                    Some(why) => {
                        refused = Some(format!(
                            "{host} resolves to {} ({why} address refused; see --allow-private)",
                            a.ip()
                        ));
                        false
                    }
                    None => true,
                })
                .collect();
            if ok.is_empty() {
                let msg = refused.unwrap_or_else(|| format!("{host} resolves to no address"));
                return Err(
                    Box::new(RefusedAddress(msg)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_refused_by_default() {
        let p = Policy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "fd00::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "100.64.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::808:808",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "fec0::1",
            "64:ff9b:1::a00:1",
            "64:ff9b::7f00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(address_refusal(ip.parse().unwrap(), &p).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "64:ff9b::5db8:d822",
            "2002:5db8:d822::1",
        ] {
            assert!(address_refusal(ip.parse().unwrap(), &p).is_none(), "{ip}");
        }
        let lo = Policy {
            allow_loopback: true,
            ..Policy::default()
        };
        assert!(address_refusal("127.0.0.1".parse().unwrap(), &lo).is_none());
        assert!(
            address_refusal("10.0.0.1".parse().unwrap(), &lo).is_some(),
            "loopback only"
        );
        let all = Policy {
            allow_private: true,
            ..Policy::default()
        };
        assert!(address_refusal("10.0.0.1".parse().unwrap(), &all).is_none());
    }
}
