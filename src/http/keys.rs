//! API keys (admin): create (the key is in this response only), list, read,
//! update limits and scopes, revoke (effective on the next request, in every
//! process, since keys are looked up per request).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::extract::{object, page_sorted};
use super::{AppState, Auth, JsonBody, Params, Routes};
use crate::domain::{format_ms, now_ms, EmailAddress};
use crate::error::{ApiError, FieldError};
use crate::keys::{new_key, ApiKey, KeyLimits, KeyMode, Scope};
use crate::store::KeyPatch;

pub fn routes(r: Routes) -> Routes {
    r.post("/v1/keys", create)
        .get("/v1/keys", list)
        .get("/v1/keys/{id}", get)
        .patch("/v1/keys/{id}", patch)
        .delete("/v1/keys/{id}", revoke)
}

/// The fields of a create or patch body besides the limits.
const KEY_FIELDS: &[&str] = &["name", "scopes", "allowed_from_domains", "mode"];

/// Every field of a create or patch body.
fn fields() -> Vec<&'static str> {
    [KEY_FIELDS, LIMIT_FIELDS].concat()
}

pub fn key_view(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": format!("mr_{}", k.prefix),
        "scopes": k.scopes,
        "mode": k.mode.as_str(),
        "rate_per_second": k.limits.rate_per_second,
        "burst": k.limits.burst,
        "daily_quota": k.limits.daily_quota,
        "monthly_quota": k.limits.monthly_quota,
        "per_recipient_hourly": k.limits.per_recipient_hourly,
        "timezone": k.limits.timezone.as_deref().unwrap_or("UTC"),
        "allowed_from_domains": k.allowed_from_domains,
        "created_at": format_ms(k.created_at),
        "revoked_at": k.revoked_at.map(format_ms),
    })
}

/// Parses the fields of a create or patch body; `None` for absent fields.
struct KeyFields {
    name: Option<String>,
    scopes: Option<Vec<Scope>>,
    mode: Option<KeyMode>,
    limits: KeyLimits,
    limits_given: bool,
    domains: Option<Vec<String>>,
}

/// Reads a create or patch body field by field, collecting every error.
struct FieldReader<'a> {
    obj: &'a Map<String, Value>,
    errors: Vec<FieldError>,
}

impl FieldReader<'_> {
    /// Records `field` as invalid; nothing is read from it.
    fn fail<T>(&mut self, field: impl Into<String>, message: &str) -> Option<T> {
        self.errors.push(FieldError::new(field, message));
        None
    }

    fn name(&mut self) -> Option<String> {
        match self.obj.get("name")? {
            Value::String(n) if !n.trim().is_empty() && n.len() <= 100 => {
                Some(n.trim().to_string())
            }
            _ => self.fail(
                "name",
                "must be a non-empty string of at most 100 characters",
            ),
        }
    }

    fn scopes(&mut self) -> Option<Vec<Scope>> {
        let items = match self.obj.get("scopes")? {
            Value::Array(items) if !items.is_empty() => items,
            _ => return self.fail("scopes", "must be a non-empty array of send, read, admin"),
        };
        let mut scopes = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str().and_then(Scope::parse) {
                Some(s) if !scopes.contains(&s) => scopes.push(s),
                Some(_) => {}
                None => {
                    self.fail::<()>(format!("scopes[{i}]"), "must be send, read or admin");
                }
            }
        }
        Some(scopes)
    }

    fn mode(&mut self) -> Option<KeyMode> {
        match self.obj.get("mode")? {
            Value::Null => None,
            v => match v.as_str().and_then(KeyMode::parse) {
                Some(m) => Some(m),
                None => self.fail("mode", "must be live or test"),
            },
        }
    }

    /// A limit: `old` when absent, none when null.
    fn limit<T>(
        &mut self,
        field: &str,
        old: Option<T>,
        read: impl FnOnce(&Value) -> Option<T>,
        message: &str,
    ) -> Option<T> {
        match self.obj.get(field) {
            None => old,
            Some(Value::Null) => None,
            Some(v) => match read(v) {
                Some(value) => Some(value),
                None => self.fail(field, message),
            },
        }
    }

    fn count(&mut self, field: &str, old: Option<i64>) -> Option<i64> {
        let positive = |v: &Value| v.as_i64().filter(|n| *n > 0);
        self.limit(field, old, positive, "must be a positive integer")
    }

    fn limits(&mut self, base: &KeyLimits) -> KeyLimits {
        let rate = |v: &Value| v.as_f64().filter(|r| *r > 0.0 && r.is_finite());
        let zone = |v: &Value| {
            let tz = v.as_str()?.parse::<chrono_tz::Tz>().ok()?;
            Some(tz.name().to_string())
        };
        let limits = KeyLimits {
            rate_per_second: self.limit(
                "rate_per_second",
                base.rate_per_second,
                rate,
                "must be a positive number",
            ),
            burst: self.count("burst", base.burst),
            daily_quota: self.count("daily_quota", base.daily_quota),
            monthly_quota: self.count("monthly_quota", base.monthly_quota),
            per_recipient_hourly: self.count("per_recipient_hourly", base.per_recipient_hourly),
            timezone: self.limit(
                "timezone",
                base.timezone.clone(),
                zone,
                "must be an IANA time zone such as Europe/Berlin or UTC",
            ),
        };
        if limits.burst.is_some() && limits.rate_per_second.is_none() {
            self.fail::<()>("burst", "needs rate_per_second");
        }
        limits
    }

    /// `Some(empty)` for null: any domain.
    fn domains(&mut self) -> Option<Vec<String>> {
        let items = match self.obj.get("allowed_from_domains")? {
            Value::Null => return Some(Vec::new()),
            Value::Array(items) => items,
            _ => return self.fail("allowed_from_domains", "must be an array of domain names"),
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let domain = item
                .as_str()
                .filter(|d| EmailAddress::parse(&format!("x@{d}")).is_ok());
            match domain {
                Some(d) => out.push(d.to_lowercase()),
                None => {
                    self.fail::<()>(
                        format!("allowed_from_domains[{i}]"),
                        "must be a domain name",
                    );
                }
            }
        }
        Some(out)
    }
}

