//! Suppressions and idempotency records.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::Row;

use super::{batch, Backend, SqlStore};
use crate::domain::Millis;
use crate::store::records::*;
use crate::store::{IdempotencyStore, StoreResult, SuppressionStore};

/// An in-flight record older than this belongs to a request that died.
const ABANDONED_MS: i64 = 60_000;

#[async_trait]
impl SuppressionStore for SqlStore {
    async fn list_suppressions(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Suppression>> {
        let found = sqlx::query(
            "SELECT email, reason, source, message_id, created_at FROM suppressions \
             WHERE ($1 IS NULL OR email > $1) ORDER BY email LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
            .map(|r| {
                Ok(Suppression {
                    email: r.try_get("email")?,
                    reason: r.try_get("reason")?,
                    source: r.try_get("source")?,
                    message_id: r.try_get("message_id")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn put_suppression(&self, s: &Suppression) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO suppressions (email, reason, source, message_id, created_at) VALUES ($1,$2,$3,$4,$5) \
             ON CONFLICT (email) DO UPDATE SET reason = excluded.reason, source = excluded.source",
        )
        .bind(s.email.to_lowercase())
        .bind(&s.reason)
        .bind(&s.source)
        .bind(&s.message_id)
        .bind(s.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_suppression(&self, email: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM suppressions WHERE email = $1")
            .bind(email.to_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// An idempotency record's columns as the shared reservation binds them.
const IDEM_INSERT_COLS: usize = 6;

impl SqlStore {
    /// Reserves every key among `reqs` that no record holds (one statement
    /// per chunk of up to 64, padded by repeating the last request, which
    /// its own first row makes a conflict); returns those reserved.
    ///
    /// Not flushed on commit: the reservation only has to hold while its
    /// request runs, and that request answers 202 only after the accept's
    /// durable commit, which flushes the WAL written before it — this
    /// reservation included. Lost in a crash before that, it belonged to a
    /// request that got no answer and may be sent again. On Postgres a
    /// group that fits one statement is that statement alone, its own
    /// transaction, which sets `synchronous_commit` off for itself
    /// (`set_config(…, true)`): one round trip instead of three.
    async fn reserve_free_keys(
        &self,
        reqs: &[&IdemRequest],
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<HashSet<(String, String)>> {
        let mut reserved = HashSet::with_capacity(reqs.len());
        if reqs.is_empty() {
            return Ok(reserved);
        }
        let chunks = batch::padded(reqs, IDEM_INSERT_COLS);
        let mut conn = self.hot.get(&self.pool).await?;
        if let ([(chunk, size)], Backend::Postgres) = (chunks.as_slice(), self.backend) {
            let sql = reserve_sql(*size, true);
            let found = bind_reservations(sqlx::query(&sql), chunk, *size, now, ttl_ms)
                .fetch_all(&mut *conn)
                .await?;
            collect_reserved(&found, &mut reserved)?;
        } else {
            let mut tx = self.begin_unflushed_on(&mut conn).await?;
            for (chunk, size) in &chunks {
                let sql = reserve_sql(*size, false);
                let found = bind_reservations(sqlx::query(&sql), chunk, *size, now, ttl_ms)
                    .fetch_all(&mut *tx)
                    .await?;
                collect_reserved(&found, &mut reserved)?;
            }
            tx.commit().await?;
        }
        conn.keep();
        Ok(reserved)
    }
}

/// The reservation of `rows` keys; `unflushed`, a statement that commits
/// without a WAL flush as its own transaction (Postgres).
fn reserve_sql(rows: usize, unflushed: bool) -> String {
    let values = batch::values(rows, IDEM_INSERT_COLS, 1);
    let insert =
        "INSERT INTO idempotency (key_id, idem_key, request_hash, created_at, expires_at, state)";
    let rest = "ON CONFLICT (key_id, idem_key) DO NOTHING RETURNING key_id, idem_key";
    if unflushed {
        format!(
            "WITH c AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS s) \
             {insert} SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6 \
             FROM (VALUES {values}) AS v, c {rest}"
        )
    } else {
        format!("{insert} VALUES {values} {rest}")
    }
}

fn bind_reservations<'q>(
    mut query: batch::AnyQuery<'q>,
    chunk: &[&'q IdemRequest],
    size: usize,
    now: Millis,
    ttl_ms: i64,
) -> batch::AnyQuery<'q> {
    for req in batch::fill(chunk, size) {
        query = query
            .bind(&req.key_id)
            .bind(&req.idem_key)
            .bind(&req.request_hash)
            .bind(now)
            .bind(now + ttl_ms)
            .bind("in_flight");
    }
    query
}

fn collect_reserved(
    found: &[sqlx::any::AnyRow],
    reserved: &mut HashSet<(String, String)>,
) -> StoreResult<()> {
    for row in found {
        reserved.insert((row.try_get("key_id")?, row.try_get("idem_key")?));
    }
    Ok(())
}

#[async_trait]
impl IdempotencyStore for SqlStore {
    async fn idem_begin(
        &self,
        req: &IdemRequest,
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<IdemBegin> {
        for _ in 0..3 {
            let inserted = sqlx::query(
                "INSERT INTO idempotency (key_id, idem_key, request_hash, state, created_at, expires_at) \
                 VALUES ($1,$2,$3,'in_flight',$4,$5) ON CONFLICT (key_id, idem_key) DO NOTHING",
            )
            .bind(&req.key_id)
            .bind(&req.idem_key)
            .bind(&req.request_hash)
            .bind(now)
            .bind(now + ttl_ms)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(IdemBegin::Reserved);
            }
            let Some(row) = sqlx::query(
                "SELECT request_hash, state, response_status, response_body, created_at, expires_at \
                 FROM idempotency WHERE key_id = $1 AND idem_key = $2",
            )
            .bind(&req.key_id)
            .bind(&req.idem_key)
            .fetch_optional(&self.pool)
            .await?
            else {
                continue;
            };
            let hash: String = row.try_get("request_hash")?;
            let state: String = row.try_get("state")?;
            let created_at: i64 = row.try_get("created_at")?;
            let expires_at: i64 = row.try_get("expires_at")?;
            let stale =
                expires_at <= now || (state == "in_flight" && created_at < now - ABANDONED_MS);
            if stale {
                let taken = sqlx::query(
                    "UPDATE idempotency SET request_hash = $3, state = 'in_flight', created_at = $4, \
                     expires_at = $5, response_status = NULL, response_body = NULL \
                     WHERE key_id = $1 AND idem_key = $2 AND created_at = $6",
                )
                .bind(&req.key_id)
                .bind(&req.idem_key)
                .bind(&req.request_hash)
                .bind(now)
                .bind(now + ttl_ms)
                .bind(created_at)
                .execute(&self.pool)
                .await?;
                if taken.rows_affected() == 1 {
                    return Ok(IdemBegin::Reserved);
                }
                continue;
            }
            if hash != req.request_hash {
                return Ok(IdemBegin::Mismatch);
            }
            if state == "in_flight" {
                return Ok(IdemBegin::InFlight);
            }
            let status: Option<i64> = row.try_get("response_status")?;
            let body: Option<String> = row.try_get("response_body")?;
            return Ok(IdemBegin::Replay {
                status: status.unwrap_or(202) as u16,
                body: body.unwrap_or_default(),
            });
        }
        Ok(IdemBegin::InFlight)
    }

    async fn idem_begin_many(
        &self,
        reqs: &[IdemRequest],
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<Vec<IdemBegin>> {
        // The first request for each key tries the shared insert; a repeat
        // of a key within `reqs` finds it taken, one by one, like a
        // concurrent request would.
        let mut seen = HashSet::new();
        let firsts: Vec<&IdemRequest> = reqs
            .iter()
            .filter(|r| seen.insert((r.key_id.as_str(), r.idem_key.as_str())))
            .collect();
        let mut reserved = self.reserve_free_keys(&firsts, now, ttl_ms).await?;
        let mut answers = Vec::with_capacity(reqs.len());
        for req in reqs {
            // The first request for a reserved key takes it out of the set.
            let key = (req.key_id.clone(), req.idem_key.clone());
            answers.push(if reserved.remove(&key) {
                IdemBegin::Reserved
            } else {
                self.idem_begin(req, now, ttl_ms).await?
            });
        }
        Ok(answers)
    }

    async fn idem_release(&self, key_id: &str, idem_key: &str) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency WHERE key_id = $1 AND idem_key = $2 AND state = 'in_flight'",
        )
        .bind(key_id)
        .bind(idem_key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
