//! End to end through a real SMTP server: templates, inline, attachments,
//! per-recipient outcomes, retries, give-up, suppression, TLS + AUTH,
//! failover.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::{
    app_with_smtp, code_to, event_types, field_strs, Env, Smtp, Stack, TestApp, Tls,
};
use crate::on_both_stacks;

on_both_stacks!(
    builtin_templates_in_two_languages,
    inline_with_attachment_and_headers,
    bcc_recipients_only,
    mixed_outcome_bounce_then_suppressed,
    deferred_twice_then_delivered,
    gives_up_after_configured_age,
    starttls_and_implicit_tls_with_auth,
    fails_over_from_dead_relay,
    concurrent_sends_keep_their_recipients,
    listing_filters_combine,
    every_list_pages_by_cursor,
);

/// `/metrics` shows the store's backlog (messages not yet final), read at
/// most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_waiting_messages() {
    let env = Env::new(Stack::Postgres).await;
    let app = TestApp::start(&env, None).await;
    let waiting = |n: &'static str| {
        let api = app.api.clone();
        async move {
            let text = api.get("/metrics").await.body.as_str()?.to_string();
            text.lines()
                .any(|l| l == format!("mailroom_messages_waiting {n}"))
                .then_some(())
        }
    };
    let mut body = code_to("later@example.com");
    body["send_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let id = app.api.send(body).await;
    crate::harness::eventually(Duration::from_secs(5), "one waiting", || waiting("1")).await;
    let canceled = app
        .api
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(canceled.status, 200);
    crate::harness::eventually(Duration::from_secs(5), "none waiting", || waiting("0")).await;
    app.stop().await;
}

/// Where the relay offers PIPELINING the envelope goes in one write, and a
/// refused recipient (its DATA refused too) leaves the session in step: the
/// next message on the same connection is delivered; a refused sender whose
/// relay hangs up is recorded with the relay's reply. Where it does not, one
/// command at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_the_envelope_only_where_offered() {
    for (smtp, pipelined) in [
        (Smtp::start(), true),
        (Smtp::start_without_pipelining(), false),
    ] {
        let env = Env::new(Stack::Embedded).await;
        let mut settings = env.settings(Some(format!("{}&pool=1", smtp.relay())));
        settings.workers = Some(1);
        let app = TestApp::spawn(settings).await;
        let ok = app.api.send(code_to("one@example.com")).await;
        app.api.wait_status(&ok, "delivered").await;
        let bounced = app.api.send(code_to("bounce-p@example.com")).await;
        let m = app.api.wait_status(&bounced, "bounced").await;
        assert_eq!(m["recipients"][0]["smtp_code"], 550);
        assert_eq!(m["recipients"][0]["enhanced_code"], "5.1.1");
        let deferred = app.api.send(code_to("defer-p@example.com")).await;
        let m = app.api.wait_status(&deferred, "deferred").await;
        assert_eq!(m["attempts"][0]["smtp_code"], 451);
        // A relay that refuses the sender and hangs up: its 554 is the
        // outcome (permanent), not the broken connection after it.
        let mut refused = code_to("three@example.com");
        refused["from"] = json!("hangup@acme.test");
        let refused = app.api.send(refused).await;
        let m = app.api.wait_status(&refused, "bounced").await;
        assert_eq!(m["attempts"][0]["smtp_code"], 554, "{m}");
        assert_eq!(m["attempts"][0]["outcome"], "permanent", "{m}");
        let after = app.api.send(code_to("two@example.com")).await;
        let m = app.api.wait_status(&after, "delivered").await;
        assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "{m}");
        let got = smtp.wait_for("two@example.com").await;
        assert!(got["text"].as_str().unwrap().contains("493817"));
        let (piped, stepwise) = smtp.transactions().await;
        if pipelined {
            assert!(piped >= 4 && stepwise == 0, "{piped} / {stepwise}");
        } else {
            assert!(piped == 0 && stepwise >= 4, "{piped} / {stepwise}");
        }
        app.stop().await;
    }
}

