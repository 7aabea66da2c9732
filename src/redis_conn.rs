//! A Redis connection for the adapters: every call has a deadline, and a
//! connection that failed with an I/O error or timed out is dropped and
//! re-established on the next call. (We do not rely on a client library's
//! reconnect loop: a Redis that is killed or restarted must never leave a
//! caller waiting forever.)

use std::future::Future;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, RedisResult};

pub struct RedisConn {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl RedisConn {
    /// `timeout` bounds each call (connection included).
    pub fn new(url: &str, timeout: Duration) -> RedisResult<RedisConn> {
        Ok(RedisConn {
            client: redis::Client::open(url)?,
            conn: tokio::sync::Mutex::new(None),
            timeout,
        })
    }

    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(self.timeout);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs one operation on the shared connection, within the deadline.
    pub async fn run<T, F, Fut>(&self, op: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = async {
            let conn = self.connection().await?;
            op(conn).await
        };
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                {
                    self.reset().await;
                }
                Err(e)
            }
            Err(_) => {
                self.reset().await;
                Err(RedisError::from((
                    ErrorKind::IoError,
                    "Redis did not answer in time",
                )))
            }
        }
    }
}
