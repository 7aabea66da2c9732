//! Typed configuration. Three layers, later wins: the built-in defaults in
//! `config/default.toml`, an optional TOML file (`--config`), then environment
//! variables and command-line flags. Everything is validated here, once, at
//! start-up; nothing else in the program reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::relay::RelayConfig;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// A value that must never be printed: `Debug` shows `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Raw settings as they come from a layer: every field optional, strings for
/// durations. The same struct is the TOML schema and the CLI/env surface.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP address to listen on [default: 127.0.0.1:8080]
    #[arg(long, global = true, env = "MAILROOM_LISTEN")]
    pub listen: Option<String>,
    /// postgres://... or sqlite://path [default: embedded SQLite in the data dir]
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// redis://... [default: in-process queue and limits]
    #[arg(long, global = true, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key Mailroom uses [default: mailroom]
    #[arg(long, global = true, env = "MAILROOM_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Where embedded data and the first admin key live [default: ./mailroom-data]
    #[arg(long, global = true, env = "MAILROOM_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Comma-separated SMTP URLs in priority order: smtp://[user:pass@]host:port?tls=none|starttls, smtps://... [default: none, mail is captured]
    #[arg(long, global = true, env = "MAILROOM_RELAYS", hide_env_values = true)]
    pub relays: Option<String>,
    /// Extra trusted CA certificates (PEM) for relays [default: system roots]
    #[arg(long, global = true, env = "MAILROOM_RELAY_CA_FILE")]
    pub relay_ca_file: Option<String>,
    /// Timeout of each SMTP command [default: 30s]
    #[arg(long, global = true, env = "MAILROOM_RELAY_TIMEOUT")]
    pub relay_timeout: Option<String>,
    /// Pooled connections per relay [default: 16]
    #[arg(long, global = true, env = "MAILROOM_RELAY_POOL_SIZE")]
    pub relay_pool_size: Option<usize>,
    /// From used when a request has none [default: none, then `from` is required]
    #[arg(long, global = true, env = "MAILROOM_DEFAULT_FROM")]
    pub default_from: Option<String>,
    /// DKIM keys per From domain, comma-separated domain:selector:/path/to/key.pem (RSA or Ed25519) [default: none, mail is not signed]
    #[arg(long, global = true, env = "MAILROOM_DKIM_KEYS")]
    pub dkim_keys: Option<String>,
    /// Concurrent deliveries per process, claimed ahead of the relays' connections (which serve high-priority mail first) [default: 8 per connection of the largest relay pool, at least 128]
    #[arg(long, global = true, env = "MAILROOM_WORKERS")]
    pub workers: Option<usize>,
    /// Delays between delivery attempts, last repeats [default: 30s,2m,10m,30m,1h,2h,4h]
    #[arg(long, global = true, env = "MAILROOM_DELIVERY_RETRY_SCHEDULE")]
    pub delivery_retry_schedule: Option<String>,
    /// Age at which a deferred message becomes failed [default: 72h]
    #[arg(long, global = true, env = "MAILROOM_DELIVERY_GIVE_UP_AFTER")]
    pub delivery_give_up_after: Option<String>,
    /// How long a worker owns a claimed message [default: 5m]
    #[arg(long, global = true, env = "MAILROOM_DELIVERY_LEASE")]
    pub delivery_lease: Option<String>,
    /// How often the sweeper runs [default: 1s]
    #[arg(long, global = true, env = "MAILROOM_SWEEP_INTERVAL")]
    pub sweep_interval: Option<String>,
    /// How long due work may wait unclaimed before it is re-enqueued [default: 30s]
    #[arg(long, global = true, env = "MAILROOM_SWEEP_GRACE")]
    pub sweep_grace: Option<String>,
    /// Delays between webhook attempts [default: 5s,5m,30m,2h,5h,10h,10h]
    #[arg(long, global = true, env = "MAILROOM_WEBHOOK_RETRY_SCHEDULE")]
    pub webhook_retry_schedule: Option<String>,
    /// Allow webhook URLs on private/loopback addresses [default: false]
    #[arg(long, global = true, env = "MAILROOM_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: Option<bool>,
    /// Timeout of one webhook request [default: 15s]
    #[arg(long, global = true, env = "MAILROOM_WEBHOOK_TIMEOUT")]
    pub webhook_timeout: Option<String>,
    /// Disable an endpoint that has failed continuously this long [default: 5d]
    #[arg(long, global = true, env = "MAILROOM_WEBHOOK_DISABLE_AFTER")]
    pub webhook_disable_after: Option<String>,
    /// How long an Idempotency-Key is remembered [default: 24h]
    #[arg(long, global = true, env = "MAILROOM_IDEMPOTENCY_TTL")]
    pub idempotency_ttl: Option<String>,
    /// Largest request body in bytes [default: 10485760]
    #[arg(long, global = true, env = "MAILROOM_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Largest total of decoded attachments per message in bytes [default: 7340032]
    #[arg(long, global = true, env = "MAILROOM_MAX_ATTACHMENT_BYTES")]
    pub max_attachment_bytes: Option<usize>,
    /// Send requests processed at once before new ones get 503 [default: 1024]
    #[arg(long, global = true, env = "MAILROOM_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// json or pretty [default: pretty on a terminal, json otherwise]
    #[arg(long, global = true, env = "MAILROOM_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// One DKIM key: mail whose From domain is `domain` (or a subdomain of it)
