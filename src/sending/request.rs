//! Parsing and validating a send request from JSON: every invalid or unknown
//! field is collected and reported at once; nothing here touches the store.

use base64::Engine as _;
use chrono::DateTime;
use serde_json::{Map, Value};

use crate::domain::{Mailbox, Millis, Priority};
use crate::error::FieldError;

pub const MAX_RECIPIENTS: usize = 50;
const MAX_SCHEDULE_AHEAD_MS: i64 = 30 * 24 * 3_600_000;
const MAX_TAGS: usize = 10;
const MAX_METADATA_KEYS: usize = 20;
const MAX_METADATA_BYTES: usize = 4096;

const KNOWN_FIELDS: &[&str] = &[
    "template",
    "template_version",
    "locale",
    "data",
    "subject",
    "html",
    "text",
    "from",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "headers",
    "tags",
    "metadata",
    "attachments",
    "send_at",
    "expires_at",
    "priority",
    "collapse_key",
];

/// Headers a client may not set: Mailroom writes them, or they would let a
/// client forge routing, authentication or structure.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "sender",
    "received",
    "return-path",
    "dkim-signature",
    "arc-seal",
    "arc-message-signature",
    "arc-authentication-results",
    "authentication-results",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "delivered-to",
    "resent-from",
    "resent-to",
    "resent-cc",
    "resent-bcc",
    "resent-date",
    "resent-message-id",
    "resent-sender",
];

#[derive(Debug, Clone)]
pub enum Content {
    Template {
        name: String,
        version: Option<i64>,
        locale: Option<String>,
        data: Value,
    },
    Inline {
        subject: String,
        html: Option<String>,
        text: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct SendRequest {
    pub content: Content,
    /// The request's `from`, or the configured default.
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub headers: Vec<(String, String)>,
    pub tags: Vec<String>,
    pub metadata: Map<String, Value>,
    pub attachments: Vec<Attachment>,
    pub send_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub priority: Option<Priority>,
    pub collapse_key: Option<String>,
}

/// What the parser checks against that comes from configuration and from
/// the sending key.
pub struct ParseLimits<'a> {
    pub max_attachment_bytes: usize,
    pub now: Millis,
    /// `From` for a request without one (`MAILROOM_DEFAULT_FROM`).
    pub default_from: Option<&'a Mailbox>,
    /// The key's allowed `From` domains (empty: any).
    pub allowed_from_domains: &'a [String],
}

/// A request that cannot be accepted: every bad field found, and its
/// content when that part could be read (so that what rendering it finds
/// is named in the same answer).
#[derive(Debug)]
pub struct Invalid {
    pub errors: Vec<FieldError>,
    pub content: Option<Content>,
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }
}

pub fn is_slug(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !name.starts_with('-')
}

pub fn is_locale(locale: &str) -> bool {
    !locale.is_empty()
        && locale.len() <= 35
        && locale
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn opt_string(obj: &Map<String, Value>, field: &str, errors: &mut Errors) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.add(field, "must be a string");
            None
        }
    }
}

fn mailbox(value: &Value, field: &str, errors: &mut Errors) -> Option<Mailbox> {
    let parsed = match value {
        Value::String(s) => Mailbox::parse(s),
        Value::Object(o) => {
            if let Some(extra) = o.keys().find(|k| *k != "email" && *k != "name") {
                errors.add(format!("{field}.{extra}"), "unknown field");
                return None;
            }
            let Some(email) = o.get("email").and_then(Value::as_str) else {
                errors.add(format!("{field}.email"), "is required and must be a string");
                return None;
            };
            let name = match o.get("name") {
                None | Some(Value::Null) => None,
                Some(Value::String(n)) => Some(n.clone()),
                Some(_) => {
                    errors.add(format!("{field}.name"), "must be a string");
                    return None;
                }
            };
            Mailbox::new(name, email)
        }
        _ => {
            errors.add(field, "must be an address string or {\"email\", \"name\"}");
            return None;
        }
    };
    match parsed {
        Ok(m) => Some(m),
        Err(e) => {
            errors.add(field, format!("invalid address: {e}"));
            None
        }
    }
}

fn mailbox_list(obj: &Map<String, Value>, field: &str, errors: &mut Errors) -> Vec<Mailbox> {
    match obj.get(field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| mailbox(v, &format!("{field}[{i}]"), errors))
            .collect(),
        Some(single) => mailbox(single, field, errors).into_iter().collect(),
    }
}

