//! The delivery side of the store: claim with a lease (a conditional UPDATE,
//! never a lock held across SMTP), record outcomes, sweep lost work, expire.

use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

use super::events::{insert_message_event, subscriptions, MessageEvent, Subscription};
use super::messages::{finalize_waiting, recompute_message, Finish};
use super::{rows, SqlStore};
use crate::domain::{Millis, Outcome, Priority, Status};
use crate::store::records::*;
use crate::store::{DeliveryStore, StoreError, StoreResult};

const NOT_FINAL: &str = "('scheduled','queued','deferred','sending')";

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Transient => "transient",
        Outcome::Permanent => "permanent",
    }
}

fn due_rows(found: &[sqlx::any::AnyRow]) -> StoreResult<Vec<(String, Priority, Millis)>> {
    found
        .iter()
        .map(|r| {
            let p: String = r.try_get("priority")?;
            Ok((
                r.try_get("id")?,
                Priority::parse(&p).unwrap_or(Priority::Normal),
                r.try_get::<Option<i64>, _>("due")?.unwrap_or(0),
            ))
        })
        .collect()
}

/// Claims one message inside the caller's transaction.
async fn claim_one(
    tx: &mut AnyConnection,
    id: &str,
    owner: &str,
    now: Millis,
    lease_until: Millis,
) -> StoreResult<Option<Claim>> {
    {
        let taken = sqlx::query(&format!(
            "UPDATE messages SET lease_until = $2, lease_owner = $3, updated_at = $4, status = 'sending' \
             WHERE id = $1 AND status IN {NOT_FINAL} AND next_attempt_at <= $4 \
             AND (lease_until IS NULL OR lease_until < $4) RETURNING {}, mime, mail_from",
            rows::MESSAGE_COLUMNS
        ))
        .bind(id)
        .bind(lease_until)
        .bind(owner)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = taken else {
            return Ok(None);
        };
        let due = sqlx::query(&format!(
            "UPDATE recipients SET status = 'sending', updated_at = $2 \
             WHERE message_id = $1 AND status IN {NOT_FINAL} AND next_attempt_at <= $2 \
             RETURNING {}",
            rows::RECIPIENT_COLUMNS
        ))
        .bind(id)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            recompute_message(tx, id, now, true).await?;
            return Ok(None);
        }
        let mime: Option<String> = row.try_get("mime")?;
        let claim = Claim {
            message: rows::message(&row)?,
            mime: mime.ok_or_else(|| StoreError::Corrupt(format!("message {id} has no MIME")))?,
            mail_from: row.try_get("mail_from")?,
            recipients: due
                .iter()
                .map(rows::recipient)
                .collect::<StoreResult<_>>()?,
        };
        Ok(Some(claim))
    }
}