/// A pooled SMTP connection that the relay closed (here: the server was
/// restarted) is replaced before the next hand-off: the next message is
/// delivered on its first attempt, with no transient failure recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_is_invisible_to_the_next_message() {
    let env = Env::new(Stack::Embedded).await;
    let mut smtp = Smtp::start();
    let app = TestApp::start(&env, Some(smtp.relay())).await;
    let first = app.api.send(code_to("before@example.com")).await;
    app.api.wait_status(&first, "delivered").await;
    smtp.restart();
    let second = app.api.send(code_to("after@example.com")).await;
    let m = app.api.wait_status(&second, "delivered").await;
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "one attempt: {attempts:?}");
    assert_eq!(attempts[0]["outcome"], "delivered");
    smtp.wait_for("after@example.com").await;
    app.stop().await;
}

async fn builtin_templates_in_two_languages(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let en = app
        .api
        .send(json!({
            "template": "verification-code",
            "from": "Acme <no-reply@acme.test>",
            "to": [{"email": "bo@example.com", "name": "Bo"}],
            "data": {"code": "493817", "name": "Bo", "product": "Acme"}
        }))
        .await;
    let accepted = app
        .api
        .post(
            "/v1/send",
            json!({
                "template": "password-reset",
                "locale": "zh-CN",
                "from": "Acme <no-reply@acme.test>",
                "to": ["李雷 <lilei@例子.中国>"],
                "data": {"reset_url": "https://acme.test/r?a=1&b=2", "name": "李雷"}
            }),
        )
        .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let zh = accepted.body["id"].as_str().expect("id").to_string();
    let m = app.api.wait_status(&en, "delivered").await;
    assert_eq!(m["recipients"][0]["smtp_code"], 250);
    assert_eq!(
        m["attempts"][0]["relay"],
        format!("smtp://127.0.0.1:{}", smtp.port)
    );
    assert_eq!(m["events"][0]["type"], "message.delivered");
    let zh_message = app.api.wait_status(&zh, "delivered").await;
    // One name for the recipient everywhere: the 202, the message, its
    // events; and a list by the address as the client wrote it finds it.
    let stored = "lilei@xn--fsqu00a.xn--fiqs8s";
    assert_eq!(accepted.body["recipients"][0]["email"], stored);
    assert_eq!(zh_message["recipients"][0]["email"], stored);
    assert_eq!(
        zh_message["recipients"][0]["address"],
        "李雷 <lilei@例子.中国>"
    );
    assert_eq!(zh_message["events"][0]["data"]["recipient"], stored);
    for to in ["lilei@例子.中国", "LILEI@例子.中国", stored] {
        let listed = app
            .api
            .get(&format!(
                "/v1/messages?to={}",
                percent_encoding::utf8_percent_encode(to, percent_encoding::NON_ALPHANUMERIC)
            ))
            .await;
        assert_eq!(listed.body["data"][0]["id"], zh.as_str(), "to={to}");
    }

    let got = smtp.wait_for("bo@example.com").await;
    assert_eq!(got["subject"], "Acme: your verification code");
    assert_eq!(got["to"], "Bo <bo@example.com>");
    assert!(got["text"].as_str().unwrap().contains("493817"));
    assert!(got["html"].as_str().unwrap().contains("493817"));
    assert_eq!(got["message_id"], m["message_id"]);

    let got = smtp.wait_for("lilei@xn--fsqu00a.xn--fiqs8s").await;
    assert_eq!(got["subject"], "重置您的密码");
    assert_eq!(got["to"], "李雷 <lilei@xn--fsqu00a.xn--fiqs8s>");
    let text = got["text"].as_str().unwrap();
    assert!(
        text.contains("李雷，您好") && text.contains("https://acme.test/r?a=1&b=2"),
        "{text}"
    );
    // Autoescaped in HTML (minijinja also escapes `/`), verbatim in text.
    let html = got["html"].as_str().unwrap();
    assert!(
        html.contains("a=1&amp;b=2") && !html.contains("a=1&b=2"),
        "{html}"
    );
    app.stop().await;
}