/// is signed with `d=domain; s=selector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
}

/// `domain:selector:/path/key.pem[,...]`; an empty string is no keys.
fn parse_dkim_keys(text: &str) -> Result<Vec<DkimKeyConfig>, ConfigError> {
    let mut keys: Vec<DkimKeyConfig> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let mut parts = item.splitn(3, ':').map(str::trim);
        let (Some(domain), Some(selector), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "MAILROOM_DKIM_KEYS",
                format!("{item:?}: expected domain:selector:/path/to/key.pem"),
            ));
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !domain.split('.').all(label_ok) || !selector.split('.').all(label_ok) || path.is_empty()
        {
            return Err(invalid(
                "MAILROOM_DKIM_KEYS",
                format!("{item:?}: expected domain:selector:/path/to/key.pem (ASCII domain and selector)"),
            ));
        }
        if keys.iter().any(|k| k.domain == domain) {
            return Err(invalid(
                "MAILROOM_DKIM_KEYS",
                format!("{domain} has more than one key"),
            ));
        }
        keys.push(DkimKeyConfig {
            domain,
            selector: selector.to_string(),
            key_file: PathBuf::from(path),
        });
    }
    Ok(keys)
}

macro_rules! layer {
    ($upper:expr, $lower:expr, $($field:ident),+) => {
        Settings { $($field: $upper.$field.or($lower.$field)),+ }
    };
}

impl Settings {
    /// `self` wins over `lower` field by field.
    pub fn over(self, lower: Settings) -> Settings {
        layer!(
            self,
            lower,
            listen,
            database_url,
            redis_url,
            redis_prefix,
            data_dir,
            relays,
            relay_ca_file,
            relay_timeout,
            relay_pool_size,
            default_from,
            dkim_keys,
            workers,
            delivery_retry_schedule,
            delivery_give_up_after,
            delivery_lease,
            sweep_interval,
            sweep_grace,
            webhook_retry_schedule,
            webhook_allow_private,
            webhook_timeout,
            webhook_disable_after,
            idempotency_ttl,
            max_request_bytes,
            max_attachment_bytes,
            max_in_flight,
            log_format
        )
    }

    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File(e.to_string()))
    }

    pub fn defaults() -> Settings {
        // The embedded defaults are part of the binary and covered by a test.
        Settings::from_toml(DEFAULTS).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The validated configuration every part of the program reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: Option<Secret<String>>,
    pub redis_url: Option<Secret<String>>,
    pub redis_prefix: String,
    pub data_dir: PathBuf,
    pub relays: Vec<RelayConfig>,
    pub relay_ca_file: Option<PathBuf>,
    pub default_from: Option<String>,
    pub dkim_keys: Vec<DkimKeyConfig>,
    pub workers: usize,
    pub delivery_retry_schedule: Vec<Duration>,
    pub delivery_give_up_after: Duration,
    pub delivery_lease: Duration,
    pub sweep_interval: Duration,
    pub sweep_grace: Duration,
    pub webhook_retry_schedule: Vec<Duration>,
    pub webhook_allow_private: bool,
    pub webhook_timeout: Duration,
    pub webhook_disable_after: Duration,
    pub idempotency_ttl: Duration,
    pub max_request_bytes: usize,
    pub max_attachment_bytes: usize,
    pub max_in_flight: usize,
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file: {0}")]
    File(String),
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

pub fn parse_duration(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text.trim()).map_err(|e| invalid(setting, format!("{text:?}: {e}")))
}

pub fn parse_schedule(setting: &'static str, text: &str) -> Result<Vec<Duration>, ConfigError> {
    let steps = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse_duration(setting, s))
        .collect::<Result<Vec<_>, _>>()?;
    if steps.is_empty() {
        return Err(invalid(setting, "needs at least one delay"));
    }
    Ok(steps)
}

fn required<T>(setting: &'static str, value: Option<T>) -> Result<T, ConfigError> {
    value.ok_or_else(|| invalid(setting, "missing"))
}

