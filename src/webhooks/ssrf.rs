//! SSRF protection for webhook URLs: only http(s), and never an address on
//! loopback, private, link-local, CGNAT, unique-local, multicast, reserved or
//! IPv4-embedding IPv6 ranges (unless the operator allows private targets).
//! Literal addresses are checked up front; names are checked inside the DNS
//! resolver the HTTP client connects with, so rebinding cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (64..=127).contains(&o[1]))
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (18..=19).contains(&o[1]))
        || o[0] >= 240
}

pub fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return true;
    }
    // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d).
    if s[..5].iter().all(|x| *x == 0) && (s[5] == 0xffff || s[5] == 0) {
        return true;
    }
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    (s[0] & 0xfe00) == 0xfc00          // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80   // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0   // site-local fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] == 0)      // Teredo
        || (s[0] == 0x0100 && s[1..4].iter().all(|x| *x == 0)) // discard-only
        || (s[0] == 0x64 && s[1] == 0xff9b && forbidden_v4(embedded(s[6], s[7]))) // NAT64
        || (s[0] == 0x2002 && forbidden_v4(embedded(s[1], s[2]))) // 6to4
}

pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("is not a valid URL")]
    Invalid,
    #[error("must use http or https")]
    Scheme,
    #[error("must not contain credentials")]
    Credentials,
    #[error("points to a loopback, private or otherwise internal address")]
    Internal,
    #[error("does not resolve")]
    Unresolvable,
}

/// Checks what can be checked without DNS (scheme, literal addresses,
/// `localhost`). The URL parser normalises decimal, hex and octal IPv4 forms.
pub fn check_static(url: &str, allow_private: bool) -> Result<url::Url, UrlError> {
    let parsed = url::Url::parse(url).map_err(|_| UrlError::Invalid)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::Scheme);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    if allow_private {
        return Ok(parsed);
    }
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) if forbidden_v4(ip) => Err(UrlError::Internal),
        Some(url::Host::Ipv6(ip)) if forbidden_v6(ip) => Err(UrlError::Internal),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost"
                || d.ends_with(".localhost")
                || d.ends_with(".internal")
                || d.ends_with(".local")
            {
                Err(UrlError::Internal)
            } else {
                Ok(parsed)
            }
        }
        None => Err(UrlError::Invalid),
        _ => Ok(parsed),
    }
}

/// Full check at creation: static rules, then every resolved address.
pub async fn check(url: &str, allow_private: bool) -> Result<url::Url, UrlError> {
    let parsed = check_static(url, allow_private)?;
    if allow_private {
        return Ok(parsed);
    }
    if let Some(url::Host::Domain(d)) = parsed.host() {
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((d, port))
            .await
            .map_err(|_| UrlError::Unresolvable)?
            .collect();
        if addrs.is_empty() {
            return Err(UrlError::Unresolvable);
        }
        if addrs.iter().any(|a| forbidden(a.ip())) {
            return Err(UrlError::Internal);
        }
    }
    Ok(parsed)
}

/// DNS resolver for the webhook client: refuses names that resolve to an
/// internal address at connection time.
pub struct SafeResolver {
    pub allow_private: bool,
}

impl Resolve for SafeResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if !allow_private && addrs.iter().any(|a| forbidden(a.ip())) {
                return Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{} resolves to an internal address", name.as_str()),
                ))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_refused() {
        for url in [
            "http://127.0.0.1/",
            "http://localhost:8080/",
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://0177.0.0.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:8.8.8.8]/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://[64:ff9b::a00:1]/",
        ] {
            assert_eq!(
                check_static(url, false).unwrap_err(),
                UrlError::Internal,
                "{url}"
            );
        }
        assert_eq!(
            check_static("ftp://example.com/", false).unwrap_err(),
            UrlError::Scheme
        );
        assert!(check_static("https://hooks.example.com/x", false).is_ok());
        assert!(check_static("http://93.184.216.34/", false).is_ok());
        assert!(check_static("http://127.0.0.1:9/", true).is_ok());
    }
}
