//! The durable event log. Events are written inside the transaction that
//! changes a status, together with one pending webhook delivery per
//! subscribed endpoint, so neither can be lost or written alone.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::AnyConnection;

use super::{batch, rows, SqlStore};
use crate::domain::{format_ms, new_id, Attempt, Millis, Status};
use crate::store::{
    EventFilter, EventRecord, EventStore, Handing, StoreResult, Webhook, WebhookJob,
};

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

/// An enabled webhook endpoint (all of it: a delivery handed to the
/// dispatcher as it is written is posted without reading it again).
pub type Subscription = Webhook;

/// Enabled endpoints, read once for a group of events.
pub async fn subscriptions(conn: &mut AnyConnection) -> StoreResult<Vec<Subscription>> {
    let found = sqlx::query(&format!(
        "SELECT {} FROM webhooks WHERE disabled_at IS NULL",
        rows::WEBHOOK_COLUMNS
    ))
    .fetch_all(&mut *conn)
    .await?;
    found.iter().map(rows::webhook).collect()
}

/// An endpoint's subscription list, empty for all events.
fn subscribed(webhook: &Webhook, event_type: &str) -> bool {
    webhook.events.is_empty() || webhook.events.iter().any(|e| e == event_type)
}

/// The last per-message event sequence of each message (0 if none yet).
pub async fn last_sequences(
    conn: &mut AnyConnection,
    message_ids: &[&str],
) -> StoreResult<HashMap<String, i64>> {
    Ok(batch::select_map(
        conn,
        "SELECT message_id AS k, MAX(message_seq) AS v FROM events \
         WHERE message_id IN ({keys}) GROUP BY message_id",
        message_ids,
    )
    .await?)
}

/// Builds the event for a status change (`None` if the status is not
/// announced). `sequences` holds each message's last sequence and is
/// advanced.
pub fn message_event(
    e: MessageEvent<'_>,
    sequences: &mut HashMap<String, i64>,
    subscriptions: &[Subscription],
    now: Millis,
) -> Option<PendingEvent> {
    let event_type = e.status.event_type()?;
    let sequence = sequences.entry(e.message_id.to_string()).or_insert(0);
    *sequence += 1;
    let data = MessageEventData {
        attempt: e.attempt_number,
        enhanced_code: e.attempt.and_then(|a| a.enhanced_code.as_deref()),
        message_id: e.message_id,
        metadata: e.metadata,
        reason: e.reason,
        recipient: e.recipient,
        relay: e.attempt.map(|a| a.relay.as_str()),
        sequence: *sequence,
        smtp_code: e.attempt.and_then(|a| a.smtp_code),
        smtp_response: e.attempt.map(|a| a.response.as_str()),
        status: e.status.as_str(),
        superseded_by: e.superseded_by,
        tags: e.tags,
    };
    let event = NewEvent {
        event_type,
        message_id: Some(e.message_id),
        key_id: Some(e.key_id),
        recipient: Some(e.recipient),
        message_seq: *sequence,
        data: serde_json::to_string(&data).unwrap_or_else(|_| "null".into()),
        only_webhook: None,
    };
    Some(event.pending(subscriptions, now))
}

/// A message event's `data`, serialized straight from borrowed fields (no
/// intermediate `Value` tree, no copies of tags and metadata). Fields are
/// in alphabetical order: the order `json!`'s sorted map gave them, so the
/// payload bytes are unchanged.
#[derive(serde::Serialize)]
struct MessageEventData<'a> {
    attempt: i64,
    enhanced_code: Option<&'a str>,
    message_id: &'a str,
    metadata: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    recipient: &'a str,
    relay: Option<&'a str>,
    sequence: i64,
    smtp_code: Option<u16>,
    smtp_response: Option<&'a str>,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    superseded_by: Option<&'a str>,
    tags: &'a Value,
}

/// The stored payload: `{"data":…,"timestamp":…,"type":…}` around `data`,
/// already serialized.
fn payload(event_type: &str, timestamp: &str, data: &str) -> String {
    let quote = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"data\":{data},\"timestamp\":{},\"type\":{}}}",
        quote(timestamp),
        quote(event_type)
    )
}

pub struct NewEvent<'a> {
    pub event_type: &'a str,
    pub message_id: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub recipient: Option<&'a str>,
    pub message_seq: i64,
    /// The event's `data`, serialized JSON.
    pub data: String,
    /// Deliver to this endpoint only (test events); otherwise to subscribers.
    pub only_webhook: Option<&'a str>,
}

