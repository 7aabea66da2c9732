//! Messages and recipients: the accept transaction (with idempotency and
//! collapse keys), reads, lists, cancel, usage counts.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{AnyConnection, Connection, Row};

use super::batch::{self, AnyQuery};
use super::events::{last_sequences, message_event, subscriptions, write_events, MessageEvent};
use super::{rows, to_json, Backend, SqlStore};
use crate::domain::{Millis, Status};
use crate::store::records::*;
use crate::store::{MessageStore, StoreError, StoreResult};

const WAITING: &str = "('scheduled','queued','deferred')";

/// Columns bound per message row.
const MESSAGE_INSERT_COLS: usize = 23;
/// Columns bound per body row.
const BODY_INSERT_COLS: usize = 3;
/// Columns bound per recipient row.
const RECIPIENT_INSERT_COLS: usize = 9;

const MESSAGES_INSERT: &str =
    "INSERT INTO messages (id, key_id, mode, status, priority, from_addr, \
     mail_from, subject, template, template_version, locale, tags, metadata, message_id_header, \
     size_bytes, send_at, expires_at, collapse_key, next_attempt_at, enqueued_at, created_at, \
     updated_at, mime_patch)";

fn messages_insert_sql(rows: usize, first: usize) -> String {
    format!(
        "{MESSAGES_INSERT} VALUES {}",
        batch::values(rows, MESSAGE_INSERT_COLS, first)
    )
}

fn bind_messages<'q>(
    mut query: AnyQuery<'q>,
    messages: impl IntoIterator<Item = &'q NewMessage>,
    now: Millis,
) -> AnyQuery<'q> {
    for m in messages {
        query = query
            .bind(&m.id)
            .bind(&m.key_id)
            .bind(m.mode.as_str())
            .bind(m.status.as_str())
            .bind(m.priority.as_str())
            .bind(&m.from_addr)
            .bind(&m.mail_from)
            .bind(&m.subject)
            .bind(&m.template)
            .bind(m.template_version)
            .bind(&m.locale)
            .bind(to_json(&m.tags))
            .bind(m.metadata.to_string())
            .bind(&m.message_id_header)
            .bind(m.mime.len() as i64)
            .bind(m.send_at)
            .bind(m.expires_at)
            .bind(&m.collapse_key)
            .bind(m.next_attempt_at)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(&m.mime_patch);
    }
    query
}

const BODIES_INSERT: &str = "INSERT INTO message_bodies (message_id, mime, mime_redacted)";

fn bodies_insert_sql(rows: usize, first: usize) -> String {
    format!(
        "{BODIES_INSERT} VALUES {}",
        batch::values(rows, BODY_INSERT_COLS, first)
    )
}

fn bind_bodies<'q>(
    mut query: AnyQuery<'q>,
    messages: impl IntoIterator<Item = &'q NewMessage>,
) -> AnyQuery<'q> {
    for m in messages {
        // With a patch the sent MIME is the redacted copy patched, not a
        // second full copy.
        let mime = m.mime_patch.is_none().then_some(&m.mime);
        query = query.bind(&m.id).bind(mime).bind(&m.mime_redacted);
    }
    query
}

/// Each recipient row with its message and position.
type RecipientRow<'a> = (&'a NewMessage, usize, &'a NewRecipient);

fn recipient_rows<'a>(messages: &[&'a NewMessage]) -> Vec<RecipientRow<'a>> {
    messages
        .iter()
        .flat_map(|m| {
            m.recipients
                .iter()
                .enumerate()
                .map(move |(i, r)| (*m, i, r))
        })
        .collect()
}

const RECIPIENTS_INSERT: &str = "INSERT INTO recipients (message_id, idx, kind, address, email, \
     status, attempts, next_attempt_at, updated_at)";

fn recipients_insert_sql(rows: usize, first: usize) -> String {
    format!(
        "{RECIPIENTS_INSERT} VALUES {}",
        batch::values(rows, RECIPIENT_INSERT_COLS, first)
    )
}

