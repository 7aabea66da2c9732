//! The HTTP API: one file per resource, each registering its routes in the
//! [`Routes`] table (which the OpenAPI test compares with `openapi.yaml`),
//! plus the shared extractors and middleware (request id, span, metrics).

mod events;
mod extract;
mod health;
mod keys;
mod messages;
mod send;
mod suppressions;
mod templates;
mod usage;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

pub use extract::{Auth, JsonBody, Params, SendBody};

use crate::config::Config;
use crate::error::ApiError;
use crate::keys::ApiKey;
use crate::limiter::Limiter;
use crate::metrics::{Metrics, StoreGauges};
use crate::queue::Queue;
use crate::sending::Sender;
use crate::store::Store;
use crate::ttl_cache::TtlCache;

/// How long an authenticated key is cached. A key changed or revoked
/// through this process is dropped from the cache at once; through another
/// process (or the CLI) the change is seen within this time.
pub const KEY_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything a handler may use; built once in `app`.
pub struct Ctx {
    /// Admission control for sends (see `admit`).
    pub send_slots: Arc<tokio::sync::Semaphore>,
    pub store: Arc<dyn Store>,
    /// Keys by prefix, so a request does not cost a store round trip
    /// (see [`KEY_CACHE`]).
    pub keys: TtlCache<ApiKey>,
    /// The store-derived `/metrics` gauges (see [`crate::metrics::STORE_GAUGES_TTL`]).
    pub store_gauges: TtlCache<StoreGauges>,
    pub queue: Arc<dyn Queue>,
    pub limiter: Arc<dyn Limiter>,
    pub sender: Sender,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
}

pub type AppState = Arc<Ctx>;

/// A router that remembers which (method, path) pairs it serves.
pub struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Self {
        Self {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = match method {
            Method::GET => MethodFilter::GET,
            Method::POST => MethodFilter::POST,
            Method::PUT => MethodFilter::PUT,
            Method::PATCH => MethodFilter::PATCH,
            Method::DELETE => MethodFilter::DELETE,
            _ => MethodFilter::GET,
        };
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }

    pub fn get<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::GET, path, h)
    }
    pub fn post<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::POST, path, h)
    }
    pub fn put<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::PUT, path, h)
    }
    pub fn patch<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::PATCH, path, h)
    }
    pub fn delete<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::DELETE, path, h)
    }
}

fn all_routes() -> Routes {
    let r = Routes::new();
    let r = health::routes(r);
    let r = send::routes(r);
    let r = messages::routes(r);
    let r = templates::routes(r);
    let r = keys::routes(r);
    let r = usage::routes(r);
    let r = suppressions::routes(r);
    let r = webhooks::routes(r);
    events::routes(r)
}

/// Every (method, path) the API serves, for the OpenAPI conformance test.
pub fn route_table() -> Vec<(String, String)> {
    all_routes()
        .table
        .into_iter()
        .map(|(m, p)| (m.as_str().to_lowercase(), p.to_string()))
        .collect()
}

pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    all_routes()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .layer(axum::middleware::from_fn(refuse_nul_in_path))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// A path with an encoded NUL names nothing this API serves (and would
/// reach the store as a key it cannot hold; see `crate::nul`).
async fn refuse_nul_in_path(request: Request, next: Next) -> Response {
    if request.uri().path().contains("%00") {
        return ApiError::NotFound("No such resource: the path contains a NUL character.".into())
            .into_response();
    }
    next.run(request).await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("No such route.".into())
}

async fn method_not_allowed() -> Response {
    let mut response = ApiError::NotFound("No such route.".into()).into_response();
    *response.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    let body = serde_json::json!({
        "type": "urn:mailroom:problem:method-not-allowed",
        "title": "Method not allowed",
        "status": 405,
        "detail": "This route does not support that method."
    });
    *response.body_mut() = axum::body::Body::from(body.to_string());
    response
}

/// Admission control: at most `MAILROOM_MAX_IN_FLIGHT` sends are processed
/// at once; beyond that a send is refused with 503 + Retry-After before its
/// body is read, so memory stays bounded under overload.
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let is_send = request.method() == Method::POST && request.uri().path().starts_with("/v1/send");
    if !is_send {
        return next.run(request).await;
    }
    match state.send_slots.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Unavailable("send capacity (too many sends in flight)").into_response(),
    }
}

/// A span per request, request metrics, and one log line per request.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!("request", %method, %route, %request_id);
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .request(method.as_str(), &route, status, elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    });
    response
}