/// Concurrent sends are committed in groups of whatever size they arrive in
/// (on Postgres one statement per group, its rows padded to a power of two
/// and the padding dropped): every message keeps exactly its own
/// recipients, in order, none lost or doubled, and each is delivered once.
async fn concurrent_sends_keep_their_recipients(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..23_usize {
        let api = app.api.clone();
        sends.spawn(async move {
            let to: Vec<String> = (0..=i % 3)
                .map(|r| format!("m{i}-r{r}@example.com"))
                .collect();
            let body =
                json!({"from": "a@acme.test", "to": to, "subject": format!("n{i}"), "text": "hi"});
            (api.send(body).await, to)
        });
    }
    let mut sent = Vec::new();
    while let Some(done) = sends.join_next().await {
        sent.push(done.unwrap());
    }
    for (id, to) in &sent {
        let m = app.api.wait_status(id, "delivered").await;
        assert_eq!(&field_strs(&m["recipients"], "email"), to, "{m}");
        assert_eq!(m["attempts"].as_array().unwrap().len(), to.len(), "{m}");
    }
    app.stop().await;
}

async fn inline_with_attachment_and_headers(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let pdf = b"%PDF-1.4 fake but fine";
    let id = app
        .api
        .send(json!({
            "subject": "Your invoice",
            "text": "See attached.",
            "html": "<p>See <b>attached</b>.</p>",
            "from": "billing@acme.test",
            "to": "a@example.com",
            "cc": ["c@example.com"],
            "bcc": ["hidden@example.com"],
            "reply_to": "support@acme.test",
            "headers": {"X-Entity-Ref-ID": "user-42"},
            "tags": ["billing"],
            "metadata": {"user_id": "42"},
            "attachments": [{"filename": "invoice.pdf", "content_type": "application/pdf",
                             "content": base64::engine::general_purpose::STANDARD.encode(pdf)}]
        }))
        .await;
    let m = app.api.wait_status(&id, "delivered").await;
    assert_eq!(m["recipients"].as_array().unwrap().len(), 3);
    for rcpt in ["a@example.com", "c@example.com", "hidden@example.com"] {
        let got = smtp.wait_for(rcpt).await;
        assert_eq!(got["rcpt_to"], json!([rcpt]), "one envelope per recipient");
        assert_eq!(got["bcc_header"], false);
        assert_eq!(got["headers"]["X-Entity-Ref-ID"], "user-42");
        assert_eq!(got["headers"]["Reply-To"], "support@acme.test");
        assert_eq!(got["attachments"][0]["filename"], "invoice.pdf");
        let content = base64::engine::general_purpose::STANDARD
            .decode(got["attachments"][0]["content_b64"].as_str().unwrap())
            .unwrap();
        assert_eq!(content, pdf);
    }
    let raw = app.api.get(&format!("/v1/messages/{id}/raw")).await;
    assert_eq!(raw.headers["content-type"], "message/rfc822");
    assert!(raw
        .body
        .as_str()
        .unwrap()
        .contains("X-Entity-Ref-ID: user-42"));
    app.stop().await;
}

/// A message with Bcc recipients only (a newsletter-style blind copy): the
/// MIME has no To, Cc or Bcc header, and each recipient gets its copy.
async fn bcc_recipients_only(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let id = app
        .api
        .send(json!({
            "subject": "Maintenance tonight",
            "text": "We will be down from 02:00 to 02:30 UTC.",
            "from": "ops@acme.test",
            "bcc": ["one@example.com", "two@example.com"]
        }))
        .await;
    let m = app.api.wait_status(&id, "delivered").await;
    assert_eq!(field_strs(&m["recipients"], "type"), ["bcc", "bcc"], "{m}");
    for rcpt in ["one@example.com", "two@example.com"] {
        let got = smtp.wait_for(rcpt).await;
        assert_eq!(got["rcpt_to"], json!([rcpt]));
        assert_eq!(got["bcc_header"], false);
        assert!(got["headers"].get("To").is_none(), "{got}");
        assert!(got["headers"].get("Cc").is_none(), "{got}");
        assert_eq!(got["headers"]["Subject"], "Maintenance tonight");
    }
    app.stop().await;
}

