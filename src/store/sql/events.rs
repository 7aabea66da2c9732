//! The durable event log. Events are written inside the transaction that
//! changes a status, together with one pending webhook delivery per
//! subscribed endpoint, so neither can be lost or written alone.

use async_trait::async_trait;
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};

use super::{rows, SqlStore};
use crate::domain::{format_ms, new_id, Attempt, Millis, Status};
use crate::store::{EventFilter, EventRecord, EventStore, StoreResult};

/// What a message event says about one recipient.
pub struct MessageEvent<'a> {
    pub message_id: &'a str,
    pub key_id: &'a str,
    pub recipient: &'a str,
    pub status: Status,
    pub attempt: Option<&'a Attempt>,
    pub attempt_number: i64,
    pub tags: &'a Value,
    pub metadata: &'a Value,
    pub reason: Option<&'a str>,
    pub superseded_by: Option<&'a str>,
}

/// An enabled webhook endpoint and its stored subscription list.
pub type Subscription = (String, String);

/// Enabled endpoints, read once for a group of events.
pub async fn subscriptions(conn: &mut AnyConnection) -> StoreResult<Vec<Subscription>> {
    let found = sqlx::query("SELECT id, events FROM webhooks WHERE disabled_at IS NULL")
        .fetch_all(&mut *conn)
        .await?;
    found
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("events")?)))
        .collect()
}

fn subscribed(events: &str, event_type: &str) -> bool {
    events == "*" || events.contains(&format!(",{event_type},"))
}

/// Writes the event for a status change (if the status is announced).
/// `subscriptions`: the enabled endpoints if the caller already read them.
pub async fn insert_message_event(
    conn: &mut AnyConnection,
    e: MessageEvent<'_>,
    now: Millis,
    subscriptions: Option<&[Subscription]>,
) -> StoreResult<()> {
    let Some(event_type) = e.status.event_type() else {
        return Ok(());
    };
    let sequence: i64 = sqlx::query(
        "SELECT COALESCE(MAX(message_seq), 0) + 1 AS s FROM events WHERE message_id = $1",
    )
    .bind(e.message_id)
    .fetch_one(&mut *conn)
    .await?
    .try_get("s")?;
    let mut data = json!({
        "message_id": e.message_id,
        "recipient": e.recipient,
        "status": e.status.as_str(),
        "smtp_code": e.attempt.and_then(|a| a.smtp_code),
        "enhanced_code": e.attempt.and_then(|a| a.enhanced_code.clone()),
        "smtp_response": e.attempt.map(|a| a.response.clone()),
        "relay": e.attempt.map(|a| a.relay.clone()),
        "attempt": e.attempt_number,
        "sequence": sequence,
        "tags": e.tags,
        "metadata": e.metadata,
    });
    if let Some(reason) = e.reason {
        data["reason"] = json!(reason);
    }
    if let Some(newer) = e.superseded_by {
        data["superseded_by"] = json!(newer);
    }
    let event = NewEvent {
        event_type,
        message_id: Some(e.message_id),
        key_id: Some(e.key_id),
        recipient: Some(e.recipient),
        message_seq: sequence,
        data,
        only_webhook: None,
        subscriptions,
    };
    insert_event(conn, event, now).await.map(|_| ())
}

pub struct NewEvent<'a> {
    pub event_type: &'a str,
    pub message_id: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub recipient: Option<&'a str>,
    pub message_seq: i64,
    pub data: Value,
    /// Deliver to this endpoint only (test events); otherwise to subscribers.
    pub only_webhook: Option<&'a str>,
    /// Enabled endpoints, when the caller already read them.
    pub subscriptions: Option<&'a [Subscription]>,
}

pub async fn insert_event(
    conn: &mut AnyConnection,
    e: NewEvent<'_>,
    now: Millis,
) -> StoreResult<String> {
    let id = format!("evt_{}", new_id().replace('-', ""));
    let payload = json!({"type": e.event_type, "timestamp": format_ms(now), "data": e.data});
    sqlx::query(
        "INSERT INTO events (id, type, message_id, key_id, recipient, message_seq, payload, created_at) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
    )
    .bind(&id)
    .bind(e.event_type)
    .bind(e.message_id)
    .bind(e.key_id)
    .bind(e.recipient)
    .bind(e.message_seq)
    .bind(payload.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let read;
    let subs = match (e.only_webhook, e.subscriptions) {
        (Some(_), _) => &[][..],
        (None, Some(subs)) => subs,
        (None, None) => {
            read = subscriptions(conn).await?;
            &read[..]
        }
    };
    let targets: Vec<String> = match e.only_webhook {
        Some(webhook) => vec![webhook.to_string()],
        None => subs
            .iter()
            .filter(|(_, events)| subscribed(events, e.event_type))
            .map(|(id, _)| id.clone())
            .collect(),
    };
    for webhook_id in targets {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, status, attempts, \
             next_attempt_at, created_at, updated_at) VALUES ($1,$2,$3,'pending',0,$4,$4,$4)",
        )
        .bind(format!("dlv_{}", new_id().replace('-', "")))
        .bind(&webhook_id)
        .bind(&id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(id)
}

#[async_trait]
impl EventStore for SqlStore {
    async fn list_events(&self, f: &EventFilter) -> StoreResult<Vec<EventRecord>> {
        let found = sqlx::query(
            "SELECT seq, id, type, message_id, recipient, payload, created_at FROM events \
             WHERE seq > $1 AND created_at < $2 AND type <> 'webhook.test' \
             AND ($3 IS NULL OR type = $3) AND ($4 IS NULL OR key_id = $4) \
             ORDER BY seq LIMIT $5",
        )
        .bind(f.after_seq.unwrap_or(0))
        .bind(f.created_before)
        .bind(f.event_type.as_deref())
        .bind(f.key_id.as_deref())
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::event).collect()
    }
}
