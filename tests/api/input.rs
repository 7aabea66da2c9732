//! Bad input: a clear problem+json 4xx for everything a client can get
//! wrong, never a 500, never a row written, never a byte sent.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{code_to, Env, Smtp, Stack, TestApp};
use crate::on_both_stacks;

on_both_stacks!(bad_input_is_refused_cleanly);

fn fields(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| x["field"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn raw(
    app: &TestApp,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let r = app
        .api
        .http
        .post(format!("{}/v1/send", app.api.base))
        .bearer_auth(&app.api.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

async fn bad_input_is_refused_cleanly(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut settings = env.settings(Some(smtp.relay()));
    settings.max_request_bytes = Some(64 * 1024);
    settings.max_attachment_bytes = Some(1024);
    let app = TestApp::spawn(settings).await;

    let (status, body, headers) = raw(&app, "application/json", b"{\"template\": ".to_vec()).await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["status"], 400);
    assert!(headers.contains_key("x-request-id"));

    // A UTF-8 byte order mark before the JSON is skipped (RFC 8259 §8.1):
    // the body is read, and its own mistake named.
    let (status, body, _) = raw(
        &app,
        "application/json; charset=utf-8",
        b"\xEF\xBB\xBF{\"tpyo\": 1}".to_vec(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(fields(&body).contains(&"tpyo".to_string()), "{body}");

    let (status, _, _) = raw(&app, "text/plain", b"hello".to_vec()).await;
    assert_eq!(status, 415);
    let (status, _, _) = raw(
        &app,
        "application/json",
        vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
    )
    .await;
    assert_eq!(status, 400, "invalid UTF-8");

    // Over-size: refused from Content-Length before reading, and when chunked.
    let big = format!("{{\"subject\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, body, _) = raw(&app, "application/json", big.clone().into_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(body["status"], 413);
    // Chunked (no Content-Length): the server answers 413 once the limit is
    // passed and may close before the client finishes writing, so read the
    // answer with a raw socket whatever happens to the writes.
    let answer = chunked_upload(&app.api.base, &app.api.key, 100 * 1024).await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "chunked body over the limit: {answer:.200}"
    );
    assert!(answer.contains("application/problem+json"));

    // Every bad field named in one answer.
    let r = app
        .api
        .post(
            "/v1/send",
            json!({
                "template": "verification-code",
                "to": ["ok@example.com", "not-an-address", {"email": "x@example.com", "nmae": "typo"}],
                "from": "Eve\r\nBcc: victim@example.com <eve@acme.test>",
                "headers": {"X-Ok": "fine", "X-Evil": "a\r\nBcc: victim@example.com", "X-Lf": "a\nb", "X-Nul": "a\u{0}b", "Bcc": "v@example.com", "Bad Name": "x"},
                "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content": "not base64!!"}],
                "priority": "urgent",
                "send_at": "tomorrow",
                "tpyo": true
            }),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let f = fields(&r.body);
    for expected in [
        "to[1]",
        "to[2].nmae",
        "from",
        "headers.X-Evil",
        "headers.X-Lf",
        "headers.X-Nul",
        "headers.Bcc",
        "headers.Bad Name",
        "attachments[0].content",
        "priority",
        "send_at",
        "tpyo",
        // What rendering finds is named in the same answer.
        "data.code",
    ] {
        assert!(
            f.contains(&expected.to_string()),
            "{expected} missing from {f:?}"
        );
    }
    assert!(!f.contains(&"headers.X-Ok".to_string()));

    // Injection through inline subject, display names, addresses.
    for body in [
        json!({"subject": "Hi\r\nBcc: v@example.com", "text": "x", "from": "a@acme.test", "to": "b@example.com"}),
        json!({"subject": "Hi", "text": "x", "from": "a@acme.test", "to": [{"email": "b@example.com", "name": "B\nBcc: v@example.com"}]}),
        json!({"subject": "Hi", "text": "x", "from": "a@acme.test", "to": "b@example.com\r\nBcc: v@example.com"}),
        json!({"subject": "Hi", "text": "x", "from": "a@acme.test", "to": "b@example.com", "reply_to": "c@example.com\nX: y"}),
    ] {
        let r = app.api.post("/v1/send", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
    }

    // Unknown template, missing variable, too many recipients, big attachment.
    let r = app
        .api
        .post(
            "/v1/send",
            json!({"template": "nope", "to": "b@example.com", "from": "a@acme.test"}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), fields(&r.body)),
        (422, vec!["template".to_string()])
    );
    let r = app
        .api
        .post(
            "/v1/send",
            json!({"template": "verification-code", "to": "b@example.com", "from": "a@acme.test"}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), fields(&r.body)),
        (422, vec!["data.code".to_string()])
    );
    let many: Vec<String> = (0..51).map(|i| format!("u{i}@example.com")).collect();
    let mut body = code_to("x@example.com");
    body["to"] = json!(many);
    assert_eq!(app.api.post("/v1/send", body).await.status, 422);
    let mut body = code_to("x@example.com");
    body["attachments"] = json!([{"filename": "big.bin", "content": base64_of(2048)}]);
    assert_eq!(app.api.post("/v1/send", body).await.status, 422);
    assert_eq!(app.api.post("/v1/send", json!([1, 2])).await.status, 422);
    assert_eq!(
        app.api
            .post("/v1/send/batch", json!({"messages": []}))
            .await
            .status,
        422
    );

    // NUL (U+0000), which Postgres cannot store as text: a 422 naming the
    // field wherever JSON carries it, a 422 in a query, a 404 in a path;
    // in a batch only its own item fails.
    let mut body = code_to("x@example.com");
    body["data"]["name"] = json!("Li\u{0}Lei");
    body["metadata"] = json!({"k": "v\u{0}"});
    let r = app.api.post("/v1/send", body).await;
    assert_eq!(
        (r.status.as_u16(), fields(&r.body)),
        (422, vec!["data.name".to_string(), "metadata.k".to_string()])
    );
    // Each field once, however many checks it fails: a template name with
    // a NUL is not also "unknown" (nor asked of the store), a header or
    // field name is not also named raw, an address not also for its name.
    let mut body = code_to("x@example.com");
    body["template"] = json!("verification\u{0}code");
    body["headers"] = json!({"X-\u{0}": "v"});
    body["to"] = json!([{"email": "x@example.com", "name": "L\u{0}"}]);
    body["typo\u{0}"] = json!(1);
    let r = app.api.post("/v1/send", body).await;
    let mut named = fields(&r.body);
    named.sort();
    assert_eq!(
        (r.status.as_u16(), named),
        (
            422,
            ["headers.X-\\0", "template", "to[0].name", "typo\\0"]
                .map(String::from)
                .to_vec()
        ),
        "{}",
        r.body
    );
    let nul_text =
        json!({"from": "a@acme.test", "to": ["x@example.com"], "subject": "s", "text": "a\u{0}"});
    let r = app
        .api
        .post(
            "/v1/send/batch",
            json!({"messages": [nul_text, code_to("nul-batch@example.com")]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"][0]["error"]["errors"][0]["field"], "text");
    let batch_id = r.body["data"][1]["id"]
        .as_str()
        .expect("the valid item is accepted")
        .to_string();
    for (path, body, field) in [
        (
            "/v1/templates/nul",
            json!({"subject": "s", "text": "a\u{0}b"}),
            "text",
        ),
        (
            "/v1/templates/nul",
            json!({"subject": "s", "text": "ab", "description": "\u{0}"}),
            "description",
        ),
        (
            "/v1/suppressions/nul@example.com",
            json!({"reason": "r\u{0}"}),
            "reason",
        ),
    ] {
        let r = app.api.put(path, body).await;
        assert_eq!(
            (r.status.as_u16(), fields(&r.body)),
            (422, vec![field.to_string()]),
            "{path}"
        );
    }
    let r = app
        .api
        .post("/v1/keys", json!({"name": "k\u{0}", "scopes": ["send"]}))
        .await;
    assert_eq!(
        (r.status.as_u16(), fields(&r.body)),
        (422, vec!["name".to_string()])
    );
    let r = app.api.get("/v1/messages?tag=a%00").await;
    assert_eq!(
        (r.status.as_u16(), fields(&r.body)),
        (422, vec!["tag".to_string()])
    );
    for path in [
        "/v1/messages/a%00",
        "/v1/templates/a%00",
        "/v1/keys/a%00",
        "/v1/webhooks/a%00",
    ] {
        let r = app.api.get(path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    assert_eq!(
        app.api.get("/v1/templates/nul").await.status,
        404,
        "nothing stored"
    );

    // Auth.
    let anon = app
        .api
        .http
        .post(format!("{}/v1/send", app.api.base))
        .json(&code_to("x@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(anon.headers()["content-type"], "application/problem+json");
    assert_eq!(
        anon.headers()["www-authenticate"],
        "Bearer realm=\"mailroom\""
    );
    assert_eq!(
        app.api
            .with_key("mr_nope_nope")
            .post("/v1/send", code_to("x@example.com"))
            .await
            .status,
        401
    );
    assert_eq!(app.api.get("/v1/nowhere").await.status, 404);
    assert_eq!(app.api.delete("/v1/send").await.status, 405);

    // Request ids are echoed.
    let r = app
        .api
        .call(
            reqwest::Method::GET,
            "/healthz",
            None,
            &[("x-request-id", "trace-me-42")],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-me-42");

    // Nothing was written, nothing was sent, but the batch's valid item.
    let list = app.api.get("/v1/messages").await;
    let listed: Vec<&str> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(listed, [batch_id.as_str()]);
    app.api.wait_status(&batch_id, "delivered").await;
    let sent = smtp.messages().await;
    assert_eq!(sent.len(), 1);
    app.stop().await;
}

async fn chunked_upload(base: &str, key: &str, size: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let chunk = vec![b' '; 8192];
    let mut sent = 0;
    while sent < size {
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if stream.write_all(&frame).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn base64_of(n: usize) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(vec![7u8; n])
}
