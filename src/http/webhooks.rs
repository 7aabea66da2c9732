//! Webhook endpoints (admin): create (the `whsec_` secret is in this
//! response only), list, read, update, delete, rotate the secret (the old one
//! keeps signing for 24 h), list deliveries with their attempts, retry a
//! delivery, send a test event. URLs are checked against SSRF rules here and
//! again at every attempt.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::extract::{object, page, page_sorted};
use super::{AppState, Auth, JsonBody, Params, Routes};
use crate::domain::{format_ms, new_id, now_ms, Status};
use crate::error::{ApiError, FieldError};
use crate::keys::Scope;
use crate::store::{Webhook, WebhookDelivery};
use crate::webhooks::{signing, ssrf};

const ROTATION_GRACE_MS: i64 = 24 * 3_600_000;

pub fn routes(r: Routes) -> Routes {
    r.post("/v1/webhooks", create)
        .get("/v1/webhooks", list)
        .get("/v1/webhooks/{id}", get)
        .patch("/v1/webhooks/{id}", patch)
        .delete("/v1/webhooks/{id}", delete)
        .post("/v1/webhooks/{id}/rotate-secret", rotate)
        .get("/v1/webhooks/{id}/deliveries", deliveries)
        .post("/v1/webhooks/{id}/deliveries/{delivery_id}/retry", retry)
        // PRODUCT.md calls it a replay: both names answer.
        .post("/v1/webhooks/{id}/deliveries/{delivery_id}/replay", retry)
        .post("/v1/webhooks/{id}/test", test)
}

/// Every event type a webhook can subscribe to (and `/v1/events` filter by).
pub(crate) fn event_types() -> Vec<&'static str> {
    Status::ALL.iter().filter_map(|s| s.event_type()).collect()
}

fn view(w: &Webhook) -> Value {
    json!({
        "id": w.id,
        "url": w.url,
        "events": if w.events.is_empty() { json!(event_types()) } else { json!(w.events) },
        "description": w.description,
        "enabled": w.disabled_at.is_none(),
        "disabled_at": w.disabled_at.map(format_ms),
        "disabled_reason": w.disabled_reason,
        "failing_since": w.failing_since.map(format_ms),
        "created_at": format_ms(w.created_at),
        "updated_at": format_ms(w.updated_at),
    })
}

fn delivery_view(d: &WebhookDelivery) -> Value {
    json!({
        "id": d.id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.filter(|_| d.status == "pending").map(format_ms),
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": format_ms(d.created_at),
        "updated_at": format_ms(d.updated_at),
    })
}

async fn check_url(state: &AppState, url: &str) -> Result<String, ApiError> {
    ssrf::check(url, state.config.webhook_allow_private)
        .await
        .map(|u| u.to_string())
        .map_err(|e| ApiError::validation("url", format!("{e}")))
}

fn parse_events(obj: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Vec<String>> {
    let value = obj.get("events")?;
    let known = event_types();
    match value {
        Value::Null => Some(Vec::new()),
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str().filter(|t| known.contains(t)) {
                    Some(t) => out.push(t.to_string()),
                    None => errors.push(FieldError::new(
                        format!("events[{i}]"),
                        format!("must be one of {}", known.join(", ")),
                    )),
                }
            }
            Some(out)
        }
        _ => {
            errors.push(FieldError::new("events", "must be an array of event types"));
            None
        }
    }
}

