//! Connections kept out of the pool for the hot paths (accept, claim,
//! outcome): no liveness round trip per use while they are busy.
//!
//! sqlx's pool tests a connection with a round trip (a Sync message) when
//! it is handed out and again when it comes back: two round trips per
//! group commit, per claim and per outcome transaction, ~6% of the accept
//! path's CPU on its own. A connection used again within
//! [`FRESH_FOR`] skips the test, as HikariCP's "alive bypass window" does;
//! one idle for longer is pinged before use, so after an outage of more
//! than a second no request fails on a connection that died with the
//! server. A connection whose use fails is never kept: dropped, it goes
//! back to the pool, whose own test closes it if broken (and rolls back
//! what a failed transaction left open). Kept connections are not subject
//! to the pool's idle timeout; at most [`HotConnections::new`]'s `max` stay
//! open while idle.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection};

/// How long an idle kept connection is trusted without a test.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// A kept connection and when it was last used.
type Idle = (PoolConnection<Any>, Instant);

/// Idle connections kept for the hot paths (at most `max`; the rest of the
/// pool stays free for everything else).
#[derive(Clone)]
pub struct HotConnections {
    idle: Arc<Mutex<Vec<Idle>>>,
    max: usize,
}

impl HotConnections {
    /// `max` 0 keeps nothing: every use goes through the pool (SQLite,
    /// whose pool is one connection that other work needs too).
    pub fn new(max: usize) -> Self {
        HotConnections {
            idle: Arc::new(Mutex::new(Vec::with_capacity(max))),
            max,
        }
    }

    /// A connection: the most recently kept one (tested first if it has
    /// been idle longer than [`FRESH_FOR`]), else one from the pool.
    pub async fn get(&self, pool: &AnyPool) -> Result<HotConnection, sqlx::Error> {
        while let Some((mut conn, since)) = self.take() {
            if since.elapsed() < FRESH_FOR || conn.ping().await.is_ok() {
                return Ok(self.wrap(conn));
            }
            // Broken: dropping it returns it to the pool, which closes it.
        }
        Ok(self.wrap(pool.acquire().await?))
    }

    fn take(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn wrap(&self, conn: PoolConnection<Any>) -> HotConnection {
        HotConnection {
            conn,
            home: self.clone(),
        }
    }

    fn put(&self, conn: PoolConnection<Any>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max {
            idle.push((conn, Instant::now()));
        }
    }

    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A connection taken for one unit of hot-path work. [`HotConnection::keep`]
/// after the work succeeded; dropped without it, the connection goes back
/// to the pool and is tested there.
pub struct HotConnection {
    conn: PoolConnection<Any>,
    home: HotConnections,
}

impl HotConnection {
    pub fn keep(self) {
        self.home.put(self.conn);
    }
}

impl Deref for HotConnection {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl DerefMut for HotConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::any::AnyPoolOptions;
    use sqlx::Executor;

    async fn pool() -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPoolOptions::new()
            .max_connections(2)
            .connect("sqlite::memory:")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn kept_connections_are_reused_and_bounded() {
        let pool = pool().await;
        let hot = HotConnections::new(1);
        let mut a = hot.get(&pool).await.unwrap();
        let b = hot.get(&pool).await.unwrap();
        a.execute("SELECT 1").await.unwrap();
        a.keep();
        b.keep();
        assert_eq!(hot.idle_len(), 1, "never more than max kept");
        // The one not kept goes back to the pool (asynchronously).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.size() as usize - pool.num_idle(), 1);
        let c = hot.get(&pool).await.unwrap();
        assert_eq!(hot.idle_len(), 0);
        drop(c);
        drop(hot);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            pool.num_idle(),
            pool.size() as usize,
            "dropped with the store, kept connections go back to the pool"
        );
    }

    #[tokio::test]
    async fn nothing_is_kept_with_max_zero() {
        let pool = pool().await;
        let hot = HotConnections::new(0);
        hot.get(&pool).await.unwrap().keep();
        assert_eq!(hot.idle_len(), 0);
    }
}
