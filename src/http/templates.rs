//! Templates: `PUT /v1/templates/{name}` adds an immutable version (syntax
//! errors name part, line and column), `GET` lists and reads versions,
//! `DELETE` removes customer versions (built-ins come back), and
//! `POST .../render` renders exactly as a send would.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::extract::{object, page_sorted};
use super::{AppState, Auth, JsonBody, Params, Routes};
use crate::domain::{format_ms, now_ms, Priority};
use crate::error::{ApiError, FieldError};
use crate::keys::Scope;
use crate::sending::request::{is_locale, is_slug};
use crate::store::TemplateVersion;
use crate::templates;

pub fn routes(r: Routes) -> Routes {
    r.get("/v1/templates", list)
        .get("/v1/templates/{name}", get)
        .put("/v1/templates/{name}", put)
        .delete("/v1/templates/{name}", delete)
        .get("/v1/templates/{name}/versions", versions)
        .post("/v1/templates/{name}/render", render)
}

fn version_view(t: &TemplateVersion) -> Value {
    json!({
        "name": t.name,
        "locale": t.locale,
        "version": t.version,
        "subject": t.subject,
        "html": t.html,
        "text": t.text,
        "required": t.required,
        "secret": t.secret,
        "description": t.description,
        "priority": t.priority.map(|p| p.as_str()),
        "builtin": t.builtin,
        "created_at": format_ms(t.created_at),
    })
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_slug(name) {
        Ok(())
    } else {
        Err(ApiError::validation(
            "name",
            "must be a slug: lowercase letters, digits, - and _ (at most 64)",
        ))
    }
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[Scope::Read, Scope::Send])?;
    params.only(&["limit", "cursor"])?;
    let all = state.store.list_templates().await?;
    let mut by_name: BTreeMap<&str, Vec<&TemplateVersion>> = BTreeMap::new();
    for t in &all {
        by_name.entry(t.name.as_str()).or_default().push(t);
    }
    let data: Vec<Value> = by_name
        .into_iter()
        .map(|(name, versions)| {
            let mut locales: Vec<&str> = versions.iter().map(|v| v.locale.as_str()).collect();
            locales.sort_unstable();
            locales.dedup();
            let latest = versions.iter().max_by_key(|v| (v.version, v.created_at));
            json!({
                "name": name,
                "locales": locales,
                "latest_version": latest.map(|v| v.version),
                "builtin": versions.iter().any(|v| v.builtin),
                "customized": versions.iter().any(|v| !v.builtin),
                "description": latest.and_then(|v| v.description.clone()),
                "updated_at": latest.map(|v| format_ms(v.created_at)),
            })
        })
        .collect();
    Ok(Json(page_sorted(data, &params, |v| {
        v["name"].as_str().unwrap_or_default().to_string()
    })?))
}

async fn find(state: &AppState, name: &str, params: &Params) -> Result<TemplateVersion, ApiError> {
    params.only(&["version", "locale"])?;
    let versions = state.store.template_versions(name).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("No template {name}.")));
    }
    templates::choose(&versions, params.str("locale"), params.int("version")?)
        .cloned()
        .ok_or_else(|| {
            ApiError::NotFound(format!("Template {name} has no such version or locale."))
        })
}

async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[Scope::Read, Scope::Send])?;
    Ok(Json(version_view(&find(&state, &name, &params).await?)))
}

async fn versions(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    params: Params,
) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[Scope::Read, Scope::Send])?;
    params.only(&["limit", "cursor"])?;
    let versions = state.store.template_versions(&name).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("No template {name}.")));
    }
    let data: Vec<Value> = versions.iter().map(version_view).collect();
    // Newest version first (then by locale): the key counts down.
    Ok(Json(page_sorted(data, &params, |v| {
        format!(
            "{:019}.{}",
            i64::MAX - v["version"].as_i64().unwrap_or_default(),
            v["locale"].as_str().unwrap_or_default()
        )
    })?))
}

fn string_list(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Vec<String> {
    match obj.get(field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v.as_str() {
                Some(s)
                    if !s.is_empty()
                        && s.len() <= 64
                        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    Some(s.to_string())
                }
                _ => {
                    errors.push(FieldError::new(
                        format!("{field}[{i}]"),
                        "must be a variable name",
                    ));
                    None
                }
            })
            .collect(),
        Some(_) => {
            errors.push(FieldError::new(field, "must be an array of variable names"));
            Vec::new()
        }
    }
}

