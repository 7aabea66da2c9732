//! The SQL adapter of the `Store` port over `sqlx::Any`: Postgres in
//! production, SQLite (WAL, one writer connection, so never "database is
//! locked") for the embedded default. Queries are written once in the common
//! dialect (`$n` parameters, `RETURNING`, `ON CONFLICT`, epoch-ms integers);
//! only the migration files differ per backend.

mod batch;
mod delivery;
mod events;
mod hot;
mod keys;
mod messages;
mod misc;
mod rows;
mod templates;
mod webhooks;

use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use super::{Store, StoreError, StoreResult};

const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_message_bodies.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_key_timezone.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/postgres/0004_hot_claims.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/postgres/0005_mime_patch.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/postgres/0006_fillfactor_50.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/postgres/0007_recipient_email_lower.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/postgres/0008_webhook_due_per_endpoint.sql"),
    ),
];
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_message_bodies.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/sqlite/0003_key_timezone.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/sqlite/0004_hot_claims.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/sqlite/0005_mime_patch.sql"),
    ),
    // No 6: Postgres's fillfactor has no SQLite counterpart.
    (
        7,
        include_str!("../../../migrations/sqlite/0007_recipient_email_lower.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/sqlite/0008_webhook_due_per_endpoint.sql"),
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// Connections kept for accept, claim and outcome (Postgres only).
    hot: hot::HotConnections,
}

/// Opens a Postgres transaction whose commit does not wait for its WAL to
/// reach the disk, in one round trip.
const BEGIN_UNFLUSHED: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// Idle connections kept out of the Postgres pool for the hot paths.
const HOT_CONNECTIONS: usize = 8;

impl SqlStore {
    /// A transaction whose commit does not wait for its WAL to reach the
    /// disk (Postgres; SQLite commits as usual), for records whose work is
    /// redone if a crash of the database loses them (leases, webhook
    /// attempts).
    pub(super) async fn begin_unflushed(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Postgres => self.pool.begin_with(BEGIN_UNFLUSHED).await,
            Backend::Sqlite => self.pool.begin().await,
        }
    }

    /// [`SqlStore::begin_unflushed`] on a connection already held (a hot
    /// path's): on Postgres the `SET LOCAL` travels with the `BEGIN`, in
    /// one round trip.
    pub(super) async fn begin_unflushed_on<'c>(
        &self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, sqlx::Error> {
        use sqlx::Connection;
        match self.backend {
            Backend::Postgres => conn.begin_with(BEGIN_UNFLUSHED).await,
            Backend::Sqlite => conn.begin().await,
        }
    }

    /// Connects (creating the SQLite file if needed). `pool_size` applies to
    /// Postgres; SQLite always uses one connection.
    pub async fn connect(url: &str, pool_size: u32) -> StoreResult<SqlStore> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(3))
            .idle_timeout(Duration::from_secs(300));
        let options = match backend {
            Backend::Postgres => options
                .max_connections(pool_size)
                // As many as the hot paths keep, opened at start (and kept
                // open): a fresh process's first second under load no
                // longer waits for each of them to connect and set up.
                .min_connections(HOT_CONNECTIONS.min(pool_size as usize / 4) as u32)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        // MIME bodies are compressed on insert; lz4 costs a
                        // fraction of the default pglz's CPU. Servers built
                        // without lz4 keep their default.
                        if let Err(e) = conn.execute("SET default_toast_compression = 'lz4'").await
                        {
                            tracing::debug!(error = %e, "lz4 TOAST compression unavailable");
                        }
                        // Every statement Mailroom runs is served by an
                        // index, and the hot ones are prepared once per
                        // connection. A prepared statement's generic plan
                        // is costed once, when it is first cached: made
                        // while a table is small (a fresh install, the first
                        // minute of a spike) it is a sequential scan, and
                        // it stays one while the table grows, until the
                        // next autoanalyze, costing O(table) per call.
                        conn.execute("SET enable_seqscan = off").await?;
                        // With sequential scans priced out, a statement that
                        // must scan a small table (the webhook list) costs
                        // more than `jit_above_cost` and was JIT-compiled on
                        // every call (0.4 ms of CPU each). No statement here
                        // runs long enough for JIT to pay.
                        conn.execute("SET jit = off").await?;
                        Ok(())
                    })
                }),
            Backend::Sqlite => options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                             PRAGMA busy_timeout=10000;",
                        )
                        .await?;
                        Ok(())
                    })
                }),
        };
        let url = match backend {
            // Create the database file if it does not exist yet.
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            // Multi-row statements have up to seven texts each (see
            // `batch`); keep them all prepared rather than evicting.
            Backend::Postgres if !url.contains("statement-cache-capacity") => {
                format!(
                    "{url}{}statement-cache-capacity=256",
                    if url.contains('?') { '&' } else { '?' }
                )
            }
            _ => url.to_string(),
        };
        let pool = options.connect(&url).await?;
        let hot = hot::HotConnections::new(match backend {
            Backend::Postgres => HOT_CONNECTIONS.min(pool_size as usize / 4),
            Backend::Sqlite => 0,
        });
        Ok(SqlStore { pool, backend, hot })
    }

    /// `sqlite://` URL for a file in the data directory (created if missing).
    pub fn sqlite_url(dir: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join("mailroom.db").display())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    async fn migrate_inner(&self) -> StoreResult<()> {
        let migrations = match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS,
            Backend::Sqlite => SQLITE_MIGRATIONS,
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS mailroom_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        for (version, sql) in migrations {
            let applied: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM mailroom_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?;
            if applied > 0 {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            for statement in statements(sql) {
                sqlx::query(&statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO mailroom_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(crate::domain::now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        Ok(())
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn migrate(&self) -> StoreResult<()> {
        // Two processes starting at once may race on the first migration;
        // the loser sees the winner's work on the second pass.
        match self.migrate_inner().await {
            Ok(()) => Ok(()),
            Err(first) => {
                tracing::warn!(error = %first, "migration raced or failed; checking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.migrate_inner().await
            }
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// Splits a migration file into statements (our migrations keep `;` out of
/// string literals and comments).
fn statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads a JSON text column.
fn json_col(row: &AnyRow, col: &str) -> StoreResult<serde_json::Value> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn string_list(row: &AnyRow, col: &str) -> StoreResult<Vec<String>> {
    let value = json_col(row, col)?;
    serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}
