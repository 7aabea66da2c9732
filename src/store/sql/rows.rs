//! Row → record decoding, and the column lists the queries select.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{json_col, string_list};
use crate::domain::{mime_patch, Priority, Status};
use crate::keys::{ApiKey, KeyLimits, KeyMode, Scope};
use crate::store::records::*;
use crate::store::{StoreError, StoreResult};

pub const KEY_COLUMNS: &str = "id, prefix, secret_hash, name, scopes, mode, rate_millis, \
    burst, daily_quota, monthly_quota, per_recipient_hourly, allowed_from_domains, created_at, revoked_at, \
    timezone";

pub const TEMPLATE_COLUMNS: &str = "name, locale, version, subject, html, text_body, required, \
    secret, description, priority, builtin, created_at";

pub const MESSAGE_COLUMNS: &str = "id, key_id, mode, status, priority, from_addr, subject, \
    template, template_version, locale, tags, metadata, message_id_header, size_bytes, send_at, \
    expires_at, collapse_key, canceled_reason, superseded_by, next_attempt_at, created_at, updated_at";

pub const RECIPIENT_COLUMNS: &str = "idx, kind, address, email, status, attempts, \
    next_attempt_at, smtp_code, enhanced_code, response, canceled_reason, updated_at";

pub const WEBHOOK_COLUMNS: &str = "id, url, events, description, secret, previous_secret, \
    previous_secret_until, disabled_at, disabled_reason, failing_since, created_at, updated_at";

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

pub fn status(row: &AnyRow, col: &str) -> StoreResult<Status> {
    let text: String = row.try_get(col)?;
    Status::parse(&text).ok_or_else(|| corrupt(col, &text))
}

fn priority(row: &AnyRow, col: &str) -> StoreResult<Priority> {
    let text: String = row.try_get(col)?;
    Priority::parse(&text).ok_or_else(|| corrupt(col, &text))
}

pub fn key(row: &AnyRow) -> StoreResult<ApiKey> {
    let scopes: String = row.try_get("scopes")?;
    let mode: String = row.try_get("mode")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        prefix: row.try_get("prefix")?,
        secret_hash: row.try_get("secret_hash")?,
        name: row.try_get("name")?,
        scopes: scopes.split(',').filter_map(Scope::parse).collect(),
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("mode", &mode))?,
        limits: KeyLimits {
            rate_per_second: row
                .try_get::<Option<i64>, _>("rate_millis")?
                .map(|m| m as f64 / 1000.0),
            burst: row.try_get("burst")?,
            daily_quota: row.try_get("daily_quota")?,
            monthly_quota: row.try_get("monthly_quota")?,
            per_recipient_hourly: row.try_get("per_recipient_hourly")?,
            timezone: row.try_get("timezone")?,
        },
        allowed_from_domains: string_list(row, "allowed_from_domains")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

pub fn template(row: &AnyRow) -> StoreResult<TemplateVersion> {
    let priority: Option<String> = row.try_get("priority")?;
    let builtin: i64 = row.try_get("builtin")?;
    Ok(TemplateVersion {
        name: row.try_get("name")?,
        locale: row.try_get("locale")?,
        version: row.try_get("version")?,
        subject: row.try_get("subject")?,
        html: row.try_get("html")?,
        text: row.try_get("text_body")?,
        required: string_list(row, "required")?,
        secret: string_list(row, "secret")?,
        description: row.try_get("description")?,
        priority: priority.as_deref().and_then(Priority::parse),
        builtin: builtin != 0,
        created_at: row.try_get("created_at")?,
    })
}

pub fn message(row: &AnyRow) -> StoreResult<MessageRecord> {
    let mode: String = row.try_get("mode")?;
    Ok(MessageRecord {
        id: row.try_get("id")?,
        key_id: row.try_get("key_id")?,
        mode: KeyMode::parse(&mode).ok_or_else(|| corrupt("mode", &mode))?,
        status: status(row, "status")?,
        priority: priority(row, "priority")?,
        from_addr: row.try_get("from_addr")?,
        subject: row.try_get("subject")?,
        template: row.try_get("template")?,
        template_version: row.try_get("template_version")?,
        locale: row.try_get("locale")?,
        tags: string_list(row, "tags")?,
        metadata: json_col(row, "metadata")?,
        message_id_header: row.try_get("message_id_header")?,
        size_bytes: row.try_get("size_bytes")?,
        send_at: row.try_get("send_at")?,
        expires_at: row.try_get("expires_at")?,
        collapse_key: row.try_get("collapse_key")?,
        canceled_reason: row.try_get("canceled_reason")?,
        superseded_by: row.try_get("superseded_by")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub fn recipient(row: &AnyRow) -> StoreResult<RecipientRecord> {
    Ok(RecipientRecord {
        idx: row.try_get("idx")?,
        kind: row.try_get("kind")?,
        address: row.try_get("address")?,
        email: row.try_get("email")?,
        status: status(row, "status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        smtp_code: row.try_get("smtp_code")?,
        enhanced_code: row.try_get("enhanced_code")?,
        response: row.try_get("response")?,
        canceled_reason: row.try_get("canceled_reason")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// SQL for the stored base of the MIME as sent (select it `AS mime_base`,
/// beside the message's `mime_patch`): the full MIME, or the redacted copy
/// when the message holds a patch to it. `messages` and `bodies` name the
/// two rows.
pub fn mime_base(messages: &str, bodies: &str) -> String {
    format!(
        "CASE WHEN {messages}.mime_patch IS NULL THEN {bodies}.mime \
         ELSE {bodies}.mime_redacted END"
    )
}

/// The MIME as sent, from a row with `mime_base` and `mime_patch`; `None`
/// once only the redacted copy is left (or the store lost the body).
pub fn sent_mime(row: &AnyRow) -> StoreResult<Option<String>> {
    let base: Option<String> = row.try_get("mime_base")?;
    match (base, row.try_get::<Option<String>, _>("mime_patch")?) {
        (Some(redacted), Some(patch)) => mime_patch::apply(&redacted, &patch)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
        (base, None) => Ok(base),
        (None, Some(_)) => Ok(None),
    }
}

pub fn event(row: &AnyRow) -> StoreResult<EventRecord> {
    Ok(EventRecord {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        event_type: row.try_get("type")?,
        message_id: row.try_get("message_id")?,
        recipient: row.try_get("recipient")?,
        payload: json_col(row, "payload")?,
        created_at: row.try_get("created_at")?,
    })
}

pub fn webhook(row: &AnyRow) -> StoreResult<Webhook> {
    let events: String = row.try_get("events")?;
    Ok(Webhook {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        events: events
            .split(',')
            .filter(|e| !e.is_empty() && *e != "*")
            .map(str::to_string)
            .collect(),
        description: row.try_get("description")?,
        secret: row.try_get("secret")?,
        previous_secret: row.try_get("previous_secret")?,
        previous_secret_until: row.try_get("previous_secret_until")?,
        disabled_at: row.try_get("disabled_at")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: row.try_get("failing_since")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Stored form of a subscription list: `,a,b,` (or `*` for all), so that a
/// `LIKE '%,type,%'` matches exactly one type.
pub fn events_column(events: &[String]) -> String {
    if events.is_empty() {
        "*".to_string()
    } else {
        format!(",{},", events.join(","))
    }
}
