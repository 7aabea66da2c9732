//! The built-in templates present on every install: `verification-code`
//! (variables: `code` required+secret; `name`, `product`,
//! `expires_in_minutes` optional) and `password-reset` (`reset_url`
//! required+secret; same optional ones), each in `en` and `zh-CN`. Both
//! default to the `high` priority lane.

use crate::domain::Priority;
use crate::store::TemplateVersion;

macro_rules! builtin {
    ($name:literal, $locale:literal, $var:literal, $description:literal) => {
        TemplateVersion {
            name: $name.to_string(),
            locale: $locale.to_string(),
            version: 1,
            subject: include_str!(concat!("builtin/", $name, ".", $locale, ".subject"))
                .trim()
                .to_string(),
            html: Some(include_str!(concat!("builtin/", $name, ".", $locale, ".html")).to_string()),
            text: Some(include_str!(concat!("builtin/", $name, ".", $locale, ".txt")).to_string()),
            required: vec![$var.to_string()],
            secret: vec![$var.to_string()],
            description: Some($description.to_string()),
            priority: Some(Priority::High),
            builtin: true,
            created_at: 0,
        }
    };
}

pub fn builtins() -> Vec<TemplateVersion> {
    vec![
        builtin!(
            "verification-code",
            "en",
            "code",
            "One-time verification code"
        ),
        builtin!(
            "verification-code",
            "zh-CN",
            "code",
            "One-time verification code"
        ),
        builtin!("password-reset", "en", "reset_url", "Password reset link"),
        builtin!(
            "password-reset",
            "zh-CN",
            "reset_url",
            "Password reset link"
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::TemplateEngine;
    use serde_json::json;

    #[test]
    fn builtins_render_with_minimal_and_full_data() {
        let engine = TemplateEngine::new();
        for t in builtins() {
            let var = t.required[0].clone();
            let minimal = json!({ var.clone(): "493817" });
            let out = engine.render(&t, &minimal).unwrap();
            assert!(out.html.as_ref().unwrap().contains("493817"));
            assert!(out.text.as_ref().unwrap().contains("493817"));
            let full = json!({ var: "https://acme.test/r?a=1&b=2", "name": "李雷", "product": "Acme", "expires_in_minutes": 5 });
            let out = engine.render(&t, &full).unwrap();
            assert!(out.subject.contains("Acme"), "{}", out.subject);
            assert!(out.text.as_ref().unwrap().contains("李雷"));
            // HTML escaped, text not.
            assert!(out.html.as_ref().unwrap().contains("a=1&amp;b=2"));
            assert!(out.text.as_ref().unwrap().contains("a=1&b=2"));
        }
    }
}