fn timestamp(obj: &Map<String, Value>, field: &str, errors: &mut Errors) -> Option<Millis> {
    let text = opt_string(obj, field, errors)?;
    match DateTime::parse_from_rfc3339(&text) {
        Ok(t) => Some(t.timestamp_millis()),
        Err(_) => {
            errors.add(
                field,
                "must be an RFC 3339 timestamp, e.g. 2026-11-26T10:00:00Z",
            );
            None
        }
    }
}

fn headers(obj: &Map<String, Value>, errors: &mut Errors) -> Vec<(String, String)> {
    let Some(value) = obj.get("headers").filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(map) = value.as_object() else {
        errors.add(
            "headers",
            "must be an object of header name to string value",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in map {
        let field = format!("headers.{name}");
        let name_ok = !name.is_empty()
            && name.len() <= 76
            && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
        if !name_ok {
            errors.add(field, "is not a valid header name");
            continue;
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            errors.add(field, "is set by Mailroom and cannot be overridden");
            continue;
        }
        let Some(text) = value.as_str() else {
            errors.add(field, "must be a string");
            continue;
        };
        if text.contains(['\r', '\n', '\0']) {
            errors.add(field, "must not contain CR, LF or NUL (header injection)");
            continue;
        }
        if text.len() > 998 {
            errors.add(field, "is longer than 998 characters");
            continue;
        }
        out.push((name.clone(), text.to_string()));
    }
    out
}

fn tags(obj: &Map<String, Value>, errors: &mut Errors) -> Vec<String> {
    let Some(value) = obj.get("tags").filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        errors.add("tags", "must be an array of strings");
        return Vec::new();
    };
    if items.len() > MAX_TAGS {
        errors.add("tags", format!("at most {MAX_TAGS} tags"));
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(t)
                if !t.is_empty()
                    && t.len() <= 64
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) =>
            {
                out.push(t.to_string())
            }
            _ => errors.add(
                format!("tags[{i}]"),
                "must be 1-64 characters of letters, digits, - _ . :",
            ),
        }
    }
    out
}

fn metadata(obj: &Map<String, Value>, errors: &mut Errors) -> Map<String, Value> {
    let Some(value) = obj.get("metadata").filter(|v| !v.is_null()) else {
        return Map::new();
    };
    let Some(map) = value.as_object() else {
        errors.add("metadata", "must be an object");
        return Map::new();
    };
    if map.len() > MAX_METADATA_KEYS {
        errors.add("metadata", format!("at most {MAX_METADATA_KEYS} keys"));
    }
    if value.to_string().len() > MAX_METADATA_BYTES {
        errors.add("metadata", format!("at most {MAX_METADATA_BYTES} bytes"));
    }
    for (k, v) in map {
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            errors.add(
                format!("metadata.{k}"),
                "must be a string, number or boolean",
            );
        }
    }
    map.clone()
}

fn attachments(obj: &Map<String, Value>, max_bytes: usize, errors: &mut Errors) -> Vec<Attachment> {
    let Some(value) = obj.get("attachments").filter(|v| !v.is_null()) else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        errors.add("attachments", "must be an array");
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut total = 0usize;
    for (i, item) in items.iter().enumerate() {
        let field = format!("attachments[{i}]");
        let Some(a) = item.as_object() else {
            errors.add(field, "must be an object {filename, content_type, content}");
            continue;
        };
        for extra in a
            .keys()
            .filter(|k| !["filename", "content_type", "content"].contains(&k.as_str()))
        {
            errors.add(format!("{field}.{extra}"), "unknown field");
        }
        let filename = a.get("filename").and_then(Value::as_str).unwrap_or("");
        if filename.is_empty()
            || filename.len() > 255
            || filename.contains(['\r', '\n', '\0', '/', '\\'])
        {
            errors.add(
                format!("{field}.filename"),
                "is required: 1-255 characters, no path separators or line breaks",
            );
        }
        let content_type = a
            .get("content_type")
            .and_then(Value::as_str)
            .unwrap_or("application/octet-stream");
        if lettre::message::header::ContentType::parse(content_type).is_err()
            || content_type.contains(['\r', '\n'])
        {
            errors.add(format!("{field}.content_type"), "is not a valid MIME type");
        }
        let content = match a.get("content").and_then(Value::as_str) {
            Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(bytes) => Some(bytes),
                Err(_) => {
                    errors.add(format!("{field}.content"), "is not valid base64");
                    None
                }
            },
            None => {
                errors.add(format!("{field}.content"), "is required (base64)");
                None
            }
        };
        if let Some(content) = content {
            total += content.len();
            out.push(Attachment {
                filename: filename.to_string(),
                content_type: content_type.to_string(),
                content,
            });
        }
    }
    if total > max_bytes {
        errors.add(
            "attachments",
            format!("attachments total {total} bytes; at most {max_bytes}"),
        );
    }
    out
}