/// Upper bound of `MAILROOM_WORKERS`.
const MAX_WORKERS: usize = 4096;

/// Concurrent deliveries when `MAILROOM_WORKERS` is not set: eight per
/// connection of the largest relay pool, and never fewer than 128. A
/// delivery holds its slot while it is received, claimed and checked
/// against suppressions, which takes several times as long as handing it to
/// a pooled connection; slots claimed ahead keep every connection busy
/// (docs/performance.md: with `pool=32`, 128 slots drained ~8,000/s, 256
/// ~9,300/s, 512 no more).
fn default_workers(relays: &[RelayConfig]) -> usize {
    let widest = relays.iter().map(|r| r.pool_size as usize).max();
    (widest.unwrap_or(0) * 8).clamp(128, MAX_WORKERS)
}

fn duration(setting: &'static str, value: Option<String>) -> Result<Duration, ConfigError> {
    parse_duration(setting, &required(setting, value)?)
}

impl Config {
    /// Validates fully layered settings (see [`Settings::over`]).
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let s = s.over(Settings::defaults());
        let listen = required("MAILROOM_LISTEN", s.listen)?;
        let listen = listen
            .parse()
            .map_err(|e| invalid("MAILROOM_LISTEN", format!("{listen:?}: {e}")))?;
        let database_url = s.database_url.filter(|u| !u.trim().is_empty());
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
            {
                return Err(invalid(
                    "DATABASE_URL",
                    "must start with postgres://, postgresql:// or sqlite:",
                ));
            }
        }
        let redis_url = s.redis_url.filter(|u| !u.trim().is_empty());
        if let Some(url) = &redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "REDIS_URL",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        let relay_timeout = duration("MAILROOM_RELAY_TIMEOUT", s.relay_timeout)?;
        let pool = required("MAILROOM_RELAY_POOL_SIZE", s.relay_pool_size)?.max(1);
        let relays = match s.relays.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|u| RelayConfig::parse(u.trim(), pool, relay_timeout))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("MAILROOM_RELAYS", e))?,
        };
        let log_format = match s.log_format.as_deref() {
            None | Some("") => None,
            Some("json") => Some(LogFormat::Json),
            Some("pretty") => Some(LogFormat::Pretty),
            Some(other) => {
                return Err(invalid(
                    "MAILROOM_LOG_FORMAT",
                    format!("{other:?}: expected json or pretty"),
                ))
            }
        };
        let default_from = s.default_from.filter(|f| !f.trim().is_empty());
        if let Some(from) = &default_from {
            crate::domain::Mailbox::parse(from)
                .map_err(|e| invalid("MAILROOM_DEFAULT_FROM", e.to_string()))?;
        }
        let workers = s
            .workers
            .unwrap_or_else(|| default_workers(&relays))
            .clamp(1, MAX_WORKERS);
        Ok(Config {
            listen,
            database_url: database_url.map(Secret::new),
            redis_url: redis_url.map(Secret::new),
            redis_prefix: required("MAILROOM_REDIS_PREFIX", s.redis_prefix)?,
            data_dir: PathBuf::from(required("MAILROOM_DATA_DIR", s.data_dir)?),
            relays,
            relay_ca_file: s.relay_ca_file.filter(|p| !p.is_empty()).map(PathBuf::from),
            default_from,
            dkim_keys: parse_dkim_keys(s.dkim_keys.as_deref().unwrap_or(""))?,
            workers,
            delivery_retry_schedule: parse_schedule(
                "MAILROOM_DELIVERY_RETRY_SCHEDULE",
                &required(
                    "MAILROOM_DELIVERY_RETRY_SCHEDULE",
                    s.delivery_retry_schedule,
                )?,
            )?,
            delivery_give_up_after: duration(
                "MAILROOM_DELIVERY_GIVE_UP_AFTER",
                s.delivery_give_up_after,
            )?,
            delivery_lease: duration("MAILROOM_DELIVERY_LEASE", s.delivery_lease)?,
            sweep_interval: duration("MAILROOM_SWEEP_INTERVAL", s.sweep_interval)?,
            sweep_grace: duration("MAILROOM_SWEEP_GRACE", s.sweep_grace)?,
            webhook_retry_schedule: parse_schedule(
                "MAILROOM_WEBHOOK_RETRY_SCHEDULE",
                &required("MAILROOM_WEBHOOK_RETRY_SCHEDULE", s.webhook_retry_schedule)?,
            )?,
            webhook_allow_private: required(
                "MAILROOM_WEBHOOK_ALLOW_PRIVATE",
                s.webhook_allow_private,
            )?,
            webhook_timeout: duration("MAILROOM_WEBHOOK_TIMEOUT", s.webhook_timeout)?,
            webhook_disable_after: duration(
                "MAILROOM_WEBHOOK_DISABLE_AFTER",
                s.webhook_disable_after,
            )?,
            idempotency_ttl: duration("MAILROOM_IDEMPOTENCY_TTL", s.idempotency_ttl)?,
            max_request_bytes: required("MAILROOM_MAX_REQUEST_BYTES", s.max_request_bytes)?,
            max_attachment_bytes: required(
                "MAILROOM_MAX_ATTACHMENT_BYTES",
                s.max_attachment_bytes,
            )?,
            max_in_flight: required("MAILROOM_MAX_IN_FLIGHT", s.max_in_flight)?.max(1),
            log_format,
        })
    }

    /// A human description of the backends in use, without secrets.
    pub fn describe_backends(&self) -> String {
        let store = match &self.database_url {
            Some(url) if url.expose().starts_with("sqlite:") => "sqlite (DATABASE_URL)".to_string(),
            Some(_) => "postgres".to_string(),
            None => format!("sqlite ({})", self.data_dir.join("mailroom.db").display()),
        };
        let queue = if self.redis_url.is_some() {
            "redis"
        } else {
            "in-process"
        };
        let relays = if self.relays.is_empty() {
            "capture (mail is stored, NOT sent)".to_string()
        } else {
            self.relays
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("store={store} queue={queue} limiter={queue} relays={relays}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let config = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert!(config.database_url.is_none() && config.redis_url.is_none());
        assert!(config.relays.is_empty());
        assert_eq!(
            config.delivery_give_up_after,
            Duration::from_secs(72 * 3600)
        );
        assert_eq!(config.webhook_retry_schedule.len(), 7);
        assert!(config.dkim_keys.is_empty());
        assert_eq!(config.workers, 128);
    }

    #[test]
    fn workers_default_to_eight_per_connection_of_the_widest_relay() {
        let workers = |relays: &str, pool: Option<usize>, workers: Option<usize>| {
            let settings = Settings {
                relays: Some(relays.into()),
                relay_pool_size: pool,
                workers,
                ..Settings::default()
            };
            Config::from_settings(settings).unwrap().workers
        };
        let two = "smtp://a.test:25?pool=32,smtp://b.test:25?pool=4";
        assert_eq!(workers(two, None, None), 256);
        assert_eq!(workers("smtp://a.test:25", None, None), 128);
        assert_eq!(workers("smtp://a.test:25", Some(4), None), 128);
        assert_eq!(workers("smtp://a.test:25", Some(100), None), 800);
        assert_eq!(workers("smtp://a.test:25", Some(10_000), None), 4096);
        assert_eq!(workers(two, None, Some(7)), 7);
    }

    #[test]
    fn dkim_keys_parse_and_reject_bad_entries() {
        let keys =
            parse_dkim_keys(" Example.COM.:s1:/k/a.pem , mail.other.org:sel.2025:C:/keys/b.pem")
                .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].domain, "example.com");
        assert_eq!(keys[0].key_file, PathBuf::from("/k/a.pem"));
        assert_eq!(keys[1].selector, "sel.2025");
        assert_eq!(keys[1].key_file, PathBuf::from("C:/keys/b.pem"));
        assert!(parse_dkim_keys("").unwrap().is_empty());
        for bad in [
            "example.com:s1",
            "example.com::/k.pem",
            "exa mple.com:s1:/k.pem",
            "a.com:s:/x,a.com:t:/y",
        ] {
            assert!(parse_dkim_keys(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upper_layer_wins() {
        let file = Settings::from_toml("workers = 3\nlisten = \"0.0.0.0:9\"").unwrap();
        let cli = Settings {
            workers: Some(7),
            ..Settings::default()
        };
        let config = Config::from_settings(cli.over(file)).unwrap();
        assert_eq!(config.workers, 7);
        assert_eq!(config.listen.port(), 9);
    }

    #[test]
    fn bad_values_name_their_setting() {
        let err = Config::from_settings(Settings {
            delivery_retry_schedule: Some("5m,soon".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("MAILROOM_DELIVERY_RETRY_SCHEDULE"));
        assert!(Settings::from_toml("no_such_key = 1").is_err());
    }

    #[test]
    fn secrets_hidden_from_debug() {
        let config = Config::from_settings(Settings {
            database_url: Some("postgres://u:hunter2@db/x".into()),
            relays: Some("smtp://me:pa55word@relay.test:587?tls=starttls".into()),
            ..Settings::default()
        })
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pa55word"),
            "{shown}"
        );
    }
}
