//! DKIM signing per From domain: the keys named by `MAILROOM_DKIM_KEYS` are
//! read once at start, and each composed message whose From domain (or a
//! parent of it) has a key gets a `DKIM-Signature` (relaxed/relaxed,
//! rsa-sha256 or ed25519-sha256) before it is stored.

use std::collections::HashMap;

use base64::Engine;
use lettre::message::dkim::{
    dkim_sign, DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use lettre::Message;
use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
use rsa::pkcs8::DecodePrivateKey;

use crate::config::DkimKeyConfig;

/// Headers covered by the signature. Absent ones are listed too, so they
/// cannot be added after signing (RFC 6376 §5.4). Not `Content-Type`:
/// lettre writes a multipart body's Content-Type with the body, after the
/// signature is computed over the message's own headers, so a signature
/// claiming it would not verify (the body hash still covers every part).
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "MIME-Version",
];

/// The DER prefix of a PKCS#8 Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read the DKIM key for {domain} ({path}): {reason}")]
    Key {
        domain: String,
        path: String,
        reason: String,
    },
}

/// Signing configuration by domain (lower-case ASCII).
#[derive(Default)]
pub struct DkimSigner {
    by_domain: HashMap<String, DkimConfig>,
}

impl std::fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys: only the domains that have one.
        f.debug_struct("DkimSigner")
            .field("domains", &self.by_domain.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DkimSigner {
    /// Reads every configured key file; any unreadable key stops start-up.
    pub fn load(keys: &[DkimKeyConfig]) -> Result<DkimSigner, DkimError> {
        let mut by_domain = HashMap::new();
        for k in keys {
            let fail = |reason: String| DkimError::Key {
                domain: k.domain.clone(),
                path: k.key_file.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(&k.key_file).map_err(|e| fail(e.to_string()))?;
            let key = signing_key(&text).map_err(fail)?;
            let headers = SIGNED_HEADERS
                .iter()
                .map(|h| HeaderName::new_from_ascii_str(h))
                .collect();
            let config = DkimConfig::new(
                k.selector.clone(),
                k.domain.clone(),
                key,
                headers,
                DkimCanonicalization {
                    header: DkimCanonicalizationType::Relaxed,
                    body: DkimCanonicalizationType::Relaxed,
                },
            );
            by_domain.insert(k.domain.clone(), config);
        }
        Ok(DkimSigner { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The key for mail from `domain`: its own, else the nearest parent's.
    fn config_for(&self, domain: &str) -> Option<&DkimConfig> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut candidate = domain.as_str();
        loop {
            if let Some(config) = self.by_domain.get(candidate) {
                return Some(config);
            }
            candidate = candidate.split_once('.')?.1;
        }
    }

    /// Signs `message` if its From domain has a key; true if it did.
    pub fn sign(&self, message: &mut Message, from_domain: &str) -> bool {
        match self.config_for(from_domain) {
            Some(config) => {
                dkim_sign(message, config);
                true
            }
            None => false,
        }
    }
}

/// An RSA key (PKCS#1 or PKCS#8 PEM) or an Ed25519 key (PKCS#8 PEM, as
/// `openssl genpkey -algorithm ed25519` writes it, or the base64 seed).
fn signing_key(text: &str) -> Result<DkimSigningKey, String> {
    let text = text.trim();
    if text.contains("BEGIN RSA PRIVATE KEY") {
        return DkimSigningKey::new(text, DkimSigningAlgorithm::Rsa).map_err(|e| e.to_string());
    }
    if text.contains("BEGIN PRIVATE KEY") {
        let der = pem_body(text)?;
        if der.len() == 48 && der.starts_with(&ED25519_PKCS8_PREFIX) {
            let seed = base64::engine::general_purpose::STANDARD.encode(&der[16..]);
            return DkimSigningKey::new(&seed, DkimSigningAlgorithm::Ed25519)
                .map_err(|e| e.to_string());
        }
        let rsa = rsa::RsaPrivateKey::from_pkcs8_pem(text)
            .map_err(|e| format!("not an RSA or Ed25519 PKCS#8 key: {e}"))?;
        let pkcs1 = rsa
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?;
        return DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa).map_err(|e| e.to_string());
    }
    if text.contains("-----BEGIN") {
        return Err("unsupported PEM type (expected an RSA or Ed25519 private key)".into());
    }
    DkimSigningKey::new(text, DkimSigningAlgorithm::Ed25519)
        .map_err(|_| "expected a PEM private key or a base64 Ed25519 seed".to_string())
}

fn pem_body(text: &str) -> Result<Vec<u8>, String> {
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("bad PEM: {e}"))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fixed key for tests that sign.
    use super::*;

    pub const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";

    /// A signer for `domain` (selector `s1`), its key written to `dir`.
    pub fn signer(dir: &std::path::Path, domain: &str, pem: &str) -> DkimSigner {
        let path = dir.join(format!("{domain}.pem"));
        std::fs::write(&path, pem).unwrap();
        DkimSigner::load(&[DkimKeyConfig {
            domain: domain.into(),
            selector: "s1".into(),
            key_file: path,
        }])
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{signer, ED25519_PEM};
    use super::*;

    fn message() -> Message {
        Message::builder()
            .from("A <a@mail.example.com>".parse().unwrap())
            .to("b@example.net".parse().unwrap())
            .subject("hi")
            .body(String::from("hello\r\n"))
            .unwrap()
    }

    #[test]
    fn signs_for_the_domain_and_its_subdomains_only() {
        let dir = std::env::temp_dir().join(format!("mailroom-dkim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let signer = signer(&dir, "example.com", ED25519_PEM);
        let mut m = message();
        assert!(signer.sign(&mut m, "Mail.Example.com"));
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(text.contains("DKIM-Signature: v=1; a=ed25519-sha256; d=example.com; s=s1;"));
        assert!(text.contains("h=from:reply-to:subject:date:to:cc:message-id:mime-version;"));
        let mut other = message();
        assert!(!signer.sign(&mut other, "example.org"));
        assert!(!signer.sign(&mut other, "notexample.com"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unreadable_keys_are_refused() {
        assert!(
            signing_key("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----").is_err()
        );
        assert!(signing_key("not a key").is_err());
        assert!(signing_key(ED25519_PEM).is_ok());
    }
}
