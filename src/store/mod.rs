//! The `Store` port: the source of truth for keys, templates, messages,
//! recipients, attempts, events, suppressions, idempotency records and
//! webhooks. One SQL adapter ([`SqlStore`]) serves both backends (Postgres
//! and embedded SQLite) through `sqlx::Any`, with a migration set per backend.
//! Nothing outside this module writes SQL or knows which backend is in use.

mod records;
mod sql;

use async_trait::async_trait;

pub use records::*;
pub use sql::SqlStore;

use crate::domain::{Millis, Priority};
use crate::keys::{ApiKey, KeyLimits, KeyMode, Scope};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down: a 503.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A value the database cannot hold as text (Postgres: a NUL character,
    /// or one its encoding lacks): the request's fault, a 422. The HTTP
    /// layer refuses NULs before they get here; this is the safety net.
    #[error("value cannot be stored: {0}")]
    Unstorable(#[source] sqlx::Error),
    /// Anything else: a bug or corrupted data, a 500 that leaks nothing.
    #[error("store error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| {
                    // Postgres: admin shutdown / cannot connect now, connection
                    // exceptions (08), insufficient resources such as "too many
                    // clients" (53); SQLite: busy/locked.
                    matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "5" | "6")
                        || c.starts_with("08")
                        || c.starts_with("53")
                }) =>
            {
                StoreError::Unavailable(e)
            }
            // character_not_in_repertoire, untranslatable_character
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|c| matches!(c.as_ref(), "22021" | "22P05")) =>
            {
                StoreError::Unstorable(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn create_key(&self, key: &ApiKey) -> StoreResult<()>;
    async fn key_by_prefix(&self, prefix: &str) -> StoreResult<Option<ApiKey>>;
    async fn key(&self, id: &str) -> StoreResult<Option<ApiKey>>;
    async fn list_keys(&self) -> StoreResult<Vec<ApiKey>>;
    async fn count_active_keys(&self) -> StoreResult<i64>;
    async fn update_key(&self, id: &str, patch: &KeyPatch) -> StoreResult<Option<ApiKey>>;
    async fn revoke_key(&self, id: &str, now: Millis) -> StoreResult<bool>;
}

/// Fields of a key that `PATCH /v1/keys/{id}` may change.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<Scope>>,
    pub mode: Option<KeyMode>,
    pub limits: Option<KeyLimits>,
    pub allowed_from_domains: Option<Vec<String>>,
}

#[async_trait]
pub trait TemplateStore: Send + Sync {
    /// Every version of every locale of `name`, newest version first.
    async fn template_versions(&self, name: &str) -> StoreResult<Vec<TemplateVersion>>;
    async fn list_templates(&self) -> StoreResult<Vec<TemplateVersion>>;
    /// Stores a new version (number assigned here) and returns it.
    async fn put_template(&self, version: &TemplateVersion) -> StoreResult<TemplateVersion>;
    /// Deletes customer versions; built-ins stay. Returns rows deleted.
    async fn delete_template(&self, name: &str) -> StoreResult<u64>;
    /// Inserts a built-in version if it is not there yet.
    async fn seed_builtin(&self, version: &TemplateVersion) -> StoreResult<()>;
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Commits a group of accepted messages in one transaction: messages,
    /// recipients, idempotency records, collapse cancellations and events.
    async fn accept(&self, batch: &[NewMessage], now: Millis) -> StoreResult<()>;
    async fn message(&self, id: &str) -> StoreResult<Option<MessageRecord>>;
    async fn recipients(&self, id: &str) -> StoreResult<Vec<RecipientRecord>>;
    async fn attempts(&self, id: &str) -> StoreResult<Vec<AttemptRecord>>;
    async fn message_events(&self, id: &str) -> StoreResult<Vec<EventRecord>>;
    async fn raw_mime(&self, id: &str) -> StoreResult<Option<RawMime>>;
    async fn list_messages(&self, filter: &MessageFilter) -> StoreResult<Vec<MessageRecord>>;
    async fn cancel(&self, id: &str, reason: &str, now: Millis) -> StoreResult<CancelResult>;
    async fn usage(&self, key_id: &str, since: Millis) -> StoreResult<Vec<(String, i64)>>;
}

