//! OTP-grade semantics: scheduled sends and cancel, expiry, collapse keys,
//! priority lanes under a bulk backlog.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::harness::{
    app_with_smtp, code_to, event_types, eventually, Env, ProcApp, Smtp, Stack, TestApp,
};
use crate::on_both_stacks;

on_both_stacks!(
    scheduled_send_waits_for_its_time,
    cancel_scheduled_and_refuse_final,
    sigkill_while_scheduled_still_on_time,
    expires_instead_of_failing,
    collapse_key_keeps_only_the_latest,
    high_priority_overtakes_bulk_backlog,
    codes_go_first_to_a_busy_relay,
    leases_outlast_a_long_wait_for_the_relay,
);

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A scheduled message reached the SMTP server not before `send_at` (with a
/// second of clock slack) and at most `late` seconds after it.
fn assert_on_time(got: &serde_json::Value, send_at: f64, late: f64) {
    let received = got["received_at"].as_f64().unwrap();
    let delay = received - send_at;
    println!("scheduled send reached SMTP {delay:.2}s after send_at");
    assert!(delay >= -1.0, "delivered {:.2}s before send_at", -delay);
    assert!(delay < late, "late by {delay:.2}s");
}

fn at(seconds_from_now: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(seconds_from_now)).to_rfc3339()
}

async fn scheduled_send_waits_for_its_time(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let send_at = now_secs() + 3.0;
    let mut body = code_to("later@example.com");
    body["send_at"] = json!(at(3));
    let r = app.api.post("/v1/send", body).await;
    assert_eq!(
        (r.status.as_u16(), r.body["status"].as_str()),
        (202, Some("scheduled"))
    );
    let id = r.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(app.api.message(&id).await["status"], "scheduled");
    assert!(smtp.received_by("later@example.com").await.is_empty());
    let got = smtp.wait_for("later@example.com").await;
    assert_on_time(&got, send_at, 3.0);
    app.api.wait_status(&id, "delivered").await;
    app.stop().await;
}