/// The limit fields: given any of them, a patch replaces the key's limits.
const LIMIT_FIELDS: &[&str] = &[
    "rate_per_second",
    "burst",
    "daily_quota",
    "monthly_quota",
    "per_recipient_hourly",
    "timezone",
];

fn parse_fields(obj: &Map<String, Value>, base: &KeyLimits) -> Result<KeyFields, ApiError> {
    let mut read = FieldReader {
        obj,
        errors: Vec::new(),
    };
    let fields = KeyFields {
        name: read.name(),
        scopes: read.scopes(),
        mode: read.mode(),
        limits: read.limits(base),
        limits_given: LIMIT_FIELDS.iter().any(|f| obj.contains_key(*f)),
        domains: read.domains(),
    };
    if !read.errors.is_empty() {
        return Err(ApiError::Validation(read.errors));
    }
    Ok(fields)
}

async fn create(
    State(state): State<AppState>,
    auth: Auth,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    let obj = object(&body, &fields())?;
    let fields = parse_fields(obj, &KeyLimits::default())?;
    let mut missing = Vec::new();
    if fields.name.is_none() {
        missing.push(FieldError::new("name", "is required"));
    }
    if fields.scopes.is_none() {
        missing.push(FieldError::new("scopes", "is required"));
    }
    if !missing.is_empty() {
        return Err(ApiError::Validation(missing));
    }
    let (key, plaintext) = new_key(
        fields.name.unwrap_or_default(),
        fields.scopes.unwrap_or_default(),
        fields.mode.unwrap_or(KeyMode::Live),
        fields.limits,
        fields.domains.unwrap_or_default(),
        now_ms(),
    );
    state.store.create_key(&key).await?;
    let mut view = key_view(&key);
    view["key"] = json!(plaintext);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    params.only(&["limit", "cursor"])?;
    let keys = state.store.list_keys().await?;
    let data: Vec<Value> = keys.iter().map(key_view).collect();
    Ok(Json(page_sorted(data, &params, |v| {
        v["id"].as_str().unwrap_or_default().to_string()
    })?))
}

async fn find(state: &AppState, id: &str) -> Result<ApiKey, ApiError> {
    state
        .store
        .key(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No key {id}.")))
}

async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    Ok(Json(key_view(&find(&state, &id).await?)))
}

async fn patch(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    auth.require(Scope::Admin)?;
    let current = find(&state, &id).await?;
    let obj = object(&body, &fields())?;
    let fields = parse_fields(obj, &current.limits)?;
    let patch = KeyPatch {
        name: fields.name,
        scopes: fields.scopes,
        mode: fields.mode,
        limits: fields.limits_given.then_some(fields.limits),
        allowed_from_domains: fields.domains,
    };
    let updated = state
        .store
        .update_key(&id, &patch)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No key {id}.")))?;
    state.keys.clear();
    Ok(Json(key_view(&updated)))
}

async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    find(&state, &id).await?;
    state.store.revoke_key(&id, now_ms()).await?;
    state.keys.clear();
    Ok(StatusCode::NO_CONTENT)
}
