//! Templates as a product: versions and pinning, locale fallback, syntax
//! error positions, required and secret variables, safe rendering, and the
//! render endpoint agreeing with what the SMTP server receives.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use crate::harness::{app_with_smtp, field_strs, Env, ProcApp, Smtp, Stack};
use crate::on_both_stacks;

on_both_stacks!(
    versions_pinning_and_locale_fallback,
    authoring_errors_and_safe_rendering,
    secrets_stay_secret
);

fn welcome(subject: &str) -> serde_json::Value {
    json!({"subject": subject, "html": "<p>Hi {{ name }}</p>", "text": "Hi {{ name }}", "required": ["name"]})
}

fn send_welcome(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({"template": "welcome", "from": "a@acme.test", "to": "u@example.com", "data": {"name": "Ann"}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn versions_pinning_and_locale_fallback(stack: Stack) {
    let (_env, _smtp, app) = app_with_smtp(stack).await;
    let v1 = app
        .api
        .put("/v1/templates/welcome", welcome("Welcome v1"))
        .await;
    assert_eq!(
        (v1.status.as_u16(), v1.body["version"].as_i64()),
        (201, Some(1))
    );
    let v2 = app
        .api
        .put("/v1/templates/welcome", welcome("Welcome v2"))
        .await;
    assert_eq!(v2.body["version"], 2);
    let mut zh = welcome("欢迎");
    zh["locale"] = json!("zh");
    assert_eq!(
        app.api.put("/v1/templates/welcome", zh).await.body["locale"],
        "zh"
    );

    let latest = app.api.send(send_welcome(json!({}))).await;
    let pinned = app
        .api
        .send(send_welcome(json!({"template_version": 1})))
        .await;
    let chinese = app
        .api
        .send(send_welcome(json!({"locale": "zh-Hant-TW"})))
        .await;
    let fallback = app.api.send(send_welcome(json!({"locale": "fr-CA"}))).await;
    for (id, subject, version, locale) in [
        (latest, "Welcome v2", 2, "en"),
        (pinned, "Welcome v1", 1, "en"),
        (chinese, "欢迎", 1, "zh"),
        (fallback, "Welcome v2", 2, "en"),
    ] {
        let m = app.api.wait_status(&id, "delivered").await;
        assert_eq!(
            (
                m["subject"].as_str().unwrap(),
                m["template_version"].as_i64().unwrap(),
                m["locale"].as_str().unwrap()
            ),
            (subject, version, locale)
        );
    }
    let missing = app
        .api
        .post("/v1/send", send_welcome(json!({"template_version": 9})))
        .await;
    assert_eq!(missing.status, 422);

    assert_eq!(
        app.api.get("/v1/templates/welcome?version=1").await.body["subject"],
        "Welcome v1"
    );
    assert_eq!(
        app.api.get("/v1/templates/welcome?locale=zh-CN").await.body["locale"],
        "zh"
    );
    assert_eq!(
        app.api.get("/v1/templates/welcome/versions").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let list = app.api.get("/v1/templates").await.body;
    assert_eq!(
        field_strs(&list["data"], "name"),
        ["password-reset", "verification-code", "welcome"]
    );

    // Built-ins can be overridden, and deleting the override restores them.
    let custom = json!({"subject": "Custom code", "text": "Code: {{ code }}", "secret": ["code"], "required": ["code"]});
    assert_eq!(
        app.api
            .put("/v1/templates/verification-code", custom)
            .await
            .body["version"],
        2
    );
    let code = json!({"template": "verification-code", "from": "a@acme.test", "to": "c@example.com", "data": {"code": "1"}});
    let id = app.api.send(code.clone()).await;
    assert_eq!(
        app.api.wait_status(&id, "delivered").await["subject"],
        "Custom code"
    );
    assert_eq!(
        app.api
            .delete("/v1/templates/verification-code")
            .await
            .status,
        204
    );
    let id = app.api.send(code).await;
    assert_eq!(
        app.api.wait_status(&id, "delivered").await["subject"],
        "Your verification code"
    );
    assert_eq!(
        app.api
            .delete("/v1/templates/verification-code")
            .await
            .status,
        409,
        "a built-in alone cannot be deleted"
    );
    assert_eq!(app.api.delete("/v1/templates/welcome").await.status, 204);
    assert_eq!(app.api.get("/v1/templates/welcome").await.status, 404);
    app.stop().await;
}

async fn authoring_errors_and_safe_rendering(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let r = app
        .api
        .put(
            "/v1/templates/broken",
            json!({"subject": "ok", "html": "<p>\n  {% if %}</p>", "text": "{{ unclosed"}),
        )
        .await;
    assert_eq!(r.status, 422);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors[0]["field"], "html");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2, column"),
        "{}",
        errors[0]
    );
    assert_eq!(errors[1]["field"], "text");
    // A secret the template never reads (a typo) would leave the real one
    // unmasked: refused, naming it.
    let r = app
        .api
        .put(
            "/v1/templates/typo",
            json!({"subject": "Your code", "text": "Code: {{ code }}", "secret": ["code", "cdoe"]}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "secret[1]");
    assert_eq!(r.body["errors"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.api
            .put(
                "/v1/templates/Bad Name",
                json!({"subject": "s", "text": "t"})
            )
            .await
            .status,
        422
    );
    // An empty body is no body: refused, for a template as for a send; the
    // render endpoint names the field it was sent (`version`).
    let refused = [
        (
            "put",
            "/v1/templates/blank",
            json!({"subject": "s", "text": "", "html": " "}),
            "html",
        ),
        (
            "post",
            "/v1/send",
            json!({"subject": "s", "text": "", "from": "a@acme.test", "to": "x@example.com"}),
            "html",
        ),
        (
            "post",
            "/v1/templates/verification-code/render",
            json!({"data": {"code": "1"}, "version": 99}),
            "version",
        ),
    ];
    for (method, path, body, field) in refused {
        let r = match method {
            "put" => app.api.put(path, body).await,
            _ => app.api.post(path, body).await,
        };
        assert_eq!(
            (r.status.as_u16(), field_strs(&r.body["errors"], "field")),
            (422, vec![field]),
            "{path}"
        );
    }
    assert_eq!(
        app.api
            .put(
                "/v1/templates/two-lines",
                json!({"subject": "a\nb", "text": "t"})
            )
            .await
            .status,
        422
    );

    // Required variables: every missing one is named.
    app.api
        .put(
            "/v1/templates/needs",
            json!({"subject": "s", "text": "{{ a }}{{ b }}", "required": ["a", "b"]}),
        )
        .await;
    let r = app
        .api
        .post(
            "/v1/send",
            json!({"template": "needs", "from": "a@acme.test", "to": "x@example.com", "data": {}}),
        )
        .await;
    let fields: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!((r.status.as_u16(), fields), (422, vec!["data.a", "data.b"]));

    // Autoescape by part, whatever the template is called; render == SMTP.
    let plain = json!({"subject": "For {{ who }}", "html": "<p>{{ v }}</p>", "text": "{{ v }}"});
    assert_eq!(app.api.put("/v1/templates/plain", plain).await.status, 201);
    let data = json!({"who": "Ann & Bo", "v": "<script>alert(1)</script> & more"});
    let preview = app
        .api
        .post("/v1/templates/plain/render", json!({"data": data}))
        .await
        .body;
    assert_eq!(
        preview["html"],
        "<p>&lt;script&gt;alert(1)&lt;&#x2f;script&gt; &amp; more</p>"
    );
    assert_eq!(preview["text"], "<script>alert(1)</script> & more");
    assert!(preview["mime_size_bytes"].as_u64().unwrap() > 100);
    app.api.send(json!({"template": "plain", "from": "a@acme.test", "to": "render@example.com", "data": data})).await;
    let got = smtp.wait_for("render@example.com").await;
    assert_eq!(got["subject"], preview["subject"]);
    assert_eq!(
        got["html"].as_str().unwrap().trim_end(),
        preview["html"].as_str().unwrap()
    );
    assert_eq!(
        got["text"].as_str().unwrap().trim_end(),
        preview["text"].as_str().unwrap()
    );

    // A runaway template is a 422, quickly, never a stuck worker.
    let runaway = json!({"subject": "s", "text": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"});
    assert_eq!(
        app.api.put("/v1/templates/runaway", runaway).await.status,
        201
    );
    let started = Instant::now();
    let r = app
        .api
        .post(
            "/v1/send",
            json!({"template": "runaway", "from": "a@acme.test", "to": "x@example.com"}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        app.api
            .post("/v1/templates/runaway/render", json!({}))
            .await
            .status,
        422
    );
    let recursive =
        json!({"subject": "s", "text": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"});
    app.api.put("/v1/templates/recursive", recursive).await;
    assert_eq!(
        app.api
            .post("/v1/templates/recursive/render", json!({}))
            .await
            .status,
        422
    );
    app.stop().await;
}

async fn secrets_stay_secret(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let app = ProcApp::start(&env, Some(smtp.relay())).await;
    let code = "918273";
    let id = app
        .api
        .send(json!({"template": "verification-code", "from": "a@acme.test", "to": "s@example.com", "tags": ["auth"], "data": {"code": code}}))
        .await;
    let raw_before = app.api.get(&format!("/v1/messages/{id}/raw")).await;
    let m = app.api.wait_status(&id, "delivered").await;
    let got = smtp.wait_for("s@example.com").await;
    assert!(
        got["text"].as_str().unwrap().contains(code),
        "the recipient gets the code"
    );
    assert!(
        !m.to_string().contains(code),
        "message resource leaks the code"
    );
    assert!(!app
        .api
        .get("/v1/messages?tag=auth")
        .await
        .body
        .to_string()
        .contains(code));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!app
        .api
        .get("/v1/events")
        .await
        .body
        .to_string()
        .contains(code));
    let raw = app.api.get(&format!("/v1/messages/{id}/raw")).await;
    assert_eq!(raw.headers["mailroom-redacted"], "true");
    assert!(
        !raw.body.as_str().unwrap().contains("OTE4Mjcz")
            && !raw.body.as_str().unwrap().contains(code)
    );
    assert!(raw.body.as_str().unwrap().contains("Subject:"));
    if raw_before.headers["mailroom-redacted"] == "false" {
        // Fetched before the outcome: the exact bytes the relay received.
        let sent = base64::engine::general_purpose::STANDARD
            .decode(got["raw_b64"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw_before.body.as_str().unwrap().as_bytes(), &sent[..]);
    }
    // While waiting, `/raw` shows what will be sent; once final, only the
    // redacted copy is left.
    let send_at = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let later = app
        .api
        .send(
            json!({"template": "verification-code", "from": "a@acme.test", "to": "t@example.com",
                     "send_at": send_at, "data": {"code": code}}),
        )
        .await;
    let raw = app.api.get(&format!("/v1/messages/{later}/raw")).await;
    assert_eq!(raw.headers["mailroom-redacted"], "false");
    let text = raw.body.as_str().unwrap();
    assert!(text.contains(code) || text.contains("OTE4Mjcz"), "{text}");
    assert!(text.contains("Message-ID: <"), "{text}");
    let canceled = app
        .api
        .post(&format!("/v1/messages/{later}/cancel"), json!({}))
        .await;
    assert_eq!(canceled.status, 200, "{:?}", canceled.body);
    let raw = app.api.get(&format!("/v1/messages/{later}/raw")).await;
    assert_eq!(raw.headers["mailroom-redacted"], "true");
    let text = raw.body.as_str().unwrap();
    assert!(!text.contains(code) && !text.contains("OTE4Mjcz"), "{text}");
    if let Some(url) = &env.database_url {
        // Once both messages are final, no live row holds the code.
        let rows = crate::harness::shared_pg().dump(url);
        assert!(rows.contains(&id) && rows.contains(&later));
        assert!(!rows.contains(code) && !rows.contains("OTE4Mjcz"));
    }
    let logs = app.logs();
    assert!(!logs.is_empty());
    assert!(!logs.contains(code), "logs leak the code");
    assert!(!logs.contains(&app.api.key), "logs leak the API key");
    assert!(
        !logs.contains(app.api.key.split('_').next_back().unwrap()),
        "logs leak the key secret"
    );
}