async fn cancel_scheduled_and_refuse_final(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let mut body = code_to("never@example.com");
    body["send_at"] = json!(at(3600));
    let id = app.api.send(body).await;
    let r = app
        .api
        .post(&format!("/v1/messages/{id}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "canceled");
    assert_eq!(r.body["recipients"][0]["status"], "canceled");
    let m = app.api.message(&id).await;
    assert_eq!(m["events"][0]["type"], "message.canceled");
    assert_eq!(
        app.api
            .post(&format!("/v1/messages/{id}/cancel"), json!({}))
            .await
            .status,
        409
    );
    let delivered = app.api.send(code_to("done@example.com")).await;
    app.api.wait_status(&delivered, "delivered").await;
    let r = app
        .api
        .post(&format!("/v1/messages/{delivered}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(
        app.api
            .post("/v1/messages/nope/cancel", json!({}))
            .await
            .status,
        404
    );
    assert!(smtp.received_by("never@example.com").await.is_empty());
    app.stop().await;
}

async fn sigkill_while_scheduled_still_on_time(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut app = ProcApp::start(&env, Some(smtp.relay())).await;
    let send_at = now_secs() + 4.0;
    let mut body = code_to("restart@example.com");
    body["send_at"] = json!(at(4));
    let id = app.api.send(body).await;
    app.kill9();
    app.restart(&env.data_dir).await;
    let got = smtp.wait_for("restart@example.com").await;
    // Redis keeps the delayed entry; the embedded queue is rebuilt from the store.
    assert_on_time(&got, send_at, 3.5);
    app.api.wait_status(&id, "delivered").await;
}

async fn expires_instead_of_failing(stack: Stack) {
    let (_env, _smtp, app) = app_with_smtp(stack).await;
    let mut body = code_to("defer-otp@example.com");
    body["expires_at"] = json!(at(3));
    let expires = now_secs() + 3.0;
    let id = app.api.send(body).await;
    let m = app.api.wait_status(&id, "expired").await;
    assert_eq!(m["recipients"][0]["status"], "expired");
    let types = event_types(&m);
    assert_eq!(types.last(), Some(&"message.expired"));
    assert!(!types.contains(&"message.failed"));
    for a in m["attempts"].as_array().unwrap() {
        let t = chrono::DateTime::parse_from_rfc3339(a["at"].as_str().unwrap())
            .unwrap()
            .timestamp_millis() as f64
            / 1000.0;
        assert!(t <= expires + 0.2, "attempt after expiry");
    }
    let bad = app
        .api
        .post("/v1/send", {
            let mut b = code_to("x@example.com");
            b["expires_at"] = json!(at(-10));
            b
        })
        .await;
    assert_eq!(bad.status, 422);
    let bad = app
        .api
        .post("/v1/send", {
            let mut b = code_to("x@example.com");
            b["send_at"] = json!(at(60));
            b["expires_at"] = json!(at(30));
            b
        })
        .await;
    assert_eq!(bad.status, 422);
    app.stop().await;
}

async fn collapse_key_keeps_only_the_latest(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut settings = env.settings(Some(smtp.relay()));
    settings.workers = Some(1);
    let app = TestApp::spawn(settings).await;
    // Occupy the only worker so the codes wait behind a slow relay.
    app.api.send(code_to("slow2500-blocker@example.com")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = Vec::new();
    // The same recipient however its address is cased.
    for (code, to) in [
        ("111111", "user@example.com"),
        ("222222", "User@Example.COM"),
        ("333333", "user@example.com"),
    ] {
        let mut body = code_to(to);
        body["data"]["code"] = json!(code);
        body["collapse_key"] = json!("signup-code");
        ids.push(app.api.send(body).await);
    }
    let last = app.api.wait_status(&ids[2], "delivered").await;
    assert_eq!(last["recipients"][0]["status"], "delivered");
    for (older, newer) in [(&ids[0], &ids[1]), (&ids[1], &ids[2])] {
        let m = app.api.message(older).await;
        assert_eq!(m["status"], "canceled");
        assert_eq!(m["superseded_by"], newer.as_str());
        assert_eq!(m["canceled_reason"], "superseded");
        assert_eq!(m["events"][0]["data"]["superseded_by"], newer.as_str());
    }
    let got = smtp.received_by("user@example.com").await;
    assert_eq!(got.len(), 1, "exactly one code delivered");
    assert!(
        got[0]["text"].as_str().unwrap().contains("333333"),
        "the latest one"
    );

    // Two racing sends with one collapse key leave exactly one live message.
    app.api.send(code_to("slow2000-blocker2@example.com")).await;
    let mut race = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let api = app.api.clone();
        race.spawn(async move {
            let mut body = code_to("racer@example.com");
            body["collapse_key"] = json!("race");
            api.send(body).await
        });
    }
    let mut raced = Vec::new();
    while let Some(id) = race.join_next().await {
        raced.push(id.unwrap());
    }
    let statuses = eventually(Duration::from_secs(30), "the race to settle", || async {
        let mut s = Vec::new();
        for id in &raced {
            s.push(
                app.api.message(id).await["status"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        s.iter()
            .all(|x| x == "delivered" || x == "canceled")
            .then_some(s)
    })
    .await;
    assert_eq!(
        statuses.iter().filter(|s| *s == "delivered").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "canceled").count(),
        1,
        "{statuses:?}"
    );
    app.stop().await;
}

async fn high_priority_overtakes_bulk_backlog(stack: Stack) {
    let (_env, smtp, app) = app_with_smtp(stack).await;
    let bulk_total = 20_000;
    for batch in 0..bulk_total / 500 {
        let messages: Vec<serde_json::Value> = (0..500)
            .map(|i| json!({"subject": "Newsletter", "text": "news", "from": "news@acme.test", "to": format!("b{batch}-{i}@example.com"), "priority": "bulk"}))
            .collect();
        let r = app
            .api
            .post("/v1/send/batch", json!({"messages": messages}))
            .await;
        assert_eq!(r.status, 200);
    }
    let sent_at = now_secs();
    let id = app.api.send(code_to("vip@example.com")).await;
    let got = smtp.wait_for("vip@example.com").await;
    let latency = got["received_at"].as_f64().unwrap() - sent_at;
    let bulk_done = smtp
        .messages()
        .await
        .iter()
        .filter(|m| m["subject"] == "Newsletter")
        .count();
    println!("priority: code reached SMTP {latency:.3}s after its 202 with {bulk_done} of {bulk_total} bulk delivered ({stack:?})");
    assert!(
        bulk_done < bulk_total,
        "the code must not wait for the whole backlog"
    );
    app.api.wait_status(&id, "delivered").await;
    assert_eq!(app.api.message(&id).await["priority"], "high");
    app.stop().await;
}

/// An app (16 workers) whose relay has one connection, with `messages`
/// accepted in one batch; their ids.
async fn one_connection_relay_with(
    stack: Stack,
    messages: Vec<serde_json::Value>,
) -> (Env, Smtp, TestApp, Vec<String>) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let app = TestApp::start(&env, Some(format!("{}&pool=1", smtp.relay()))).await;
    let r = app
        .api
        .post("/v1/send/batch", json!({"messages": messages}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().expect("accepted").to_string())
        .collect();
    (env, smtp, app, ids)
}

/// Deliveries claimed ahead of a busy relay queue for its connections: a
/// code goes to the front of that queue, not behind the bulk mail already
/// claimed. One connection, 16 workers, bulk mail that takes the relay
/// 100 ms each: in arrival order the code would follow up to 15 of them.
async fn codes_go_first_to_a_busy_relay(stack: Stack) {
    let bulk = (0..60)
        .map(|i| json!({"subject": "Newsletter", "text": "news", "from": "news@acme.test", "to": format!("slow100-{i}@example.com"), "priority": "bulk"}))
        .collect();
    let (_env, smtp, app, _) = one_connection_relay_with(stack, bulk).await;
    // Wait until the workers hold the relay busy, then send a code.
    eventually(Duration::from_secs(20), "bulk mail under way", || async {
        (smtp.messages().await.len() >= 3).then_some(())
    })
    .await;
    app.api.send(code_to("vip@example.com")).await;
    smtp.wait_for("vip@example.com").await;
    let received = smtp.messages().await;
    let vip = received
        .iter()
        .position(|m| m["subject"] != "Newsletter")
        .expect("the code was received");
    let bulk_before = vip;
    println!("relay queue: the code reached SMTP after {bulk_before} bulk messages ({stack:?})");
    // The bulk mail already at the relay when the code was sent, the one in
    // its connection when the code was claimed, and no more than a couple
    // that were given the connection while the code was being claimed.
    assert!(
        bulk_before <= 8,
        "the code waited behind {bulk_before} bulk messages"
    );
    app.stop().await;
}

/// A delivery that waits for a relay connection longer than its lease (5 s
/// here) keeps the message: its lease is extended while it waits, so the
/// sweeper does not hand the message to a second delivery and nothing is
/// sent twice. One connection, 2 s per message, eight messages: the last
/// waits ~14 s.
async fn leases_outlast_a_long_wait_for_the_relay(stack: Stack) {
    let slow = (0..8)
        .map(|i| json!({"subject": "Slow", "text": "x", "from": "news@acme.test", "to": format!("slow2000-{i}@example.com")}))
        .collect();
    let (_env, smtp, app, ids) = one_connection_relay_with(stack, slow).await;
    for id in &ids {
        eventually(Duration::from_secs(40), "delivered", || async {
            (app.api.message(id).await["status"] == "delivered").then_some(())
        })
        .await;
    }
    // Anything sent twice would reach the server within its 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut seen = std::collections::HashMap::new();
    for m in smtp.messages().await {
        *seen.entry(m["rcpt_to"].to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "sent twice: {seen:?}");
    for id in &ids {
        let m = app.api.message(id).await;
        assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "{m}");
    }
    app.stop().await;
}
