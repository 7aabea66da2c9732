//! `GET /v1/usage`: per key, what it sent today and this month (UTC), by
//! outcome, its limits and what remains. Admins may ask about any key.

use std::collections::HashMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AppState, Auth, Params, Routes};
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::limiter::Windows;

pub fn routes(r: Routes) -> Routes {
    r.get("/v1/usage", usage)
}

fn counts(rows: Vec<(String, i64)>) -> Value {
    let by: HashMap<String, i64> = rows.into_iter().collect();
    let get = |s: &str| by.get(s).copied().unwrap_or(0);
    let waiting = ["scheduled", "queued", "sending", "deferred"]
        .iter()
        .map(|s| get(s))
        .sum::<i64>();
    json!({
        "accepted": by.values().sum::<i64>(),
        "delivered": get("delivered"),
        "bounced": get("bounced"),
        "failed": get("failed"),
        "suppressed": get("suppressed"),
        "canceled": get("canceled"),
        "expired": get("expired"),
        "in_flight": waiting,
    })
}

async fn usage(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    params.only(&["key_id"])?;
    let key = match params.str("key_id") {
        Some(id) if id != auth.0.id => {
            if !auth.0.is_admin() {
                return Err(ApiError::Forbidden(
                    "Only admin keys may read another key's usage.".into(),
                ));
            }
            state
                .store
                .key(id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("No key {id}.")))?
        }
        _ => auth.0.clone(),
    };
    let now = now_ms();
    let tz = key.limits.tz();
    let today = state
        .store
        .usage(&key.id, Windows::day_start(now, tz))
        .await?;
    let month = state
        .store
        .usage(&key.id, Windows::month_start(now, tz))
        .await?;
    let (daily_used, monthly_used) = state.limiter.used(&key.id, tz, now).await?;
    let remaining = |limit: Option<i64>, used: i64| limit.map(|l| (l - used).max(0));
    Ok(Json(json!({
        "key_id": key.id,
        "today": counts(today),
        "month": counts(month),
        "limits": {
            "rate_per_second": key.limits.rate_per_second,
            "burst": key.limits.burst,
            "daily_quota": key.limits.daily_quota,
            "monthly_quota": key.limits.monthly_quota,
            "per_recipient_hourly": key.limits.per_recipient_hourly,
            "timezone": tz.name(),
        },
        "remaining": {
            "daily": remaining(key.limits.daily_quota, daily_used),
            "monthly": remaining(key.limits.monthly_quota, monthly_used),
        },
    })))
}
