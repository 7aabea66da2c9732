//! SMTP relay: one transaction (MAIL, RCPT, DATA) per recipient over a
//! pooled connection (see [`super::pool`]), one pool per relay, so one slow
//! relay does not stall another. Also the one place where an SMTP result
//! becomes an [`Outcome`].

use std::time::Instant;

use async_trait::async_trait;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::Address;

use super::pool::{ConnectError, Endpoint, Pool};
use super::{Relay, RelayConfig, TlsMode};
use crate::domain::{Attempt, Outcome};

pub struct SmtpRelay {
    name: String,
    pool: Pool,
    /// Bound on one whole hand-off (connect, TLS, AUTH, envelope, DATA), so
    /// a relay that stops answering cannot hold a worker forever.
    deadline: std::time::Duration,
}

/// Why a hand-off did not end in a 2xx.
enum Failure {
    /// Could not connect, or TLS/greeting/AUTH failed.
    Connect(ConnectError),
    /// The server answered a command negatively, or the connection broke.
    Smtp(lettre::transport::smtp::Error),
    /// We refused before sending (the server lacks a needed extension).
    Refused(String),
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
        if config.tls == TlsMode::None && config.username.is_some() {
            tracing::warn!(relay = %config.name, "relay credentials will be sent without TLS (tls=none)");
        }
        let endpoint = Endpoint {
            host: config.host.clone(),
            port: config.port,
            implicit_tls: match config.tls {
                TlsMode::Implicit => Some(tls_parameters()?),
                _ => None,
            },
            starttls: match config.tls {
                TlsMode::StartTls => Some(tls_parameters()?),
                _ => None,
            },
            credentials: match (&config.username, &config.password) {
                (Some(user), Some(pass)) => {
                    Some(Credentials::new(user.clone(), pass.expose().clone()))
                }
                _ => None,
            },
            connect_timeout: config.timeout,
        };
        Ok(SmtpRelay {
            name: config.name.clone(),
            pool: Pool::new(endpoint, config.pool_size),
            deadline: config.timeout * 3,
        })
    }

    /// One hand-off; a reused connection that turns out to be dead before
    /// the server saw anything is replaced once.
    async fn hand_off(
        &self,
        from: &Address,
        to: &Address,
        mime: &[u8],
    ) -> Result<Response, Failure> {
        let mut lease = self.pool.get().await.map_err(Failure::Connect)?;
        loop {
            match transact(&mut lease.conn, from, to, mime).await {
                Ok(response) => {
                    self.pool.put(lease);
                    return Ok(response);
                }
                Err((Failure::Smtp(e), Stage::Mail)) if !lease.fresh && e.status().is_none() => {
                    tracing::debug!(relay = %self.name, error = %e, "pooled connection was dead; reconnecting");
                    lease = self.pool.reconnect(lease).await.map_err(Failure::Connect)?;
                }
                Err((failure, _)) => {
                    // A negative reply leaves the connection usable after RSET.
                    if matches!(&failure, Failure::Smtp(e) if e.status().is_some())
                        && lease.conn.command(Rset).await.is_ok()
                    {
                        self.pool.put(lease);
                    }
                    return Err(failure);
                }
            }
        }
    }
}

/// Where a transaction failed: at MAIL (nothing accepted yet) or later.
#[derive(Clone, Copy)]
enum Stage {
    Mail,
    Later,
}

async fn transact(
    conn: &mut AsyncSmtpConnection,
    from: &Address,
    to: &Address,
    mime: &[u8],
) -> Result<Response, (Failure, Stage)> {
    let info = conn.server_info();
    let mut options = Vec::new();
    if ![from, to]
        .iter()
        .all(|a| AsRef::<str>::as_ref(*a).is_ascii())
    {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            let why = "the address is not ASCII and the relay does not support SMTPUTF8";
            return Err((Failure::Refused(why.into()), Stage::Mail));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !mime.is_ascii() {
        if !info.supports_feature(Extension::EightBitMime) {
            let why = "the message is not 7-bit and the relay does not support 8BITMIME";
            return Err((Failure::Refused(why.into()), Stage::Mail));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let smtp = |stage| move |e| (Failure::Smtp(e), stage);
    conn.command(Mail::new(Some(from.clone()), options))
        .await
        .map_err(smtp(Stage::Mail))?;
    conn.command(Rcpt::new(to.clone(), Vec::new()))
        .await
        .map_err(smtp(Stage::Later))?;
    conn.command(Data).await.map_err(smtp(Stage::Later))?;
    conn.message(mime).await.map_err(smtp(Stage::Later))
}

#[async_trait]
impl Relay for SmtpRelay {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&self, mail_from: &str, rcpt_to: &str, mime: &[u8]) -> Attempt {
        let started = Instant::now();
        let (Ok(from), Ok(to)) = (mail_from.parse::<Address>(), rcpt_to.parse::<Address>()) else {
            return self.attempt(
                Outcome::Permanent,
                None,
                "envelope address rejected by the client".into(),
                started,
            );
        };
        let sent = tokio::time::timeout(self.deadline, self.hand_off(&from, &to, mime)).await;
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
            Err(Failure::Smtp(error)) | Err(Failure::Connect(ConnectError::Smtp(error))) => {
                let (outcome, code, text) = classify(&error);
                self.attempt(outcome, code, text, started)
            }
            Err(Failure::Connect(ConnectError::Io(error))) => self.attempt(
                Outcome::Transient,
                None,
                format!("could not connect: {error}"),
                started,
            ),
            Err(Failure::Refused(why)) => self.attempt(Outcome::Permanent, None, why, started),
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
