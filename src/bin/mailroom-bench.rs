//! Load generator for Mailroom (see docs/performance.md). Drives
//! `POST /v1/send` with the built-in `verification-code` template, closed-loop
//! (N clients back to back) or open-loop (a fixed rate), then waits for every
//! accepted message to be delivered (unless `--no-drain`) and reports: accepted/s, accept latency
//! percentiles, errors by status, delivered/s, 202→relay-250 latency
//! (sampled from the message records), and the server's peak RSS and CPU.
//! Prints one JSON object on stdout (the table is made by bench/run.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Mailroom load generator")]
struct Args {
    /// Base URL of the Mailroom under test
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    base: String,
    /// API key with send and read scopes
    #[arg(long, env = "MAILROOM_BENCH_KEY")]
    key: String,
    /// closed (N clients back to back) or open (fixed rate)
    #[arg(long, default_value = "closed")]
    mode: String,
    /// Clients in closed-loop mode
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests per second in open-loop mode
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,
    /// Server process id, for peak RSS and CPU
    #[arg(long)]
    pid: Option<u32>,
    /// The store's server process id (Postgres's postmaster), for the CPU
    /// it and its children spend per message
    #[arg(long)]
    store_pid: Option<u32>,
    /// The queue's server process id (Redis), for its CPU per message
    #[arg(long)]
    queue_pid: Option<u32>,
    /// Messages sampled for 202→250 latency
    #[arg(long, default_value_t = 500)]
    sample: usize,
    /// Give up waiting for deliveries after this long
    #[arg(long, default_value = "120s")]
    drain_timeout: humantime::Duration,
    /// Open loop only: send at the same rate for this long first, measured
    /// apart (`warmup_accept_ms`), so that the figures are the steady
    /// state's and a server's cold start (connections being opened,
    /// statements prepared) shows on its own
    #[arg(long, default_value = "0s")]
    warmup: humantime::Duration,
    /// Measure accepts only: do not wait for deliveries (for a server that
    /// does not deliver, `mailroom api`; delivered/s and 202→250 are then
    /// not measured)
    #[arg(long)]
    no_drain: bool,
    /// Send an `Idempotency-Key` with every request (unique per request),
    /// so that accepting also records and checks idempotency
    #[arg(long)]
    idempotency: bool,
    /// Receive webhooks at this address (`POST /hook`, answered 204) and
    /// report how many arrived: for a run with a webhook subscribed to
    /// `message.delivered` there
    #[arg(long)]
    webhook_listen: Option<String>,
}

#[derive(Default)]
struct Results {
    latencies: Vec<f64>,
    /// When each request started, in seconds from the first (same order).
    starts: Vec<f64>,
    statuses: BTreeMap<u16, u64>,
    ids: Vec<String>,
    /// When each accepted message's 202 arrived, in seconds from the first
    /// request (same order as `ids`).
    accepted_at: Vec<f64>,
}

