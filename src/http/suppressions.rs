//! The suppression list: addresses Mailroom will not send to. Hard bounces
//! add themselves; admins add and remove entries by hand.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::extract::{object, page};
use super::{AppState, Auth, JsonBody, Params, Routes};
use crate::domain::{format_ms, now_ms, EmailAddress};
use crate::error::ApiError;
use crate::keys::Scope;
use crate::store::Suppression;

pub fn routes(r: Routes) -> Routes {
    r.get("/v1/suppressions", list)
        .put("/v1/suppressions/{email}", put)
        .delete("/v1/suppressions/{email}", delete)
}

fn view(s: &Suppression) -> Value {
    json!({
        "email": s.email,
        "reason": s.reason,
        "source": s.source,
        "message_id": s.message_id,
        "created_at": format_ms(s.created_at),
    })
}

fn address(email: &str) -> Result<EmailAddress, ApiError> {
    EmailAddress::parse(email)
        .map_err(|e| ApiError::validation("email", format!("invalid address: {e}")))
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[Scope::Read, Scope::Admin])?;
    params.only(&["limit", "cursor"])?;
    let limit = params.limit()?;
    let found = state
        .store
        .list_suppressions(params.str("cursor"), limit + 1)
        .await?;
    let data = found.iter().map(view).collect();
    Ok(Json(page(data, limit, |v| {
        v["email"].as_str().map(str::to_string)
    })))
}

async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(email): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    let email = address(&email)?;
    let obj = object(&body, &["reason"])?;
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => "added manually".to_string(),
        Some(Value::String(r)) if r.len() <= 500 => r.clone(),
        Some(_) => {
            return Err(ApiError::validation(
                "reason",
                "must be a string of at most 500 characters",
            ))
        }
    };
    let entry = Suppression {
        email: email.key(),
        reason,
        source: "manual".into(),
        message_id: None,
        created_at: now_ms(),
    };
    state.store.put_suppression(&entry).await?;
    Ok(Json(view(&entry)))
}

async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(email): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    let email = address(&email)?;
    if state.store.delete_suppression(&email.key()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "{} is not suppressed.",
            email.key()
        )))
    }
}
