//! Webhooks: Standard Webhooks signatures verified by the `standardwebhooks`
//! library in a real receiver; retries with one webhook-id; nothing lost when
//! the receiver or Mailroom goes down; 410, redirects, SSRF, rotation; the
//! event feed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::harness::{code_to, eventually, Client, Env, ProcApp, Receiver, Stack, TestApp};
use crate::on_both_stacks;

on_both_stacks!(
    signed_and_retried_with_one_id,
    receiver_down_during_a_burst_loses_nothing,
    gone_disables_and_redirects_are_failures,
    secret_rotation_signs_twice,
    event_feed_pages_without_loss,
    a_hanging_endpoint_holds_half_the_slots_at_most,
);

async fn create_hook(api: &Client, url: &str, events: Option<Vec<&str>>) -> (String, String) {
    let mut body = json!({"url": url, "description": "test receiver"});
    if let Some(events) = events {
        body["events"] = json!(events);
    }
    let r = api.post("/v1/webhooks", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    (r.body["id"].as_str().unwrap().to_string(), secret)
}

/// The messages whose events reached `receiver` with a verified signature.
async fn verified_message_ids(receiver: &Receiver) -> HashSet<String> {
    receiver
        .received()
        .await
        .iter()
        .filter(|r| !r["verified_with"].as_array().unwrap().is_empty())
        .map(|r| {
            r["body"]["data"]["message_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn signed_and_retried_with_one_id(stack: Stack) {
    let env = Env::new(stack).await;
    let receiver = Receiver::start();
    let app = TestApp::start(&env, None).await;
    let (hook, secret) =
        create_hook(&app.api, &receiver.url(), Some(vec!["message.delivered"])).await;
    assert!(
        app.api
            .get(&format!("/v1/webhooks/{hook}"))
            .await
            .body
            .get("secret")
            .is_none(),
        "secret shown once"
    );
    receiver.configure(&[&secret], &[500, 500]).await;
    let mut body = code_to("hooked@example.com");
    body["tags"] = json!(["auth"]);
    body["metadata"] = json!({"user_id": "42"});
    let id = app.api.send(body).await;
    let got = eventually(
        Duration::from_secs(30),
        "three webhook attempts",
        || async {
            let r = receiver.received().await;
            (r.len() >= 3).then_some(r)
        },
    )
    .await;
    let ids: HashSet<&str> = got.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "same webhook-id on every retry");
    assert!(
        got.iter().all(|r| r["verified_with"] == json!([secret])),
        "{got:?}"
    );
    let event = &got[2]["body"];
    assert_eq!(event["type"], "message.delivered");
    assert_eq!(event["data"]["message_id"], id.as_str());
    assert_eq!(event["data"]["recipient"], "hooked@example.com");
    assert_eq!(event["data"]["status"], "delivered");
    assert_eq!(event["data"]["tags"], json!(["auth"]));
    assert_eq!(event["data"]["metadata"], json!({"user_id": "42"}));
    assert!(
        !event.to_string().contains("493817"),
        "no secret variables in events"
    );
    let deliveries = eventually(
        Duration::from_secs(30),
        "the delivery to be recorded as succeeded",
        || async {
            let d = app
                .api
                .get(&format!("/v1/webhooks/{hook}/deliveries"))
                .await
                .body;
            (d["data"][0]["status"] == "succeeded").then_some(d)
        },
    )
    .await;
    let delivery = &deliveries["data"][0];
    assert_eq!(delivery["attempts"], 3);
    let log: Vec<Value> = delivery["attempt_log"].as_array().unwrap().clone();
    assert_eq!(
        log.iter()
            .map(|a| a["status_code"].clone())
            .collect::<Vec<_>>(),
        vec![json!(500), json!(500), json!(200)]
    );
    // Manual replay of a delivery: same webhook-id again.
    let did = delivery["id"].as_str().unwrap();
    assert_eq!(
        app.api
            .post(
                &format!("/v1/webhooks/{hook}/deliveries/{did}/retry"),
                json!({})
            )
            .await
            .status,
        202
    );
    eventually(Duration::from_secs(30), "the replay", || async {
        (receiver.received().await.len() >= 4).then_some(())
    })
    .await;
    assert_eq!(receiver.received().await[3]["id"], got[0]["id"]);
    // `.../replay` is the same as `.../retry` (PRODUCT.md's word for it).
    let replay = app
        .api
        .post(
            &format!("/v1/webhooks/{hook}/deliveries/{did}/replay"),
            json!({}),
        )
        .await;
    assert_eq!(replay.status, 202, "{}", replay.body);
    eventually(Duration::from_secs(30), "the second replay", || async {
        (receiver.received().await.len() >= 5).then_some(())
    })
    .await;
    assert_eq!(receiver.received().await[4]["id"], got[0]["id"]);
    // Test event.
    assert_eq!(
        app.api
            .post(&format!("/v1/webhooks/{hook}/test"), json!({}))
            .await
            .status,
        202
    );
    eventually(Duration::from_secs(30), "the test event", || async {
        receiver
            .received()
            .await
            .iter()
            .any(|r| r["body"]["type"] == "webhook.test")
            .then_some(())
    })
    .await;
    app.stop().await;
}

async fn receiver_down_during_a_burst_loses_nothing(stack: Stack) {
    let env = Env::new(stack).await;
    let mut receiver = Receiver::start();
    // A compressed version of the real schedule (which spans ~1.5 days):
    // long enough that no event runs out of attempts while the receiver is
    // down, even on a loaded machine.
    let mut settings = env.settings(None);
    settings.webhook_retry_schedule = Some("1s,2s,4s,8s,15s,30s,60s".into());
    let app = TestApp::spawn(settings).await;
    let (_, secret) = create_hook(&app.api, &receiver.url(), Some(vec!["message.delivered"])).await;
    receiver.stop();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            app.api
                .send(code_to(&format!("burst{i}@example.com")))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    receiver.start_again_verifying(&[&secret]);
    let started = Instant::now();
    let got = eventually(Duration::from_secs(150), "100 delivered events", || async {
        let messages = verified_message_ids(&receiver).await;
        (messages.len() >= 100).then_some(messages)
    })
    .await;
    for id in &ids {
        assert!(got.contains(id), "no event for {id}");
    }
    println!(
        "webhooks: 100 events caught up in {:?} after the receiver came back",
        started.elapsed()
    );
    app.stop().await;
}

/// An endpoint that accepts connections and never answers; it counts the
/// connections its client still holds open, and closes them all when
/// dropped.
struct Hanging {
    port: u16,
    open: Arc<AtomicUsize>,
    closing: CancellationToken,
}

impl Hanging {
    async fn start() -> Hanging {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, closing) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let (count, stop) = (open.clone(), closing.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (count, stop) = (count.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sink = [0u8; 4096];
                    loop {
                        tokio::select! {
                            read = socket.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { break },
                            _ = stop.cancelled() => break,
                        }
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Hanging {
            port,
            open,
            closing,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Connections the client holds open: its requests in flight here.
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// One endpoint hangs until the timeout while events keep coming; another
/// still gets every event at once, and the hanging one never holds more
/// than half of the 128 request slots.
async fn a_hanging_endpoint_holds_half_the_slots_at_most(stack: Stack) {
    let env = Env::new(stack).await;
    let receiver = Receiver::start();
    let hanging = Hanging::start().await;
    let timeout = Duration::from_secs(30);
    let mut settings = env.settings(None);
    settings.webhook_timeout = Some("30s".into());
    let app = TestApp::spawn(settings).await;
    create_hook(&app.api, &hanging.url(), Some(vec!["message.delivered"])).await;
    let (_, secret) = create_hook(&app.api, &receiver.url(), Some(vec!["message.delivered"])).await;
    // A third endpoint with nothing due: the claim asks all three at once.
    create_hook(&app.api, &receiver.url(), Some(vec!["message.bounced"])).await;
    receiver.configure(&[&secret], &[]).await;
    let batch = |from: usize, n: usize| {
        let messages: Vec<Value> = (from..from + n)
            .map(|i| code_to(&format!("pair{i}@example.com")))
            .collect();
        json!({ "messages": messages })
    };
    let r = app.api.post("/v1/send/batch", batch(0, 200)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(30),
        "the hanging endpoint's share in use",
        || async { (hanging.open() >= 64).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hanging.open(),
        64,
        "requests in flight to the hanging endpoint"
    );
    // More events while it hangs: the other endpoint gets them before the
    // hanging requests time out (with every slot theirs, it would wait).
    let started = Instant::now();
    let r = app.api.post("/v1/send/batch", batch(200, 100)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        timeout * 2,
        "300 events at the healthy endpoint",
        || async {
            let got = verified_message_ids(&receiver).await;
            (got.len() >= 300).then_some(())
        },
    )
    .await;
    assert!(
        started.elapsed() < timeout / 2,
        "the healthy endpoint waited for the hanging one: {:?}",
        started.elapsed()
    );
    let posts = receiver.received().await;
    let distinct: HashSet<&str> = posts.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(distinct.len(), posts.len(), "an event posted twice");
    assert_eq!(
        hanging.open(),
        64,
        "requests in flight to the hanging endpoint"
    );
    // Answer nothing, but close: the requests fail and the app stops at once.
    drop(hanging);
    app.stop().await;
}

async fn gone_disables_and_redirects_are_failures(stack: Stack) {
    let env = Env::new(stack).await;
    let receiver = Receiver::start();
    let app = TestApp::start(&env, None).await;
    let (hook, secret) = create_hook(&app.api, &receiver.url(), None).await;
    receiver.configure(&[&secret], &[302, 410]).await;
    app.api.send(code_to("a@example.com")).await;
    let w = eventually(
        Duration::from_secs(20),
        "the endpoint to be disabled",
        || async {
            let w = app.api.get(&format!("/v1/webhooks/{hook}")).await.body;
            (w["enabled"] == false).then_some(w)
        },
    )
    .await;
    assert!(w["disabled_reason"].as_str().unwrap().contains("410"));
    let d = app
        .api
        .get(&format!("/v1/webhooks/{hook}/deliveries"))
        .await
        .body;
    let log = &d["data"][0]["attempt_log"];
    assert_eq!(log[0]["status_code"], 302);
    assert!(log[0]["error"]
        .as_str()
        .unwrap()
        .contains("redirects are not followed"));
    assert_eq!(log[1]["status_code"], 410);
    assert_eq!(
        receiver.received().await.len(),
        2,
        "the redirect was not followed"
    );
    // Disabled endpoints get nothing; re-enabling works.
    app.api.send(code_to("b@example.com")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received().await.len(), 2);
    let enabled = app
        .api
        .patch(&format!("/v1/webhooks/{hook}"), json!({"enabled": true}))
        .await;
    assert_eq!(enabled.body["enabled"], true);
    app.stop().await;
}

async fn secret_rotation_signs_twice(stack: Stack) {
    let env = Env::new(stack).await;
    let receiver = Receiver::start();
    let app = TestApp::start(&env, None).await;
    let (hook, old) = create_hook(&app.api, &receiver.url(), Some(vec!["message.delivered"])).await;
    let rotated = app
        .api
        .post(&format!("/v1/webhooks/{hook}/rotate-secret"), json!({}))
        .await;
    assert_eq!(rotated.status, 200);
    let new = rotated.body["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    receiver.configure(&[&old, &new], &[]).await;
    app.api.send(code_to("rot@example.com")).await;
    let got = eventually(Duration::from_secs(20), "a signed event", || async {
        receiver.received().await.into_iter().next()
    })
    .await;
    assert_eq!(
        got["verified_with"],
        json!([old, new]),
        "both secrets verify during the grace period"
    );
    assert_eq!(got["signature"].as_str().unwrap().split(' ').count(), 2);
    app.stop().await;
}

async fn event_feed_pages_without_loss(stack: Stack) {
    let env = Env::new(stack).await;
    let app = TestApp::start(&env, None).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.api.send(code_to(&format!("feed{i}@example.com"))).await);
    }
    for id in &ids {
        app.api.wait_status(id, "delivered").await;
    }
    let seen = eventually(
        Duration::from_secs(30),
        "five events in the feed",
        || async {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/v1/events?limit=2&after={c}"),
                    None => "/v1/events?limit=2".to_string(),
                };
                let page = app.api.get(&path).await.body;
                let data = page["data"].as_array().unwrap().clone();
                if data.is_empty() {
                    break;
                }
                seen.extend(data);
                cursor = page["next_cursor"].as_str().map(str::to_string);
            }
            (seen.len() >= 5).then_some(seen)
        },
    )
    .await;
    let messages: Vec<&str> = seen
        .iter()
        .map(|e| e["data"]["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(messages.len(), 5);
    for id in &ids {
        assert!(messages.contains(&id.as_str()));
    }
    let cursors: Vec<i64> = seen
        .iter()
        .map(|e| e["cursor"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "ordered");
    // A consumer resumes after the last event it processed, by its id (a
    // webhook's `webhook-id`).
    let second = seen[1]["id"].as_str().unwrap();
    let resumed = app.api.get(&format!("/v1/events?after={second}")).await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_eq!(resumed.body["data"][0]["id"], seen[2]["id"]);
    let unknown = app
        .api
        .get("/v1/events?after=evt_0000000000000000000000000000000f")
        .await;
    assert_eq!(unknown.status, 422);
    assert_eq!(unknown.body["errors"][0]["field"], "after");
    let (_, reader) = app
        .api
        .create_key(json!({"name": "feed-reader", "scopes": ["read"]}))
        .await;
    let foreign = app
        .api
        .with_key(&reader)
        .get(&format!("/v1/events?after={second}"))
        .await;
    assert_eq!(foreign.status, 422, "another key's event is not found");
    let filtered = app.api.get("/v1/events?type=message.bounced").await.body;
    assert_eq!(filtered["data"], json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_sigkill_of_mailroom() {
    for stack in [Stack::Embedded, Stack::Postgres] {
        let env = Env::new(stack).await;
        let mut receiver = Receiver::start();
        let mut app = ProcApp::start(&env, None).await;
        let (_, secret) =
            create_hook(&app.api, &receiver.url(), Some(vec!["message.delivered"])).await;
        receiver.stop();
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(app.api.send(code_to(&format!("k{i}@example.com"))).await);
        }
        for id in &ids {
            app.api.wait_status(id, "delivered").await;
        }
        app.kill9();
        receiver.start_again_verifying(&[&secret]);
        app.restart(&env.data_dir).await;
        // Deliveries the killed process had claimed wait for their lease
        // (30 s) to lapse.
        eventually(
            Duration::from_secs(120),
            "all 20 events after the restart",
            || async {
                let got = verified_message_ids(&receiver).await;
                ids.iter().all(|id| got.contains(id)).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_targets_are_refused() {
    let env = Env::new(Stack::Embedded).await;
    let mut settings = env.settings(None);
    settings.webhook_allow_private = Some(false);
    let app = TestApp::spawn(settings).await;
    // A name (not a literal, not "localhost") that resolves to a loopback or
    // private address: this machine's own hostname, as /etc/hosts maps it.
    let host = String::from_utf8(
        std::process::Command::new("hostname")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let by_name = format!("http://{}:9/hook", host.trim());
    let resolved = tokio::net::lookup_host((host.trim(), 9))
        .await
        .map(|a| a.collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        resolved
            .iter()
            .any(|a| mailroom::webhooks::ssrf::forbidden(a.ip())),
        "this test needs the hostname to resolve to an internal address, got {resolved:?}"
    );
    for url in [
        by_name.as_str(),
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://2130706433/hook",
        "http://0x7f000001/hook",
        "http://0177.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.1.10/",
        "http://172.16.5.4/",
        "http://100.64.1.1/",
        "http://[fc00::1]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "ftp://example.com/hook",
        "http://user:pass@example.com/hook",
    ] {
        let r = app.api.post("/v1/webhooks", json!({"url": url})).await;
        assert_eq!(r.status, 422, "{url} was accepted: {}", r.body);
        assert_eq!(r.body["errors"][0]["field"], "url");
    }
    assert_eq!(app.api.get("/v1/webhooks").await.body["data"], json!([]));
    app.stop().await;
}
