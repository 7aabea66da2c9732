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
use crate::metrics::Gauges;

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
    let now = now_ms();
    if let Ok(stats) = state.store.queue_stats(now).await {
        gauges.messages_waiting = stats.waiting;
        gauges.oldest_due_seconds = stats
            .oldest_due
            .map_or(0.0, |due| (now - due).max(0) as f64 / 1000.0);
    }
    if let Ok(backlog) = state.store.webhook_backlog().await {
        gauges.webhook_backlog = backlog;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&gauges),
    )
        .into_response()
}