fn bind_recipients<'a, 'q: 'a>(
    mut query: AnyQuery<'q>,
    rows: impl IntoIterator<Item = &'a RecipientRow<'q>>,
    now: Millis,
) -> AnyQuery<'q> {
    for (m, i, r) in rows {
        query = query
            .bind(&m.id)
            .bind(*i as i64)
            .bind(r.kind)
            .bind(&r.address)
            .bind(&r.email)
            .bind(m.status.as_str())
            .bind(0_i64)
            .bind(m.next_attempt_at)
            .bind(now);
    }
    query
}

/// `WITH m AS (INSERT messages), b AS (INSERT bodies), r AS (INSERT
/// recipients) SELECT 1` for `messages` message rows and `recipients`
/// recipient rows, both padded (see [`padded_insert`]), and with
/// `idempotency` rows (padded too) `i AS (UPDATE idempotency …)`, which
/// stores the keyed sends' answers in the same statement.
fn one_statement_insert_sql(messages: usize, recipients: usize, idempotency: usize) -> String {
    let bodies_from = 1 + messages * MESSAGE_INSERT_COLS;
    let recipients_from = bodies_from + messages * BODY_INSERT_COLS;
    let finish = match idempotency {
        0 => String::new(),
        rows => format!(
            ", i AS ({})",
            idempotency_update_sql(rows, recipients_from + recipients * RECIPIENT_INSERT_COLS)
        ),
    };
    format!(
        "WITH m AS ({}), b AS ({}), r AS ({}){finish} SELECT 1",
        padded_insert(MESSAGES_INSERT, messages, MESSAGE_INSERT_COLS, 1, "column1"),
        padded_insert(
            BODIES_INSERT,
            messages,
            BODY_INSERT_COLS,
            bodies_from,
            "column1"
        ),
        padded_insert(
            RECIPIENTS_INSERT,
            recipients,
            RECIPIENT_INSERT_COLS,
            recipients_from,
            "column1, column2"
        )
    )
}

/// An insert of `rows` rows padded up to a power of two by repeating the
/// last one, so that a group of any size up to a chunk is one prepared
/// statement (and one round trip, its own transaction) instead of one per
/// power-of-two piece in a transaction of their own. `DISTINCT ON` the
/// table's key drops the repeats: the real rows never share a key (their
/// message ids are new).
fn padded_insert(insert: &str, rows: usize, cols: usize, first: usize, key: &str) -> String {
    format!(
        "{insert} SELECT DISTINCT ON ({key}) * FROM (VALUES {}) AS v",
        batch::values(rows, cols, first)
    )
}

/// One statement's share of an accepted group: its messages and their
/// recipients, each with the row count bound (padded to a power of two).
struct InsertChunk<'a> {
    messages: &'a [&'a NewMessage],
    message_rows: usize,
    recipients: Vec<RecipientRow<'a>>,
    recipient_rows: usize,
    /// The keyed sends' answers, when the statement stores them too.
    idempotency: Vec<&'a IdemFinish>,
    idempotency_rows: usize,
}

impl<'a> InsertChunk<'a> {
    fn new(messages: &'a [&'a NewMessage], message_rows: usize) -> Self {
        let recipients = recipient_rows(messages);
        let recipient_rows = recipients.len().next_power_of_two();
        InsertChunk {
            messages,
            message_rows,
            recipients,
            recipient_rows,
            idempotency: Vec::new(),
            idempotency_rows: 0,
        }
    }

    /// Makes the chunk's statement store its keyed sends' answers as well
    /// (for a group that is one chunk, whose statement is then its whole
    /// transaction).
    fn finish_idempotency_too(&mut self) {
        self.idempotency = idempotency_of(self.messages.iter().copied());
        self.idempotency_rows = match self.idempotency.len() {
            0 => 0,
            n => n.next_power_of_two(),
        };
    }

    fn params(&self) -> usize {
        self.message_rows * (MESSAGE_INSERT_COLS + BODY_INSERT_COLS)
            + self.recipient_rows * RECIPIENT_INSERT_COLS
            + self.idempotency_rows * IDEM_FINISH_COLS
    }

    fn sql(&self) -> String {
        one_statement_insert_sql(
            self.message_rows,
            self.recipient_rows,
            self.idempotency_rows,
        )
    }

    fn bind<'q>(&'q self, sql: &'q str, now: Millis) -> AnyQuery<'q> {
        let messages = || batch::fill(self.messages, self.message_rows).copied();
        let query = bind_messages(sqlx::query(sql), messages(), now);
        let query = bind_bodies(query, messages());
        let query = bind_recipients(
            query,
            batch::fill(&self.recipients, self.recipient_rows),
            now,
        );
        bind_idempotency(
            query,
            batch::fill(&self.idempotency, self.idempotency_rows).copied(),
        )
    }
}