fn content(obj: &Map<String, Value>, errors: &mut Errors) -> Option<Content> {
    let template = opt_string(obj, "template", errors);
    let subject = opt_string(obj, "subject", errors);
    // A body with nothing in it is no body: `"html": ""` beside a text
    // part adds no empty part, and alone it is no content at all.
    let html = opt_string(obj, "html", errors).filter(|b| !b.trim().is_empty());
    let text = opt_string(obj, "text", errors).filter(|b| !b.trim().is_empty());
    if let Some(name) = template {
        for inline in ["subject", "html", "text"] {
            if obj.get(inline).is_some_and(|v| !v.is_null()) {
                errors.add(inline, "cannot be combined with template");
            }
        }
        if !is_slug(&name) {
            errors.add(
                "template",
                "must be a template name (lowercase letters, digits, - and _)",
            );
        }
        let version = match obj.get("template_version") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64().filter(|n| *n > 0) {
                Some(n) => Some(n),
                None => {
                    errors.add("template_version", "must be a positive integer");
                    None
                }
            },
        };
        let locale = opt_string(obj, "locale", errors);
        if locale.as_deref().is_some_and(|l| !is_locale(l)) {
            errors.add("locale", "must be a language tag such as en or zh-CN");
        }
        let data = match obj.get("data") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                errors.add("data", "must be an object");
                Value::Object(Map::new())
            }
        };
        return Some(Content::Template {
            name,
            version,
            locale,
            data,
        });
    }
    for template_only in ["template_version", "locale", "data"] {
        if obj.get(template_only).is_some_and(|v| !v.is_null()) {
            errors.add(template_only, "only applies with template");
        }
    }
    let Some(subject) = subject else {
        errors.add(
            "template",
            "either template, or subject with html and/or text, is required",
        );
        return None;
    };
    if subject.trim().is_empty() || subject.contains(['\r', '\n', '\0']) || subject.len() > 998 {
        errors.add(
            "subject",
            "must be one non-empty line of at most 998 characters",
        );
    }
    if html.is_none() && text.is_none() {
        errors.add("html", "a non-empty html or text is required with subject");
    }
    Some(Content::Inline {
        subject,
        html,
        text,
    })
}

/// Parses a send request; `Err` lists every problem found.
pub fn parse(body: &Value, limits: &ParseLimits) -> Result<SendRequest, Invalid> {
    let mut errors = Errors(Vec::new());
    let Some(obj) = body.as_object() else {
        return Err(Invalid {
            errors: vec![FieldError::new(
                "",
                "the request body must be a JSON object",
            )],
            content: None,
        });
    };
    for key in obj.keys().filter(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        errors.add(key.clone(), "unknown field");
    }
    let content = content(obj, &mut errors);
    let from = sender(obj, limits, &mut errors);
    let to = mailbox_list(obj, "to", &mut errors);
    let cc = mailbox_list(obj, "cc", &mut errors);
    let bcc = mailbox_list(obj, "bcc", &mut errors);
    let reply_to = mailbox_list(obj, "reply_to", &mut errors);
    let total = to.len() + cc.len() + bcc.len();
    let listed = ["to", "cc", "bcc"]
        .iter()
        .map(|f| obj.get(*f).and_then(Value::as_array).map_or(0, Vec::len))
        .sum::<usize>();
    if total == 0 && errors.0.iter().all(|e| !e.field.starts_with("to")) {
        errors.add("to", "at least one recipient is required");
    }
    if total.max(listed) > MAX_RECIPIENTS {
        errors.add(
            "to",
            format!("at most {MAX_RECIPIENTS} recipients across to, cc and bcc"),
        );
    }
    let headers = headers(obj, &mut errors);
    let tags = tags(obj, &mut errors);
    let metadata = metadata(obj, &mut errors);
    let attachments = attachments(obj, limits.max_attachment_bytes, &mut errors);
    let mut send_at = timestamp(obj, "send_at", &mut errors);
    if let Some(at) = send_at {
        if at > limits.now + MAX_SCHEDULE_AHEAD_MS {
            errors.add("send_at", "at most 30 days ahead");
        }
        if at <= limits.now {
            send_at = None;
        }
    }
    let expires_at = timestamp(obj, "expires_at", &mut errors);
    if let Some(exp) = expires_at {
        if exp <= limits.now {
            errors.add("expires_at", "is in the past");
        } else if send_at.is_some_and(|s| exp <= s) {
            errors.add("expires_at", "must be after send_at");
        }
    }
    let priority = opt_string(obj, "priority", &mut errors).and_then(|p| {
        let parsed = Priority::parse(&p);
        if parsed.is_none() {
            errors.add("priority", "must be high, normal or bulk");
        }
        parsed
    });
    let collapse_key = opt_string(obj, "collapse_key", &mut errors);
    if collapse_key
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > 128 || k.chars().any(char::is_control))
    {
        errors.add("collapse_key", "must be 1-128 printable characters");
    }
    // A NUL anywhere is named, and named once (see `crate::nul`).
    errors.0 = crate::nul::named_first(crate::nul::value_fields(body), errors.0);
    match (errors.0.is_empty(), content, from) {
        (true, Some(content), Some(from)) => Ok(SendRequest {
            content,
            from,
            to,
            cc,
            bcc,
            reply_to,
            headers,
            tags,
            metadata,
            attachments,
            send_at,
            expires_at,
            priority,
            collapse_key,
        }),
        (_, content, _) => Err(Invalid {
            errors: errors.0,
            content,
        }),
    }
}

