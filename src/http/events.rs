//! `GET /v1/events?after=`: the durable event log, oldest first, so a
//! consumer that missed webhooks can catch up. Events become visible one
//! second after they are written, so that a transaction committing late
//! cannot slip in behind a cursor that has already moved past it. `after`
//! is a cursor from an earlier page or the id of an event the consumer has
//! seen (a webhook's `webhook-id`), so it can resume from the last webhook
//! it processed.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::messages::event_view;
use super::{AppState, Auth, Params, Routes};
use crate::domain::now_ms;
use crate::error::ApiError;
use crate::keys::Scope;
use crate::store::EventFilter;

pub const SETTLE_MS: i64 = 1000;

pub fn routes(r: Routes) -> Routes {
    r.get("/v1/events", list)
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Read)?;
    params.only(&["after", "type", "limit"])?;
    let owner = auth.owner_filter();
    let after = match params.str("after") {
        Some(after) => Some(position(&state, after, owner.as_deref()).await?),
        None => None,
    };
    let limit = params.limit()?;
    let event_type = params.str("type");
    let types = super::webhooks::event_types();
    if let Some(t) = event_type.filter(|t| !types.contains(t)) {
        return Err(ApiError::validation(
            "type",
            format!("unknown event type {t:?}; one of {}", types.join(", ")),
        ));
    }
    let filter = EventFilter {
        after_seq: after,
        event_type: event_type.map(str::to_string),
        key_id: owner,
        created_before: now_ms() - SETTLE_MS,
        limit,
    };
    let events = state.store.list_events(&filter).await?;
    let data: Vec<Value> = events.iter().map(event_view).collect();
    let next = data
        .last()
        .and_then(|e| e["cursor"].as_str().map(str::to_string))
        .or_else(|| after.map(|a| a.to_string()));
    Ok(Json(json!({"data": data, "next_cursor": next})))
}

/// Where `after` points in the log: a cursor as given, or an event id's
/// position (an id the key cannot see is as unknown as one that never was).
async fn position(state: &AppState, after: &str, owner: Option<&str>) -> Result<i64, ApiError> {
    if after.starts_with("evt_") {
        return state
            .store
            .event_position(after, owner)
            .await?
            .ok_or_else(|| ApiError::validation("after", format!("no event {after} in the log")));
    }
    after.parse::<i64>().map_err(|_| {
        ApiError::validation(
            "after",
            "must be a cursor from a previous page or an event id (evt_...)",
        )
    })
}