async fn mixed_outcome_bounce_then_suppressed(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let mut body = code_to("ok@example.com");
    body["to"] = json!(["ok@example.com", "bounce@example.com"]);
    let id = app.api.send(body).await;
    let m = app.api.wait_status(&id, "bounced").await;
    let by: std::collections::HashMap<String, serde_json::Value> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["email"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    assert_eq!(by["ok@example.com"]["status"], "delivered");
    let bounced = &by["bounce@example.com"];
    assert_eq!(bounced["status"], "bounced");
    assert_eq!(bounced["smtp_code"], 550);
    assert_eq!(bounced["enhanced_code"], "5.1.1");
    let types = event_types(&m);
    assert!(types.contains(&"message.delivered") && types.contains(&"message.bounced"));

    let list = app.api.get("/v1/suppressions").await;
    assert_eq!(list.body["data"][0]["email"], "bounce@example.com");
    assert_eq!(list.body["data"][0]["source"], "bounce");

    let before = smtp.attempts("bounce@example.com").await;
    let again = app.api.send(code_to("Bounce@Example.com")).await;
    let m = app.api.wait_status(&again, "suppressed").await;
    assert_eq!(m["events"][0]["type"], "message.suppressed");
    assert_eq!(
        smtp.attempts("bounce@example.com").await,
        before,
        "SMTP not touched"
    );

    // Removing the entry lets mail through again (and it bounces again).
    assert_eq!(
        app.api
            .delete("/v1/suppressions/bounce@example.com")
            .await
            .status,
        204
    );
    let third = app.api.send(code_to("bounce@example.com")).await;
    app.api.wait_status(&third, "bounced").await;
    app.stop().await;
}

async fn deferred_twice_then_delivered(stack: Stack) {
    let (_env, _smtp, app) = app_with_smtp(stack).await;
    let id = app.api.send(code_to("flaky2-x@example.com")).await;
    let m = app.api.wait_status(&id, "delivered").await;
    assert_eq!(m["recipients"][0]["attempts"], 3);
    assert_eq!(
        field_strs(&m["attempts"], "outcome"),
        ["transient", "transient", "delivered"]
    );
    assert_eq!(m["attempts"][0]["smtp_code"], 451);
    assert_eq!(m["attempts"][0]["enhanced_code"], "4.3.0");
    let types = event_types(&m);
    assert_eq!(
        types,
        ["message.deferred", "message.deferred", "message.delivered"]
    );
    app.stop().await;
}

async fn gives_up_after_configured_age(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut settings = env.settings(Some(smtp.relay()));
    settings.delivery_give_up_after = Some("3s".into());
    let app = TestApp::spawn(settings).await;
    let id = app.api.send(code_to("defer@example.com")).await;
    let m = app.api.wait_status(&id, "failed").await;
    let attempts = m["recipients"][0]["attempts"].as_i64().unwrap();
    assert!((2..=6).contains(&attempts), "{attempts} attempts");
    assert_eq!(
        m["events"].as_array().unwrap().last().unwrap()["type"],
        "message.failed"
    );
    app.stop().await;
}

/// An app relaying through `relay`, trusting the test server's throwaway CA.
async fn tls_app(env: &Env, smtp: &Smtp, relay: String) -> TestApp {
    let mut settings = env.settings(Some(relay));
    settings.relay_ca_file = Some(smtp.certdir.join("ca.pem").display().to_string());
    TestApp::spawn(settings).await
}

async fn starttls_and_implicit_tls_with_auth(stack: Stack) {
    for (tls, scheme) in [(Tls::Starttls, "smtp"), (Tls::Implicit, "smtps")] {
        let env = Env::new(stack).await;
        let smtp = Smtp::start_with(tls, Some("mailer:s3cret/pass"));
        let query = if tls == Tls::Starttls {
            "?tls=starttls"
        } else {
            ""
        };
        let relay = format!(
            "{scheme}://mailer:s3cret%2Fpass@localhost:{}{query}",
            smtp.port
        );
        let app = tls_app(&env, &smtp, relay).await;
        let id = app.api.send(code_to("tls@example.com")).await;
        let m = app.api.wait_status(&id, "delivered").await;
        assert_eq!(
            m["attempts"][0]["relay"],
            format!("{scheme}://localhost:{}", smtp.port)
        );
        smtp.wait_for("tls@example.com").await;
        app.stop().await;
    }
    // Wrong password: never delivered; the attempt is recorded (and a relay
    // that stops answering is cut off by the hand-off deadline).
    let env = Env::new(stack).await;
    let smtp = Smtp::start_with(Tls::Implicit, Some("mailer:right"));
    let relay = format!("smtps://mailer:wrong@localhost:{}?timeout=2s", smtp.port);
    let app = tls_app(&env, &smtp, relay).await;
    let id = app.api.send(code_to("tls@example.com")).await;
    crate::harness::eventually(Duration::from_secs(20), "an attempt", || async {
        let m = app.api.message(&id).await;
        (m["attempts"].as_array().is_some_and(|a| !a.is_empty())).then_some(())
    })
    .await;
    assert!(smtp.received_by("tls@example.com").await.is_empty());
    app.stop().await;
}

async fn fails_over_from_dead_relay(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let dead = crate::harness::free_port();
    let relays = format!("smtp://127.0.0.1:{dead}?tls=none,{}", smtp.relay());
    let app = TestApp::start(&env, Some(relays)).await;
    let id = app.api.send(code_to("failover@example.com")).await;
    let m = app.api.wait_status(&id, "delivered").await;
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["relay"], format!("smtp://127.0.0.1:{dead}"));
    assert_eq!(attempts[0]["outcome"], "transient");
    assert_eq!(
        attempts[1]["relay"],
        format!("smtp://127.0.0.1:{}", smtp.port)
    );
    assert_eq!(attempts[1]["outcome"], "delivered");
    app.stop().await;
}

