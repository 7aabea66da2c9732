//! Templates: compiling (with syntax errors located by part, line and
//! column), choosing a version and locale (with fallback), and rendering
//! safely: strict undefined variables, HTML autoescape decided by the part
//! (never by the template's name), fuel, recursion and output-size limits.
//! Compiled templates are cached per (name, locale, version); versions are
//! immutable, so the cache never goes stale.

mod builtin;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value;

pub use builtin::builtins;

use crate::store::TemplateVersion;

/// Instructions a render may execute; a runaway loop ends in a 422.
const FUEL: u64 = 2_000_000;
const RECURSION_LIMIT: usize = 64;
/// Largest rendered part.
const MAX_PART_BYTES: usize = 2 * 1024 * 1024;
pub const REDACTED: &str = "[redacted]";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProblem {
    /// `subject`, `html` or `text` (or `data.<var>` for missing variables).
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub subject: String,
    pub html: Option<String>,
    pub text: Option<String>,
}

type Compiled = Arc<Environment<'static>>;

#[derive(Default)]
pub struct TemplateEngine {
    cache: RwLock<HashMap<(String, String, i64), Compiled>>,
}

const PARTS: [&str; 3] = ["subject", "html", "text"];

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

fn problem(part: &str, source: &str, err: &minijinja::Error) -> TemplateProblem {
    let line = err.line().unwrap_or(1);
    let column = err
        .range()
        .map(|r| {
            let start = r.start.min(source.len());
            let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
            source[line_start..start].chars().count() + 1
        })
        .unwrap_or(1);
    let detail = err
        .detail()
        .map_or_else(|| err.kind().to_string(), str::to_string);
    TemplateProblem {
        field: part.to_string(),
        message: format!("line {line}, column {column}: {detail}"),
    }
}

/// Compiles the parts of a template; every syntax error is reported.
pub fn compile(
    subject: &str,
    html: Option<&str>,
    text: Option<&str>,
) -> Result<Environment<'static>, Vec<TemplateProblem>> {
    let mut env = environment();
    let mut problems = Vec::new();
    for (part, source) in PARTS.iter().zip([Some(subject), html, text]) {
        if let Some(source) = source {
            if let Err(e) = env.add_template_owned(part.to_string(), source.to_string()) {
                problems.push(problem(part, source, &e));
            }
        }
    }
    if problems.is_empty() {
        Ok(env)
    } else {
        Err(problems)
    }
}

/// The variables a compiled template's parts read from their data.
pub fn variables(env: &Environment<'static>) -> std::collections::HashSet<String> {
    PARTS
        .iter()
        .filter_map(|part| env.get_template(part).ok())
        .flat_map(|t| t.undeclared_variables(false))
        .collect()
}

impl TemplateEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn compiled(&self, t: &TemplateVersion) -> Result<Compiled, Vec<TemplateProblem>> {
        let key = (t.name.clone(), t.locale.clone(), t.version);
        if let Some(env) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(env.clone());
        }
        let env = Arc::new(compile(&t.subject, t.html.as_deref(), t.text.as_deref())?);
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, env.clone());
        Ok(env)
    }

    /// Renders a stored version with `data`. Checks `required` variables
    /// first so that every missing one is named.
    pub fn render(
        &self,
        t: &TemplateVersion,
        data: &Value,
    ) -> Result<Rendered, Vec<TemplateProblem>> {
        let missing: Vec<TemplateProblem> = t
            .required
            .iter()
            .filter(|var| data.get(var.as_str()).is_none_or(Value::is_null))
            .map(|var| TemplateProblem {
                field: format!("data.{var}"),
                message: format!("required variable `{var}` is missing"),
            })
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        let env = self.compiled(t)?;
        render_parts(&env, data, t.html.is_some(), t.text.is_some())
    }
}