impl SqlStore {
    /// Inserts messages and their recipients: one multi-row statement per
    /// table (per chunk), whatever the group size.
    async fn insert_messages(
        &self,
        conn: &mut AnyConnection,
        messages: &[&NewMessage],
        now: Millis,
    ) -> StoreResult<()> {
        for chunk in batch::split(messages, MESSAGE_INSERT_COLS) {
            let sql = messages_insert_sql(chunk.len(), 1);
            bind_messages(sqlx::query(&sql), chunk.iter().copied(), now)
                .execute(&mut *conn)
                .await?;
            let sql = bodies_insert_sql(chunk.len(), 1);
            bind_bodies(sqlx::query(&sql), chunk.iter().copied())
                .execute(&mut *conn)
                .await?;
        }
        let rows = recipient_rows(messages);
        for chunk in batch::split(&rows, RECIPIENT_INSERT_COLS) {
            let sql = recipients_insert_sql(chunk.len(), 1);
            bind_recipients(sqlx::query(&sql), chunk, now)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Postgres, messages without a collapse key: the three inserts in one
    /// statement per chunk of up to 64 messages, padded (see
    /// [`padded_insert`]). A group that fits one chunk is one round trip:
    /// its statement, which also marks its keyed sends' idempotency records
    /// done, is its own transaction. A bigger group's statements share one
    /// transaction, with one more statement for the idempotency records.
    /// `false` if the group does not qualify.
    async fn insert_in_one_statement(
        &self,
        messages: &[NewMessage],
        now: Millis,
    ) -> StoreResult<bool> {
        let plain = messages.iter().all(|m| m.collapse_key.is_none());
        if self.backend != Backend::Postgres || !plain {
            return Ok(false);
        }
        let rows: Vec<&NewMessage> = messages.iter().collect();
        let mut chunks: Vec<InsertChunk> = batch::padded(
            &rows,
            MESSAGE_INSERT_COLS + BODY_INSERT_COLS + RECIPIENT_INSERT_COLS,
        )
        .into_iter()
        .map(|(chunk, size)| InsertChunk::new(chunk, size))
        .collect();
        if let [only] = chunks.as_mut_slice() {
            only.finish_idempotency_too();
        }
        if chunks.iter().any(|c| c.params() > batch::MAX_PARAMS) {
            return Ok(false);
        }
        let mut conn = self.hot.get(&self.pool).await?;
        if let [only] = chunks.as_slice() {
            let sql = only.sql();
            only.bind(&sql, now).execute(&mut *conn).await?;
        } else {
            let mut tx = conn.begin().await?;
            for chunk in &chunks {
                let sql = chunk.sql();
                chunk.bind(&sql, now).execute(&mut *tx).await?;
            }
            finish_idempotency(&mut tx, messages).await?;
            tx.commit().await?;
        }
        conn.keep();
        Ok(true)
    }

    /// Cancels older waiting messages with the same key, collapse key and
    /// recipient. The upsert on `collapse_heads` serialises racing senders.
    async fn collapse(
        &self,
        conn: &mut AnyConnection,
        m: &NewMessage,
        now: Millis,
    ) -> StoreResult<()> {
        let Some(collapse_key) = &m.collapse_key else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO collapse_heads (key_id, collapse_key, message_id) VALUES ($1,$2,$3) \
             ON CONFLICT (key_id, collapse_key) DO UPDATE SET message_id = excluded.message_id",
        )
        .bind(&m.key_id)
        .bind(collapse_key)
        .bind(&m.id)
        .execute(&mut *conn)
        .await?;
        for r in &m.recipients {
            let email = r.email.to_lowercase();
            let older = sqlx::query(&format!(
                "SELECT DISTINCT r.message_id FROM recipients r JOIN messages o ON o.id = r.message_id \
                 WHERE o.key_id = $1 AND o.collapse_key = $2 AND LOWER(r.email) = $3 AND r.message_id <> $4 \
                 AND r.status IN {WAITING}"
            ))
            .bind(&m.key_id)
            .bind(collapse_key)
            .bind(&email)
            .bind(&m.id)
            .fetch_all(&mut *conn)
            .await?;
            for row in older {
                let older_id: String = row.try_get("message_id")?;
                let finish = Finish {
                    status: Status::Canceled,
                    reason: "superseded",
                    superseded_by: Some(&m.id),
                    only_email: Some(&email),
                };
                finalize_waiting(conn, &older_id, &finish, now).await?;
                sqlx::query("UPDATE messages SET superseded_by = $2, canceled_reason = 'superseded' WHERE id = $1")
                    .bind(&older_id)
                    .bind(&m.id)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }
}

/// How to end waiting recipients without sending (cancel, collapse, expiry).
pub struct Finish<'a> {
    pub status: Status,
    pub reason: &'a str,
    pub superseded_by: Option<&'a str>,
    /// Only this recipient (its address lowercased; compared ignoring case).
    pub only_email: Option<&'a str>,
}

/// Moves waiting recipients of one message to a final status, with events,
/// then recomputes the message. Returns how many recipients changed.
pub async fn finalize_waiting(
    conn: &mut AnyConnection,
    message_id: &str,
    finish: &Finish<'_>,
    now: Millis,
) -> StoreResult<u64> {
    let changed = sqlx::query(&format!(
        "UPDATE recipients SET status = $2, canceled_reason = $3, next_attempt_at = NULL, updated_at = $4 \
         WHERE message_id = $1 AND status IN {WAITING} AND ($5 IS NULL OR LOWER(email) = $5) \
         RETURNING email, attempts"
    ))
    .bind(message_id)
    .bind(finish.status.as_str())
    .bind(finish.reason)
    .bind(now)
    .bind(finish.only_email)
    .fetch_all(&mut *conn)
    .await?;
    if changed.is_empty() {
        return Ok(0);
    }
    let msg = sqlx::query("SELECT key_id, tags, metadata FROM messages WHERE id = $1")
        .bind(message_id)
        .fetch_one(&mut *conn)
        .await?;
    let key_id: String = msg.try_get("key_id")?;
    let tags = super::json_col(&msg, "tags")?;
    let metadata = super::json_col(&msg, "metadata")?;
    let subscriptions = subscriptions(conn).await?;
    let mut sequences = last_sequences(conn, &[message_id]).await?;
    let mut events = Vec::with_capacity(changed.len());
    for row in &changed {
        let email: String = row.try_get("email")?;
        let attempts: i64 = row.try_get("attempts")?;
        let event = MessageEvent {
            message_id,
            key_id: &key_id,
            recipient: &email,
            status: finish.status,
            attempt: None,
            attempt_number: attempts,
            tags: &tags,
            metadata: &metadata,
            reason: Some(finish.reason),
            superseded_by: finish.superseded_by,
        };
        events.extend(message_event(event, &mut sequences, &subscriptions, now));
    }
    write_events(conn, &events, None).await?;
    recompute_message(conn, message_id, now, true).await?;
    Ok(changed.len() as u64)
}

/// Re-derives one message's status and next due time from its recipients;
/// see [`recompute_messages`].
pub async fn recompute_message(
    conn: &mut AnyConnection,
    message_id: &str,
    now: Millis,
    redact: bool,
) -> StoreResult<(Status, Option<Millis>)> {
    let mut done = recompute_messages(conn, &[(message_id, redact)], now).await?;
    done.remove(message_id)
        .ok_or_else(|| StoreError::Corrupt(format!("message {message_id} has no recipients")))
}

/// Re-derives each message's status and next due time from its recipients,
/// releases its lease, and (when final and its flag is set) drops the
/// unredacted MIME so secret values do not outlive delivery. Three
/// statements for the whole group (read, update, redact).
pub async fn recompute_messages(
    conn: &mut AnyConnection,
    messages: &[(&str, bool)],
    now: Millis,
) -> StoreResult<HashMap<String, (Status, Option<Millis>)>> {
    let mut found: HashMap<String, (Vec<Status>, Option<Millis>)> = HashMap::new();
    let ids: Vec<&str> = messages.iter().map(|(id, _)| *id).collect();
    let statuses = batch::select_in(
        conn,
        "SELECT message_id, status, next_attempt_at FROM recipients WHERE message_id IN ({keys})",
        &ids,
    )
    .await?;
    for row in statuses {
        let status = rows::status(&row, "status")?;
        let due: Option<Millis> = row.try_get("next_attempt_at")?;
        let entry = found.entry(row.try_get("message_id")?).or_default();
        if let (false, Some(due)) = (status.is_final(), due) {
            entry.1 = Some(entry.1.map_or(due, |n| n.min(due)));
        }
        entry.0.push(status);
    }
    let mut out = HashMap::with_capacity(found.len());
    let mut updates = Vec::with_capacity(found.len());
    for (id, redact) in messages {
        let Some((statuses, next)) = found.remove(*id) else {
            continue;
        };
        let status = Status::aggregate(statuses);
        // `next_attempt_at` is NULL exactly when the message is final: the
        // due-work indexes rely on it (migration 0004).
        let next = if status.is_final() {
            None
        } else {
            Some(next.unwrap_or(now))
        };
        updates.push((*id, status, next, status.is_final() && *redact));
        out.insert(id.to_string(), (status, next));
    }
    for (chunk, size) in batch::padded(&updates, 4) {
        // A final message that is redacted loses the patch to its sent MIME.
        let sql = format!(
            "UPDATE messages SET status = v.column2, next_attempt_at = v.column3, updated_at = $1, \
             lease_until = NULL, lease_owner = NULL, \
             mime_patch = CASE WHEN v.column4 = 1 THEN NULL ELSE messages.mime_patch END \
             FROM (VALUES {}) AS v WHERE messages.id = v.column1",
            batch::values(size, 4, 2)
        );
        let mut query = sqlx::query(&sql).bind(now);
        for (id, status, next, redact) in batch::fill(chunk, size) {
            query = query
                .bind(*id)
                .bind(status.as_str())
                .bind(*next)
                .bind(i64::from(*redact));
        }
        query.execute(&mut *conn).await?;
    }
    let redact: Vec<&str> = updates
        .iter()
        .filter(|(_, _, _, redact)| *redact)
        .map(|(id, ..)| *id)
        .collect();
    batch::select_in(
        conn,
        "UPDATE message_bodies SET mime = NULL WHERE mime_redacted IS NOT NULL \
         AND mime IS NOT NULL AND message_id IN ({keys})",
        &redact,
    )
    .await?;
    Ok(out)
}

/// A parameter of the list query.
#[derive(Debug, PartialEq)]
enum ListBind {
    Text(String),
    Int(i64),
}

/// The list query for `f`, with a condition only for each filter given, so
/// that the planner sees each one as it is: a recipient filter becomes a
/// semi-join it may start from `recipients_email_lower_idx` (inside an
/// `$n IS NULL OR EXISTS …` it could only be tested message by message,
/// newest first, scanning every message for a rare address).
fn list_query(f: &MessageFilter) -> (String, Vec<ListBind>) {
    let mut conditions: Vec<String> = Vec::new();
    let mut binds = Vec::new();
    let mut add = |condition: &str, bind: ListBind| {
        binds.push(bind);
        conditions.push(condition.replace("$?", &format!("${}", binds.len())));
    };
    if let Some(key_id) = &f.key_id {
        add("key_id = $?", ListBind::Text(key_id.clone()));
    }
    if let Some(status) = f.status {
        add("status = $?", ListBind::Text(status.as_str().to_string()));
    }
    if let Some(tag) = &f.tag {
        let escaped = tag
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        add(
            "tags LIKE $? ESCAPE '\\'",
            ListBind::Text(format!("%\"{escaped}\"%")),
        );
    }
    if let Some(to) = &f.to {
        add(
            "id IN (SELECT message_id FROM recipients WHERE LOWER(email) = $?)",
            ListBind::Text(to.to_lowercase()),
        );
    }
    if let Some(since) = f.since {
        add("created_at >= $?", ListBind::Int(since));
    }
    if let Some(until) = f.until {
        add("created_at < $?", ListBind::Int(until));
    }
    if let Some(before) = &f.before_id {
        add("id < $?", ListBind::Text(before.clone()));
    }
    binds.push(ListBind::Int(f.limit));
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {} ", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {} FROM messages {filter}ORDER BY id DESC LIMIT ${}",
        rows::MESSAGE_COLUMNS,
        binds.len()
    );
    (sql, binds)
}

#[async_trait]
impl MessageStore for SqlStore {
    async fn accept(&self, batch: &[NewMessage], now: Millis) -> StoreResult<()> {
        if self.insert_in_one_statement(batch, now).await? {
            return Ok(());
        }
        let mut conn = self.hot.get(&self.pool).await?;
        let mut tx = conn.begin().await?;
        // Messages with a collapse key go one at a time, in order, so that
        // the newest of a group supersedes the older ones.
        let (collapsing, plain): (Vec<&NewMessage>, Vec<&NewMessage>) =
            batch.iter().partition(|m| m.collapse_key.is_some());
        self.insert_messages(&mut tx, &plain, now).await?;
        for m in collapsing {
            self.insert_messages(&mut tx, &[m], now).await?;
            self.collapse(&mut tx, m, now).await?;
        }
        finish_idempotency(&mut tx, batch).await?;
        tx.commit().await?;
        conn.keep();
        Ok(())
    }