fn opt_str(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

/// The fields of a template version (`PUT /v1/templates/{name}`).
const VERSION_FIELDS: &[&str] = &[
    "subject",
    "html",
    "text",
    "locale",
    "required",
    "secret",
    "description",
    "priority",
];

async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    auth.require(Scope::Admin)?;
    check_name(&name)?;
    let obj = object(&body, VERSION_FIELDS)?;
    let version = new_version(name, obj)?;
    let compiled = templates::compile(
        &version.subject,
        version.html.as_deref(),
        version.text.as_deref(),
    )
    .map_err(crate::sending::template_problems)?;
    check_secrets_are_read(&compiled, &version.secret)?;
    let stored = state.store.put_template(&version).await?;
    state.sender.forget_template(&stored.name);
    Ok((StatusCode::CREATED, Json(version_view(&stored))).into_response())
}

/// A new version from a request's fields, every invalid field named at
/// once (its syntax is checked by compiling it, after).
fn new_version(
    name: String,
    obj: &serde_json::Map<String, Value>,
) -> Result<TemplateVersion, ApiError> {
    let mut errors = Vec::new();
    let subject = opt_str(obj, "subject", &mut errors);
    // An empty body is no body (no empty part in every message).
    let html = opt_str(obj, "html", &mut errors).filter(|b| !b.trim().is_empty());
    let text = opt_str(obj, "text", &mut errors).filter(|b| !b.trim().is_empty());
    let locale = opt_str(obj, "locale", &mut errors).unwrap_or_else(|| "en".to_string());
    let description = opt_str(obj, "description", &mut errors);
    let priority = opt_str(obj, "priority", &mut errors);
    let required = string_list(obj, "required", &mut errors);
    let secret = string_list(obj, "secret", &mut errors);
    match &subject {
        None => errors.push(FieldError::new("subject", "is required")),
        Some(s) if s.trim().is_empty() || s.contains(['\r', '\n']) => {
            errors.push(FieldError::new("subject", "must be one non-empty line"))
        }
        _ => {}
    }
    if html.is_none() && text.is_none() {
        errors.push(FieldError::new(
            "html",
            "a non-empty html or text (or both) is required",
        ));
    }
    if !is_locale(&locale) {
        errors.push(FieldError::new(
            "locale",
            "must be a language tag such as en or zh-CN",
        ));
    }
    let priority = priority.and_then(|p| {
        let parsed = Priority::parse(&p);
        if parsed.is_none() {
            errors.push(FieldError::new("priority", "must be high, normal or bulk"));
        }
        parsed
    });
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(TemplateVersion {
        name,
        locale,
        version: 0,
        subject: subject.unwrap_or_default(),
        html,
        text,
        required,
        secret,
        description,
        priority,
        builtin: false,
        created_at: now_ms(),
    })
}

/// A secret the template never reads is a typo that would leave the real
/// one unmasked in logs, events and listings.
fn check_secrets_are_read(
    compiled: &minijinja::Environment<'static>,
    secret: &[String],
) -> Result<(), ApiError> {
    let used = templates::variables(compiled);
    let unknown: Vec<FieldError> = secret
        .iter()
        .enumerate()
        .filter(|(_, var)| !used.contains(*var))
        .map(|(i, var)| {
            FieldError::new(
                format!("secret[{i}]"),
                format!("`{var}` is not a variable of this template"),
            )
        })
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(unknown))
    }
}

async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Scope::Admin)?;
    let versions = state.store.template_versions(&name).await?;
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("No template {name}.")));
    }
    if versions.iter().all(|v| v.builtin) {
        return Err(ApiError::Conflict {
            slug: "builtin-template",
            detail: format!("{name} is built in and has no customized versions to delete."),
            retry_after: None,
        });
    }
    state.store.delete_template(&name).await?;
    state.sender.forget_template(&name);
    Ok(StatusCode::NO_CONTENT)
}

async fn render(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    auth.require_any(&[Scope::Read, Scope::Send])?;
    let obj = object(&body, &["data", "locale", "version"])?;
    let data = match obj.get("data") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(ApiError::validation("data", "must be an object")),
    };
    let locale = match obj.get("locale") {
        None | Some(Value::Null) => None,
        Some(Value::String(l)) if is_locale(l) => Some(l.clone()),
        Some(_) => {
            return Err(ApiError::validation(
                "locale",
                "must be a language tag such as en or zh-CN",
            ))
        }
    };
    let version = match obj.get("version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::validation("version", "must be a positive integer"))?,
        ),
    };
    if state.store.template_versions(&name).await?.is_empty() {
        return Err(ApiError::NotFound(format!("No template {name}.")));
    }
    let preview = state
        .sender
        .preview(&name, &data, locale.as_deref(), version)
        .await?;
    Ok(Json(json!({
        "subject": preview.rendered.subject,
        "html": preview.rendered.html,
        "text": preview.rendered.text,
        "locale": preview.version.locale,
        "version": preview.version.version,
        "mime_size_bytes": preview.mime_bytes,
    })))
}