fn render_parts(
    env: &Environment<'static>,
    data: &Value,
    has_html: bool,
    has_text: bool,
) -> Result<Rendered, Vec<TemplateProblem>> {
    let mut problems = Vec::new();
    let mut render = |part: &str| -> Option<String> {
        let result = env.get_template(part).and_then(|t| t.render(data));
        match result {
            Ok(out) if out.len() > MAX_PART_BYTES => {
                problems.push(TemplateProblem {
                    field: part.to_string(),
                    message: format!("rendered {part} is larger than {MAX_PART_BYTES} bytes"),
                });
                None
            }
            Ok(out) => Some(out),
            Err(e) => {
                let source = env
                    .get_template(part)
                    .map(|t| t.source().to_string())
                    .unwrap_or_default();
                problems.push(problem(part, &source, &e));
                None
            }
        }
    };
    let subject = render("subject");
    let html = if has_html { render("html") } else { None };
    let text = if has_text { render("text") } else { None };
    if let Some(s) = &subject {
        if s.contains(['\r', '\n']) {
            problems.push(TemplateProblem {
                field: "subject".into(),
                message: "rendered subject contains a line break".into(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Rendered {
        subject: subject.unwrap_or_default(),
        html,
        text,
    })
}

/// `data` with every secret variable replaced by [`REDACTED`]; `None` when
/// the template declares no secret that `data` carries.
pub fn redacted_data(secret: &[String], data: &Value) -> Option<Value> {
    let map = data.as_object()?;
    if !secret.iter().any(|s| map.contains_key(s)) {
        return None;
    }
    let mut copy = map.clone();
    for s in secret {
        if copy.contains_key(s) {
            copy.insert(s.clone(), Value::String(REDACTED.to_string()));
        }
    }
    Some(Value::Object(copy))
}

/// The locale fallback chain: `zh-Hant-TW` → `zh-Hant` → `zh`.
pub fn locale_chain(locale: &str) -> Vec<String> {
    let parts: Vec<&str> = locale.split(['-', '_']).filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("-"))
        .collect()
}

/// Picks the version to use from all versions of one template.
/// `versions` must be non-empty. The default locale is `en` if present,
/// otherwise the locale of the oldest version.
pub fn choose<'a>(
    versions: &'a [TemplateVersion],
    locale: Option<&str>,
    version: Option<i64>,
) -> Option<&'a TemplateVersion> {
    let default_locale = if versions.iter().any(|v| v.locale.eq_ignore_ascii_case("en")) {
        "en".to_string()
    } else {
        versions
            .iter()
            .min_by_key(|v| (v.created_at, v.version))
            .map(|v| v.locale.clone())?
    };
    let mut chain = locale.map(locale_chain).unwrap_or_default();
    chain.push(default_locale);
    chain.iter().find_map(|candidate| {
        versions
            .iter()
            .filter(|v| v.locale.eq_ignore_ascii_case(candidate))
            .filter(|v| version.is_none_or(|n| v.version == n))
            .max_by_key(|v| v.version)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version(locale: &str, v: i64, html: &str) -> TemplateVersion {
        TemplateVersion {
            name: "t".into(),
            locale: locale.into(),
            version: v,
            subject: "Hi {{ name }}".into(),
            html: Some(html.into()),
            text: Some("Hi {{ name }}".into()),
            required: vec!["name".into()],
            secret: vec![],
            description: None,
            priority: None,
            builtin: false,
            created_at: v,
        }
    }

    #[test]
    fn autoescape_html_not_text() {
        let engine = TemplateEngine::new();
        let t = version("en", 1, "<p>{{ name }}</p>");
        let out = engine.render(&t, &json!({"name": "<b>&"})).unwrap();
        assert_eq!(out.html.unwrap(), "<p>&lt;b&gt;&amp;</p>");
        assert_eq!(out.text.unwrap(), "Hi <b>&");
    }

    #[test]
    fn missing_and_undefined_variables_are_errors() {
        let engine = TemplateEngine::new();
        let t = version("en", 1, "{{ other }}");
        let errs = engine.render(&t, &json!({})).unwrap_err();
        assert_eq!(errs[0].field, "data.name");
        let errs = engine.render(&t, &json!({"name": "x"})).unwrap_err();
        assert_eq!(errs[0].field, "html");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let errs = compile("ok", Some("<p>\n  {% if %}</p>"), None).unwrap_err();
        assert_eq!(errs[0].field, "html");
        assert!(
            errs[0].message.starts_with("line 2, column"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let engine = TemplateEngine::new();
        let mut t = version(
            "en",
            1,
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        t.required.clear();
        let started = std::time::Instant::now();
        assert!(engine.render(&t, &json!({"name": "n"})).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn locale_fallback() {
        assert_eq!(locale_chain("zh-Hant-TW"), ["zh-Hant-TW", "zh-Hant", "zh"]);
        let versions = vec![
            version("en", 1, "a"),
            version("en", 2, "b"),
            version("zh-CN", 1, "c"),
            version("zh", 1, "d"),
        ];
        assert_eq!(
            choose(&versions, Some("zh-CN"), None).unwrap().locale,
            "zh-CN"
        );
        assert_eq!(
            choose(&versions, Some("zh-Hant-TW"), None).unwrap().locale,
            "zh"
        );
        assert_eq!(choose(&versions, Some("fr"), None).unwrap().version, 2);
        assert_eq!(
            choose(&versions, None, Some(1)).unwrap().html.as_deref(),
            Some("a")
        );
        assert!(choose(&versions, Some("en"), Some(9)).is_none());
    }

    #[test]
    fn secrets_are_redacted() {
        let data = json!({"code": "123456", "name": "x"});
        let red = redacted_data(&["code".into()], &data).unwrap();
        assert_eq!(red["code"], REDACTED);
        assert!(redacted_data(&["other".into()], &data).is_none());
    }
}