    async fn message(&self, id: &str) -> StoreResult<Option<MessageRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM messages WHERE id = $1",
            rows::MESSAGE_COLUMNS
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::message).transpose()
    }

    async fn recipients(&self, id: &str) -> StoreResult<Vec<RecipientRecord>> {
        let found = sqlx::query(&format!(
            "SELECT {} FROM recipients WHERE message_id = $1 ORDER BY idx",
            rows::RECIPIENT_COLUMNS
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::recipient).collect()
    }

    async fn attempts(&self, id: &str) -> StoreResult<Vec<AttemptRecord>> {
        let found = sqlx::query(
            "SELECT recipient, at, relay, outcome, smtp_code, enhanced_code, response, duration_ms \
             FROM attempts WHERE message_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
            .map(|r| {
                Ok(AttemptRecord {
                    recipient: r.try_get("recipient")?,
                    at: r.try_get("at")?,
                    relay: r.try_get("relay")?,
                    outcome: r.try_get("outcome")?,
                    smtp_code: r.try_get("smtp_code")?,
                    enhanced_code: r.try_get("enhanced_code")?,
                    response: r.try_get("response")?,
                    duration_ms: r.try_get("duration_ms")?,
                })
            })
            .collect()
    }

    async fn message_events(&self, id: &str) -> StoreResult<Vec<EventRecord>> {
        let found = sqlx::query(
            "SELECT seq, id, type, message_id, recipient, payload, created_at FROM events \
             WHERE message_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        found.iter().map(rows::event).collect()
    }

    async fn raw_mime(&self, id: &str) -> StoreResult<Option<RawMime>> {
        let row = sqlx::query(&format!(
            "SELECT {} AS mime_base, b.mime_redacted, m.mime_patch FROM message_bodies b \
             JOIN messages m ON m.id = b.message_id WHERE b.message_id = $1",
            rows::mime_base("m", "b")
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if let Some(mime) = rows::sent_mime(&row)? {
            return Ok(Some(RawMime {
                mime,
                redacted: false,
            }));
        }
        let redacted: Option<String> = row.try_get("mime_redacted")?;
        Ok(redacted.map(|mime| RawMime {
            mime,
            redacted: true,
        }))
    }

    async fn list_messages(&self, f: &MessageFilter) -> StoreResult<Vec<MessageRecord>> {
        let (sql, binds) = list_query(f);
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = match bind {
                ListBind::Text(text) => query.bind(text),
                ListBind::Int(n) => query.bind(n),
            };
        }
        let found = query.fetch_all(&self.pool).await?;
        found.iter().map(rows::message).collect()
    }

    async fn cancel(&self, id: &str, reason: &str, now: Millis) -> StoreResult<CancelResult> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query("SELECT status FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(CancelResult::NotFound);
        };
        let current = rows::status(&row, "status")?;
        let finish = Finish {
            status: Status::Canceled,
            reason,
            superseded_by: None,
            only_email: None,
        };
        let changed = finalize_waiting(&mut tx, id, &finish, now).await?;
        if changed == 0 {
            return Ok(CancelResult::NotCancelable(current));
        }
        sqlx::query("UPDATE messages SET canceled_reason = $2 WHERE id = $1")
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        let status = rows::status(
            &sqlx::query("SELECT status FROM messages WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?,
            "status",
        )?;
        tx.commit().await?;
        Ok(CancelResult::Canceled {
            recipients: changed,
            status,
        })
    }

    async fn usage(&self, key_id: &str, since: Millis) -> StoreResult<Vec<(String, i64)>> {
        let found = sqlx::query(
            "SELECT r.status AS status, COUNT(*) AS n FROM recipients r JOIN messages m ON m.id = r.message_id \
             WHERE m.key_id = $1 AND m.created_at >= $2 GROUP BY r.status",
        )
        .bind(key_id)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        found
            .iter()
            .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
            .collect()
    }
}

/// Parameters of one row of [`idempotency_update_sql`].
const IDEM_FINISH_COLS: usize = 4;

/// The keyed sends' answers among `messages`.
fn idempotency_of<'a>(messages: impl Iterator<Item = &'a NewMessage>) -> Vec<&'a IdemFinish> {
    messages.filter_map(|m| m.idempotency.as_ref()).collect()
}

/// Marks `rows` idempotency records done with their answers (parameters
/// from `$first`; rows padded by repeating the last, which updates nothing
/// twice).
fn idempotency_update_sql(rows: usize, first: usize) -> String {
    format!(
        "UPDATE idempotency SET state = 'done', response_status = v.column3, \
         response_body = v.column4 FROM (VALUES {}) AS v \
         WHERE idempotency.key_id = v.column1 AND idempotency.idem_key = v.column2",
        batch::values(rows, IDEM_FINISH_COLS, first)
    )
}

fn bind_idempotency<'q>(
    mut query: AnyQuery<'q>,
    rows: impl IntoIterator<Item = &'q IdemFinish>,
) -> AnyQuery<'q> {
    for idem in rows {
        query = query
            .bind(&idem.key_id)
            .bind(&idem.idem_key)
            .bind(i64::from(idem.status))
            .bind(&idem.body);
    }
    query
}