/// A realistic send: the built-in template with a name, tags and metadata,
/// its recipient and code varying per request. Written straight to JSON
/// text (every value is plain ASCII): building a `serde_json::Value` and
/// serialising it cost the generator more CPU than the bytes are worth.
fn body(i: u64) -> String {
    format!(
        concat!(
            r#"{{"template":"verification-code","from":"Acme <no-reply@acme.test>","#,
            r#""to":[{{"email":"user{i}@example.com","name":"Bench User"}}],"#,
            r#""data":{{"code":"{code:06}","name":"Bench User","product":"Acme"}},"#,
            r#""tags":["bench"],"metadata":{{"user_id":"{i}"}}}}"#
        ),
        i = i,
        code = i % 1_000_000
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The sending side's HTTP/1.1 connections, kept alive and reused; one per
/// request in flight at most (a closed-loop client keeps one, as pgbench's
/// clients keep theirs). Plain hyper connections rather than a full client
/// (pool lookups, redirects, timers per request): the generator shares the
/// cores with what it measures, and every microsecond it spends is one the
/// server does not get (its CPU per message is reported beside the
/// server's).
struct Conns {
    addr: String,
    /// `Host` and `Authorization` header values, built once.
    host: HeaderValue,
    auth: HeaderValue,
    /// Prefix of each request's `Idempotency-Key`, when sent.
    idempotency: Option<String>,
    idle: std::sync::Mutex<Vec<Sender>>,
}

impl Conns {
    fn new(base: &str, key: &str, idempotency: bool) -> Self {
        let url = url::Url::parse(base).expect("--base is a URL");
        let host = url.host_str().expect("--base has a host");
        let addr = format!("{host}:{}", url.port_or_known_default().unwrap_or(80));
        Self {
            host: HeaderValue::from_str(&addr).expect("host header"),
            auth: HeaderValue::from_str(&format!("Bearer {key}")).expect("key is a header value"),
            addr,
            // Unique per run, so that a second run against the same server
            // is not answered from the first one's records.
            idempotency: idempotency.then(|| format!("bench-{}", uuid::Uuid::now_v7().simple())),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    async fn take(&self) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
        let idle = self.idle.lock().unwrap().pop();
        if let Some(sender) = idle.filter(|s| !s.is_closed()) {
            return Ok(sender);
        }
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    fn give_back(&self, sender: Sender) {
        if !sender.is_closed() {
            self.idle.lock().unwrap().push(sender);
        }
    }

    /// Sends one request; its status and, for a 202, the message id.
    async fn send(
        &self,
        i: u64,
    ) -> Result<(u16, Option<String>), Box<dyn std::error::Error + Send + Sync>> {
        let mut sender = self.take().await?;
        let mut request = hyper::Request::post("/v1/send")
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(prefix) = &self.idempotency {
            request = request.header("idempotency-key", format!("{prefix}-{i}"));
        }
        let request = request.body(Full::new(Bytes::from(body(i))))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        self.give_back(sender);
        #[derive(serde::Deserialize)]
        struct Accepted {
            id: String,
        }
        let id = (status == 202)
            .then(|| serde_json::from_slice::<Accepted>(&bytes).ok())
            .flatten()
            .map(|a| a.id);
        Ok((status, id))
    }
}

async fn one(conns: &Conns, i: u64, t0: Instant, results: &std::sync::Mutex<Results>) {
    let started = Instant::now();
    let (status, id) = conns.send(i).await.unwrap_or((0, None));
    let elapsed = started.elapsed().as_secs_f64();
    let mut r = results.lock().unwrap();
    r.latencies.push(elapsed);
    r.starts.push(started.duration_since(t0).as_secs_f64());
    *r.statuses.entry(status).or_default() += 1;
    if let Some(id) = id {
        r.ids.push(id);
        r.accepted_at
            .push(started.duration_since(t0).as_secs_f64() + elapsed);
    }
}

/// The run's worst seconds for accept latency: for each second (from the
/// first request) its request count, p99 and max in ms; the `n` with the
/// highest max, worst first. A tail made of one stall shows as one second.
fn worst_seconds(starts: &[f64], latencies: &[f64], n: usize) -> Vec<serde_json::Value> {
    let mut by_second: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (start, latency) in starts.iter().zip(latencies) {
        by_second.entry(*start as u64).or_default().push(*latency);
    }
    let mut seconds: Vec<(u64, usize, f64, f64)> = by_second
        .into_iter()
        .map(|(second, mut l)| {
            l.sort_by(f64::total_cmp);
            let max = l.last().copied().unwrap_or(0.0);
            (second, l.len(), percentile(&l, 0.99), max)
        })
        .collect();
    seconds.sort_by(|a, b| b.3.total_cmp(&a.3));
    seconds
        .into_iter()
        .take(n)
        .map(|(second, count, p99, max)| {
            json!({"second": second, "requests": count, "p99_ms": p99 * 1000.0, "max_ms": max * 1000.0})
        })
        .collect()
}

/// Accept latency percentiles and maximum, in ms, of `latencies` (seconds,
/// in any order).
fn accept_summary(latencies: &[f64]) -> serde_json::Map<String, Value> {
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let ms = |p: f64| percentile(&sorted, p) * 1000.0;
    let mut out = serde_json::Map::new();
    out.insert("p50".into(), json!(ms(0.50)));
    out.insert("p95".into(), json!(ms(0.95)));
    out.insert("p99".into(), json!(ms(0.99)));
    out.insert("max".into(), json!(ms(1.0)));
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// (peak RSS in MB, CPU seconds) of a process, from /proc.
fn proc_stats(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fields = stat_fields(pid)?;
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((hwm_kb / 1024.0, ticks / 100.0))
}

/// The fields of /proc/<pid>/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// CPU seconds of a process tree: the process, its exited children (reaped
/// into its own counters) and its live children (Postgres's backends).
fn tree_cpu(pid: u32) -> Option<f64> {
    let ticks = |f: &[String], from: usize, to: usize| -> f64 {
        f[from..=to]
            .iter()
            .filter_map(|v| v.parse::<f64>().ok())
            .sum()
    };
    let own = stat_fields(pid)?;
    let parent = pid.to_string();
    let mut total = ticks(&own, 11, 14);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(child).filter(|f| f.get(1) == Some(&parent)) {
            total += ticks(&f, 11, 12);
        }
    }
    Some(total / 100.0)
}

async fn delivered_count(client: &reqwest::Client, base: &str) -> u64 {
    let Ok(resp) = client.get(format!("{base}/metrics")).send().await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("mailroom_deliveries_total{status=\"delivered\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn millis(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Starts one request every `1/rate` s from `started` until `deadline`
/// (each in its own task, in `tasks`), whatever the answers' latency.
async fn open_loop(
    tasks: &mut tokio::task::JoinSet<()>,
    conns: &Arc<Conns>,
    results: &Arc<std::sync::Mutex<Results>>,
    counter: &Arc<std::sync::atomic::AtomicU64>,
    rate: u64,
    started: Instant,
    deadline: Instant,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = started;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    while Instant::now() < deadline {
        next += interval;
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        let (conns, results) = (conns.clone(), results.clone());
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(async move {
            one(&conns, i, started, &results).await;
            drop(permit);
        });
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let load = Load {
        conns: Arc::new(Conns::new(&args.base, &args.key, args.idempotency)),
        counter: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    // Deliveries are counted from here: the warm-up's messages may still be
    // delivering when the measured run starts, and are taken off by number
    // rather than waited for (which would leave a gap in the load).
    let delivered_at_start = delivered_count(&client, &args.base).await;
    let hooks = match &args.webhook_listen {
        Some(addr) => Some(Hooks::listen(addr).await),
        None => None,
    };
    let warmup = warm_up(&args, &load).await;
    let delivered_before = delivered_at_start + warmup.as_ref().map_or(0, |w| w.1);
    let cpu = CpuMarks::now(&args);
    let duration: Duration = args.duration.into();
    let started = Instant::now();
    let results = load.drive(&args, started, started + duration).await;
    let send_seconds = started.elapsed().as_secs_f64();
    // This generator's own CPU while sending: it shares the machine, as
    // pgbench's client does in the baseline.
    let own_cpu = proc_stats(std::process::id()).map(|s| s.1 - cpu.own);
    let accepted = results.ids.len() as u64;
    let delivered = if args.no_drain {
        0
    } else {
        wait_for_deliveries(&client, &args, delivered_before, accepted).await
    };
    let delivery_seconds = started.elapsed().as_secs_f64();
    let stats = args.pid.and_then(proc_stats);
    let webhooks = match &hooks {
        Some(hooks) => Some(hooks.wait_for(delivered, &args, started, &results).await),
        None => None,
    };
    let per_message_us = |cpu: f64| cpu / accepted.max(1) as f64 * 1e6;
    let to_relay = if args.no_drain {
        Vec::new()
    } else {
        to_relay_seconds(&client, &args, &results.ids).await
    };
    let mut accept_ms = accept_summary(&results.latencies);
    let worst = worst_seconds(&results.starts, &results.latencies, 3);
    accept_ms.insert("worst_seconds".into(), json!(worst));
    let report = json!({
        "mode": args.mode,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "requests": results.latencies.len(),
        "accepted": accepted,
        "accepted_per_s": accepted as f64 / send_seconds,
        "accept_ms": accept_ms,
        "statuses": results.statuses,
        "warmup_accept_ms": warmup.map(|w| w.0),
        "delivered": delivered,
        "delivered_per_s": delivered as f64 / delivery_seconds,
        "to_relay_ms": {
            "samples": to_relay.len(),
            "p50": percentile(&to_relay, 0.50) * 1000.0,
            "p99": percentile(&to_relay, 0.99) * 1000.0,
        },
        "webhooks": webhooks,
        "server_peak_rss_mb": stats.map(|s| s.0),
        "server_cpu_percent": stats.map(|s| (s.1 - cpu.server) / delivery_seconds * 100.0),
        // CPU per accepted message, from the first send to the last
        // delivery: a figure that drifts less than rates on a shared machine.
        "server_cpu_us_per_message": stats.map(|s| per_message_us(s.1 - cpu.server)),
        "store_cpu_us_per_message": cpu.store_since(&args).map(per_message_us),
        "queue_cpu_us_per_message": cpu.queue_since(&args).map(per_message_us),
        "load_generator_cpu_us_per_message": own_cpu.map(per_message_us),
    });
    println!("{report}");
}

/// The connections requests go out on, and the number of the next request.
struct Load {
    conns: Arc<Conns>,
    counter: Arc<std::sync::atomic::AtomicU64>,
}

impl Load {
    /// Sends until `deadline`: at the open loop's rate, or with the closed
    /// loop's clients back to back.
    async fn drive(&self, args: &Args, started: Instant, deadline: Instant) -> Results {
        let results = Arc::new(std::sync::Mutex::new(Results::default()));
        let mut tasks = tokio::task::JoinSet::new();
        if args.mode == "open" {
            let (conns, counter) = (&self.conns, &self.counter);
            open_loop(
                &mut tasks, conns, &results, counter, args.rate, started, deadline,
            )
            .await;
        } else {
            for _ in 0..args.concurrency {
                let (conns, results) = (self.conns.clone(), results.clone());
                let counter = self.counter.clone();
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        one(&conns, i, started, &results).await;
                    }
                });
            }
        }
        while tasks.join_next().await.is_some() {}
        // Every task is done, and with it every other handle to the results.
        Arc::into_inner(results)
            .expect("no request task outlives the load")
            .into_inner()
            .unwrap()
    }
}

/// The open loop's warm-up at the measured rate: its accept latencies
/// (reported apart) and how many it had accepted.
async fn warm_up(args: &Args, load: &Load) -> Option<(serde_json::Map<String, Value>, u64)> {
    let warmup: Duration = args.warmup.into();
    if args.mode != "open" || warmup.is_zero() {
        return None;
    }
    let started = Instant::now();
    let r = load.drive(args, started, started + warmup).await;
    let mut summary = accept_summary(&r.latencies);
    summary.insert("seconds".into(), json!(warmup.as_secs_f64()));
    summary.insert("requests".into(), json!(r.latencies.len()));
    Some((summary, r.ids.len() as u64))
}

/// A webhook receiver that counts what it is sent and notes when each
/// message's webhook arrived (every `POST /hook` is answered 204 at once,
/// as a consumer that queues its events would).
struct Hooks {
    received: Arc<std::sync::atomic::AtomicU64>,
    arrivals: Arc<std::sync::Mutex<Vec<(String, Instant)>>>,
}

/// The one field of a webhook the receiver reads.
#[derive(serde::Deserialize)]
struct HookBody {
    data: HookData,
}

#[derive(serde::Deserialize)]
struct HookData {
    message_id: String,
}

impl Hooks {
    async fn listen(addr: &str) -> Hooks {
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, noted) = (received.clone(), arrivals.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: Bytes| {
                let at = Instant::now();
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(hook) = serde_json::from_slice::<HookBody>(&body) {
                    noted.lock().unwrap().push((hook.data.message_id, at));
                }
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("--webhook-listen is a free address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hooks { received, arrivals }
    }

    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (up to the drain timeout) until `expected` webhooks arrived:
    /// how many did, the seconds from `started` until the wait ended, and
    /// the time from each measured message's 202 to its webhook.
    async fn wait_for(
        &self,
        expected: u64,
        args: &Args,
        started: Instant,
        results: &Results,
    ) -> Value {
        let deadline = Instant::now() + Duration::from(args.drain_timeout);
        while self.received() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let from_202 = self.waits_after_202(started, results);
        json!({
            "received": self.received(),
            "seconds": seconds,
            "per_s": self.received() as f64 / seconds,
            "from_202_ms": {
                "samples": from_202.len(),
                "p50": percentile(&from_202, 0.50) * 1000.0,
                "p99": percentile(&from_202, 0.99) * 1000.0,
            },
        })
    }

    /// Seconds from a message's 202 to its first webhook, sorted, for the
    /// messages of the measured run.
    fn waits_after_202(&self, started: Instant, results: &Results) -> Vec<f64> {
        let accepted: std::collections::HashMap<&str, f64> = results
            .ids
            .iter()
            .map(String::as_str)
            .zip(results.accepted_at.iter().copied())
            .collect();
        let mut first: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
        let arrivals = self.arrivals.lock().unwrap();
        for (id, at) in arrivals.iter() {
            if let Some(&at_202) = accepted.get(id.as_str()) {
                let wait = at.duration_since(started).as_secs_f64() - at_202;
                first
                    .entry(id.as_str())
                    .and_modify(|w| *w = w.min(wait))
                    .or_insert(wait);
            }
        }
        let mut waits: Vec<f64> = first.into_values().collect();
        waits.sort_by(f64::total_cmp);
        waits
    }
}

/// CPU seconds spent so far by the server, the store, the queue and this
/// generator, read when the measured run starts.
struct CpuMarks {
    server: f64,
    store: Option<f64>,
    queue: Option<f64>,
    own: f64,
}

impl CpuMarks {
    fn now(args: &Args) -> Self {
        CpuMarks {
            server: args.pid.and_then(proc_stats).map_or(0.0, |s| s.1),
            store: args.store_pid.and_then(tree_cpu),
            queue: args.queue_pid.and_then(tree_cpu),
            own: proc_stats(std::process::id()).map_or(0.0, |s| s.1),
        }
    }

    fn store_since(&self, args: &Args) -> Option<f64> {
        Some(args.store_pid.and_then(tree_cpu)? - self.store?)
    }

    fn queue_since(&self, args: &Args) -> Option<f64> {
        Some(args.queue_pid.and_then(tree_cpu)? - self.queue?)
    }
}

/// Polls `/metrics` until `accepted` more messages than `before` are
/// delivered or the drain timeout passes; the number delivered.
async fn wait_for_deliveries(
    client: &reqwest::Client,
    args: &Args,
    before: u64,
    accepted: u64,
) -> u64 {
    let deadline = Instant::now() + Duration::from(args.drain_timeout);
    let mut delivered = 0;
    while Instant::now() < deadline {
        delivered = delivered_count(client, &args.base)
            .await
            .saturating_sub(before);
        if delivered >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    delivered
}

/// 202 → relay answer, in seconds and sorted, for a sample of the accepted
/// messages, from their records.
async fn to_relay_seconds(client: &reqwest::Client, args: &Args, ids: &[String]) -> Vec<f64> {
    let step = (ids.len() / args.sample.max(1)).max(1);
    let mut to_relay = Vec::new();
    for id in ids.iter().step_by(step).take(args.sample) {
        let Ok(resp) = client
            .get(format!("{}/v1/messages/{id}", args.base))
            .bearer_auth(&args.key)
            .send()
            .await
        else {
            continue;
        };
        let m: Value = resp.json().await.unwrap_or(Value::Null);
        let (Some(created), Some(attempt)) = (
            millis(&m["created_at"]),
            m["attempts"].as_array().and_then(|a| a.last()),
        ) else {
            continue;
        };
        if let (Some(at), Some(d)) = (millis(&attempt["at"]), attempt["duration_ms"].as_i64()) {
            to_relay.push((at + d - created) as f64 / 1000.0);
        }
    }
    to_relay.sort_by(f64::total_cmp);
    to_relay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_seconds_name_the_stall() {
        // Second 0: ten fast requests; second 1: one stalled, nine fast.
        let starts: Vec<f64> = (0..20).map(|i| f64::from(i) / 10.0).collect();
        let mut latencies = vec![0.001; 20];
        latencies[13] = 0.250;
        let worst = worst_seconds(&starts, &latencies, 1);
        assert_eq!(worst.len(), 1);
        assert_eq!(worst[0]["second"], 1);
        assert_eq!(worst[0]["requests"], 10);
        assert_eq!(worst[0]["max_ms"], 250.0);
        assert_eq!(worst_seconds(&starts, &latencies, 5).len(), 2);
        assert!(worst_seconds(&[], &[], 3).is_empty());
    }

    #[test]
    fn body_is_the_send_it_describes() {
        let sent: Value = serde_json::from_str(&body(1_234_567)).unwrap();
        assert_eq!(
            sent,
            json!({
                "template": "verification-code",
                "from": "Acme <no-reply@acme.test>",
                "to": [{"email": "user1234567@example.com", "name": "Bench User"}],
                "data": {"code": "234567", "name": "Bench User", "product": "Acme"},
                "tags": ["bench"],
                "metadata": {"user_id": "1234567"}
            })
        );
        let small: Value = serde_json::from_str(&body(7)).unwrap();
        assert_eq!(small["data"]["code"], "000007");
    }
}