/// Runs a command and returns its stdout, failing the test on error.
fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The DKIM TXT record's `p=` value of a private key file: the DER
/// SubjectPublicKeyInfo for RSA, the raw 32-byte key for Ed25519 (RFC 8463).
fn dkim_public(key: &std::path::Path, ed25519: bool) -> String {
    let der = run(
        "openssl",
        &[
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-outform",
            "DER",
        ],
    );
    let raw = if ed25519 {
        &der[der.len() - 32..]
    } else {
        &der[..]
    };
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// `dkimpy`'s verdict on a received message, with the given TXT records.
fn dkim_verdict(dir: &std::path::Path, raw: &[u8], records: &[String]) -> String {
    let file = dir.join(format!("{}.eml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, raw).unwrap();
    let mut args = vec![
        crate::harness::support("dkim_verify.py")
            .display()
            .to_string(),
        file.display().to_string(),
    ];
    args.extend(records.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    String::from_utf8(run("python3", &args))
        .unwrap()
        .trim()
        .to_string()
}

/// Mail from a domain with a DKIM key (or a subdomain of one) is signed and
/// verifies with `dkimpy` (RSA and Ed25519); a changed body fails; mail from
/// other domains is not signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_signatures_verify_with_dkimpy() {
    let env = Env::new(Stack::Embedded).await;
    let smtp = Smtp::start();
    let dir = crate::harness::temp_dir("dkim");
    let rsa = dir.join("rsa.pem");
    let ed = dir.join("ed.pem");
    run(
        "openssl",
        &["genrsa", "-out", rsa.to_str().unwrap(), "2048"],
    );
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            ed.to_str().unwrap(),
        ],
    );
    let records = vec![
        format!(
            "rsa1._domainkey.acme.test=v=DKIM1; k=rsa; p={}",
            dkim_public(&rsa, false)
        ),
        format!(
            "ed1._domainkey.ed.example=v=DKIM1; k=ed25519; p={}",
            dkim_public(&ed, true)
        ),
    ];
    let mut settings = env.settings(Some(smtp.relay()));
    settings.dkim_keys = Some(format!(
        "acme.test:rsa1:{}, ed.example:ed1:{}",
        rsa.display(),
        ed.display()
    ));
    let app = TestApp::spawn(settings).await;

    let mut from_sub = code_to("rsa@example.com");
    from_sub["from"] = json!("Acme <no-reply@Mail.Acme.test>");
    app.api.send(from_sub).await;
    let mut from_ed = code_to("ed@example.com");
    from_ed["from"] = json!("Ed <hi@ed.example>");
    // An encoded-word subject and a non-ASCII body are signed as sent.
    from_ed["locale"] = json!("zh-CN");
    app.api.send(from_ed).await;
    let mut unsigned = code_to("plain@example.com");
    unsigned["from"] = json!("Other <hi@other.example>");
    app.api.send(unsigned).await;

    let raw = |m: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(m["raw_b64"].as_str().unwrap())
            .unwrap()
    };
    let signed_rsa = raw(&smtp.wait_for("rsa@example.com").await);
    let text = String::from_utf8_lossy(&signed_rsa).to_string();
    assert!(
        text.contains("a=rsa-sha256; d=acme.test; s=rsa1;"),
        "{text}"
    );
    assert_eq!(dkim_verdict(&dir, &signed_rsa, &records), "pass");
    let tampered = text.replacen("493817", "000000", 1);
    assert_ne!(tampered, text, "the code is in the body");
    assert_eq!(dkim_verdict(&dir, tampered.as_bytes(), &records), "fail");

    let signed_ed = raw(&smtp.wait_for("ed@example.com").await);
    let text = String::from_utf8_lossy(&signed_ed).to_string();
    assert!(
        text.contains("a=ed25519-sha256; d=ed.example; s=ed1;"),
        "{text}"
    );
    assert!(text.contains("Subject: =?utf-8?"), "{text}");
    assert_eq!(dkim_verdict(&dir, &signed_ed, &records), "pass");

    let plain = raw(&smtp.wait_for("plain@example.com").await);
    assert!(!String::from_utf8_lossy(&plain).contains("DKIM-Signature"));
    app.stop().await;
}