/// Stores the answer of each keyed send of an accepted group, for replays:
/// one statement per chunk of up to 64; none for a group without keys.
async fn finish_idempotency(conn: &mut AnyConnection, messages: &[NewMessage]) -> StoreResult<()> {
    let idems = idempotency_of(messages.iter());
    for (chunk, size) in batch::padded(&idems, IDEM_FINISH_COLS) {
        let sql = idempotency_update_sql(size, 1);
        bind_idempotency(sqlx::query(&sql), batch::fill(chunk, size).copied())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        list_query, one_statement_insert_sql, ListBind, BODY_INSERT_COLS, IDEM_FINISH_COLS,
        MESSAGE_INSERT_COLS, RECIPIENT_INSERT_COLS,
    };
    use crate::domain::Status;
    use crate::store::records::MessageFilter;

    fn filter() -> MessageFilter {
        MessageFilter {
            limit: 50,
            ..MessageFilter::default()
        }
    }

    /// The accept statement numbers its parameters 1..=n, each once, in the
    /// order they are bound: messages, bodies, recipients, idempotency.
    #[test]
    fn the_accept_statement_binds_every_parameter_once_in_order() {
        for (messages, recipients, idempotency) in [(1, 1, 0), (4, 8, 0), (1, 1, 1), (8, 16, 4)] {
            let sql = one_statement_insert_sql(messages, recipients, idempotency);
            let mut numbers: Vec<usize> = sql
                .split('$')
                .skip(1)
                .map(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().unwrap()
                })
                .collect();
            let expected = messages * (MESSAGE_INSERT_COLS + BODY_INSERT_COLS)
                + recipients * RECIPIENT_INSERT_COLS
                + idempotency * IDEM_FINISH_COLS;
            assert_eq!(numbers.len(), expected, "{sql}");
            assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{sql}");
            numbers.dedup();
            assert_eq!((numbers[0], numbers[numbers.len() - 1]), (1, expected));
            assert_eq!(sql.contains("UPDATE idempotency"), idempotency > 0);
        }
    }

    #[test]
    fn a_list_without_filters_has_no_conditions() {
        let (sql, binds) = list_query(&filter());
        assert!(
            sql.ends_with("FROM messages ORDER BY id DESC LIMIT $1"),
            "{sql}"
        );
        assert_eq!(binds, [ListBind::Int(50)]);
    }

    #[test]
    fn each_filter_given_is_one_condition_numbered_in_order() {
        let f = MessageFilter {
            key_id: Some("k1".into()),
            status: Some(Status::Delivered),
            tag: Some("50%_off\\".into()),
            to: Some("Ann@Example.COM".into()),
            since: Some(10),
            until: Some(20),
            before_id: Some("m9".into()),
            limit: 7,
        };
        let (sql, binds) = list_query(&f);
        let conditions = sql
            .split_once("WHERE ")
            .and_then(|(_, rest)| rest.split_once(" ORDER BY"))
            .map(|(c, _)| c)
            .unwrap_or_default();
        assert_eq!(
            conditions,
            "key_id = $1 AND status = $2 AND tags LIKE $3 ESCAPE '\\' AND \
             id IN (SELECT message_id FROM recipients WHERE LOWER(email) = $4) AND \
             created_at >= $5 AND created_at < $6 AND id < $7"
        );
        assert!(sql.ends_with("LIMIT $8"), "{sql}");
        let text = |s: &str| ListBind::Text(s.to_string());
        assert_eq!(
            binds,
            [
                text("k1"),
                text("delivered"),
                text("%\"50\\%\\_off\\\\\"%"),
                text("ann@example.com"),
                ListBind::Int(10),
                ListBind::Int(20),
                text("m9"),
                ListBind::Int(7),
            ]
        );
    }

    #[test]
    fn a_recipient_filter_alone_is_a_semi_join_on_the_lowered_address() {
        let f = MessageFilter {
            to: Some("x@y.z".into()),
            ..filter()
        };
        let (sql, binds) = list_query(&f);
        assert!(sql.contains(
            "WHERE id IN (SELECT message_id FROM recipients WHERE LOWER(email) = $1) ORDER BY"
        ));
        assert_eq!(binds.len(), 2);
    }
}
