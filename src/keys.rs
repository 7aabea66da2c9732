//! API keys: the `mr_<prefix>_<secret>` format, generation, hashing
//! (SHA-256 of the secret, compared in constant time), scopes and limits.
//! The plaintext key exists only in the response that creates it.

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Send,
    Read,
    Admin,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "send" => Some(Scope::Send),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    Live,
    Test,
}

impl KeyMode {
    pub fn parse(text: &str) -> Option<KeyMode> {
        match text {
            "live" => Some(KeyMode::Live),
            "test" => Some(KeyMode::Test),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Live => "live",
            KeyMode::Test => "test",
        }
    }
}

/// Per-key limits; `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KeyLimits {
    pub rate_per_second: Option<f64>,
    pub burst: Option<i64>,
    pub daily_quota: Option<i64>,
    pub monthly_quota: Option<i64>,
    pub per_recipient_hourly: Option<i64>,
    /// IANA time zone the daily, monthly and hourly windows follow; `None`
    /// is UTC. Validated on input.
    pub timezone: Option<String>,
}

impl KeyLimits {
    /// The key's time zone (UTC when unset or unknown).
    pub fn tz(&self) -> chrono_tz::Tz {
        self.timezone
            .as_deref()
            .and_then(|t| t.parse().ok())
            .unwrap_or(chrono_tz::UTC)
    }
}

/// A stored key (never the secret itself).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub prefix: String,
    pub secret_hash: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub mode: KeyMode,
    pub limits: KeyLimits,
    pub allowed_from_domains: Vec<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// `admin` implies every scope.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    pub fn verify(&self, secret: &str) -> bool {
        let given = hash_secret(secret);
        given.as_bytes().ct_eq(self.secret_hash.as_bytes()).into()
    }
}

/// A freshly generated key: the plaintext (show once) and what is stored.
pub struct NewSecret {
    pub plaintext: String,
    pub prefix: String,
    pub secret_hash: String,
}

pub fn generate() -> NewSecret {
    let mut rng = rand::thread_rng();
    let mut prefix = [0u8; 6];
    let mut secret = [0u8; 24];
    rng.fill_bytes(&mut prefix);
    rng.fill_bytes(&mut secret);
    let prefix = hex::encode(prefix);
    let secret = base62(&secret);
    NewSecret {
        plaintext: format!("mr_{prefix}_{secret}"),
        secret_hash: hash_secret(&secret),
        prefix,
    }
}

/// Splits `mr_<prefix>_<secret>`.
pub fn split(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("mr_")?;
    let (prefix, secret) = rest.split_once('_')?;
    if prefix.is_empty() || secret.is_empty() {
        return None;
    }
    Some((prefix, secret))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn base62(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % 62] as char)
        .collect()
}

/// A new key record and its plaintext (shown once).
pub fn new_key(
    name: String,
    scopes: Vec<Scope>,
    mode: KeyMode,
    limits: KeyLimits,
    allowed_from_domains: Vec<String>,
    now: i64,
) -> (ApiKey, String) {
    let secret = generate();
    let key = ApiKey {
        id: format!("key_{}", uuid::Uuid::now_v7().simple()),
        prefix: secret.prefix,
        secret_hash: secret.secret_hash,
        name,
        scopes,
        mode,
        limits,
        allowed_from_domains,
        created_at: now,
        revoked_at: None,
    };
    (key, secret.plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_verify() {
        let new = generate();
        let (prefix, secret) = split(&new.plaintext).unwrap();
        assert_eq!(prefix, new.prefix);
        let key = ApiKey {
            id: "k".into(),
            prefix: new.prefix.clone(),
            secret_hash: new.secret_hash.clone(),
            name: "n".into(),
            scopes: vec![Scope::Send],
            mode: KeyMode::Live,
            limits: KeyLimits::default(),
            allowed_from_domains: vec![],
            created_at: 0,
            revoked_at: None,
        };
        assert!(key.verify(secret));
        assert!(!key.verify("nope"));
        assert!(key.has(Scope::Send) && !key.has(Scope::Read));
        assert!(split("mr__x").is_none() && split("sk_live_x").is_none());
    }
}
