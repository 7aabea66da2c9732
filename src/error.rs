//! One error type for the HTTP API, turned into RFC 9457
//! `application/problem+json` in one place. Dependencies that are down become
//! 503 with `Retry-After`; internal errors are logged with their chain and
//! answered with a body that reveals nothing.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::limiter::LimiterError;
use crate::queue::QueueError;
use crate::store::StoreError;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {detail}")]
    Conflict {
        slug: &'static str,
        detail: String,
        retry_after: Option<u64>,
    },
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("{detail}")]
    Unprocessable {
        slug: &'static str,
        title: &'static str,
        detail: String,
    },
    #[error("limit exceeded: {detail}")]
    RateLimited {
        policy: &'static str,
        detail: String,
        retry_after: u64,
        headers: Box<HeaderMap>,
    },
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) | ApiError::Unprocessable { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }

    /// The problem document (also used inside batch responses).
    pub fn problem(&self) -> Value {
        let status = self.status().as_u16();
        let (slug, title, detail): (&str, &str, String) = match self {
            ApiError::BadRequest(d) => ("malformed-request", "Malformed request", d.clone()),
            ApiError::Unauthorized => (
                "unauthorized",
                "Unauthorized",
                "Send `Authorization: Bearer mr_...` with a valid, unrevoked API key.".into(),
            ),
            ApiError::Forbidden(d) => ("forbidden", "Forbidden", d.clone()),
            ApiError::NotFound(d) => ("not-found", "Not found", d.clone()),
            ApiError::Conflict { slug, detail, .. } => (slug, "Conflict", detail.clone()),
            ApiError::TooLarge(n) => (
                "payload-too-large",
                "Payload too large",
                format!("The request body is larger than {n} bytes."),
            ),
            ApiError::UnsupportedMediaType => (
                "unsupported-media-type",
                "Unsupported media type",
                "Send the body as JSON with `Content-Type: application/json`.".into(),
            ),
            ApiError::Validation(errors) => (
                "validation-error",
                "Validation failed",
                errors
                    .iter()
                    .map(|e| match e.field.as_str() {
                        "" => e.message.clone(),
                        field => format!("{field}: {}", e.message),
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            ApiError::Unprocessable {
                slug,
                title,
                detail,
            } => (slug, title, detail.clone()),
            ApiError::RateLimited { detail, .. } => {
                ("quota-exceeded", "Limit exceeded", detail.clone())
            }
            ApiError::Unavailable(what) => (
                "service-unavailable",
                "Service unavailable",
                format!("The {what} is unavailable; retry later."),
            ),
            ApiError::Internal(_) => (
                "internal-error",
                "Internal error",
                "Something went wrong on our side; it has been logged.".into(),
            ),
        };
        let mut body = json!({
            "type": format!("urn:mailroom:problem:{slug}"),
            "title": title,
            "status": status,
            "detail": detail,
        });
        if let ApiError::Validation(errors) = self {
            body["errors"] = json!(errors);
        }
        if let ApiError::RateLimited { policy, .. } = self {
            body["policy"] = json!(policy);
        }
        body
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Conflict { retry_after, .. } => *retry_after,
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::Unavailable(_) => Some(2),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(e) => tracing::error!(error = ?e, "internal error"),
            ApiError::Unavailable(what) => {
                tracing::warn!(dependency = what, "dependency unavailable")
            }
            _ => {}
        }
        let status = self.status();
        let mut response = (status, self.problem().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthorized) {
            // RFC 6750 §3: a 401 names the scheme the client must use.
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mailroom\""),
            );
        }
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if let ApiError::RateLimited { headers: extra, .. } = self {
            headers.extend(*extra);
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "store unavailable");
                ApiError::Unavailable("database")
            }
            StoreError::Unstorable(source) => {
                tracing::warn!(error = %source, "request value refused by the store");
                ApiError::Unprocessable {
                    slug: "unstorable-value",
                    title: "Value cannot be stored",
                    detail: "A text value of the request holds a character that cannot be stored (such as NUL, U+0000).".into(),
                }
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        tracing::warn!(error = %e, "queue unavailable");
        ApiError::Unavailable("queue")
    }
}

impl From<LimiterError> for ApiError {
    fn from(e: LimiterError) -> Self {
        tracing::warn!(error = %e, "limiter unavailable");
        ApiError::Unavailable("rate limiter")
    }
}