/// Records one report inside the caller's transaction.
async fn record_one(
    tx: &mut AnyConnection,
    report: &DeliveryReport,
    subscriptions: &[Subscription],
) -> StoreResult<RecordResult> {
    {
        let now = report.now;
        let key_id = &report.key_id;
        let tags = serde_json::json!(report.tags);
        let metadata = &report.metadata;
        for r in &report.results {
            let last = r.attempts.last();
            let updated = sqlx::query(
                "UPDATE recipients SET status = $3, attempts = attempts + $4, next_attempt_at = $5, \
                 smtp_code = COALESCE($6, smtp_code), enhanced_code = COALESCE($7, enhanced_code), \
                 response = COALESCE($8, response), canceled_reason = $9, updated_at = $10 \
                 WHERE message_id = $1 AND idx = $2 RETURNING attempts",
            )
            .bind(&report.message_id)
            .bind(r.idx)
            .bind(r.status.as_str())
            .bind(i64::from(!r.attempts.is_empty()))
            .bind(r.next_attempt_at)
            .bind(last.and_then(|a| a.smtp_code).map(i64::from))
            .bind(last.and_then(|a| a.enhanced_code.clone()))
            .bind(last.map(|a| a.response.clone()))
            .bind(r.reason.as_deref())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let attempt_number: i64 = updated.try_get("attempts")?;
            for a in &r.attempts {
                sqlx::query(
                    "INSERT INTO attempts (message_id, recipient_idx, recipient, at, relay, outcome, \
                     smtp_code, enhanced_code, response, duration_ms) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
                )
                .bind(&report.message_id)
                .bind(r.idx)
                .bind(&r.email)
                .bind(now - a.duration_ms)
                .bind(&a.relay)
                .bind(outcome_name(&a.outcome))
                .bind(a.smtp_code.map(i64::from))
                .bind(&a.enhanced_code)
                .bind(&a.response)
                .bind(a.duration_ms)
                .execute(&mut *tx)
                .await?;
            }
            if r.suppress {
                sqlx::query(
                    "INSERT INTO suppressions (email, reason, source, message_id, created_at) \
                     VALUES ($1, $2, 'bounce', $3, $4) ON CONFLICT (email) DO NOTHING",
                )
                .bind(r.email.to_lowercase())
                .bind(last.map_or("hard bounce".to_string(), |a| {
                    format!("hard bounce: {}", a.response)
                }))
                .bind(&report.message_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let event = MessageEvent {
                message_id: &report.message_id,
                key_id,
                recipient: &r.email,
                status: r.status,
                attempt: last,
                attempt_number,
                tags: &tags,
                metadata,
                reason: r.reason.as_deref(),
                superseded_by: None,
            };
            insert_message_event(&mut *tx, event, now, Some(subscriptions)).await?;
        }
        let (status, next) = recompute_message(tx, &report.message_id, now, report.redact).await?;
        Ok(RecordResult {
            status,
            priority: report.priority,
            next_attempt_at: next,
        })
    }
}

#[async_trait]
impl DeliveryStore for SqlStore {
    async fn claim_many(
        &self,
        ids: &[String],
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<Claim>> {
        let mut tx = self.pool.begin().await?;
        let mut claims = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(claim) = claim_one(&mut tx, id, owner, now, lease_until).await? {
                claims.push(claim);
            }
        }
        tx.commit().await?;
        Ok(claims)
    }

    async fn record_many(&self, reports: &[DeliveryReport]) -> StoreResult<Vec<RecordResult>> {
        let mut tx = self.pool.begin().await?;
        let subscriptions = subscriptions(&mut tx).await?;
        let mut results = Vec::with_capacity(reports.len());
        for report in reports {
            results.push(record_one(&mut tx, report, &subscriptions).await?);
        }
        tx.commit().await?;
        Ok(results)
    }

    async fn sweep(
        &self,
        now: Millis,
        grace: i64,
        limit: i64,
    ) -> StoreResult<Vec<(String, Priority, Millis)>> {
        let found = sqlx::query(&format!(
            "SELECT id, priority, next_attempt_at AS due FROM messages WHERE status IN {NOT_FINAL} \
             AND next_attempt_at <= $1 AND enqueued_at <= $1 \
             AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_attempt_at LIMIT $3"
        ))
        .bind(now - grace)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let due = due_rows(&found)?;
        for (id, _, _) in &due {
            sqlx::query("UPDATE messages SET enqueued_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        Ok(due)
    }

    async fn pending(
        &self,
        _now: Millis,
        limit: i64,
        after: &str,
    ) -> StoreResult<Vec<(String, Priority, Millis)>> {
        let found = sqlx::query(&format!(
            "SELECT id, priority, CASE WHEN lease_until IS NOT NULL AND lease_until > next_attempt_at \
             THEN lease_until ELSE next_attempt_at END AS due FROM messages \
             WHERE status IN {NOT_FINAL} AND id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        due_rows(&found)
    }

    async fn release_leases(&self) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE messages SET lease_until = NULL, lease_owner = NULL WHERE lease_until IS NOT NULL",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expire_overdue(&self, now: Millis, limit: i64) -> StoreResult<u64> {
        let found = sqlx::query(&format!(
            "SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= $1 \
             AND status IN {NOT_FINAL} AND (lease_until IS NULL OR lease_until < $1) LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut expired = 0;
        for row in found {
            let id: String = row.try_get("id")?;
            let mut tx = self.pool.begin().await?;
            let finish = Finish {
                status: Status::Expired,
                reason: "expired",
                superseded_by: None,
                only_email: None,
            };
            expired += finalize_waiting(&mut tx, &id, &finish, now).await?;
            tx.commit().await?;
        }
        Ok(expired)
    }

    async fn suppressed(&self, emails: &[String]) -> StoreResult<Vec<String>> {
        if emails.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = (1..=emails.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!("SELECT email FROM suppressions WHERE email IN ({placeholders})");
        let mut query = sqlx::query_scalar::<_, String>(&sql);
        for e in emails {
            query = query.bind(e.to_lowercase());
        }
        Ok(query.fetch_all(&self.pool).await?)
    }

    async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats> {
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, MIN(CASE WHEN next_attempt_at <= $1 THEN next_attempt_at END) AS oldest \
             FROM messages WHERE status IN {NOT_FINAL}"
        ))
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueStats {
            waiting: row.try_get("n")?,
            oldest_due: row.try_get("oldest")?,
        })
    }
}