#[async_trait]
pub trait DeliveryStore: Send + Sync {
    /// Takes due messages for delivery with a lease, in one transaction;
    /// messages not due, final, or leased by someone else are left out.
    async fn claim_many(
        &self,
        ids: &[String],
        owner: &str,
        now: Millis,
        lease_until: Millis,
    ) -> StoreResult<Vec<Claim>>;
    /// Records what happened to each recipient of each message, in one
    /// transaction; returns each message's new status and next due time.
    /// With `handing`, the webhook deliveries of the events it writes are
    /// offered to it (see [`Handing`]).
    async fn record_many(
        &self,
        reports: &[DeliveryReport],
        handing: Option<&mut Handing<'_>>,
    ) -> StoreResult<Vec<RecordResult>>;
    /// Messages not leased, due and last enqueued no later than `before`,
    /// which the sweeper has judged the queue to have lost. Marks them
    /// re-enqueued (at `now`).
    async fn sweep(
        &self,
        now: Millis,
        before: Millis,
        limit: i64,
    ) -> StoreResult<Vec<(String, Priority, Millis)>>;
    /// Every message not final and not leased, for rebuilding a volatile queue.
    async fn pending(
        &self,
        now: Millis,
        limit: i64,
        after: &str,
    ) -> StoreResult<Vec<(String, Priority, Millis)>>;
    /// Releases every lease: only for a store no other process can use
    /// (embedded mode), after a restart.
    async fn release_leases(&self) -> StoreResult<u64>;
    /// Extends the lease `owner` holds on a message being delivered to
    /// `until`; false if it holds it no longer (it ended or was taken over).
    async fn extend_lease(&self, id: &str, owner: &str, until: Millis) -> StoreResult<bool>;
    /// Marks waiting recipients whose `expires_at` has passed as expired.
    async fn expire_overdue(&self, now: Millis, limit: i64) -> StoreResult<u64>;
    async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats>;
}

#[async_trait]
pub trait SuppressionStore: Send + Sync {
    async fn list_suppressions(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Suppression>>;
    async fn put_suppression(&self, s: &Suppression) -> StoreResult<()>;
    async fn delete_suppression(&self, email: &str) -> StoreResult<bool>;
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    async fn idem_begin(
        &self,
        req: &IdemRequest,
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<IdemBegin>;
    /// [`idem_begin`](Self::idem_begin) for many requests at once, in
    /// order: keys free now are reserved by one statement; the rest (taken,
    /// expired, or twice in `reqs`) are answered one by one.
    async fn idem_begin_many(
        &self,
        reqs: &[IdemRequest],
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<Vec<IdemBegin>>;
    async fn idem_release(&self, key_id: &str, idem_key: &str) -> StoreResult<()>;
}

#[async_trait]
pub trait EventStore: Send + Sync {
    async fn list_events(&self, filter: &EventFilter) -> StoreResult<Vec<EventRecord>>;
    /// The log position (cursor) of event `id`, if it exists and, with
    /// `key_id`, belongs to that key.
    async fn event_position(&self, id: &str, key_id: Option<&str>) -> StoreResult<Option<i64>>;
}

#[async_trait]
pub trait WebhookStore: Send + Sync {
    async fn create_webhook(&self, w: &Webhook) -> StoreResult<()>;
    async fn webhook(&self, id: &str) -> StoreResult<Option<Webhook>>;
    async fn list_webhooks(&self) -> StoreResult<Vec<Webhook>>;
    async fn update_webhook(&self, w: &Webhook) -> StoreResult<()>;
    async fn delete_webhook(&self, id: &str) -> StoreResult<bool>;
    async fn deliveries(
        &self,
        webhook_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    async fn delivery_attempts(&self, delivery_id: &str) -> StoreResult<Vec<WebhookAttempt>>;
    async fn retry_delivery(
        &self,
        webhook_id: &str,
        delivery_id: &str,
        now: Millis,
    ) -> StoreResult<bool>;
    /// Adds a `webhook.test` event addressed to one endpoint only.
    async fn test_event(&self, webhook_id: &str, now: Millis) -> StoreResult<String>;
    /// The ids of the endpoints not disabled.
    async fn enabled_webhooks(&self) -> StoreResult<Vec<String>>;
    /// Leases due deliveries: at most `limit` in all, taken from the
    /// endpoints in `rooms` in order, from each at most its room, oldest
    /// first (the dispatcher decides the shares).
    async fn claim_webhook_jobs(
        &self,
        now: Millis,
        lease_until: Millis,
        rooms: &[(String, usize)],
        limit: usize,
    ) -> StoreResult<Vec<WebhookJob>>;
    /// Records attempts (in one transaction): each delivery's new state,
    /// its attempt log entry, and the endpoints' failing or disabled state.
    async fn record_webhook_attempts(&self, results: &[WebhookResult]) -> StoreResult<()>;
    async fn webhook_backlog(&self) -> StoreResult<i64>;
}

/// The whole port.
#[async_trait]
pub trait Store:
    KeyStore
    + TemplateStore
    + MessageStore
    + DeliveryStore
    + SuppressionStore
    + IdempotencyStore
    + EventStore
    + WebhookStore
{
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
    fn backend(&self) -> &'static str;
}
