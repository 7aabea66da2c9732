//! SMTP relay: one transaction (MAIL, RCPT, DATA) per recipient over a
//! pooled connection (see [`super::pool`]), one pool per relay, so one slow
//! relay does not stall another. Where the server offers PIPELINING the
//! envelope goes in one write and the message with its terminating dot in
//! another: two round trips per message instead of four. Also the one place
//! where an SMTP result becomes an [`Outcome`].

use std::fmt;
use std::time::Instant;

use async_trait::async_trait;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::Address;

use super::pool::{ConnectError, Connection, Endpoint, Pool};
use super::slots::Slot;
use super::{Relay, RelayConfig, TlsMode};
use crate::domain::{Attempt, Outcome, Priority};

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
        slot: Slot,
        from: &Address,
        to: &Address,
        mime: &[u8],
    ) -> Result<Response, Failure> {
        let mut lease = self.pool.get(slot).await.map_err(Failure::Connect)?;
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
                Err((failure, stage)) => {
                    // A negative reply leaves the connection usable after RSET.
                    if matches!(&failure, Failure::Smtp(e) if e.status().is_some())
                        && stage != Stage::DataOpen
                        && lease.conn.smtp.command(Rset).await.is_ok()
                    {
                        self.pool.put(lease);
                    }
                    return Err(failure);
                }
            }
        }
    }
}

/// Where a transaction failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// At MAIL: nothing was accepted yet (a stale pooled connection shows
    /// here).
    Mail,
    /// After MAIL; a RSET makes the connection usable again.
    Later,
    /// The server accepted a pipelined DATA although the envelope failed, and
    /// now waits for a message: the connection cannot be reused.
    DataOpen,
}

type Failed = (Failure, Stage);

fn smtp(stage: Stage) -> impl Fn(lettre::transport::smtp::Error) -> Failed {
    move |e| (Failure::Smtp(e), stage)
}

async fn transact(
    conn: &mut Connection,
    from: &Address,
    to: &Address,
    mime: &[u8],
) -> Result<Response, Failed> {
    let options = mail_parameters(conn.smtp.server_info(), from, to, mime)
        .map_err(|why| (why, Stage::Mail))?;
    let mail = Mail::new(Some(from.clone()), options);
    let rcpt = Rcpt::new(to.clone(), Vec::new());
    if conn.pipelining {
        envelope_pipelined(&mut conn.smtp, &mail, &rcpt).await?;
    } else {
        conn.smtp.command(mail).await.map_err(smtp(Stage::Mail))?;
        conn.smtp.command(rcpt).await.map_err(smtp(Stage::Later))?;
        conn.smtp.command(Data).await.map_err(smtp(Stage::Later))?;
    }
    let sent = match std::str::from_utf8(mime) {
        Ok(text) => conn.smtp.command(MessageData(text)).await,
        Err(_) => conn.smtp.message(mime).await,
    };
    sent.map_err(smtp(Stage::Later))
}

