//! A pool of SMTP connections to one relay. Sockets are opened here, with
//! `TCP_NODELAY` (lettre writes the message and its terminating `.` in two
//! writes; with Nagle's algorithm the second waits ~40 ms for the server's
//! delayed ACK), then handed to lettre for the protocol. A connection used
//! recently is reused without a `NOOP`; one idle for longer is checked first.
//! Each connection knows whether its server offers `PIPELINING` (RFC 2920):
//! lettre keeps only the EHLO keywords it knows, so the pool asks once more
//! when it opens the connection.
//!
//! Implicit TLS wraps our socket in lettre's `AsyncNetworkStream` (public but
//! deprecated in lettre 0.11, "not meant to be made public"), the one way to
//! get lettre's TLS over a socket we configured; `Cargo.lock` pins lettre.
#![allow(deprecated)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::client::{AsyncNetworkStream, AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use super::slots::{Slot, Slots};
use crate::domain::Priority;

/// Reused without a check when last used this recently.
const FRESH: Duration = Duration::from_secs(5);
/// Dropped instead of reused when idle this long.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// How to reach and greet the relay.
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// TLS from the first byte (SMTPS).
    pub implicit_tls: Option<TlsParameters>,
    /// STARTTLS after EHLO, required.
    pub starttls: Option<TlsParameters>,
    pub credentials: Option<Credentials>,
    pub connect_timeout: Duration,
}

/// A connection checked out of the pool; give it back with [`Pool::put`]
/// when it is known to be in a clean state, or drop it.
pub struct Lease {
    pub conn: Connection,
    /// True when the connection was opened for this lease.
    pub fresh: bool,
    _slot: Slot,
}

/// An open SMTP session and what its server offers beyond lettre's view.
pub struct Connection {
    pub smtp: AsyncSmtpConnection,
    /// The server advertised `PIPELINING`: an envelope may go in one write.
    pub pipelining: bool,
}

pub struct Pool {
    endpoint: Endpoint,
    hello: ClientId,
    idle: Mutex<Vec<(Connection, Instant)>>,
    slots: Slots,
}

impl Pool {
    pub fn new(endpoint: Endpoint, size: u32) -> Pool {
        Pool {
            endpoint,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            slots: Slots::new(size as usize),
        }
    }

    /// Waits for a connection slot, served by priority (see `slots`).
    pub async fn slot(&self, priority: Priority) -> Slot {
        self.slots.acquire(priority).await
    }

    /// Reuses an idle connection or opens one, in the slot taken.
    pub async fn get(&self, slot: Slot) -> Result<Lease, ConnectError> {
        while let Some((mut conn, since)) = self.take_idle() {
            let idle = since.elapsed();
            if idle > MAX_IDLE || conn.smtp.has_broken() {
                continue;
            }
            if idle < FRESH || conn.smtp.test_connected().await {
                return Ok(Lease {
                    conn,
                    fresh: false,
                    _slot: slot,
                });
            }
        }
        Ok(Lease {
            conn: self.connect().await?,
            fresh: true,
            _slot: slot,
        })
    }

    /// Opens a new connection (for a retry after a reused one failed).
    pub async fn reconnect(&self, lease: Lease) -> Result<Lease, ConnectError> {
        Ok(Lease {
            conn: self.connect().await?,
            fresh: true,
            _slot: lease._slot,
        })
    }

    /// Returns a connection that ended a transaction cleanly.
    pub fn put(&self, lease: Lease) {
        if !lease.conn.smtp.has_broken() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((lease.conn, Instant::now()));
        }
    }

    fn take_idle(&self) -> Option<(Connection, Instant)> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    async fn connect(&self) -> Result<Connection, ConnectError> {
        let e = &self.endpoint;
        let tcp = tokio::time::timeout(
            e.connect_timeout,
            TcpStream::connect((e.host.as_str(), e.port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))
        .and_then(|r| r)
        .map_err(ConnectError::Io)?;
        tcp.set_nodelay(true).map_err(ConnectError::Io)?;
        let stream: Box<dyn AsyncTokioStream> = match &e.implicit_tls {
            None => Box::new(tcp),
            Some(params) => {
                let mut wrapped = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                wrapped.upgrade_tls(params.clone()).await?;
                Box::new(TlsStream(wrapped.compat()))
            }
        };
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello).await?;
        if let Some(params) = &e.starttls {
            conn.starttls(params.clone(), &self.hello).await?;
        }
        // A repeated EHLO only resets the (empty) transaction state (RFC
        // 5321 4.1.4); it goes before AUTH, which it must not follow.
        let ehlo = conn.command(Ehlo::new(self.hello.clone())).await?;
        if let Some(credentials) = &e.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(Connection {
            smtp: conn,
            pipelining: offers(&ehlo, "PIPELINING"),
        })
    }
}

/// Whether an EHLO reply lists `keyword` (case-insensitive, RFC 5321).
fn offers(ehlo: &Response, keyword: &str) -> bool {
    ehlo.message()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .any(|k| k.eq_ignore_ascii_case(keyword))
}

/// Why a connection could not be had.
#[derive(Debug)]
pub enum ConnectError {
    /// The TCP connection itself (refused, unreachable, timed out).
    Io(io::Error),
    /// TLS, the greeting, EHLO, STARTTLS or AUTH.
    Smtp(Error),
}

impl From<Error> for ConnectError {
    fn from(e: Error) -> Self {
        ConnectError::Smtp(e)
    }
}

/// An implicit-TLS stream (lettre's own TLS over our socket), seen by lettre
/// as a plain transport.
#[derive(Debug)]
struct TlsStream(Compat<AsyncNetworkStream>);

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().peer_addr()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_keywords_are_read_past_the_greeting_line() {
        let reply: Response = "250-mx.example.com Hello PIPELINING\r\n250-SIZE 1000\r\n250-pipelining\r\n250 HELP\r\n"
            .parse()
            .unwrap();
        assert!(offers(&reply, "PIPELINING"));
        assert!(offers(&reply, "size"));
        let plain: Response = "250-PIPELINING.example\r\n250-8BITMIME\r\n250 HELP\r\n"
            .parse()
            .unwrap();
        assert!(
            !offers(&plain, "PIPELINING"),
            "the greeting line names the host"
        );
        assert!(!offers(&plain, "CHUNKING"));
    }
}
