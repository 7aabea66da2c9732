//! `/healthz` (the process answers), `/readyz` (store and queue reachable),
//! `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AppState, Routes};
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::metrics::{Gauges, StoreGauges};

pub fn routes(r: Routes) -> Routes {
    r.get("/healthz", healthz)
        .get("/readyz", readyz)
        .get("/metrics", metrics)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = tokio::time::timeout(std::time::Duration::from_secs(3), state.store.ping()).await;
    if !matches!(store, Ok(Ok(()))) {
        return Err(ApiError::Unavailable("database"));
    }
    let queue = tokio::time::timeout(std::time::Duration::from_secs(3), state.queue.ping()).await;
    if !matches!(queue, Ok(Ok(()))) {
        return Err(ApiError::Unavailable("queue"));
    }
    Ok(Json(json!({
        "status": "ready",
        "store": state.store.backend(),
        "queue": state.queue.name(),
    })))
}

/// The store's gauges, read at most once per [`crate::metrics::STORE_GAUGES_TTL`].
async fn store_gauges(state: &AppState) -> StoreGauges {
    if let Some(cached) = state.store_gauges.get("store") {
        return cached;
    }
    let mut gauges = StoreGauges::default();
    let now = now_ms();
    let stats = state.store.queue_stats(now).await;
    if let Ok(stats) = &stats {
        gauges.messages_waiting = stats.waiting;
        gauges.oldest_due_seconds = stats
            .oldest_due
            .map_or(0.0, |due| (now - due).max(0) as f64 / 1000.0);
    }
    let backlog = state.store.webhook_backlog().await;
    if let Ok(backlog) = backlog {
        gauges.webhook_backlog = backlog;
    }
    // A failed read is tried again by the next scrape.
    if stats.is_ok() && backlog.is_ok() {
        state.store_gauges.put("store", gauges.clone());
    }
    gauges
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut gauges = Gauges::default();
    if let Ok(depth) = state.queue.depth().await {
        gauges.queue_ready = depth
            .ready
            .into_iter()
            .map(|(p, n)| (p.as_str().to_string(), n))
            .collect();
        gauges.queue_delayed = depth.delayed;
    }
    gauges.store = store_gauges(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
