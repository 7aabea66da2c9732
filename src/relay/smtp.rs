//! SMTP relay over lettre's pooled async transport: connections are reused,
//! one pool per relay, so one slow relay does not stall another. Also the one
//! place where an SMTP result becomes an [`Outcome`].

use std::time::Instant;

use async_trait::async_trait;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Relay, RelayConfig, TlsMode};
use crate::domain::{Attempt, Outcome};

pub struct SmtpRelay {
    name: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// Bound on one whole hand-off (connect, TLS, AUTH, envelope, DATA), so
    /// a relay that stops answering cannot hold a worker forever.
    deadline: std::time::Duration,
}

impl SmtpRelay {
    pub fn build(config: &RelayConfig, extra_ca_pem: Option<&[u8]>) -> anyhow::Result<SmtpRelay> {
        let tls_parameters = || -> anyhow::Result<TlsParameters> {
            let mut builder = TlsParameters::builder(config.host.clone());
            if let Some(pem) = extra_ca_pem {
                builder = builder.add_root_certificate(Certificate::from_pem(pem)?);
            }
            Ok(builder.build_rustls()?)
        };
        let tls = match config.tls {
            TlsMode::None => Tls::None,
            TlsMode::StartTls => Tls::Required(tls_parameters()?),
            TlsMode::Implicit => Tls::Wrapper(tls_parameters()?),
        };
        if config.tls == TlsMode::None && config.username.is_some() {
            tracing::warn!(relay = %config.name, "relay credentials will be sent without TLS (tls=none)");
        }
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout))
            .pool_config(PoolConfig::new().max_size(config.pool_size));
        if let (Some(user), Some(pass)) = (&config.username, &config.password) {
            builder = builder.credentials(Credentials::new(user.clone(), pass.expose().clone()));
        }
        Ok(SmtpRelay {
            name: config.name.clone(),
            transport: builder.build(),
            deadline: config.timeout * 3,
        })
    }
}

#[async_trait]
impl Relay for SmtpRelay {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, mail_from: &str, rcpt_to: &str, mime: &[u8]) -> Attempt {
        let started = Instant::now();
        let envelope = match (mail_from.parse(), rcpt_to.parse()) {
            (Ok(from), Ok(to)) => Envelope::new(Some(from), vec![to]),
            _ => {
                return self.attempt(
                    Outcome::Permanent,
                    None,
                    "envelope address rejected by the client".into(),
                    started,
                )
            }
        };
        let envelope = match envelope {
            Ok(e) => e,
            Err(e) => return self.attempt(Outcome::Permanent, None, e.to_string(), started),
        };
        let sent =
            tokio::time::timeout(self.deadline, self.transport.send_raw(&envelope, mime)).await;
        let Ok(sent) = sent else {
            return self.attempt(
                Outcome::Transient,
                None,
                format!("timed out after {:?}", self.deadline),
                started,
            );
        };
        match sent {
            Ok(response) => {
                let text = response.message().collect::<Vec<_>>().join(" ");
                self.attempt(
                    Outcome::Delivered,
                    Some(u16::from(response.code())),
                    text,
                    started,
                )
            }
            Err(error) => {
                let (outcome, code, text) = classify(&error);
                self.attempt(outcome, code, text, started)
            }
        }
    }
}

impl SmtpRelay {
    fn attempt(
        &self,
        outcome: Outcome,
        code: Option<u16>,
        text: String,
        started: Instant,
    ) -> Attempt {
        let (enhanced_code, response) = Attempt::split_enhanced(&text);
        Attempt {
            relay: self.name.clone(),
            outcome,
            smtp_code: code,
            enhanced_code,
            response,
            duration_ms: started.elapsed().as_millis() as i64,
        }
    }
}

/// The one place an SMTP error becomes an outcome: 5xx permanent, 4xx and
/// every connection, TLS, timeout or protocol error transient.
fn classify(error: &lettre::transport::smtp::Error) -> (Outcome, Option<u16>, String) {
    use std::error::Error as _;
    let code = error.status().map(u16::from);
    let text = match (code, error.source()) {
        (Some(_), Some(source)) => source.to_string(),
        _ => error.to_string(),
    };
    let outcome = if error.is_permanent() {
        Outcome::Permanent
    } else {
        Outcome::Transient
    };
    (outcome, code, text)
}