/// The MAIL parameters a message needs, or a refusal when the server lacks
/// the extension.
fn mail_parameters(
    info: &lettre::transport::smtp::extension::ServerInfo,
    from: &Address,
    to: &Address,
    mime: &[u8],
) -> Result<Vec<MailParameter>, Failure> {
    let mut options = Vec::new();
    if ![from, to]
        .iter()
        .all(|a| AsRef::<str>::as_ref(*a).is_ascii())
    {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            let why = "the address is not ASCII and the relay does not support SMTPUTF8";
            return Err(Failure::Refused(why.into()));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !mime.is_ascii() {
        if !info.supports_feature(Extension::EightBitMime) {
            let why = "the message is not 7-bit and the relay does not support 8BITMIME";
            return Err(Failure::Refused(why.into()));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    Ok(options)
}

/// MAIL, RCPT and DATA in one write (RFC 2920), then their three replies in
/// order. Every reply is read even after a refusal, so the session stays in
/// step; the first refusal is the one reported.
async fn envelope_pipelined(
    conn: &mut AsyncSmtpConnection,
    mail: &Mail,
    rcpt: &Rcpt,
) -> Result<(), Failed> {
    let mail_reply = unless_broken(conn.command(Envelope(mail, rcpt)).await, Stage::Mail)?;
    let rcpt_reply = conn.read_response().await;
    if matches!(&rcpt_reply, Err(e) if e.status().is_none()) {
        if let Err(refused) = mail_reply {
            // A server that refuses MAIL may hang up (421, or a 5xx): the
            // refusal is the outcome, not the broken connection after it.
            return Err((Failure::Smtp(refused), Stage::Later));
        }
    }
    let rcpt_reply = unless_broken(rcpt_reply, Stage::Later)?;
    let data_reply = conn.read_response().await;
    let refused = match (mail_reply, rcpt_reply) {
        (Err(e), _) | (Ok(_), Err(e)) => e,
        (Ok(_), Ok(_)) => return data_reply.map(|_| ()).map_err(smtp(Stage::Later)),
    };
    let stage = if data_reply.is_ok() {
        Stage::DataOpen
    } else {
        Stage::Later
    };
    Err((Failure::Smtp(refused), stage))
}

/// A reply, or the failure when the connection broke before one came (a
/// refusal is a reply: the session goes on).
fn unless_broken(
    reply: Result<Response, lettre::transport::smtp::Error>,
    stage: Stage,
) -> Result<Result<Response, lettre::transport::smtp::Error>, Failed> {
    match reply {
        Err(e) if e.status().is_none() => Err((Failure::Smtp(e), stage)),
        reply => Ok(reply),
    }
}

/// MAIL, RCPT and DATA as one pipelined group (each keeps its CRLF).
struct Envelope<'a>(&'a Mail, &'a Rcpt);

impl fmt::Display for Envelope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.0, self.1, Data)
    }
}

/// A message as sent after DATA: dot-stuffed (RFC 5321 4.5.2), with the
/// terminating `.` line, so it leaves in one write. A dot is doubled at the
/// start of every line, after a bare LF too.
struct MessageData<'a>(&'a str);

impl fmt::Display for MessageData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest.starts_with('.') {
            f.write_str(".")?;
        }
        while let Some(at) = rest.find("\n.") {
            f.write_str(&rest[..=at])?;
            f.write_str(".")?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)?;
        if self.0.ends_with("\r\n") {
            f.write_str(".\r\n")
        } else {
            f.write_str("\r\n.\r\n")
        }
    }
}

#[async_trait]
impl Relay for SmtpRelay {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        mail_from: &str,
        rcpt_to: &str,
        mime: &[u8],
        priority: Priority,
    ) -> Attempt {
        let started = Instant::now();
        let (Ok(from), Ok(to)) = (mail_from.parse::<Address>(), rcpt_to.parse::<Address>()) else {
            return self.attempt(
                Outcome::Permanent,
                None,
                "envelope address rejected by the client".into(),
                started,
            );
        };
        // The deadline is the transaction's: waiting for a connection behind
        // other deliveries is not the relay being slow.
        let slot = self.pool.slot(priority).await;
        let sent = tokio::time::timeout(self.deadline, self.hand_off(slot, &from, &to, mime)).await;
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

#[cfg(test)]
mod tests {
    use super::MessageData;

    #[test]
    fn message_data_is_dot_stuffed_and_terminated_once() {
        let sent = MessageData(".a\r\nb\r\n..c\r\nd.\r\n.\r\n").to_string();
        assert_eq!(sent, "..a\r\nb\r\n...c\r\nd.\r\n..\r\n.\r\n");
        assert_eq!(MessageData("x").to_string(), "x\r\n.\r\n");
        assert_eq!(MessageData("x\n.y").to_string(), "x\n..y\r\n.\r\n");
        assert_eq!(MessageData("").to_string(), "\r\n.\r\n");
    }
}
