//! Relay settings parsed from `MAILROOM_RELAYS` URLs.

use std::time::Duration;

use crate::config::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain SMTP.
    None,
    /// STARTTLS, required (never opportunistic).
    StartTls,
    /// Implicit TLS from the first byte (port 465).
    Implicit,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `smtp://host:port` or `smtps://host:port`, without credentials.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub pool_size: u32,
    pub timeout: Duration,
}

impl RelayConfig {
    /// `smtp://[user:pass@]host[:port][?tls=none|starttls&pool=N&timeout=30s]`
    /// or `smtps://...`. Without `tls=`, `smtp://` means STARTTLS when
    /// credentials are given and plain otherwise.
    pub fn parse(text: &str, pool_size: usize, timeout: Duration) -> Result<RelayConfig, String> {
        let url = url::Url::parse(text).map_err(|e| format!("relay URL: {e}"))?;
        let implicit = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => return Err(format!("relay scheme {other:?}: expected smtp or smtps")),
        };
        let host = url
            .host_str()
            .ok_or("relay URL has no host")?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let username = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(|p| Secret::new(decode(p)));
        let mut tls = if implicit {
            TlsMode::Implicit
        } else if username.is_some() {
            TlsMode::StartTls
        } else {
            TlsMode::None
        };
        let mut pool_size = pool_size as u32;
        let mut timeout = timeout;
        for (key, value) in url.query_pairs() {
            match (key.as_ref(), value.as_ref()) {
                ("tls", "none") if !implicit => tls = TlsMode::None,
                ("tls", "starttls") if !implicit => tls = TlsMode::StartTls,
                ("tls", "tls") => tls = TlsMode::Implicit,
                ("tls", other) => return Err(format!("tls={other}: expected none or starttls")),
                ("pool", n) => {
                    pool_size = n.parse().map_err(|_| format!("pool={n}: not a number"))?
                }
                ("timeout", t) => {
                    timeout =
                        humantime::parse_duration(t).map_err(|e| format!("timeout={t}: {e}"))?
                }
                (other, _) => return Err(format!("unknown relay parameter {other:?}")),
            }
        }
        let default_port = match tls {
            TlsMode::Implicit => 465,
            TlsMode::StartTls => 587,
            TlsMode::None => 25,
        };
        let port = url.port().unwrap_or(default_port);
        let scheme = if tls == TlsMode::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        Ok(RelayConfig {
            name: format!("{scheme}://{host}:{port}"),
            host,
            port,
            tls,
            username,
            password,
            pool_size: pool_size.max(1),
            timeout,
        })
    }

    /// AUTH over a plain connection to another machine: the password
    /// crosses the network unencrypted (loopback is this machine).
    pub fn sends_password_in_clear(&self) -> bool {
        let loopback = self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        self.tls == TlsMode::None && self.password.is_some() && !loopback
    }
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> RelayConfig {
        RelayConfig::parse(text, 4, Duration::from_secs(30)).unwrap()
    }

    #[test]
    fn relay_urls() {
        let r = parse("smtps://me%40qq.com:p%2Fss@smtp.qq.com");
        assert_eq!((r.tls, r.port), (TlsMode::Implicit, 465));
        assert_eq!(r.username.as_deref(), Some("me@qq.com"));
        assert_eq!(r.password.unwrap().expose(), "p/ss");
        assert_eq!(r.name, "smtps://smtp.qq.com:465");
        let r = parse("smtp://127.0.0.1:2525?tls=none&pool=2&timeout=5s");
        assert_eq!((r.tls, r.port, r.pool_size), (TlsMode::None, 2525, 2));
        assert_eq!(r.timeout, Duration::from_secs(5));
        assert_eq!(parse("smtp://u:p@relay.test").tls, TlsMode::StartTls);
        assert!(parse("smtp://u:p@relay.test?tls=none").sends_password_in_clear());
        assert!(!parse("smtp://u:p@127.0.0.1?tls=none").sends_password_in_clear());
        assert!(!parse("smtp://u:p@[::1]?tls=none").sends_password_in_clear());
        assert!(!parse("smtp://u:p@relay.test").sends_password_in_clear());
        assert!(!parse("smtp://relay.test?tls=none").sends_password_in_clear());
        assert!(RelayConfig::parse("http://x", 1, Duration::ZERO).is_err());
        assert!(RelayConfig::parse("smtp://x?tls=maybe", 1, Duration::ZERO).is_err());
    }
}