/// The sender: the request's `from` or the default, in one of the key's
/// allowed domains.
fn sender(obj: &Map<String, Value>, limits: &ParseLimits, errors: &mut Errors) -> Option<Mailbox> {
    let from = match obj.get("from").filter(|v| !v.is_null()) {
        Some(v) => mailbox(v, "from", errors)?,
        None => match limits.default_from {
            Some(default) => default.clone(),
            None => {
                errors.add("from", "is required (no MAILROOM_DEFAULT_FROM is set)");
                return None;
            }
        },
    };
    let domains = limits.allowed_from_domains;
    if !domains.is_empty()
        && !domains.iter().any(|d| {
            d.eq_ignore_ascii_case(from.email.domain())
                || d.eq_ignore_ascii_case(from.email.ascii_domain())
        })
    {
        errors.add(
            "from",
            format!("domain {} is not allowed for this key", from.email.domain()),
        );
        return None;
    }
    Some(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> ParseLimits<'static> {
        ParseLimits {
            max_attachment_bytes: 1000,
            now: 1_000_000,
            default_from: None,
            allowed_from_domains: &[],
        }
    }

    fn fields(body: Value) -> Vec<String> {
        parse(&body, &limits())
            .unwrap_err()
            .errors
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn every_bad_field_is_named() {
        let f = fields(json!({
            "template": "verification-code",
            "to": ["ok@example.com", "not an address"],
            "headers": {"X-Evil": "a\r\nBcc: x@y.co", "Bcc": "x@y.co"},
            "attachments": [{"filename": "a.pdf", "content": "%%%"}],
            "priority": "urgent",
            "tpyo": 1
        }));
        for expected in [
            "to[1]",
            "headers.X-Evil",
            "headers.Bcc",
            "attachments[0].content",
            "priority",
            "tpyo",
        ] {
            assert!(f.contains(&expected.to_string()), "{expected} not in {f:?}");
        }
    }

    #[test]
    fn recipients_are_capped() {
        let to: Vec<String> = (0..51).map(|i| format!("u{i}@example.com")).collect();
        assert!(fields(json!({"subject": "s", "text": "t", "to": to})).contains(&"to".to_string()));
    }

    #[test]
    fn inline_and_template_parse() {
        let req = parse(
            &json!({"subject": "Hi", "text": "x", "from": "a@acme.test", "to": "李雷 <lilei@example.com>", "send_at": "1970-01-01T00:00:00Z"}),
            &limits(),
        )
        .unwrap();
        assert_eq!(req.to[0].name.as_deref(), Some("李雷"));
        assert!(req.send_at.is_none(), "past send_at means now");
        let req = parse(
            &json!({"template": "password-reset", "data": {"reset_url": "x"}, "from": "a@acme.test", "to": [{"email": "b@example.com", "name": "Bo"}]}),
            &limits(),
        )
        .unwrap();
        assert!(matches!(req.content, Content::Template { .. }));
    }

    #[test]
    fn sender_is_the_default_and_in_an_allowed_domain() {
        let default = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let domains = ["acme.test".to_string()];
        let limits = ParseLimits {
            default_from: Some(&default),
            allowed_from_domains: &domains,
            ..limits()
        };
        let body = json!({"subject": "s", "text": "t", "to": "b@example.com"});
        assert_eq!(parse(&body, &limits).unwrap().from, default);
        let mut other = body.clone();
        other["from"] = json!("x@elsewhere.test");
        let invalid = parse(&other, &limits).unwrap_err();
        assert_eq!(invalid.errors[0].field, "from");
        assert!(
            invalid.content.is_some(),
            "the content is kept so that rendering can name its own problems"
        );
        assert_eq!(fields(body), ["from"], "no default: from is required");
    }
}
