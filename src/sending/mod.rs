//! Accepting mail: validate, render, compose, apply idempotency and quotas,
//! commit (group commit, which then enqueues the ids). A 202 is returned only
//! after the commit; an enqueue that fails after it is repaired by the sweeper.

mod commit;
mod compose;
mod dkim;
mod gather;
pub mod request;
mod reservations;
mod transfer;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub use commit::{CommitError, Committer};
pub use dkim::{DkimError, DkimSigner};
pub use request::{Content, SendRequest};
pub use reservations::{ReserveError, Reserver};

use crate::domain::{new_id, now_ms, Mailbox, Millis, Priority, Status};
use crate::error::{ApiError, FieldError};
use crate::keys::ApiKey;
use crate::limiter::{Limiter, QuotaDecision, QuotaRequest, Reservation};
use crate::store::{
    IdemBegin, IdemFinish, IdemRequest, NewMessage, NewRecipient, Store, TemplateVersion,
};
use crate::templates::{self, Rendered, TemplateEngine, TemplateProblem};
use crate::ttl_cache::TtlCache;

pub const MAX_BATCH: usize = 500;

/// What a send produced, for the HTTP layer to answer with.
pub struct Accepted {
    pub status: StatusCode,
    pub body: Value,
    pub replayed: bool,
    /// (daily, monthly) used after this request, when the key has quotas.
    pub quota_used: Option<(i64, i64)>,
}

/// A validated, rendered, composed message not yet stored.
struct Prepared {
    message: NewMessage,
    response: Value,
    quota_recipients: Vec<String>,
}

pub struct SenderSettings {
    pub default_from: Option<Mailbox>,
    pub max_attachment_bytes: usize,
    pub dkim: DkimSigner,
}

/// How long template lookups are cached. Versions are immutable; a new
/// version or a delete made through another process is seen within this.
const TEMPLATE_CACHE: Duration = Duration::from_secs(1);

pub struct Sender {
    template_cache: TtlCache<Arc<Vec<TemplateVersion>>>,
    store: Arc<dyn Store>,
    limiter: Arc<dyn Limiter>,
    templates: Arc<TemplateEngine>,
    committer: Committer,
    reserver: Reserver,
    settings: SenderSettings,
}

/// Preview of a template render, as `POST /v1/templates/{name}/render` returns.
pub struct Preview {
    pub rendered: Rendered,
    pub version: TemplateVersion,
    pub mime_bytes: usize,
}

/// A template's compile or render problems as a 422 naming each part.
pub fn template_problems(problems: Vec<TemplateProblem>) -> ApiError {
    ApiError::Validation(
        problems
            .into_iter()
            .map(|p| FieldError::new(p.field, p.message))
            .collect(),
    )
}

