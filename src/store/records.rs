//! Plain data that crosses the `Store` port: what goes in, what comes out.

use serde_json::Value;

use crate::domain::{Attempt, Millis, Priority, Status};
use crate::keys::KeyMode;

#[derive(Debug, Clone)]
pub struct TemplateVersion {
    pub name: String,
    pub locale: String,
    pub version: i64,
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
    pub required: Vec<String>,
    pub secret: Vec<String>,
    pub description: Option<String>,
    pub priority: Option<Priority>,
    pub builtin: bool,
    pub created_at: Millis,
}

#[derive(Debug, Clone)]
pub struct NewRecipient {
    pub kind: &'static str,
    /// As displayed: `Name <local@domain>`.
    pub address: String,
    /// Envelope address (ASCII domain).
    pub email: String,
}

/// Finishes an idempotency record in the accept transaction.
#[derive(Debug, Clone)]
pub struct IdemFinish {
    pub key_id: String,
    pub idem_key: String,
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub key_id: String,
    pub mode: KeyMode,
    pub status: Status,
    pub priority: Priority,
    pub from_addr: String,
    pub mail_from: String,
    /// Subject with secret variables redacted (what lists and GET show).
    pub subject: String,
    pub template: Option<String>,
    pub template_version: Option<i64>,
    pub locale: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub message_id_header: String,
    /// The MIME to send.
    pub mime: String,
    /// The same MIME with secret values replaced; `None` when there are none.
    pub mime_redacted: Option<String>,
    /// Turns `mime_redacted` into `mime` ([`crate::domain::mime_patch`]);
    /// with it, the store keeps the redacted copy and the patch only.
    pub mime_patch: Option<String>,
    pub send_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub collapse_key: Option<String>,
    pub next_attempt_at: Millis,
    pub recipients: Vec<NewRecipient>,
    pub idempotency: Option<IdemFinish>,
}

#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub id: String,
    pub key_id: String,
    pub mode: KeyMode,
    pub status: Status,
    pub priority: Priority,
    pub from_addr: String,
    pub subject: String,
    pub template: Option<String>,
    pub template_version: Option<i64>,
    pub locale: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub message_id_header: String,
    pub size_bytes: i64,
    pub send_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub collapse_key: Option<String>,
    pub canceled_reason: Option<String>,
    pub superseded_by: Option<String>,
    pub next_attempt_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct RecipientRecord {
    pub idx: i64,
    pub kind: String,
    pub address: String,
    pub email: String,
    pub status: Status,
    pub attempts: i64,
    pub next_attempt_at: Option<Millis>,
    pub smtp_code: Option<i64>,
    pub enhanced_code: Option<String>,
    pub response: Option<String>,
    pub canceled_reason: Option<String>,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub recipient: String,
    pub at: Millis,
    pub relay: String,
    pub outcome: String,
    pub smtp_code: Option<i64>,
    pub enhanced_code: Option<String>,
    pub response: String,
    pub duration_ms: i64,
}

#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub message_id: Option<String>,
    pub recipient: Option<String>,
    pub payload: Value,
    pub created_at: Millis,
}

pub struct RawMime {
    pub mime: String,
    pub redacted: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Only this key's messages (keys without `admin`).
    pub key_id: Option<String>,
    pub status: Option<Status>,
    pub tag: Option<String>,
    pub to: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// Cursor: ids strictly older than this one.
    pub before_id: Option<String>,
    pub limit: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CancelResult {
    NotFound,
    /// Nothing was waiting: the message is final (or all in flight).
    NotCancelable(Status),
    Canceled {
        recipients: u64,
        status: Status,
    },
}

/// A claimed message: the recipients now marked `sending`, and what to send.
#[derive(Debug, Clone)]
pub struct Claim {
    pub message: MessageRecord,
    pub mime: String,
    pub mail_from: String,
    pub recipients: Vec<RecipientRecord>,
    /// Those of `recipients` on the suppression list (lowercased), read in
    /// the claim's own transaction: a message is never claimed without it.
    pub suppressed: std::collections::HashSet<String>,
}

#[derive(Debug, Clone)]
pub struct RecipientResult {
    pub idx: i64,
    pub email: String,
    pub status: Status,
    pub attempts: Vec<Attempt>,
    /// Attempts made before this delivery (from the claim).
    pub prior_attempts: i64,
    pub next_attempt_at: Option<Millis>,
    /// Add the address to the suppression list (hard bounce).
    pub suppress: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub message_id: String,
    /// Copied from the claimed message, for the events.
    pub key_id: String,
    pub priority: Priority,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub now: Millis,
    /// Drop the unredacted MIME once final (false for captured mail).
    pub redact: bool,
    pub results: Vec<RecipientResult>,
}

#[derive(Debug, Clone)]
pub struct RecordResult {
    pub status: Status,
    pub priority: Priority,
    pub next_attempt_at: Option<Millis>,
}

#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    /// Messages not final.
    pub waiting: i64,
    /// Due time of the oldest due message still waiting.
    pub oldest_due: Option<Millis>,
}

#[derive(Debug, Clone)]
pub struct Suppression {
    pub email: String,
    pub reason: String,
    pub source: String,
    pub message_id: Option<String>,
    pub created_at: Millis,
}

#[derive(Debug, Clone)]
pub struct IdemRequest {
    pub key_id: String,
    pub idem_key: String,
    pub request_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdemBegin {
    /// This request owns the key now.
    Reserved,
    /// Same key, same body, finished: the original response.
    Replay { status: u16, body: String },
    /// Same key, different body.
    Mismatch,
    /// Same key, first request still running.
    InFlight,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub after_seq: Option<i64>,
    pub event_type: Option<String>,
    pub key_id: Option<String>,
    /// Only events created before this time (lets concurrent commits settle).
    pub created_before: Millis,
    pub limit: i64,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// Event types subscribed to; empty means all.
    pub events: Vec<String>,
    pub description: Option<String>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<Millis>,
    pub disabled_at: Option<Millis>,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<Millis>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct WebhookAttempt {
    pub at: Millis,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

/// Fresh webhook deliveries handed, as an outcome transaction writes them,
/// to the webhook dispatcher of the process that writes them: each one
/// `take` accepts (the dispatcher has a free request slot for its endpoint)
/// is written already leased until `lease_until` and comes back in `jobs`,
/// to be posted as soon as the transaction commits — no claim, no lease
/// update and no read back. The others (`left`) are written unleased, for
/// a claim to find.
pub struct Handing<'a> {
    pub lease_until: Millis,
    pub take: &'a mut (dyn FnMut(&str) -> bool + Send),
    pub jobs: Vec<WebhookJob>,
    pub left: usize,
}

impl<'a> Handing<'a> {
    pub fn new(lease_until: Millis, take: &'a mut (dyn FnMut(&str) -> bool + Send)) -> Self {
        Handing {
            lease_until,
            take,
            jobs: Vec::new(),
            left: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WebhookJob {
    pub delivery_id: String,
    pub event_id: String,
    pub payload: String,
    pub attempts: i64,
    pub webhook: Webhook,
}

#[derive(Debug, Clone)]
pub struct WebhookResult {
    pub delivery_id: String,
    pub webhook_id: String,
    pub now: Millis,
    pub status_code: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub success: bool,
    /// When to try again; `None` with `success == false` means exhausted.
    pub next_attempt_at: Option<Millis>,
    /// Disable the endpoint (410 Gone, or failing for too long).
    pub disable_reason: Option<String>,
}