impl NewEvent<'_> {
    /// The row to write, with one webhook delivery per subscribed endpoint.
    pub fn pending(self, subscriptions: &[Subscription], now: Millis) -> PendingEvent {
        let targets = match self.only_webhook {
            Some(webhook) => vec![webhook.to_string()],
            None => subscriptions
                .iter()
                .filter(|w| subscribed(w, self.event_type))
                .map(|w| w.id.clone())
                .collect(),
        };
        PendingEvent {
            id: format!("evt_{}", new_id().replace('-', "")),
            event_type: self.event_type.to_string(),
            message_id: self.message_id.map(str::to_string),
            key_id: self.key_id.map(str::to_string),
            recipient: self.recipient.map(str::to_string),
            message_seq: self.message_seq,
            payload: payload(self.event_type, &format_ms(now), &self.data),
            created_at: now,
            targets,
        }
    }
}

/// An event ready to be written, with the endpoints it goes to.
pub struct PendingEvent {
    pub id: String,
    event_type: String,
    message_id: Option<String>,
    key_id: Option<String>,
    recipient: Option<String>,
    message_seq: i64,
    payload: String,
    created_at: Millis,
    targets: Vec<String>,
}

/// Writes events and their pending webhook deliveries: one multi-row
/// statement each (per chunk). With `handing` (and the endpoints the events
/// were addressed from), each delivery is offered to it first.
pub async fn write_events(
    conn: &mut AnyConnection,
    events: &[PendingEvent],
    mut handing: Option<(&mut Handing<'_>, &[Subscription])>,
) -> StoreResult<()> {
    for chunk in batch::split(events, 8) {
        let sql = format!(
            "INSERT INTO events (id, type, message_id, key_id, recipient, message_seq, payload, \
             created_at) VALUES {}",
            batch::values(chunk.len(), 8, 1)
        );
        let mut query = sqlx::query(&sql);
        for e in chunk {
            query = query
                .bind(&e.id)
                .bind(&e.event_type)
                .bind(e.message_id.as_deref())
                .bind(e.key_id.as_deref())
                .bind(e.recipient.as_deref())
                .bind(e.message_seq)
                .bind(&e.payload)
                .bind(e.created_at);
        }
        query.execute(&mut *conn).await?;
    }
    let deliveries: Vec<(&PendingEvent, &String)> = events
        .iter()
        .flat_map(|e| e.targets.iter().map(move |t| (e, t)))
        .collect();
    for chunk in batch::split(&deliveries, 5) {
        let sql = format!(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, next_attempt_at, status, \
             attempts, created_at, updated_at, lease_until) SELECT v.column1, v.column2, \
             v.column3, v.column4, 'pending', 0, v.column4, v.column4, v.column5 \
             FROM (VALUES {}) AS v",
            batch::values(chunk.len(), 5, 1)
        );
        let mut query = sqlx::query(&sql);
        for (event, webhook_id) in chunk {
            let id = format!("dlv_{}", new_id().replace('-', ""));
            let lease_until = match handing.as_mut() {
                Some((h, endpoints)) => hand(h, endpoints, event, webhook_id, &id),
                None => None,
            };
            query = query
                .bind(id)
                .bind(webhook_id.as_str())
                .bind(&event.id)
                .bind(event.created_at)
                .bind(lease_until);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Offers one delivery to `handing`: its lease if taken (and its job added
/// to those to post), `None` if it is left for a claim.
fn hand(
    handing: &mut Handing<'_>,
    endpoints: &[Subscription],
    event: &PendingEvent,
    webhook_id: &str,
    delivery_id: &str,
) -> Option<Millis> {
    let webhook = endpoints.iter().find(|w| w.id == webhook_id);
    match webhook {
        Some(webhook) if (handing.take)(webhook_id) => {
            handing.jobs.push(WebhookJob {
                delivery_id: delivery_id.to_string(),
                event_id: event.id.clone(),
                payload: event.payload.clone(),
                attempts: 0,
                webhook: webhook.clone(),
            });
            Some(handing.lease_until)
        }
        _ => {
            handing.left += 1;
            None
        }
    }
}

/// Writes one event (reading the subscriptions itself); returns its id.
pub async fn insert_event(
    conn: &mut AnyConnection,
    e: NewEvent<'_>,
    now: Millis,
) -> StoreResult<String> {
    let subs = match e.only_webhook {
        Some(_) => Vec::new(),
        None => subscriptions(conn).await?,
    };
    let event = e.pending(&subs, now);
    write_events(conn, std::slice::from_ref(&event), None).await?;
    Ok(event.id)
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

    async fn event_position(&self, id: &str, key_id: Option<&str>) -> StoreResult<Option<i64>> {
        let seq = sqlx::query_scalar(
            "SELECT seq FROM events WHERE id = $1 AND ($2 IS NULL OR key_id = $2)",
        )
        .bind(id)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The payload as `json!` built it before (sorted keys, `reason` and
    /// `superseded_by` only when set).
    fn with_json_macro(e: &MessageEvent<'_>, sequence: i64, now: Millis) -> String {
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
        let event_type = e.status.event_type().unwrap_or_default();
        json!({"type": event_type, "timestamp": format_ms(now), "data": data}).to_string()
    }

    #[test]
    fn payloads_are_byte_for_byte_what_json_gave() {
        let attempt = Attempt {
            relay: "primary".into(),
            outcome: crate::domain::Outcome::Transient,
            smtp_code: Some(451),
            enhanced_code: Some("4.7.1".into()),
            response: "try \"later\" \u{2014} greylisted\n".into(),
            duration_ms: 12,
        };
        let tags = json!(["otp", "sign-up"]);
        let metadata =
            json!({"user_id": "42", "nested": {"z": 1, "a": [true, null]}, "名前": "李雷"});
        let none = json!({});
        let cases = [
            (
                Status::Delivered,
                Some(&attempt),
                None,
                None,
                &tags,
                &metadata,
            ),
            (Status::Deferred, Some(&attempt), None, None, &tags, &none),
            (
                Status::Canceled,
                None,
                Some("superseded"),
                Some("0190-newer"),
                &none,
                &metadata,
            ),
            (
                Status::Bounced,
                Some(&attempt),
                Some("hard bounce"),
                None,
                &tags,
                &none,
            ),
        ];
        for (status, attempt, reason, superseded_by, tags, metadata) in cases {
            let e = MessageEvent {
                message_id: "0190abcd-0000-7000-8000-000000000001",
                key_id: "key_1",
                recipient: "ada@example.com",
                status,
                attempt,
                attempt_number: 2,
                tags,
                metadata,
                reason,
                superseded_by,
            };
            let expected = with_json_macro(&e, 3, 1_700_000_000_123);
            let mut sequences = HashMap::from([(e.message_id.to_string(), 2)]);
            let event = message_event(e, &mut sequences, &[], 1_700_000_000_123).unwrap();
            assert_eq!(event.payload, expected, "{status:?}");
        }
    }

    fn endpoint(id: &str) -> Webhook {
        Webhook {
            id: id.into(),
            url: format!("https://hooks.example.com/{id}"),
            events: Vec::new(),
            description: None,
            secret: "whsec_test".into(),
            previous_secret: None,
            previous_secret_until: None,
            disabled_at: None,
            disabled_reason: None,
            failing_since: None,
            created_at: 1,
            updated_at: 1,
        }
    }

    /// A delivery the dispatcher takes is written leased and comes back as
    /// a job to post; one it does not is written unleased, for a claim.
    #[tokio::test]
    async fn deliveries_taken_by_the_dispatcher_are_written_leased_and_returned() {
        use crate::store::Store;
        let store = SqlStore::connect("sqlite::memory:", 1).await.unwrap();
        store.migrate().await.unwrap();
        let endpoints = vec![endpoint("wh_a"), endpoint("wh_b")];
        let event = NewEvent {
            event_type: "message.delivered",
            message_id: Some("m1"),
            key_id: Some("k1"),
            recipient: Some("a@example.com"),
            message_seq: 1,
            data: "{}".into(),
            only_webhook: None,
        }
        .pending(&endpoints, 1_000);
        let mut offered = Vec::new();
        let mut take = |id: &str| {
            offered.push(id.to_string());
            id == "wh_a"
        };
        let mut handing = Handing::new(31_000, &mut take);
        let mut conn = store.pool.acquire().await.unwrap();
        write_events(
            &mut conn,
            std::slice::from_ref(&event),
            Some((&mut handing, &endpoints)),
        )
        .await
        .unwrap();
        let Handing { jobs, left, .. } = handing;
        assert_eq!(offered, ["wh_a", "wh_b"]);
        assert_eq!(left, 1);
        assert_eq!(jobs.len(), 1);
        assert_eq!(
            (
                jobs[0].webhook.id.as_str(),
                jobs[0].event_id.as_str(),
                jobs[0].attempts
            ),
            ("wh_a", event.id.as_str(), 0)
        );
        assert_eq!(jobs[0].payload, event.payload);
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT id, webhook_id, lease_until FROM webhook_deliveries ORDER BY webhook_id",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].0.as_str(), rows[0].2),
            (jobs[0].delivery_id.as_str(), Some(31_000))
        );
        assert_eq!((rows[1].1.as_str(), rows[1].2), ("wh_b", None));
    }
}
