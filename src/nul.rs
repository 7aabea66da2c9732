//! NUL (U+0000) is refused wherever a client can put text: in a JSON body
//! (422 naming each field; a batch item on its own), a query parameter
//! (422) or a path (404, in `http`). No value of this API has a use for it
//! — an email may not carry one (RFC 5322), and Postgres cannot store one
//! in a text column, so without this rule such a request reached the store
//! and failed there as a 500.

use std::fmt::Write as _;

use serde_json::Value;

use crate::error::FieldError;

const MESSAGE: &str = "must not contain NUL characters (U+0000)";

/// The fields of a parsed JSON body whose value (or name) holds a NUL; none
/// without a look at the value when the raw text has no `\u0000` escape
/// (the only way JSON can carry one), so the common case costs one scan.
pub fn json_fields(raw: &[u8], value: &Value) -> Vec<FieldError> {
    if memchr::memmem::find(raw, b"\\u0000").is_some() {
        value_fields(value)
    } else {
        Vec::new()
    }
}

/// The fields of `value` whose value (or name) holds a NUL. Paths are
/// only spelled out when there is one (a send's body is checked on every
/// request).
pub fn value_fields(value: &Value) -> Vec<FieldError> {
    let mut found = Vec::new();
    if holds_nul(value) {
        walk(value, &mut String::new(), &mut found);
    }
    found
}

/// The NUL complaints, then the `others` about fields without a NUL: a
/// field holding one is named once, for that — not again by a check that
/// spells its name raw (an unknown field, a header name) or that judges
/// the object holding it (an address whose `name` holds the NUL).
pub fn named_first(nul: Vec<FieldError>, others: Vec<FieldError>) -> Vec<FieldError> {
    if nul.is_empty() {
        return others;
    }
    let mut all = nul;
    let named = all.len();
    for e in others {
        let about_a_nul = e.field.contains('\0')
            || all[..named]
                .iter()
                .any(|n| n.field == e.field || parent(&n.field) == Some(e.field.as_str()));
        if !about_a_nul {
            all.push(e);
        }
    }
    all
}

/// The field holding `field` (`to[0]` for `to[0].name`), if any.
fn parent(field: &str) -> Option<&str> {
    field.rfind(['.', '[']).map(|at| &field[..at])
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields
            .iter()
            .any(|(name, item)| name.contains('\0') || holds_nul(item)),
        _ => false,
    }
}

fn walk(value: &Value, path: &mut String, found: &mut Vec<FieldError>) {
    match value {
        Value::String(s) if s.contains('\0') => found.push(FieldError::new(path.clone(), MESSAGE)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                walk(item, path, found);
                path.truncate(len);
            }
        }
        Value::Object(fields) => {
            for (name, item) in fields {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                let _ = write!(path, "{}", name.escape_debug());
                if name.contains('\0') {
                    found.push(FieldError::new(path.clone(), MESSAGE));
                } else {
                    walk(item, path, found);
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The query parameters (by name) that hold a NUL.
pub fn params<'a>(pairs: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<FieldError> {
    pairs
        .filter(|(k, v)| k.contains('\0') || v.contains('\0'))
        .map(|(k, _)| FieldError::new(k.escape_debug().to_string(), MESSAGE))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: &Value) -> Vec<String> {
        let raw = serde_json::to_vec(value).unwrap();
        json_fields(&raw, value)
            .into_iter()
            .map(|f| f.field)
            .collect()
    }

    #[test]
    fn every_field_with_a_nul_is_named() {
        let body = json!({
            "text": "a\u{0}b",
            "to": ["ok@example.com", {"name": "x\u{0}"}],
            "data": {"code": "1\u{0}2", "ok": "fine"},
            "metadata": {"k\u{0}": "v"},
        });
        let mut got = fields(&body);
        got.sort();
        assert_eq!(
            got,
            ["data.code", "metadata.k\\0", "text", "to[1].name"],
            "each offending value, and a key holding one, by its path"
        );
    }

    #[test]
    fn text_without_a_nul_passes_even_with_the_escape_spelled_out() {
        // A literal backslash followed by `u0000` is six ordinary characters.
        let body = json!({"text": "\\u0000 is how JSON writes NUL"});
        assert!(fields(&body).is_empty());
        assert!(fields(&json!({"a": [1, true, null, "x"]})).is_empty());
    }

    #[test]
    fn a_parsed_value_is_checked_without_its_text() {
        let body = json!({"to": [{"email": "a@example.com", "name": "\u{0}"}]});
        let got: Vec<String> = value_fields(&body).into_iter().map(|f| f.field).collect();
        assert_eq!(got, ["to[0].name"]);
        assert!(value_fields(&json!({"to": ["a@example.com"], "n": 1})).is_empty());
    }

    #[test]
    fn a_field_holding_a_nul_is_named_once() {
        let nul = vec![FieldError::new("to[0]", MESSAGE)];
        let others = vec![
            FieldError::new("to[0]", "invalid address: contains a control character"),
            FieldError::new("from", "is required"),
        ];
        let all: Vec<(String, String)> = named_first(nul, others)
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect();
        assert_eq!(
            all,
            [
                ("to[0]".to_string(), MESSAGE.to_string()),
                ("from".to_string(), "is required".to_string())
            ]
        );
    }

    #[test]
    fn a_nul_is_not_named_again_raw_or_by_its_container() {
        let nul = vec![
            FieldError::new("to[0].name", MESSAGE),
            FieldError::new("headers.x\\0y", MESSAGE),
        ];
        let others = vec![
            FieldError::new("to[0]", "invalid address: contains a control character"),
            FieldError::new("headers.x\0y", "is not a valid header name"),
            FieldError::new("to[1]", "invalid address"),
            FieldError::new("to", "too many recipients"),
        ];
        let fields: Vec<String> = named_first(nul, others)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["to[0].name", "headers.x\\0y", "to[1]", "to"]);
    }

    #[test]
    fn query_parameters_with_a_nul_are_named() {
        let pairs = [
            ("tag".to_string(), "a\0".to_string()),
            ("to".to_string(), "b".to_string()),
        ];
        let got: Vec<String> = params(pairs.iter().map(|(k, v)| (k, v)))
            .into_iter()
            .map(|f| f.field)
            .collect();
        assert_eq!(got, ["tag"]);
    }
}
