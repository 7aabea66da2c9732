//! Extractors that turn every malformed input into a problem+json answer:
//! `Auth` (Bearer key, hashed, constant-time; keys cached for `KEY_CACHE`), `JsonBody` (415 / 413 before
//! buffering / 400; 422 for a NUL, see `crate::nul`), `SendBody` (the same, NULs left to each
//! message's parsing) and `Params` (query string) with typed getters.

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde_json::Value;

use super::AppState;
use crate::domain::Millis;
use crate::error::ApiError;
use crate::keys::{self, ApiKey, Scope};

/// The authenticated key of a request.
pub struct Auth(pub ApiKey);

impl Auth {
    pub fn require(&self, scope: Scope) -> Result<&ApiKey, ApiError> {
        if self.0.has(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::Forbidden(format!(
                "This key lacks the `{}` scope.",
                scope.as_str()
            )))
        }
    }

    /// Like `require`, but any of the scopes will do.
    pub fn require_any(&self, scopes: &[Scope]) -> Result<&ApiKey, ApiError> {
        if scopes.iter().any(|s| self.0.has(*s)) {
            Ok(&self.0)
        } else {
            let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            Err(ApiError::Forbidden(format!(
                "This key needs one of the scopes: {}.",
                names.join(", ")
            )))
        }
    }

    /// `None` for admin keys (they see everything), else the key's id.
    pub fn owner_filter(&self) -> Option<String> {
        (!self.0.is_admin()).then(|| self.0.id.clone())
    }

    pub fn can_see(&self, owner_key_id: &str) -> bool {
        self.0.is_admin() || self.0.id == owner_key_id
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized)?
            .trim();
        let (prefix, secret) = keys::split(token).ok_or(ApiError::Unauthorized)?;
        let key = match state.keys.get(prefix) {
            Some(key) => key,
            None => {
                let key = state
                    .store
                    .key_by_prefix(prefix)
                    .await?
                    .ok_or(ApiError::Unauthorized)?;
                state.keys.put(prefix, key.clone());
                key
            }
        };
        if key.revoked_at.is_some() || !key.verify(secret) {
            return Err(ApiError::Unauthorized);
        }
        Ok(Auth(key))
    }
}

/// A JSON request body as a `Value`.
pub struct JsonBody(pub Value);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (bytes, value) = read_json(request, state).await?;
        let nul = crate::nul::json_fields(&bytes, &value);
        if !nul.is_empty() {
            return Err(ApiError::Validation(nul));
        }
        Ok(JsonBody(value))
    }
}

/// A send or batch body as a `Value`: as [`JsonBody`], but a NUL is left
/// to the parsing of each message (`sending::request::parse`), so that in a
/// batch it fails only its own item.
pub struct SendBody(pub Value);

impl FromRequest<AppState> for SendBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        Ok(SendBody(read_json(request, state).await?.1))
    }
}

/// The body, read up to the configured limit, and its JSON.
async fn read_json(
    request: Request,
    state: &AppState,
) -> Result<(axum::body::Bytes, Value), ApiError> {
    let limit = state.config.max_request_bytes;
    if !is_json(request.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                ApiError::TooLarge(limit)
            } else {
                ApiError::BadRequest(format!("could not read the body: {e}"))
            }
        })?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("the request body is empty".into()));
    }
    let value = serde_json::from_slice(without_bom(&bytes))
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    Ok((bytes, value))
}

/// JSON text without a leading UTF-8 byte order mark, which some clients
/// write (RFC 8259 §8.1: a parser MAY ignore it rather than fail).
fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Query-string parameters with typed, validated getters.
pub struct Params(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let pairs: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let nul = crate::nul::params(pairs.iter());
        if !nul.is_empty() {
            return Err(ApiError::Validation(nul));
        }
        Ok(Params(pairs))
    }
}

impl Params {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.str(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::validation(name, "must be an integer"))
            })
            .transpose()
    }

    /// `limit`: 1..=200, default 50.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.int("limit")? {
            None => Ok(50),
            Some(n) if (1..=200).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::validation("limit", "must be between 1 and 200")),
        }
    }

    pub fn time(&self, name: &str) -> Result<Option<Millis>, ApiError> {
        self.str(name)
            .map(|v| {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.timestamp_millis())
                    .map_err(|_| ApiError::validation(name, "must be an RFC 3339 timestamp"))
            })
            .transpose()
    }

    /// Rejects parameters the endpoint does not know (typos surface).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        let unknown: Vec<_> = self
            .0
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .map(|k| crate::error::FieldError::new(k.clone(), "unknown query parameter"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(unknown))
        }
    }
}

/// `{data, next_cursor}` for a page of at most `limit` items. `data` holds
/// what the store returned for `limit + 1`: one item more than the page
/// says there is a next page, and `next_cursor` is null on the last one.
pub fn page(
    mut data: Vec<Value>,
    limit: i64,
    cursor_of: impl Fn(&Value) -> Option<String>,
) -> Value {
    let limit = usize::try_from(limit).unwrap_or(0);
    let next = if data.len() > limit {
        data.truncate(limit);
        data.last().and_then(cursor_of)
    } else {
        None
    };
    serde_json::json!({"data": data, "next_cursor": next})
}

/// A page of a list read whole (templates, keys, webhooks: sets small
/// enough to hold), in the order of `key`, which is also its cursor: the
/// next page starts after the cursor's key, so an item deleted between
/// two pages moves nothing.
pub fn page_sorted(
    items: Vec<Value>,
    params: &Params,
    key: impl Fn(&Value) -> String,
) -> Result<Value, ApiError> {
    let limit = params.limit()?;
    let after = params.str("cursor");
    let mut keyed: Vec<(String, Value)> = items.into_iter().map(|v| (key(&v), v)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let rest: Vec<Value> = keyed
        .into_iter()
        .filter(|(k, _)| after.is_none_or(|c| k.as_str() > c))
        .take(usize::try_from(limit).unwrap_or(0) + 1)
        .map(|(_, v)| v)
        .collect();
    Ok(page(rest, limit, |v| Some(key(v))))
}

/// Checks unknown top-level fields of a JSON object body.
pub fn object<'a>(
    body: &'a Value,
    known: &[&str],
) -> Result<&'a serde_json::Map<String, Value>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::validation("", "the request body must be a JSON object"))?;
    let unknown: Vec<_> = obj
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| crate::error::FieldError::new(k.clone(), "unknown field"))
        .collect();
    if unknown.is_empty() {
        Ok(obj)
    } else {
        Err(ApiError::Validation(unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let body = b"\xEF\xBB\xBF{\"a\": 1}";
        let value: Value = serde_json::from_slice(without_bom(body)).unwrap();
        assert_eq!(value["a"], 1);
        assert_eq!(without_bom(b"{}"), b"{}");
        assert_eq!(without_bom(b"\xEF\xBB"), b"\xEF\xBB", "only a whole mark");
    }
}
