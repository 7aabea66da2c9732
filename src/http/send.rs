//! `POST /v1/send` and `POST /v1/send/batch`: auth, the key's rate limit,
//! `Idempotency-Key`, then the sending service. Every answer after the rate
//! check (202, 422, 409, 429) carries the IETF `RateLimit-Policy` /
//! `RateLimit` headers when the key has limits.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{AppState, Auth, Routes, SendBody};
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::keys::{ApiKey, Scope};
use crate::limiter::{RateDecision, Windows};
use crate::sending::Accepted;

pub fn routes(r: Routes) -> Routes {
    r.post("/v1/send", send).post("/v1/send/batch", batch)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = raw
        .to_str()
        .map_err(|_| ApiError::validation("Idempotency-Key", "must be printable ASCII"))?;
    let key = text.trim().trim_matches('"');
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "must be 1-255 printable ASCII characters",
        ));
    }
    Ok(Some(key.to_string()))
}

/// Rate (GCRA) parameters of a key, if it has a rate limit.
fn rate_of(key: &ApiKey) -> Option<(f64, i64)> {
    let rate = key.limits.rate_per_second?;
    let burst = key
        .limits
        .burst
        .unwrap_or_else(|| rate.ceil().max(1.0) as i64);
    Some((rate, burst))
}

async fn check_rate(state: &AppState, key: &ApiKey) -> Result<Option<RateDecision>, ApiError> {
    let Some((rate, burst)) = rate_of(key) else {
        return Ok(None);
    };
    let decision = state.limiter.rate(&key.id, rate, burst).await?;
    if !decision.allowed {
        let retry_after = ((decision.retry_after_ms + 999) / 1000).max(1) as u64;
        return Err(ApiError::RateLimited {
            policy: "burst",
            detail: format!("The key's rate limit ({rate}/s, burst {burst}) is exceeded."),
            retry_after,
            headers: Box::new(ratelimit_headers(key, Some(&decision), None)),
        });
    }
    Ok(Some(decision))
}

fn secs(ms: i64) -> i64 {
    ((ms + 999) / 1000).max(0)
}

/// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub fn ratelimit_headers(
    key: &ApiKey,
    rate: Option<&RateDecision>,
    used: Option<(i64, i64)>,
) -> HeaderMap {
    let mut policies = Vec::new();
    let mut limits = Vec::new();
    if let (Some((per_second, burst)), Some(d)) = (rate_of(key), rate) {
        let window = ((burst as f64 / per_second).ceil() as i64).max(1);
        policies.push(format!("\"burst\";q={burst};w={window}"));
        limits.push(format!(
            "\"burst\";r={};t={}",
            d.remaining.max(0),
            secs(d.reset_ms)
        ));
    }
    let w = Windows::at(now_ms(), key.limits.tz());
    if let (Some(q), Some((daily, _))) = (key.limits.daily_quota, used) {
        policies.push(format!("\"daily\";q={q};w=86400"));
        limits.push(format!(
            "\"daily\";r={};t={}",
            (q - daily).max(0),
            secs(w.ms_to_next_day)
        ));
    }
    if let (Some(q), Some((_, monthly))) = (key.limits.monthly_quota, used) {
        policies.push(format!("\"monthly\";q={q};w=2592000"));
        limits.push(format!(
            "\"monthly\";r={};t={}",
            (q - monthly).max(0),
            secs(w.ms_to_next_month)
        ));
    }
    let mut headers = HeaderMap::new();
    if !policies.is_empty() {
        if let (Ok(p), Ok(l)) = (
            HeaderValue::from_str(&policies.join(", ")),
            HeaderValue::from_str(&limits.join(", ")),
        ) {
            headers.insert(HeaderName::from_static("ratelimit-policy"), p);
            headers.insert(HeaderName::from_static("ratelimit"), l);
        }
    }
    headers
}

/// The key's quota use for the headers: what the accept counted, else
/// read (`None` when the key has no quotas, or the read fails).
async fn quota_used(
    state: &AppState,
    key: &ApiKey,
    counted: Option<(i64, i64)>,
) -> Option<(i64, i64)> {
    if key.limits.daily_quota.is_none() && key.limits.monthly_quota.is_none() {
        return None;
    }
    match counted {
        Some(used) => Some(used),
        None => state
            .limiter
            .used(&key.id, key.limits.tz(), now_ms())
            .await
            .ok(),
    }
}

/// The answer to a send, accepted or not, with the key's `RateLimit`
/// headers: a refused request (422, 409…) has spent a rate token too, and
/// says what is left. A 429 carries its own; a dependency that is down is
/// not asked again for the quota.
async fn respond(
    state: &AppState,
    key: &ApiKey,
    rate: Option<RateDecision>,
    result: Result<Accepted, ApiError>,
) -> Response {
    let (mut response, counted, replayed) = match result {
        Ok(a) => (
            (a.status, Json(a.body)).into_response(),
            a.quota_used,
            a.replayed,
        ),
        Err(e @ (ApiError::RateLimited { .. } | ApiError::Unavailable(_))) => {
            return e.into_response();
        }
        Err(e) => (e.into_response(), None, false),
    };
    let used = quota_used(state, key, counted).await;
    response
        .headers_mut()
        .extend(ratelimit_headers(key, rate.as_ref(), used));
    if replayed {
        response.headers_mut().insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    response
}

async fn send(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    SendBody(body): SendBody,
) -> Result<Response, ApiError> {
    let key = auth.require(Scope::Send)?;
    let idem = idempotency_key(&headers)?;
    let rate = check_rate(&state, key).await?;
    let result = state.sender.send(key, body, idem.as_deref()).await;
    Ok(respond(&state, key, rate, result).await)
}

async fn batch(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    SendBody(body): SendBody,
) -> Result<Response, ApiError> {
    let key = auth.require(Scope::Send)?;
    let idem = idempotency_key(&headers)?;
    let rate = check_rate(&state, key).await?;
    let result = state.sender.send_batch(key, body, idem.as_deref()).await;
    Ok(respond(&state, key, rate, result).await)
}