fn parse_description(
    obj: &Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> Option<Option<String>> {
    match obj.get("description")? {
        Value::Null => Some(None),
        Value::String(d) if d.len() <= 500 => Some(Some(d.clone())),
        _ => {
            errors.push(FieldError::new(
                "description",
                "must be a string of at most 500 characters",
            ));
            None
        }
    }
}

async fn create(
    State(state): State<AppState>,
    auth: Auth,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let obj = object(&body, &["url", "events", "description"])?;
    let mut errors = Vec::new();
    let events = parse_events(obj, &mut errors).unwrap_or_default();
    let description = parse_description(obj, &mut errors).flatten();
    let url = match obj.get("url").and_then(Value::as_str) {
        Some(u) => Some(u.to_string()),
        None => {
            errors.push(FieldError::new("url", "is required"));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let url = check_url(&state, &url.unwrap_or_default()).await?;
    let now = now_ms();
    let webhook = Webhook {
        id: format!("wh_{}", new_id().replace('-', "")),
        url,
        events,
        description,
        secret: signing::new_secret(),
        previous_secret: None,
        previous_secret_until: None,
        disabled_at: None,
        disabled_reason: None,
        failing_since: None,
        created_at: now,
        updated_at: now,
    };
    state.store.create_webhook(&webhook).await?;
    let mut v = view(&webhook);
    v["secret"] = json!(webhook.secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    params.only(&["limit", "cursor"])?;
    let data: Vec<Value> = state
        .store
        .list_webhooks()
        .await?
        .iter()
        .map(view)
        .collect();
    Ok(Json(page_sorted(data, &params, |v| {
        v["id"].as_str().unwrap_or_default().to_string()
    })?))
}

async fn find(state: &AppState, id: &str) -> Result<Webhook, ApiError> {
    state
        .store
        .webhook(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No webhook {id}.")))
}

async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    Ok(Json(view(&find(&state, &id).await?)))
}

async fn patch(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    let mut w = find(&state, &id).await?;
    let obj = object(&body, &["url", "events", "description", "enabled"])?;
    let mut errors = Vec::new();
    if let Some(events) = parse_events(obj, &mut errors) {
        w.events = events;
    }
    if let Some(description) = parse_description(obj, &mut errors) {
        w.description = description;
    }
    let enabled = match obj.get("enabled") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            errors.push(FieldError::new("enabled", "must be true or false"));
            None
        }
    };
    let url = match obj.get("url") {
        None => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => {
            errors.push(FieldError::new("url", "must be a string"));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    if let Some(url) = url {
        w.url = check_url(&state, &url).await?;
    }
    let now = now_ms();
    match enabled {
        Some(true) => {
            w.disabled_at = None;
            w.disabled_reason = None;
            w.failing_since = None;
        }
        Some(false) if w.disabled_at.is_none() => {
            w.disabled_at = Some(now);
            w.disabled_reason = Some("disabled by request".into());
        }
        _ => {}
    }
    w.updated_at = now;
    state.store.update_webhook(&w).await?;
    Ok(Json(view(&w)))
}

async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    if state.store.delete_webhook(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("No webhook {id}.")))
    }
}

async fn rotate(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    let mut w = find(&state, &id).await?;
    let now = now_ms();
    w.previous_secret = Some(std::mem::replace(&mut w.secret, signing::new_secret()));
    w.previous_secret_until = Some(now + ROTATION_GRACE_MS);
    w.updated_at = now;
    state.store.update_webhook(&w).await?;
    let mut v = view(&w);
    v["secret"] = json!(w.secret);
    v["previous_secret_expires_at"] = json!(format_ms(now + ROTATION_GRACE_MS));
    Ok(Json(v))
}

async fn deliveries(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    params.only(&["limit", "cursor"])?;
    find(&state, &id).await?;
    let limit = params.limit()?;
    let found = state
        .store
        .deliveries(&id, params.str("cursor"), limit + 1)
        .await?;
    let mut data = Vec::with_capacity(found.len());
    for d in &found {
        let attempts = state.store.delivery_attempts(&d.id).await?;
        let mut v = delivery_view(d);
        v["attempt_log"] = attempts
            .iter()
            .map(|a| json!({"at": format_ms(a.at), "status_code": a.status_code, "latency_ms": a.latency_ms, "error": a.error}))
            .collect();
        data.push(v);
    }
    Ok(Json(page(data, limit, |v| {
        v["id"].as_str().map(str::to_string)
    })))
}

async fn retry(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, delivery_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    if state
        .store
        .retry_delivery(&id, &delivery_id, now_ms())
        .await?
    {
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": delivery_id, "status": "pending"})),
        )
            .into_response())
    } else {
        Err(ApiError::NotFound(format!(
            "No delivery {delivery_id} for webhook {id}."
        )))
    }
}

async fn test(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    find(&state, &id).await?;
    let event_id = state.store.test_event(&id, now_ms()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": event_id, "type": "webhook.test"})),
    )
        .into_response())
}