/// `GET /v1/messages`: each filter narrows the list, they combine, the
/// recipient filter ignores case, and the cursor pages newest first.
async fn listing_filters_combine(stack: Stack) {
    let (_env, _smtp, app) = app_with_smtp(stack).await;
    let send = |to: &str, tags: Value, later: bool| {
        let mut body = code_to(to);
        body["tags"] = tags;
        if later {
            body["send_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
        }
        let api = app.api.clone();
        async move {
            let id = api.send(body).await;
            // Distinct creation times, for the since/until bounds below.
            tokio::time::sleep(Duration::from_millis(5)).await;
            id
        }
    };
    let a = send("Ann@Example.com", json!(["auth"]), false).await;
    let b = send("bob@example.com", json!(["auth", "x"]), false).await;
    let c = send("ann@example.com", json!(["billing"]), false).await;
    let d = send("ann@example.com", json!(["auth"]), true).await;
    let ids = |query: &str| {
        let api = app.api.clone();
        let path = format!("/v1/messages?{query}");
        async move {
            let r = api.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            let ids: Vec<String> = r.body["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|m| m["id"].as_str().expect("id").to_string())
                .collect();
            (ids, r.body["next_cursor"].as_str().map(str::to_string))
        }
    };
    assert_eq!(
        ids("to=ANN@example.COM").await.0,
        [d.as_str(), c.as_str(), a.as_str()]
    );
    assert_eq!(ids("to=bob@example.com").await.0, [b.as_str()]);
    assert!(ids("to=nobody@example.com").await.0.is_empty());
    assert_eq!(
        ids("to=ann@example.com&tag=auth").await.0,
        [d.as_str(), a.as_str()]
    );
    assert_eq!(
        ids("tag=auth").await.0,
        [d.as_str(), b.as_str(), a.as_str()]
    );
    assert_eq!(
        ids("to=ann@example.com&status=scheduled").await.0,
        [d.as_str()]
    );
    let created = |id: &String| {
        let api = app.api.clone();
        let id = id.clone();
        async move {
            let m = api.message(&id).await;
            let at = m["created_at"].as_str().expect("created_at").to_string();
            at.replace('+', "%2B")
        }
    };
    let (from_c, from_b) = (created(&c).await, created(&b).await);
    assert_eq!(
        ids(&format!("to=ann@example.com&since={from_c}")).await.0,
        [d.as_str(), c.as_str()]
    );
    assert_eq!(
        ids(&format!("to=ann@example.com&until={from_c}")).await.0,
        [a.as_str()]
    );
    assert_eq!(
        ids(&format!("since={from_b}&until={from_c}&tag=auth"))
            .await
            .0,
        [b.as_str()]
    );
    let (first, cursor) = ids("to=ann@example.com&limit=2").await;
    assert_eq!(first, [d.as_str(), c.as_str()]);
    let cursor = cursor.expect("a next page");
    let (rest, end) = ids(&format!("to=ann@example.com&limit=2&cursor={cursor}")).await;
    assert_eq!(rest, [a.as_str()]);
    assert_eq!(end, None);
    // A page that ends the list exactly says so: no cursor to an empty page.
    let (all, end) = ids("to=ann@example.com&limit=3").await;
    assert_eq!(all.len(), 3);
    assert_eq!(end, None);
    let r = app.api.get("/v1/messages?cursor=not-a-cursor").await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "cursor");
    app.stop().await;
}

/// Every list answers `?limit=&cursor=` with `{data, next_cursor}`: pages
/// of at most `limit`, in a stable order, `next_cursor` null on the last.
async fn every_list_pages_by_cursor(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let api = &app.api;
    for name in ["k1", "k2", "k3"] {
        let r = api
            .post("/v1/keys", json!({"name": name, "scopes": ["send"]}))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for n in 0..3 {
        let r = api
            .post(
                "/v1/webhooks",
                json!({"url": format!("http://127.0.0.1:9/hook{n}")}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let tpl = json!({"subject": "s {{ n }}", "text": "t {{ n }}", "required": ["n"]});
    for _ in 0..3 {
        assert_eq!(
            api.put("/v1/templates/paged", tpl.clone()).await.status,
            201
        );
    }
    for email in [
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
    ] {
        let r = api
            .put(
                &format!("/v1/suppressions/{email}"),
                json!({"reason": "test"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // (list path, how many items it holds, the field that names one)
    for (path, count, field) in [
        ("/v1/keys", 4, "id"), // the bootstrap admin key too
        ("/v1/webhooks", 3, "id"),
        ("/v1/templates", 3, "name"),
        ("/v1/templates/paged/versions", 3, "version"),
        ("/v1/suppressions", 4, "email"),
    ] {
        let whole = api.get(path).await;
        assert_eq!(whole.status, 200, "{path}: {}", whole.body);
        let expected: Vec<String> = whole.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[field].to_string())
            .collect();
        assert_eq!(expected.len(), count, "{path}: {}", whole.body);
        assert_eq!(whole.body["next_cursor"], Value::Null, "{path}");
        for limit in [1, 2, count] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..=count {
                let page_path = match &cursor {
                    Some(c) => format!("{path}?limit={limit}&cursor={c}"),
                    None => format!("{path}?limit={limit}"),
                };
                let page = api.get(&page_path).await;
                assert_eq!(page.status, 200, "{page_path}: {}", page.body);
                let data = page.body["data"].as_array().unwrap();
                assert!(!data.is_empty() && data.len() <= limit, "{page_path}");
                seen.extend(data.iter().map(|v| v[field].to_string()));
                cursor = page.body["next_cursor"].as_str().map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
            assert_eq!(seen, expected, "{path} in pages of {limit}");
        }
        let r = api.get(&format!("{path}?limit=0")).await;
        assert_eq!(r.status, 422, "{path}: {}", r.body);
        let r = api.get(&format!("{path}?page=2")).await;
        assert_eq!(r.status, 422, "{path}: {}", r.body);
    }
    app.stop().await;
}
