//! Keys, scopes, rate limits, quotas, idempotency, batch, test-mode keys.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{app_with_smtp, code_to, Client, Env, Stack, TestApp};
use crate::on_both_stacks;

on_both_stacks!(
    rate_limit_burst_and_retry_after,
    daily_quota_is_exact_under_a_race,
    per_recipient_cap,
    scopes_ownership_and_revocation,
    idempotency_replay_conflict_and_race,
    batch_accepts_valid_items,
    test_mode_key_never_reaches_smtp,
    usage_and_allowed_from_domains,
    quota_windows_follow_the_key_timezone,
);

/// Seconds from now to the next midnight at a fixed UTC offset.
fn secs_to_midnight(offset_hours: i64) -> i64 {
    let local = chrono::Utc::now().timestamp() + offset_hours * 3600;
    86_400 - local.rem_euclid(86_400)
}

/// The `t=` of the "daily" item of a `RateLimit` header.
fn daily_reset(header: &str) -> (i64, i64) {
    let item = header
        .split(", ")
        .find(|i| i.starts_with("\"daily\""))
        .unwrap_or_else(|| panic!("no daily item in {header}"));
    let field = |name: &str| -> i64 {
        item.split(';')
            .find_map(|p| p.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {item}"))
    };
    (field("r="), field("t="))
}

async fn quota_windows_follow_the_key_timezone(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let bad = app
        .api
        .post(
            "/v1/keys",
            json!({"name": "x", "scopes": ["send"], "timezone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert_eq!(bad.body["errors"][0]["field"], "timezone");
    // Kiritimati is UTC+14 all year: its days start 14 hours before UTC's.
    let (id, key) = app
        .api
        .create_key(json!({"name": "kiri", "scopes": ["send", "read"], "daily_quota": 5, "timezone": "Pacific/Kiritimati"}))
        .await;
    let (_, utc_key) = app
        .api
        .create_key(json!({"name": "utc", "scopes": ["send"], "daily_quota": 5}))
        .await;
    let view = app.api.get(&format!("/v1/keys/{id}")).await.body;
    assert_eq!(view["timezone"], "Pacific/Kiritimati");
    for (key, offset) in [(&key, 14), (&utc_key, 0)] {
        let r = app
            .api
            .with_key(key)
            .post("/v1/send", code_to("tz@example.com"))
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        let header = r.headers["ratelimit"].to_str().unwrap().to_string();
        let (remaining, reset) = daily_reset(&header);
        assert_eq!(remaining, 4, "{header}");
        let expected = secs_to_midnight(offset);
        assert!(
            (reset - expected).abs() <= 5,
            "UTC{offset:+}: daily window resets in {reset}s, expected ~{expected}s ({header})"
        );
    }
    let usage = app.api.with_key(&key).get("/v1/usage").await.body;
    assert_eq!(usage["limits"]["timezone"], "Pacific/Kiritimati");
    assert_eq!(usage["remaining"]["daily"], 4);
    let patched = app
        .api
        .patch(&format!("/v1/keys/{id}"), json!({"timezone": null}))
        .await;
    assert_eq!(patched.body["timezone"], "UTC");
    app.stop().await;
}

async fn race(
    api: &Client,
    n: usize,
    body: serde_json::Value,
    headers: Vec<(String, String)>,
) -> Vec<(StatusCode, serde_json::Value)> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let api = api.clone();
        let body = body.clone();
        let headers = headers.clone();
        tasks.spawn(async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = api
                .call(reqwest::Method::POST, "/v1/send", Some(body), &h)
                .await;
            (r.status, r.body)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

async fn rate_limit_burst_and_retry_after(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let (_, key) = app.api.create_key(json!({"name": "paced", "scopes": ["send", "read"], "rate_per_second": 0.5, "burst": 3})).await;
    let client = app.api.with_key(&key);
    // A refused send spends a token too, and its answer says what is left.
    let mut bad = code_to("a@example.com");
    bad["data"] = json!({});
    for (body, status, expected_remaining) in [
        (bad, 422, 2),
        (code_to("a@example.com"), 202, 1),
        (code_to("a@example.com"), 202, 0),
    ] {
        let r = client.post("/v1/send", body).await;
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.headers["ratelimit-policy"], "\"burst\";q=3;w=6");
        let limit = r.headers["ratelimit"].to_str().unwrap();
        assert!(
            limit.starts_with(&format!("\"burst\";r={expected_remaining};t=")),
            "{limit}"
        );
    }
    let r = client.post("/v1/send", code_to("a@example.com")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.body["policy"], "burst");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        client
            .post("/v1/send", code_to("a@example.com"))
            .await
            .status,
        202,
        "a token came back after Retry-After"
    );
    app.stop().await;
}

async fn daily_quota_is_exact_under_a_race(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let (_, key) = app
        .api
        .create_key(json!({"name": "quota", "scopes": ["send", "read"], "daily_quota": 7}))
        .await;
    let client = app.api.with_key(&key);
    let results = race(&client, 30, code_to("q@example.com"), vec![]).await;
    let ok = results.iter().filter(|(s, _)| *s == 202).count();
    let limited: Vec<_> = results.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(ok, 7, "exactly the quota is accepted");
    assert_eq!(limited.len(), 23);
    assert!(limited.iter().all(|(_, b)| b["policy"] == "daily"));
    let usage = client.get("/v1/usage").await;
    assert_eq!(usage.body["today"]["accepted"], 7);
    assert_eq!(usage.body["remaining"]["daily"], 0);
    // A rejected request (validation) consumes nothing: still exactly 7 stored.
    let list = client.get("/v1/messages?limit=100").await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 7);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_holds_across_two_processes_on_one_redis() {
    let env = Env::new(Stack::Postgres).await;
    let first = TestApp::start(&env, None).await;
    let mut settings = env.settings(None);
    settings.data_dir = Some(crate::harness::temp_dir("second").display().to_string());
    let second = TestApp::spawn(settings).await;
    let (_, key) = first
        .api
        .create_key(json!({"name": "shared", "scopes": ["send"], "daily_quota": 10}))
        .await;
    let a = first.api.with_key(&key);
    let b = second.api.with_key(&key);
    let (ra, rb) = tokio::join!(
        race(&a, 12, code_to("x@example.com"), vec![]),
        race(&b, 12, code_to("x@example.com"), vec![])
    );
    let ok = ra
        .iter()
        .chain(rb.iter())
        .filter(|(s, _)| *s == 202)
        .count();
    assert_eq!(ok, 10, "one quota across both processes");
    first.stop().await;
    second.stop().await;
}

async fn per_recipient_cap(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let (_, key) = app
        .api
        .create_key(json!({"name": "signup", "scopes": ["send"], "per_recipient_hourly": 2}))
        .await;
    let client = app.api.with_key(&key);
    assert_eq!(
        client
            .post("/v1/send", code_to("victim@example.com"))
            .await
            .status,
        202
    );
    assert_eq!(
        client
            .post("/v1/send", code_to("Victim@Example.com"))
            .await
            .status,
        202
    );
    let r = client.post("/v1/send", code_to("victim@example.com")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["policy"], "per_recipient_hourly");
    assert_eq!(
        client
            .post("/v1/send", code_to("someone-else@example.com"))
            .await
            .status,
        202
    );
    app.stop().await;
}

async fn scopes_ownership_and_revocation(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let (send_id, send_key) = app
        .api
        .create_key(json!({"name": "app", "scopes": ["send", "read"]}))
        .await;
    let (_, read_key) = app
        .api
        .create_key(json!({"name": "dash", "scopes": ["read"]}))
        .await;
    let sender = app.api.with_key(&send_key);
    let reader = app.api.with_key(&read_key);
    assert_eq!(sender.get("/v1/keys").await.status, 403);
    assert_eq!(
        sender
            .post("/v1/keys", json!({"name": "x", "scopes": ["admin"]}))
            .await
            .status,
        403
    );
    assert_eq!(
        sender
            .put("/v1/templates/x", json!({"subject": "s", "text": "t"}))
            .await
            .status,
        403
    );
    assert_eq!(
        reader
            .post("/v1/send", code_to("a@example.com"))
            .await
            .status,
        403
    );

    let mine = sender.send(code_to("a@example.com")).await;
    let admins = app.api.send(code_to("b@example.com")).await;
    assert_eq!(
        sender.get(&format!("/v1/messages/{mine}")).await.status,
        200
    );
    assert_eq!(
        sender.get(&format!("/v1/messages/{admins}")).await.status,
        404,
        "other keys' mail is invisible"
    );
    let listed: Vec<String> = sender.get("/v1/messages").await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, vec![mine.clone()]);
    assert_eq!(
        app.api.get(&format!("/v1/messages/{mine}")).await.status,
        200,
        "admin sees all"
    );

    // Keys are never shown again, and revocation is immediate.
    let shown = app.api.get(&format!("/v1/keys/{send_id}")).await;
    assert!(shown.body.get("key").is_none());
    assert!(!shown
        .body
        .to_string()
        .contains(send_key.split('_').next_back().unwrap()));
    assert_eq!(
        app.api.delete(&format!("/v1/keys/{send_id}")).await.status,
        204
    );
    assert_eq!(
        sender
            .post("/v1/send", code_to("a@example.com"))
            .await
            .status,
        401
    );
    app.stop().await;
}

async fn idempotency_replay_conflict_and_race(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let body = code_to("idem@example.com");
    let first = app
        .api
        .call(
            reqwest::Method::POST,
            "/v1/send",
            Some(body.clone()),
            &[("Idempotency-Key", "\"order-1\"")],
        )
        .await;
    assert_eq!(first.status, 202);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = app
        .api
        .call(
            reqwest::Method::POST,
            "/v1/send",
            Some(body.clone()),
            &[("Idempotency-Key", "order-1")],
        )
        .await;
    assert_eq!(again.status, 202);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body["id"], first.body["id"]);
    let other = app
        .api
        .call(
            reqwest::Method::POST,
            "/v1/send",
            Some(code_to("other@example.com")),
            &[("Idempotency-Key", "order-1")],
        )
        .await;
    assert_eq!(other.status, 422);
    // A failed validation stores nothing: the key stays free.
    let bad = app
        .api
        .call(
            reqwest::Method::POST,
            "/v1/send",
            Some(json!({"template": "nope", "to": "a@example.com", "from": "a@acme.test"})),
            &[("Idempotency-Key", "order-2")],
        )
        .await;
    assert_eq!(bad.status, 422);
    let good = app
        .api
        .call(
            reqwest::Method::POST,
            "/v1/send",
            Some(code_to("idem2@example.com")),
            &[("Idempotency-Key", "order-2")],
        )
        .await;
    assert_eq!(good.status, 202);
    assert!(good.headers.get("idempotent-replayed").is_none());

    // Twenty identical requests racing: one message, one SMTP delivery.
    let racing = code_to("race@example.com");
    let results = race(
        &app.api,
        20,
        racing,
        vec![("Idempotency-Key".into(), "race-1".into())],
    )
    .await;
    let ids: HashSet<String> = results
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{results:?}");
    assert!(
        results.iter().all(|(s, _)| *s == 202 || *s == 409),
        "{results:?}"
    );
    let id = ids.into_iter().next().unwrap();
    app.api.wait_status(&id, "delivered").await;
    let list = app.api.get("/v1/messages?to=race@example.com").await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
    smtp.wait_for("race@example.com").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.received_by("race@example.com").await.len(), 1);

    // One key, two different bodies racing (their reservations share a
    // group): one message; the others are told the key is in flight (409)
    // or was used for another body (422), never given a second message.
    let (a, b) = (
        code_to("mixed-a@example.com"),
        code_to("mixed-b@example.com"),
    );
    let key = vec![("Idempotency-Key".to_string(), "mixed-1".to_string())];
    let (left, right) = tokio::join!(race(&app.api, 6, a, key.clone()), race(&app.api, 6, b, key));
    let all: Vec<_> = left.into_iter().chain(right).collect();
    let ids: HashSet<&str> = all
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{all:?}");
    assert!(
        all.iter()
            .all(|(s, _)| [202, 409, 422].contains(&s.as_u16())),
        "{all:?}"
    );

    // Distinct keyed sends at once share a group commit, whose answers are
    // stored in one statement: each key replays its own message.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let api = app.api.clone();
        tasks.spawn(async move {
            let key = format!("group-{i}");
            let to = format!("group{i}@example.com");
            let send = |api: Client, key: String, to: String| async move {
                api.call(
                    reqwest::Method::POST,
                    "/v1/send",
                    Some(code_to(&to)),
                    &[("Idempotency-Key", key.as_str())],
                )
                .await
            };
            let first = send(api.clone(), key.clone(), to.clone()).await;
            (first, send(api, key, to).await)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (first, replay) = r.unwrap();
        assert_eq!(first.status, 202, "{}", first.body);
        assert_eq!(replay.status, 202, "{}", replay.body);
        assert_eq!(replay.headers["idempotent-replayed"], "true");
        assert_eq!(replay.body, first.body);
    }
    app.stop().await;
}

async fn batch_accepts_valid_items(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let r = app
        .api
        .post(
            "/v1/send/batch",
            json!({"messages": [code_to("one@example.com"), {"template": "verification-code", "to": "bad"}, code_to("three@example.com")]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let data = r.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[1]["error"]["status"], 422);
    let fields: Vec<&str> = data[1]["error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"to") && fields.contains(&"data.code") || fields.contains(&"to"),
        "{fields:?}"
    );
    for i in [0, 2] {
        let id = data[i]["id"].as_str().unwrap();
        assert_eq!(data[i]["index"], i);
        app.api.wait_status(id, "delivered").await;
    }
    smtp.wait_for("one@example.com").await;
    smtp.wait_for("three@example.com").await;
    app.stop().await;
}

async fn test_mode_key_never_reaches_smtp(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let (_, key) = app
        .api
        .create_key(json!({"name": "ci", "scopes": ["send", "read"], "mode": "test"}))
        .await;
    let client = app.api.with_key(&key);
    let id = client.send(code_to("ci-user@example.com")).await;
    let m = client.wait_status(&id, "delivered").await;
    assert_eq!(m["mode"], "test");
    assert_eq!(m["attempts"][0]["relay"], "capture");
    let raw = client.get(&format!("/v1/messages/{id}/raw")).await;
    assert!(raw.body.as_str().unwrap().contains("Subject:"));
    // A live message sent after it reaches SMTP, the test one never did.
    let live = app.api.send(code_to("live@example.com")).await;
    app.api.wait_status(&live, "delivered").await;
    smtp.wait_for("live@example.com").await;
    assert!(smtp.received_by("ci-user@example.com").await.is_empty());
    app.stop().await;
}

async fn usage_and_allowed_from_domains(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let (key_id, key) = app.api.create_key(json!({"name": "acme", "scopes": ["send", "read"], "allowed_from_domains": ["acme.test"], "monthly_quota": 100})).await;
    let client = app.api.with_key(&key);
    let mut body = code_to("u@example.com");
    body["from"] = json!("spoof@other.test");
    let r = client.post("/v1/send", body).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "from");
    let id = client.send(code_to("u@example.com")).await;
    client.wait_status(&id, "delivered").await;
    let usage = client.get("/v1/usage").await.body;
    assert_eq!(usage["key_id"], key_id);
    assert_eq!(usage["today"]["accepted"], 1);
    assert_eq!(usage["today"]["delivered"], 1);
    assert_eq!(usage["month"]["delivered"], 1);
    assert_eq!(usage["remaining"]["monthly"], 99);
    assert_eq!(
        client
            .get(&format!("/v1/usage?key_id={}", "key_other"))
            .await
            .status,
        403
    );
    assert_eq!(
        app.api
            .get(&format!("/v1/usage?key_id={key_id}"))
            .await
            .body["today"]["accepted"],
        1
    );
    // PATCH changes limits; the next request sees them.
    let patched = app
        .api
        .patch(&format!("/v1/keys/{key_id}"), json!({"daily_quota": 1}))
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.body["daily_quota"], 1);
    assert_eq!(patched.body["monthly_quota"], 100);
    assert_eq!(
        client
            .post("/v1/send", code_to("u@example.com"))
            .await
            .status,
        429
    );
    app.stop().await;
}

/// Overload is shed with 503 + Retry-After (never 500, never unbounded
/// memory); what was accepted is delivered, and service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503() {
    let env = Env::new(Stack::Embedded).await;
    let mut settings = env.settings(None);
    settings.max_in_flight = Some(2);
    let app = TestApp::spawn(settings).await;
    let results = race(&app.api, 40, code_to("busy@example.com"), vec![]).await;
    let shed: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    let accepted: Vec<_> = results.iter().filter(|(s, _)| *s == 202).collect();
    assert_eq!(shed.len() + accepted.len(), 40, "{results:?}");
    assert!(
        !shed.is_empty(),
        "40 concurrent sends against a capacity of 2 shed none"
    );
    assert!(shed.iter().all(|(_, b)| b["status"] == 503));
    for (_, body) in &accepted {
        app.api
            .wait_status(body["id"].as_str().unwrap(), "delivered")
            .await;
    }
    let r = app.api.post("/v1/send", code_to("after@example.com")).await;
    assert_eq!(r.status, 202);
    app.stop().await;
}
