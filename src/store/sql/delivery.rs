//! The delivery side of the store: claim with a lease (a conditional UPDATE,
//! never a lock held across SMTP), record outcomes, sweep lost work, expire.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use sqlx::{AnyConnection, Connection, Row};

use super::events::{
    last_sequences, message_event, subscriptions, write_events, MessageEvent, PendingEvent,
    Subscription,
};
use super::messages::{finalize_waiting, recompute_messages, Finish};
use super::{batch, rows, SqlStore};
use crate::domain::{Attempt, Millis, Outcome, Priority, Status};
use crate::store::records::*;
use crate::store::{DeliveryStore, StoreError, StoreResult};

const NOT_FINAL: &str = "('scheduled','queued','deferred','sending')";
/// The complement of [`NOT_FINAL`].
const FINAL: &str = "('delivered','bounced','failed','suppressed','canceled','expired')";

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

impl SqlStore {
    /// Leases every due message among `ids` (one UPDATE per chunk); returns
    /// the rows taken, each with the MIME to send (read in the same
    /// statement, by one body lookup: the full MIME, or the redacted copy
    /// when the message holds a patch to it).
    ///
    /// Only the primary key may serve this statement. `next_attempt_at + 0`
    /// keeps the planner from answering it with `messages_pending_idx`
    /// (scanning every due message and filtering by id): a prepared
    /// statement's generic plan picks that when the index's statistics say
    /// it is small, and it then costs O(backlog) per claim exactly when a
    /// backlog exists. Nothing here touches an indexed column, so on
    /// Postgres the claim is a HOT update (migration 0004).
    async fn lease_messages(
        tx: &mut AnyConnection,
        ids: &[&str],
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<Leased>> {
        let owner = owner.to_string();
        let found = batch::fetch_in(
            tx,
            &format!(
                "UPDATE messages SET lease_until = $1, lease_owner = $2, updated_at = $3, status = 'sending' \
                 WHERE id IN ({{keys}}) AND status NOT IN {FINAL} AND next_attempt_at + 0 <= $3 \
                 AND (lease_until IS NULL OR lease_until < $3) RETURNING {}, mail_from, mime_patch, \
                 (SELECT {} FROM message_bodies b WHERE b.message_id = messages.id) AS mime_base",
                rows::MESSAGE_COLUMNS,
                rows::mime_base("messages", "b")
            ),
            ids,
            3,
            |q| q.bind(lease_until).bind(owner.clone()).bind(now),
        )
        .await?;
        found
            .iter()
            .map(|row| {
                Ok(Leased {
                    message: rows::message(row)?,
                    mail_from: row.try_get("mail_from")?,
                    mime: rows::sent_mime(row)?,
                })
            })
            .collect()
    }

    /// Marks the due recipients of leased messages `sending`; returns them
    /// by message, in recipient order.
    async fn take_recipients(
        tx: &mut AnyConnection,
        ids: &[&str],
        now: Millis,
    ) -> StoreResult<HashMap<String, Vec<RecipientRecord>>> {
        let found = batch::fetch_in(
            tx,
            &format!(
                "UPDATE recipients SET status = 'sending', updated_at = $1 \
                 WHERE message_id IN ({{keys}}) AND status IN {NOT_FINAL} AND next_attempt_at <= $1 \
                 RETURNING message_id, {}",
                rows::RECIPIENT_COLUMNS
            ),
            ids,
            1,
            |q| q.bind(now),
        )
        .await?;
        let mut by_message: HashMap<String, Vec<RecipientRecord>> = HashMap::new();
        for row in &found {
            by_message
                .entry(row.try_get("message_id")?)
                .or_default()
                .push(rows::recipient(row)?);
        }
        for list in by_message.values_mut() {
            list.sort_by_key(|r| r.idx);
        }
        Ok(by_message)
    }
}

/// The addresses among `recipients` that are on the suppression list
/// (lowercased, as the list stores them).
async fn suppressed_among(
    tx: &mut AnyConnection,
    recipients: impl Iterator<Item = &RecipientRecord>,
) -> StoreResult<HashSet<String>> {
    let mut lower: Vec<String> = recipients.map(|r| r.email.to_lowercase()).collect();
    lower.sort_unstable();
    lower.dedup();
    let keys: Vec<&str> = lower.iter().map(String::as_str).collect();
    let rows = batch::select_in(
        tx,
        "SELECT email FROM suppressions WHERE email IN ({keys})",
        &keys,
    )
    .await?;
    rows.iter().map(|row| Ok(row.try_get("email")?)).collect()
}

/// A message taken by a claim, with what delivery needs beyond its record.
struct Leased {
    message: MessageRecord,
    mail_from: String,
    /// The MIME to send (`None` if the store lost it).
    mime: Option<String>,
}

/// A recipient's new state, as bound into the multi-row UPDATE.
const RECIPIENT_UPDATE_COLS: usize = 10;

async fn update_recipients(tx: &mut AnyConnection, reports: &[DeliveryReport]) -> StoreResult<()> {
    let rows: Vec<(&DeliveryReport, &RecipientResult)> = reports
        .iter()
        .flat_map(|rep| rep.results.iter().map(move |r| (rep, r)))
        .collect();
    for (chunk, size) in batch::padded(&rows, RECIPIENT_UPDATE_COLS) {
        let sql = format!(
            "UPDATE recipients SET status = v.column3, attempts = attempts + v.column4, \
             next_attempt_at = v.column5, smtp_code = COALESCE(v.column6, smtp_code), \
             enhanced_code = COALESCE(v.column7, enhanced_code), response = COALESCE(v.column8, response), \
             canceled_reason = v.column9, updated_at = v.column10 \
             FROM (VALUES {}) AS v WHERE recipients.message_id = v.column1 AND recipients.idx = v.column2",
            batch::values(size, RECIPIENT_UPDATE_COLS, 1)
        );
        let mut query = sqlx::query(&sql);
        for (report, r) in batch::fill(chunk, size) {
            let last = r.attempts.last();
            query = query
                .bind(&report.message_id)
                .bind(r.idx)
                .bind(r.status.as_str())
                .bind(i64::from(!r.attempts.is_empty()))
                .bind(r.next_attempt_at)
                .bind(last.and_then(|a| a.smtp_code).map(i64::from))
                .bind(last.and_then(|a| a.enhanced_code.clone()))
                .bind(last.map(|a| a.response.clone()))
                .bind(r.reason.as_deref())
                .bind(report.now);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn insert_attempts(tx: &mut AnyConnection, reports: &[DeliveryReport]) -> StoreResult<()> {
    let rows: Vec<(&DeliveryReport, &RecipientResult, &Attempt)> = reports
        .iter()
        .flat_map(|rep| {
            rep.results
                .iter()
                .flat_map(move |r| r.attempts.iter().map(move |a| (rep, r, a)))
        })
        .collect();
    for chunk in batch::split(&rows, 10) {
        let sql = format!(
            "INSERT INTO attempts (message_id, recipient_idx, recipient, at, relay, outcome, \
             smtp_code, enhanced_code, response, duration_ms) VALUES {}",
            batch::values(chunk.len(), 10, 1)
        );
        let mut query = sqlx::query(&sql);
        for (report, r, a) in chunk {
            query = query
                .bind(&report.message_id)
                .bind(r.idx)
                .bind(&r.email)
                .bind(report.now - a.duration_ms)
                .bind(&a.relay)
                .bind(outcome_name(&a.outcome))
                .bind(a.smtp_code.map(i64::from))
                .bind(&a.enhanced_code)
                .bind(&a.response)
                .bind(a.duration_ms);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn add_suppressions(tx: &mut AnyConnection, report: &DeliveryReport) -> StoreResult<()> {
    for r in report.results.iter().filter(|r| r.suppress) {
        let reason = r.attempts.last().map_or("hard bounce".to_string(), |a| {
            format!("hard bounce: {}", a.response)
        });
        sqlx::query(
            "INSERT INTO suppressions (email, reason, source, message_id, created_at) \
             VALUES ($1, $2, 'bounce', $3, $4) ON CONFLICT (email) DO NOTHING",
        )
        .bind(r.email.to_lowercase())
        .bind(reason)
        .bind(&report.message_id)
        .bind(report.now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// The events for a group of reports, numbered on from each message's last,
/// and the endpoints they are addressed to.
async fn report_events(
    tx: &mut AnyConnection,
    reports: &[DeliveryReport],
) -> StoreResult<(Vec<PendingEvent>, Vec<Subscription>)> {
    let subscriptions = subscriptions(tx).await?;
    let ids: Vec<&str> = reports.iter().map(|r| r.message_id.as_str()).collect();
    let mut sequences = last_sequences(tx, &ids).await?;
    let mut events = Vec::new();
    for report in reports {
        let tags = serde_json::json!(report.tags);
        for r in &report.results {
            let event = MessageEvent {
                message_id: &report.message_id,
                key_id: &report.key_id,
                recipient: &r.email,
                status: r.status,
                attempt: r.attempts.last(),
                attempt_number: r.prior_attempts + i64::from(!r.attempts.is_empty()),
                tags: &tags,
                metadata: &report.metadata,
                reason: r.reason.as_deref(),
                superseded_by: None,
            };
            events.extend(message_event(
                event,
                &mut sequences,
                &subscriptions,
                report.now,
            ));
        }
    }
    Ok((events, subscriptions))
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
        let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // One lock order for every claimer.
        ids.sort_unstable();
        ids.dedup();
        // A lease need not survive a crash (a lost one only means the
        // message is claimed again), so on Postgres its commit skips the WAL
        // flush (the durable commit of the outcome flushes it anyway). Sent
        // with the BEGIN, in the same round trip.
        let mut conn = self.hot.get(&self.pool).await?;
        let mut tx = self.begin_unflushed_on(&mut conn).await?;
        let taken = Self::lease_messages(&mut tx, &ids, owner, now, lease_until).await?;
        let taken_ids: Vec<&str> = taken.iter().map(|l| l.message.id.as_str()).collect();
        let mut recipients = Self::take_recipients(&mut tx, &taken_ids, now).await?;
        let suppressed = suppressed_among(&mut tx, recipients.values().flatten()).await?;
        let mut claims = Vec::with_capacity(taken.len());
        let mut nothing_due = Vec::new();
        for Leased {
            message,
            mail_from,
            mime,
        } in taken
        {
            match recipients.remove(&message.id) {
                Some(due) => {
                    let mime = mime.ok_or_else(|| {
                        StoreError::Corrupt(format!("message {} has no MIME", message.id))
                    })?;
                    let suppressed = due
                        .iter()
                        .map(|r| r.email.to_lowercase())
                        .filter(|e| suppressed.contains(e))
                        .collect();
                    claims.push(Claim {
                        message,
                        mime,
                        mail_from,
                        recipients: due,
                        suppressed,
                    });
                }
                None => nothing_due.push(message.id),
            }
        }
        if !nothing_due.is_empty() {
            let release: Vec<(&str, bool)> =
                nothing_due.iter().map(|id| (id.as_str(), true)).collect();
            recompute_messages(&mut tx, &release, now).await?;
        }
        tx.commit().await?;
        conn.keep();
        Ok(claims)
    }

    async fn record_many(
        &self,
        reports: &[DeliveryReport],
        handing: Option<&mut Handing<'_>>,
    ) -> StoreResult<Vec<RecordResult>> {
        let mut conn = self.hot.get(&self.pool).await?;
        let mut tx = conn.begin().await?;
        update_recipients(&mut tx, reports).await?;
        insert_attempts(&mut tx, reports).await?;
        for report in reports {
            add_suppressions(&mut tx, report).await?;
        }
        let (events, endpoints) = report_events(&mut tx, reports).await?;
        let handing = handing.map(|h| (h, endpoints.as_slice()));
        write_events(&mut tx, &events, handing).await?;
        let now = reports.iter().map(|r| r.now).max().unwrap_or(0);
        let flags: Vec<(&str, bool)> = reports
            .iter()
            .map(|r| (r.message_id.as_str(), r.redact))
            .collect();
        let mut done = recompute_messages(&mut tx, &flags, now).await?;
        tx.commit().await?;
        conn.keep();
        reports
            .iter()
            .map(|r| {
                let (status, next_attempt_at) = done.remove(&r.message_id).ok_or_else(|| {
                    StoreError::Corrupt(format!("message {} has no recipients", r.message_id))
                })?;
                Ok(RecordResult {
                    status,
                    priority: r.priority,
                    next_attempt_at,
                })
            })
            .collect()
    }

    async fn sweep(
        &self,
        now: Millis,
        before: Millis,
        limit: i64,
    ) -> StoreResult<Vec<(String, Priority, Millis)>> {
        // A message enters the queue at its due time at the earliest, so
        // both bounds must hold for it to have been there before `before`.
        let found = sqlx::query(&format!(
            "SELECT id, priority, next_attempt_at AS due FROM messages WHERE status IN {NOT_FINAL} \
             AND next_attempt_at <= $1 AND enqueued_at <= $1 \
             AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_attempt_at LIMIT $3"
        ))
        .bind(before)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let due = due_rows(&found)?;
        if due.is_empty() {
            return Ok(due);
        }
        let ids: Vec<&str> = due.iter().map(|(id, _, _)| id.as_str()).collect();
        let mut conn = self.pool.acquire().await?;
        batch::fetch_in(
            &mut conn,
            "UPDATE messages SET enqueued_at = $1 WHERE id IN ({keys})",
            &ids,
            1,
            |q| q.bind(now),
        )
        .await?;
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

    async fn extend_lease(&self, id: &str, owner: &str, until: Millis) -> StoreResult<bool> {
        // No indexed column changes: a HOT update on Postgres.
        let done = sqlx::query(
            "UPDATE messages SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 \
             AND lease_until IS NOT NULL",
        )
        .bind(until)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn expire_overdue(&self, now: Millis, limit: i64) -> StoreResult<u64> {
        let found = sqlx::query(&format!(
            "SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= $1 \
             AND next_attempt_at IS NOT NULL AND status IN {NOT_FINAL} \
             AND (lease_until IS NULL OR lease_until < $1) LIMIT $2"
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

    async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats> {
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, MIN(CASE WHEN next_attempt_at <= $1 THEN next_attempt_at END) AS oldest \
             FROM messages WHERE next_attempt_at IS NOT NULL AND status IN {NOT_FINAL}"
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

#[cfg(test)]
mod tests {
    use super::{FINAL, NOT_FINAL};
    use crate::domain::Status;

    #[test]
    fn final_and_not_final_lists_partition_the_statuses() {
        for status in Status::ALL {
            let quoted = format!("'{}'", status.as_str());
            assert_eq!(FINAL.contains(&quoted), status.is_final(), "{status:?}");
            assert_eq!(
                NOT_FINAL.contains(&quoted),
                !status.is_final(),
                "{status:?}"
            );
        }
    }
}
