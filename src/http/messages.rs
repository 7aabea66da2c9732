//! Messages: `GET /v1/messages` (filters + cursor), `GET /v1/messages/{id}`
//! (per-recipient status, attempts, event timeline), `GET .../raw` (the MIME
//! handed to the relay), `POST .../cancel`. Keys without `admin` see only
//! their own messages; anyone else's are a 404.

use axum::extract::{Path, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::extract::page;
use super::{AppState, Auth, Params, Routes};
use crate::domain::{format_ms, now_ms, EmailAddress, Status};
use crate::error::ApiError;
use crate::keys::Scope;
use crate::store::{
    AttemptRecord, CancelResult, EventRecord, MessageFilter, MessageRecord, RecipientRecord,
};

pub fn routes(r: Routes) -> Routes {
    r.get("/v1/messages", list)
        .get("/v1/messages/{id}", get)
        .get("/v1/messages/{id}/raw", raw)
        .post("/v1/messages/{id}/cancel", cancel)
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |t| json!(format_ms(t)))
}

pub fn message_view(m: &MessageRecord) -> Value {
    json!({
        "id": m.id,
        "status": m.status.as_str(),
        "priority": m.priority.as_str(),
        "mode": m.mode.as_str(),
        "from": m.from_addr,
        "subject": m.subject,
        "template": m.template,
        "template_version": m.template_version,
        "locale": m.locale,
        "tags": m.tags,
        "metadata": m.metadata,
        "message_id": m.message_id_header,
        "size_bytes": m.size_bytes,
        "created_at": format_ms(m.created_at),
        "updated_at": format_ms(m.updated_at),
        "send_at": opt_time(m.send_at),
        "expires_at": opt_time(m.expires_at),
        "collapse_key": m.collapse_key,
        "canceled_reason": m.canceled_reason,
        "superseded_by": m.superseded_by,
        "next_attempt_at": if m.status.is_final() { Value::Null } else { opt_time(m.next_attempt_at) },
    })
}

fn recipient_view(r: &RecipientRecord) -> Value {
    json!({
        "email": r.email,
        "address": r.address,
        "type": r.kind,
        "status": r.status.as_str(),
        "attempts": r.attempts,
        "smtp_code": r.smtp_code,
        "enhanced_code": r.enhanced_code,
        "smtp_response": r.response,
        "reason": r.canceled_reason,
        "next_attempt_at": if r.status.is_final() { Value::Null } else { opt_time(r.next_attempt_at) },
        "updated_at": format_ms(r.updated_at),
    })
}

fn attempt_view(a: &AttemptRecord) -> Value {
    json!({
        "recipient": a.recipient,
        "at": format_ms(a.at),
        "relay": a.relay,
        "outcome": a.outcome,
        "smtp_code": a.smtp_code,
        "enhanced_code": a.enhanced_code,
        "smtp_response": a.response,
        "duration_ms": a.duration_ms,
    })
}

pub fn event_view(e: &EventRecord) -> Value {
    json!({
        "id": e.id,
        "cursor": e.seq.to_string(),
        "type": e.event_type,
        "timestamp": e.payload.get("timestamp").cloned().unwrap_or_else(|| json!(format_ms(e.created_at))),
        "data": e.payload.get("data").cloned().unwrap_or(Value::Null),
    })
}

/// Loads a message the caller may see, or 404.
async fn visible(state: &AppState, auth: &Auth, id: &str) -> Result<MessageRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("No message {id}."));
    let message = state.store.message(id).await?.ok_or_else(not_found)?;
    if auth.can_see(&message.key_id) {
        Ok(message)
    } else {
        Err(not_found())
    }
}

/// The `to` filter as recipients are stored: an address's canonical form
/// (an IDN domain in ASCII, lower-cased), so that `to=lilei@例子.中国` finds
/// what was sent there; anything that is not an address is matched as given.
fn recipient_key(to: &str) -> String {
    EmailAddress::parse(to).map_or_else(|_| to.to_lowercase(), |e| e.key())
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Read)?;
    params.only(&["status", "tag", "to", "since", "until", "limit", "cursor"])?;
    let status = params
        .str("status")
        .map(|s| {
            Status::parse(s)
                .ok_or_else(|| ApiError::validation("status", "is not a message status"))
        })
        .transpose()?;
    let limit = params.limit()?;
    let filter = MessageFilter {
        key_id: auth.owner_filter(),
        status,
        tag: params.str("tag").map(str::to_string),
        to: params.str("to").map(recipient_key),
        since: params.time("since")?,
        until: params.time("until")?,
        before_id: params
            .str("cursor")
            .map(|c| {
                // A cursor is the last id of a page (a UUID).
                uuid::Uuid::parse_str(c)
                    .map(|_| c.to_string())
                    .map_err(|_| {
                        ApiError::validation("cursor", "must be a cursor from a previous page")
                    })
            })
            .transpose()?,
        // One more than the page, to know whether there is a next one.
        limit: limit + 1,
    };
    let found = state.store.list_messages(&filter).await?;
    let data = found.iter().map(message_view).collect();
    Ok(Json(page(data, limit, |v| {
        v["id"].as_str().map(str::to_string)
    })))
}

async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Read)?;
    let message = visible(&state, &auth, &id).await?;
    let recipients = state.store.recipients(&id).await?;
    let attempts = state.store.attempts(&id).await?;
    let events = state.store.message_events(&id).await?;
    let mut view = message_view(&message);
    view["recipients"] = recipients.iter().map(recipient_view).collect();
    view["attempts"] = attempts.iter().map(attempt_view).collect();
    view["events"] = events.iter().map(event_view).collect();
    Ok(Json(view))
}

async fn raw(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Read)?;
    visible(&state, &auth, &id).await?;
    let raw = state
        .store
        .raw_mime(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No MIME stored for message {id}.")))?;
    let mut response = raw.mime.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/rfc822"),
    );
    headers.insert(
        HeaderName::from_static("mailroom-redacted"),
        HeaderValue::from_static(if raw.redacted { "true" } else { "false" }),
    );
    Ok(response)
}

async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Send)?;
    visible(&state, &auth, &id).await?;
    match state.store.cancel(&id, "canceled by request", now_ms()).await? {
        CancelResult::NotFound => Err(ApiError::NotFound(format!("No message {id}."))),
        CancelResult::NotCancelable(status) => Err(ApiError::Conflict {
            slug: "not-cancelable",
            detail: format!(
                "Message {id} is {} and has no recipient waiting to be sent; it cannot be canceled.",
                status.as_str()
            ),
            retry_after: None,
        }),
        CancelResult::Canceled { .. } => {
            let message = visible(&state, &auth, &id).await?;
            let recipients = state.store.recipients(&id).await?;
            let mut view = message_view(&message);
            view["recipients"] = recipients.iter().map(recipient_view).collect();
            Ok(Json(view))
        }
    }
}
