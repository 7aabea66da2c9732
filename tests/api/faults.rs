//! Faults: a 202 is never lost, whatever happens to the process, Redis or
//! Postgres; dependencies down mean 503, never 500.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{
    code_to, eventually, free_port, Client, Env, PgCluster, ProcApp, Smtp, Stack, TestApp,
};
use crate::on_both_stacks;

on_both_stacks!(
    sigkill_mid_burst_loses_nothing,
    sigterm_drains_and_exits_cleanly
);

/// Sends `n` messages from `parallel` tasks; returns the ids that got a 202.
async fn burst(
    api: &Client,
    n: usize,
    parallel: usize,
    to: impl Fn(usize) -> String + Send + Sync + Clone + 'static,
) -> Vec<String> {
    burst_counting(api, n, parallel, to, Arc::default()).await
}

/// [`burst`], counting each 202 in `accepted` as it arrives.
async fn burst_counting(
    api: &Client,
    n: usize,
    parallel: usize,
    to: impl Fn(usize) -> String + Send + Sync + Clone + 'static,
    accepted: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..parallel {
        let api = api.clone();
        let to = to.clone();
        let accepted = accepted.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..n).step_by(parallel) {
                let resp = api
                    .http
                    .post(format!("{}/v1/send", api.base))
                    .bearer_auth(&api.key)
                    .json(&code_to(&to(i)))
                    .send()
                    .await;
                if let Ok(r) = resp {
                    if r.status() == StatusCode::ACCEPTED {
                        if let Ok(body) = r.json::<serde_json::Value>().await {
                            ids.push(body["id"].as_str().unwrap_or_default().to_string());
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(Ok(mut part)) = tasks.join_next().await {
        ids.append(&mut part);
    }
    ids
}

async fn all_delivered(api: &Client, ids: &[String], within: Duration) {
    let mut pending: HashSet<String> = ids.iter().cloned().collect();
    let deadline = std::time::Instant::now() + within;
    while !pending.is_empty() {
        let snapshot: Vec<String> = pending.iter().cloned().collect();
        for id in snapshot {
            let m = api.get(&format!("/v1/messages/{id}")).await;
            if m.body["status"] == "delivered" {
                pending.remove(&id);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} accepted messages not delivered after {within:?}",
            pending.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn sigkill_mid_burst_loses_nothing(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut app = ProcApp::start(&env, Some(smtp.relay())).await;
    let api = app.api.clone();
    let progress = Arc::new(AtomicUsize::new(0));
    let counter = progress.clone();
    let sender = tokio::spawn(async move {
        burst_counting(
            &api,
            200,
            8,
            |i| format!("slow20-k{i}@example.com"),
            counter,
        )
        .await
    });
    // Kill once the client holds 60 answers (rows in the database are not
    // enough: a committed message whose 202 was cut off is not accepted).
    eventually(Duration::from_secs(30), "60 accepted messages", || async {
        (progress.load(Ordering::SeqCst) >= 60).then_some(())
    })
    .await;
    app.kill9();
    let accepted = sender.await.unwrap();
    assert!(accepted.len() >= 60, "only {} accepted", accepted.len());
    app.restart(&env.data_dir).await;
    all_delivered(&app.api, &accepted, Duration::from_secs(90)).await;
    // At-least-once: every accepted message reached the SMTP server, and
    // duplicates (if any) carry the same Message-ID.
    let got = smtp.messages().await;
    let ids: HashSet<String> = got
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    for id in &accepted {
        assert!(
            ids.iter().any(|mid| mid.contains(id.as_str())),
            "{id} never reached SMTP"
        );
    }
}

async fn sigterm_drains_and_exits_cleanly(stack: Stack) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let mut app = ProcApp::start(&env, Some(smtp.relay())).await;
    let ids = burst(&app.api, 20, 4, |i| format!("slow300-t{i}@example.com")).await;
    assert_eq!(ids.len(), 20);
    // Wait until deliveries are in flight, then ask it to stop.
    eventually(Duration::from_secs(20), "a delivery in flight", || async {
        let r = app.api.get("/v1/messages?status=sending").await;
        (!r.body["data"].as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    let status = app.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(app.logs().contains("shutdown complete"));
    app.restart(&env.data_dir).await;
    all_delivered(&app.api, &ids, Duration::from_secs(60)).await;
}

/// Postgres + Redis and an SMTP server, with `workers` delivery slots.
async fn on_postgres_with_workers(workers: usize) -> (Env, Smtp, TestApp) {
    let env = Env::new(Stack::Postgres).await;
    let smtp = Smtp::start();
    let mut settings = env.settings(Some(smtp.relay()));
    settings.workers = Some(workers);
    let app = TestApp::spawn(settings).await;
    (env, smtp, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushall_loses_nothing() {
    let (env, _smtp, app) = on_postgres_with_workers(2).await;
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let mut ids = Vec::new();
    for i in 0..10 {
        let mut body = code_to(&format!("later{i}@example.com"));
        body["send_at"] = json!(soon);
        ids.push(app.api.send(body).await);
    }
    ids.extend(burst(&app.api, 20, 1, |i| format!("slow100-now{i}@example.com")).await);
    assert_eq!(ids.len(), 30);
    let redis = env.redis.as_ref().unwrap();
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    all_delivered(&app.api, &ids, Duration::from_secs(60)).await;
    app.stop().await;
}

/// A backlog that waits in Redis longer than the sweep grace is not enqueued
/// a second time (each copy would cost a claim that finds nothing to do), and
/// is still delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_older_than_the_grace_is_not_enqueued_again() {
    // One delivery slot, held for 6 s by the first message: the others wait
    // in the stream, unreceived, for three times the 2 s grace.
    let (env, smtp, app) = on_postgres_with_workers(1).await;
    let first = app.api.send(code_to("slow6000-first@example.com")).await;
    eventually(
        Duration::from_secs(5),
        "the first message taken",
        || async {
            let m = app.api.message(&first).await;
            (m["status"] == "sending").then_some(())
        },
    )
    .await;
    let mut ids = vec![first];
    ids.extend(burst(&app.api, 12, 1, |i| format!("waiting{i}@example.com")).await);
    assert_eq!(ids.len(), 13);
    let redis = env.redis.as_ref().unwrap();
    let entries = || -> i64 {
        ["high", "normal", "bulk"]
            .iter()
            .map(|lane| {
                redis
                    .cli(&["XLEN", &format!("mr:q:{lane}")])
                    .parse::<i64>()
                    .unwrap()
            })
            .sum()
    };
    assert_eq!(entries(), 13);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(entries(), 13, "the sweeper enqueued waiting messages again");
    all_delivered(&app.api, &ids, Duration::from_secs(30)).await;
    for i in 0..12 {
        let rcpt = format!("waiting{i}@example.com");
        assert_eq!(smtp.received_by(&rcpt).await.len(), 1, "{rcpt}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_no_500_and_recovery() {
    let mut env = Env::new(Stack::Postgres).await;
    let smtp = Smtp::start();
    let app = TestApp::start(&env, Some(smtp.relay())).await;
    env.redis.as_mut().unwrap().stop();
    let r = app
        .api
        .post("/v1/send", code_to("while-redis-down@example.com"))
        .await;
    assert!(
        r.status == StatusCode::ACCEPTED || r.status == StatusCode::SERVICE_UNAVAILABLE,
        "{} {}",
        r.status,
        r.body
    );
    let ready = app.api.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.headers["content-type"], "application/problem+json");
    env.redis.as_mut().unwrap().start_again();
    if r.status == StatusCode::ACCEPTED {
        let id = r.body["id"].as_str().unwrap();
        app.api
            .wait_status_within(id, "delivered", Duration::from_secs(60))
            .await;
    }
    let id = app.api.send(code_to("after-redis@example.com")).await;
    app.api
        .wait_status_within(&id, "delivered", Duration::from_secs(60))
        .await;
    assert_eq!(app.api.get("/readyz").await.status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_means_503_and_recovery() {
    let pg = PgCluster::start();
    let mut env = Env::new(Stack::Postgres).await;
    env.database_url = Some(pg.create_db().await);
    let smtp = Smtp::start();
    let app = TestApp::start(&env, Some(smtp.relay())).await;
    let first = app.api.send(code_to("before@example.com")).await;
    // A concurrent burst leaves several connections kept for the hot paths.
    for id in burst(&app.api, 64, 16, |i| format!("b{i}@example.com")).await {
        app.api.wait_status(&id, "delivered").await;
    }
    app.api.wait_status(&first, "delivered").await;
    pg.stop();
    let r = app
        .api
        .post("/v1/send", code_to("during@example.com"))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.body["status"], 503);
    assert_eq!(
        app.api.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        app.api.get(&format!("/v1/messages/{first}")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // An outage longer than the second a kept connection is trusted for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.restart();
    eventually(Duration::from_secs(30), "ready again", || async {
        (app.api.get("/readyz").await.status == StatusCode::OK).then_some(())
    })
    .await;
    // The connections kept for the hot paths all died with the server;
    // idle for more than a second, each is tested before use, so the first
    // send after recovery does not fail on one.
    let r = app.api.post("/v1/send", code_to("after@example.com")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    app.api.wait_status(&id, "delivered").await;
    app.stop().await;
    pg.stop();
}

/// The embedded store keeps keys, templates and messages across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_restart_keeps_everything() {
    let env = Env::new(Stack::Embedded).await;
    let mut app = ProcApp::start(&env, None).await;
    let (_, key) = app
        .api
        .create_key(json!({"name": "kept", "scopes": ["send", "read"]}))
        .await;
    let put = app
        .api
        .put(
            "/v1/templates/kept",
            json!({"subject": "Kept {{ n }}", "text": "{{ n }}"}),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    let id = app.api.send(json!({"template": "kept", "from": "a@acme.test", "to": "k@example.com", "data": {"n": 1}})).await;
    app.api.wait_status(&id, "delivered").await;
    app.restart(&env.data_dir).await;
    let m = app.api.message(&id).await;
    assert_eq!(
        (m["status"].as_str(), m["subject"].as_str()),
        (Some("delivered"), Some("Kept 1"))
    );
    assert_eq!(
        app.api.get("/v1/templates/kept").await.status,
        StatusCode::OK
    );
    let again = app.api.with_key(&key).send(json!({"template": "kept", "from": "a@acme.test", "to": "k@example.com", "data": {"n": 2}})).await;
    app.api.wait_status(&again, "delivered").await;
}

/// The load generator works (a second of tiny load each way; timings not
/// asserted). The server runs in this process, so this process stands for
/// both the server and the store whose CPU it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_smoke() {
    let env = Env::new(Stack::Embedded).await;
    let app = TestApp::start(&env, None).await;
    let me = std::process::id().to_string();
    let run = |mode: Vec<String>| {
        let (me, base, key) = (me.clone(), app.api.base.clone(), app.api.key.clone());
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroom-bench"))
                .args([
                    "--pid",
                    &me,
                    "--store-pid",
                    &me,
                    "--base",
                    &base,
                    "--key",
                    &key,
                ])
                .args([
                    "--duration",
                    "1s",
                    "--sample",
                    "5",
                    "--drain-timeout",
                    "30s",
                ])
                .args(mode)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let closed = run(args(&["--mode", "closed", "--concurrency", "2"])).await;
    let open = run(args(&["--mode", "open", "--rate", "50", "--warmup", "1s"])).await;
    for report in [&closed, &open] {
        assert!(report["accepted"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["delivered"], report["accepted"], "{report}");
        assert!(report["to_relay_ms"]["samples"].as_u64().unwrap() > 0);
        for cpu in ["server_cpu_us_per_message", "store_cpu_us_per_message"] {
            assert!(report[cpu].as_f64().unwrap() > 0.0, "{cpu}: {report}");
        }
        assert!(!report["accept_ms"]["worst_seconds"]
            .as_array()
            .unwrap()
            .is_empty());
    }
    // The warm-up is measured apart, and its sends are not counted again.
    assert!(closed["warmup_accept_ms"].is_null(), "{closed}");
    let warmup = open["warmup_accept_ms"]["requests"].as_u64().unwrap();
    assert!((40..=60).contains(&warmup), "{open}");
    assert!(open["requests"].as_u64().unwrap() <= 60, "{open}");
    // With a webhook received by the generator: every measured message's
    // webhook arrives and is matched to its 202.
    let listen = format!("127.0.0.1:{}", free_port());
    let hook = app
        .api
        .post(
            "/v1/webhooks",
            json!({"url": format!("http://{listen}/hook"), "events": ["message.delivered"]}),
        )
        .await;
    assert_eq!(hook.status, 201, "{}", hook.body);
    let hooked = run(args(&[
        "--mode",
        "closed",
        "--concurrency",
        "2",
        "--webhook-listen",
        &listen,
    ]))
    .await;
    let accepted = hooked["accepted"].as_u64().unwrap();
    assert_eq!(hooked["webhooks"]["received"], accepted, "{hooked}");
    assert_eq!(
        hooked["webhooks"]["from_202_ms"]["samples"], accepted,
        "{hooked}"
    );
    assert!(hooked["webhooks"]["from_202_ms"]["p99"].as_f64().unwrap() > 0.0);
    app.stop().await;
}

/// `DATABASE_URL=sqlite://...` selects the embedded store explicitly and
/// creates the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_sqlite_url_creates_its_file() {
    let env = Env::new(Stack::Embedded).await;
    let file = env.data_dir.join("explicit.db");
    let mut settings = env.settings(None);
    settings.database_url = Some(format!("sqlite://{}", file.display()));
    let app = TestApp::spawn(settings).await;
    let id = app.api.send(code_to("explicit@example.com")).await;
    app.api.wait_status(&id, "delivered").await;
    assert!(file.exists());
    assert!(
        !env.data_dir.join("mailroom.db").exists(),
        "the default file was not used"
    );
    app.stop().await;
}

/// `mailroom keys create` prints the key alone on its last line (logs go to
/// stderr), and the key works against a server on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keys_create_prints_a_working_key() {
    let env = Env::new(Stack::Embedded).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "keys",
            "create",
            "--name",
            "cli",
            "--scopes",
            "send,read",
            "--daily-quota",
            "5",
        ])
        .env_clear()
        .env("MAILROOM_DATA_DIR", &env.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(
        key.starts_with("mr_") && key.split('_').count() == 3,
        "{stdout}"
    );
    let app = ProcApp::start(&env, None).await;
    let client = app.api.with_key(&key);
    let id = client.send(code_to("cli@example.com")).await;
    client.wait_status(&id, "delivered").await;
    assert_eq!(client.get("/v1/keys").await.status, StatusCode::FORBIDDEN);
}