pub fn request_hash(body: &Value) -> String {
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

impl Sender {
    pub fn new(
        store: Arc<dyn Store>,
        limiter: Arc<dyn Limiter>,
        templates: Arc<TemplateEngine>,
        committer: Committer,
        reserver: Reserver,
        settings: SenderSettings,
    ) -> Sender {
        Sender {
            template_cache: TtlCache::new(TEMPLATE_CACHE, 10_000),
            store,
            limiter,
            templates,
            committer,
            reserver,
            settings,
        }
    }

    async fn template_versions(&self, name: &str) -> Result<Arc<Vec<TemplateVersion>>, ApiError> {
        // Every stored template has a slug for a name (`PUT` checks it): no
        // other name is asked of the store (one holding a NUL would be an
        // error there, not an unknown template).
        if !request::is_slug(name) {
            return Ok(Arc::default());
        }
        if let Some(versions) = self.template_cache.get(name) {
            return Ok(versions);
        }
        let versions = Arc::new(self.store.template_versions(name).await?);
        self.template_cache.put(name, versions.clone());
        Ok(versions)
    }

    /// Drops a cached template after this process changed it.
    pub fn forget_template(&self, name: &str) {
        self.template_cache.forget(name);
    }

    /// Finds the template version a request asks for; a problem with the
    /// version names `version_field`, the request's own name for it (a
    /// send's `template_version`, a render's `version`).
    pub async fn resolve_template(
        &self,
        name: &str,
        locale: Option<&str>,
        version: Option<i64>,
        version_field: &'static str,
    ) -> Result<TemplateVersion, ApiError> {
        let versions = self.template_versions(name).await?;
        if versions.is_empty() {
            return Err(ApiError::validation(
                "template",
                format!("unknown template `{name}`"),
            ));
        }
        templates::choose(&versions, locale, version)
            .cloned()
            .ok_or_else(|| {
                let which = match (version, locale) {
                    (Some(v), Some(l)) => format!("no version {v} in locale {l}"),
                    (Some(v), None) => format!("no version {v}"),
                    (None, Some(l)) => format!("no version in locale {l}"),
                    (None, None) => "no version".to_string(),
                };
                let field = if version.is_some() {
                    version_field
                } else {
                    "locale"
                };
                ApiError::validation(field, format!("template `{name}` has {which}"))
            })
    }

    /// The 422 for an invalid request, naming every bad field: the
    /// request's own and, when its content could be read, what rendering
    /// it finds (an unknown template, a missing variable).
    async fn every_problem(&self, invalid: request::Invalid) -> ApiError {
        let mut errors = invalid.errors;
        if let Some(content) = &invalid.content {
            if let Err(ApiError::Validation(more)) = self.render(content).await {
                // A field the request's own checks named (a template name
                // holding a NUL) is not named again as unknown.
                for e in more {
                    if !errors.iter().any(|known| known.field == e.field) {
                        errors.push(e);
                    }
                }
            }
        }
        ApiError::Validation(errors)
    }

    async fn render(
        &self,
        content: &Content,
    ) -> Result<(Rendered, Option<Rendered>, Option<TemplateVersion>), ApiError> {
        match content {
            Content::Inline {
                subject,
                html,
                text,
            } => Ok((
                Rendered {
                    subject: subject.clone(),
                    html: html.clone(),
                    text: text.clone(),
                },
                None,
                None,
            )),
            Content::Template {
                name,
                version,
                locale,
                data,
            } => {
                let t = self
                    .resolve_template(name, locale.as_deref(), *version, "template_version")
                    .await?;
                let rendered = self.templates.render(&t, data).map_err(template_problems)?;
                let redacted = match templates::redacted_data(&t.secret, data) {
                    Some(safe) => Some(
                        self.templates
                            .render(&t, &safe)
                            .map_err(template_problems)?,
                    ),
                    None => None,
                };
                Ok((rendered, redacted, Some(t)))
            }
        }
    }

    /// Everything but side effects: a 422 here stores and sends nothing.
    async fn prepare(&self, key: &ApiKey, body: &Value, now: Millis) -> Result<Prepared, ApiError> {
        let limits = request::ParseLimits {
            max_attachment_bytes: self.settings.max_attachment_bytes,
            now,
            default_from: self.settings.default_from.as_ref(),
            allowed_from_domains: &key.allowed_from_domains,
        };
        let req = match request::parse(body, &limits) {
            Ok(req) => req,
            Err(invalid) => return Err(self.every_problem(invalid).await),
        };
        let from = &req.from;
        let (rendered, redacted, template) = self.render(&req.content).await?;
        let id = new_id();
        let message_id_header = format!("<{id}@{}>", from.email.ascii_domain());
        let envelope = compose::Envelope {
            from,
            to: &req.to,
            cc: &req.cc,
            reply_to: &req.reply_to,
            headers: &req.headers,
            attachments: &req.attachments,
            message_id: &message_id_header,
            date: SystemTime::now(),
            boundary: &format!("mr{}", uuid::Uuid::new_v4().simple()),
        };
        let compose_err = |e: compose::ComposeError| ApiError::validation("", e.to_string());
        let dkim = Some(&self.settings.dkim);
        // The redacted copy is only ever shown, never sent: not signed.
        let (mime, mime_redacted, mime_patch) = match &redacted {
            Some(r) => {
                let c = compose::compose_with_redacted(&envelope, &rendered, r, dkim)
                    .map_err(compose_err)?;
                (c.sent, Some(c.shown), Some(c.patch))
            }
            None => (
                compose::compose(&envelope, &rendered, dkim).map_err(compose_err)?,
                None,
                None,
            ),
        };
        let status = if req.send_at.is_some() {
            Status::Scheduled
        } else {
            Status::Queued
        };
        let mut seen = std::collections::HashSet::new();
        let mut recipients = Vec::new();
        let mut shown = Vec::new();
        for (kind, list) in [("to", &req.to), ("cc", &req.cc), ("bcc", &req.bcc)] {
            for m in list.iter() {
                if !seen.insert(m.email.key()) {
                    continue;
                }
                recipients.push(NewRecipient {
                    kind,
                    address: m.to_string(),
                    email: m.email.envelope(),
                });
                // The 202 names each recipient as it is stored and as
                // events, webhooks and lists do (an IDN domain in ASCII).
                shown.push(json!({"email": m.email.envelope(), "name": m.name, "type": kind, "status": status.as_str()}));
            }
        }
        let priority = req
            .priority
            .or(template.as_ref().and_then(|t| t.priority))
            .unwrap_or(Priority::Normal);
        let response = json!({"id": id, "status": status.as_str(), "recipients": shown});
        let quota_recipients = recipients.iter().map(|r| r.email.to_lowercase()).collect();
        let message = NewMessage {
            id,
            key_id: key.id.clone(),
            mode: key.mode,
            status,
            priority,
            from_addr: from.to_string(),
            mail_from: from.email.envelope(),
            subject: redacted.as_ref().unwrap_or(&rendered).subject.clone(),
            template: template.as_ref().map(|t| t.name.clone()),
            template_version: template.as_ref().map(|t| t.version),
            locale: template.as_ref().map(|t| t.locale.clone()),
            tags: req.tags.clone(),
            metadata: Value::Object(req.metadata.clone()),
            message_id_header,
            mime,
            mime_redacted,
            mime_patch,
            send_at: req.send_at,
            expires_at: req.expires_at,
            collapse_key: req.collapse_key.clone(),
            next_attempt_at: req.send_at.unwrap_or(now),
            recipients,
            idempotency: None,
        };
        Ok(Prepared {
            message,
            response,
            quota_recipients,
        })
    }

    async fn begin_idempotency(
        &self,
        key: &ApiKey,
        idem_key: &str,
        body: &Value,
    ) -> Result<Option<Accepted>, ApiError> {
        let req = IdemRequest {
            key_id: key.id.clone(),
            idem_key: idem_key.to_string(),
            request_hash: request_hash(body),
        };
        let begun = self.reserver.begin(req).await.map_err(|e| match e {
            ReserveError::Busy => {
                ApiError::Unavailable("idempotency keys (too many requests in flight)")
            }
            ReserveError::Store(s) => ApiError::from(s),
        })?;
        match begun {
            IdemBegin::Reserved => Ok(None),
            IdemBegin::Replay { status, body } => Ok(Some(Accepted {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED),
                body: serde_json::from_str(&body).unwrap_or(Value::Null),
                replayed: true,
                quota_used: None,
            })),
            IdemBegin::Mismatch => Err(ApiError::Unprocessable {
                slug: "idempotency-key-reused",
                title: "Idempotency key reused",
                detail: "This Idempotency-Key was used with a different request body.".into(),
            }),
            IdemBegin::InFlight => Err(ApiError::Conflict {
                slug: "idempotency-in-flight",
                detail: "A request with this Idempotency-Key is still being processed.".into(),
                retry_after: Some(1),
            }),
        }
    }

    async fn release_idempotency(&self, key: &ApiKey, idem_key: Option<&str>) {
        if let Some(k) = idem_key {
            if let Err(e) = self.store.idem_release(&key.id, k).await {
                tracing::warn!(error = %e, "could not release idempotency key");
            }
        }
    }

    /// Reserves quota for one message; `Ok(None)` when the key is unlimited.
    async fn reserve(
        &self,
        key: &ApiKey,
        p: &Prepared,
        now: Millis,
    ) -> Result<Option<(Reservation, i64, i64)>, ApiError> {
        let req = QuotaRequest {
            key_id: key.id.clone(),
            count: p.message.recipients.len() as i64,
            daily: key.limits.daily_quota,
            monthly: key.limits.monthly_quota,
            per_recipient_hourly: key.limits.per_recipient_hourly,
            recipients: p.quota_recipients.clone(),
            now,
            tz: key.limits.tz(),
        };
        if req.unlimited() {
            return Ok(None);
        }
        match self.limiter.reserve(&req).await? {
            QuotaDecision::Allowed {
                daily_used,
                monthly_used,
                reservation,
            } => Ok(Some((reservation, daily_used, monthly_used))),
            QuotaDecision::Denied {
                policy,
                retry_after_ms,
                ..
            } => Err(ApiError::RateLimited {
                policy: policy.as_str(),
                detail: format!(
                    "The key's {} limit is reached.",
                    policy.as_str().replace('_', " ")
                ),
                retry_after: ((retry_after_ms + 999) / 1000) as u64,
                headers: Default::default(),
            }),
        }
    }

    async fn release(&self, reservations: &[Reservation]) {
        for r in reservations {
            if let Err(e) = self.limiter.release(r).await {
                tracing::warn!(error = %e, "could not release quota");
            }
        }
    }

    async fn commit(&self, messages: Vec<NewMessage>) -> Result<(), ApiError> {
        self.committer.commit(messages).await.map_err(|e| match e {
            CommitError::Busy => {
                ApiError::Unavailable("accept queue (too many requests in flight)")
            }
            CommitError::Store(s) => ApiError::from(s),
        })
    }

    /// `POST /v1/send`.
    pub async fn send(
        &self,
        key: &ApiKey,
        body: Value,
        idem_key: Option<&str>,
    ) -> Result<Accepted, ApiError> {
        if let Some(k) = idem_key {
            if let Some(replay) = self.begin_idempotency(key, k, &body).await? {
                return Ok(replay);
            }
        }
        match self.send_reserved(key, &body, idem_key).await {
            Ok(accepted) => Ok(accepted),
            Err(e) => {
                self.release_idempotency(key, idem_key).await;
                Err(e)
            }
        }
    }

    async fn send_reserved(
        &self,
        key: &ApiKey,
        body: &Value,
        idem_key: Option<&str>,
    ) -> Result<Accepted, ApiError> {
        let now = now_ms();
        let mut prepared = self.prepare(key, body, now).await?;
        let reservation = self.reserve(key, &prepared, now).await?;
        if let Some(k) = idem_key {
            prepared.message.idempotency = Some(IdemFinish {
                key_id: key.id.clone(),
                idem_key: k.to_string(),
                status: 202,
                body: prepared.response.to_string(),
            });
        }
        if let Err(e) = self.commit(vec![prepared.message]).await {
            self.release(&reservation.into_iter().map(|r| r.0).collect::<Vec<_>>())
                .await;
            return Err(e);
        }
        Ok(Accepted {
            status: StatusCode::ACCEPTED,
            body: prepared.response,
            replayed: false,
            quota_used: reservation.map(|(_, d, m)| (d, m)),
        })
    }

    /// `POST /v1/send/batch`: each item on its own; quotas are reserved item
    /// by item in order, and items that do not fit get a 429 problem.
    pub async fn send_batch(
        &self,
        key: &ApiKey,
        body: Value,
        idem_key: Option<&str>,
    ) -> Result<Accepted, ApiError> {
        let items = batch_items(&body)?;
        if let Some(k) = idem_key {
            if let Some(replay) = self.begin_idempotency(key, k, &body).await? {
                return Ok(replay);
            }
        }
        match self.batch_reserved(key, items, idem_key).await {
            Ok(accepted) => Ok(accepted),
            Err(e) => {
                self.release_idempotency(key, idem_key).await;
                Err(e)
            }
        }
    }

    async fn batch_reserved(
        &self,
        key: &ApiKey,
        items: &[Value],
        idem_key: Option<&str>,
    ) -> Result<Accepted, ApiError> {
        let now = now_ms();
        let mut results: Vec<Result<Prepared, ApiError>> = Vec::with_capacity(items.len());
        let mut reservations = Vec::new();
        let mut quota_used = None;
        for item in items {
            let prepared = match self.prepare(key, item, now).await {
                Ok(p) => match self.reserve(key, &p, now).await {
                    Ok(r) => {
                        if let Some((res, d, m)) = r {
                            reservations.push(res);
                            quota_used = Some((d, m));
                        }
                        Ok(p)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            results.push(prepared);
        }
        let data: Vec<Value> = results
            .iter()
            .enumerate()
            .map(|(index, r)| match r {
                Ok(p) => {
                    let mut v = p.response.clone();
                    v["index"] = json!(index);
                    v
                }
                Err(e) => json!({"index": index, "error": e.problem()}),
            })
            .collect();
        let response = json!({"data": data});
        let mut messages: Vec<NewMessage> = results
            .into_iter()
            .filter_map(Result::ok)
            .map(|p| p.message)
            .collect();
        if messages.is_empty() {
            self.release_idempotency(key, idem_key).await;
        } else if let Some(k) = idem_key {
            messages[0].idempotency = Some(IdemFinish {
                key_id: key.id.clone(),
                idem_key: k.to_string(),
                status: 200,
                body: response.to_string(),
            });
        }
        if !messages.is_empty() {
            if let Err(e) = self.commit(messages).await {
                self.release(&reservations).await;
                return Err(e);
            }
        }
        Ok(Accepted {
            status: StatusCode::OK,
            body: response,
            replayed: false,
            quota_used,
        })
    }

    /// Renders a template exactly as a send would, without sending.
    pub async fn preview(
        &self,
        name: &str,
        data: &Value,
        locale: Option<&str>,
        version: Option<i64>,
    ) -> Result<Preview, ApiError> {
        let t = self
            .resolve_template(name, locale, version, "version")
            .await?;
        let rendered = self.templates.render(&t, data).map_err(template_problems)?;
        let from = self
            .settings
            .default_from
            .clone()
            .or_else(|| Mailbox::parse("preview@mailroom.example").ok())
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("preview address")))?;
        let to = [from.clone()];
        let envelope = compose::Envelope {
            from: &from,
            to: &to,
            cc: &[],
            reply_to: &[],
            headers: &[],
            attachments: &[],
            message_id: "<preview@mailroom.example>",
            date: SystemTime::now(),
            boundary: "preview",
        };
        let mime = compose::compose(&envelope, &rendered, None)
            .map_err(|e| ApiError::validation("", e.to_string()))?;
        Ok(Preview {
            rendered,
            version: t,
            mime_bytes: mime.len(),
        })
    }
}

fn batch_items(body: &Value) -> Result<&[Value], ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::validation(
            "",
            "the request body must be a JSON object",
        ));
    };
    let mut errors: Vec<FieldError> = obj
        .keys()
        .filter(|k| *k != "messages")
        .map(|k| FieldError::new(k.clone(), "unknown field"))
        .collect();
    let items = obj.get("messages").and_then(Value::as_array);
    match items {
        None => errors.push(FieldError::new(
            "messages",
            "is required: an array of send requests",
        )),
        Some(items) if items.is_empty() || items.len() > MAX_BATCH => errors.push(FieldError::new(
            "messages",
            format!("must hold 1 to {MAX_BATCH} messages"),
        )),
        _ => {}
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(items.map(Vec::as_slice).unwrap_or_default())
}

/// `Map` re-export for handlers building JSON.
pub type JsonMap = Map<String, Value>;
