//! The `Relay` port: hand one envelope to the outside world and say what came
//! of it. Adapters: SMTP (lettre, pooled) and capture (store only). The
//! [`RelayChain`] tries relays in priority order and fails over on transient
//! errors. Classification of SMTP replies lives in `smtp.rs` and nowhere else.

mod capture;
mod config;
mod pool;
mod slots;
mod smtp;

use std::sync::Arc;

use async_trait::async_trait;

pub use capture::CaptureRelay;
pub use config::{RelayConfig, TlsMode};
pub use smtp::SmtpRelay;

use crate::domain::{Attempt, Outcome, Priority};

#[async_trait]
pub trait Relay: Send + Sync {
    /// Name recorded on attempts (never contains credentials).
    fn name(&self) -> &str;
    /// Hands one message to one recipient. When deliveries queue for the
    /// relay's connections, `priority` orders them.
    async fn send(
        &self,
        mail_from: &str,
        rcpt_to: &str,
        mime: &[u8],
        priority: Priority,
    ) -> Attempt;
}

/// Relays in priority order.
#[derive(Clone)]
pub struct RelayChain {
    relays: Vec<Arc<dyn Relay>>,
}

impl RelayChain {
    pub fn new(relays: Vec<Arc<dyn Relay>>) -> Self {
        Self { relays }
    }

    /// Builds the chain from config: SMTP relays, or capture when none.
    pub fn from_config(
        relays: &[RelayConfig],
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        if relays.is_empty() {
            return Ok(Self::new(vec![Arc::new(CaptureRelay)]));
        }
        let ca =
            match ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("MAILROOM_RELAY_CA_FILE {}: {e}", path.display())
                })?),
                None => None,
            };
        let built = relays
            .iter()
            .map(|r| SmtpRelay::build(r, ca.as_deref()).map(|s| Arc::new(s) as Arc<dyn Relay>))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::new(built))
    }

    pub fn capture() -> Self {
        Self::new(vec![Arc::new(CaptureRelay)])
    }

    /// Tries each relay until one gives a non-transient answer. Every try is
    /// returned, in order; the last one decides.
    pub async fn deliver(
        &self,
        mail_from: &str,
        rcpt_to: &str,
        mime: &[u8],
        priority: Priority,
    ) -> Vec<Attempt> {
        let mut attempts = Vec::with_capacity(1);
        for relay in &self.relays {
            let attempt = relay.send(mail_from, rcpt_to, mime, priority).await;
            let done = attempt.outcome != Outcome::Transient;
            attempts.push(attempt);
            if done {
                break;
            }
        }
        attempts
    }
}
