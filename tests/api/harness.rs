//! The test harness: real Postgres (its own cluster, initdb'd into a temp
//! directory and run as the postgres user), real redis-server instances, a
//! real SMTP server we did not write (aiosmtpd), a webhook receiver that
//! verifies signatures with the `standardwebhooks` library, and Mailroom
//! itself, in-process (port 0) or as the real binary for kill/restart tests.
//! Everything is started on free ports and torn down after. No fixed sleeps:
//! `eventually` polls with a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mailroom::app::{Application, Role};
use mailroom::config::{Config, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A port for a server this suite starts. A port the kernel hands out for
/// `bind(…:0)` comes from the ephemeral range, which outgoing connections
/// draw from too: between this check and the server's own bind, one of the
/// suite's many client connections could take it ("Address already in
/// use"). So the port is chosen below that range (which only explicit binds
/// use), never twice in this process, and checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    let high = ephemeral_low().clamp(LOW + 1_000, 65_536);
    let span = high - LOW;
    // Start at a random offset: two suites on one machine rarely collide.
    let _ = NEXT.compare_exchange(
        0,
        rand::random::<u32>() % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {high}");
}

/// The low end of the kernel's ephemeral port range (32768 by default).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("mailroom-tests")
        .join(format!("{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn support(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script)
}

fn wait_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Polls `check` until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_ready(cmd: &mut Command, what: &str) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(line.starts_with("READY"), "{what} did not start: {line:?}");
    Proc(child)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a Postgres binary as the postgres user when we are root.
fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server binary")
}

/// A Postgres cluster of our own.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        let bin = pg_bin();
        let dir = temp_dir("pg");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status();
        }
        let status = pg_command(&bin, "initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let cluster = PgCluster {
            port: free_port(),
            dir,
            bin,
        };
        cluster.start_server();
        cluster.watchdog();
        cluster
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=1000",
            self.port,
            self.dir.display()
        );
        let status = pg_command(&self.bin, "pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("log"))
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl start");
        assert!(
            status.success(),
            "postgres did not start; see {}",
            self.dir.join("log").display()
        );
        assert!(wait_port(self.port, Duration::from_secs(30)));
    }

    /// Stops the server at once (like a crash).
    pub fn stop(&self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .status();
    }

    pub fn restart(&self) {
        self.start_server();
    }

    /// Stops the cluster when the test process exits, however it exits.
    fn watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {dir}",
            pid = std::process::id(),
            stop = if is_root() {
                format!(
                    "runuser -u postgres -- {} -D {} -m immediate stop",
                    self.bin.join("pg_ctl").display(),
                    self.dir.join("data").display()
                )
            } else {
                format!(
                    "{} -D {} -m immediate stop",
                    self.bin.join("pg_ctl").display(),
                    self.dir.join("data").display()
                )
            },
            dir = self.dir.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Every live row of a database, as `pg_dump --data-only` prints it.
    pub fn dump(&self, url: &str) -> String {
        let out = pg_command(&self.bin, "pg_dump")
            .args(["--data-only", url])
            .output()
            .expect("pg_dump");
        assert!(out.status.success(), "pg_dump failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh, empty database for one test.
    pub async fn create_db(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let status = pg_command(&self.bin, "psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-q",
                "-c",
            ])
            .arg(format!("CREATE DATABASE {name}"))
            .stdout(Stdio::null())
            .status()
            .expect("psql");
        assert!(status.success(), "CREATE DATABASE failed");
        self.url(&name)
    }
}

static SHARED_PG: OnceLock<PgCluster> = OnceLock::new();

/// One cluster shared by the tests of this run (each gets its own database).
pub fn shared_pg() -> &'static PgCluster {
    SHARED_PG.get_or_init(PgCluster::start)
}

/// A redis-server of our own.
pub struct Redis {
    pub port: u16,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            proc: None,
        };
        r.start_again();
        r
    }

    pub fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.proc = Some(Proc(child));
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "redis did not start"
        );
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    None,
    Starttls,
    Implicit,
}

/// aiosmtpd, scripted by recipient local part (see tests/support/smtp_server.py).
pub struct Smtp {
    pub port: u16,
    control: u16,
    pub certdir: PathBuf,
    args: Vec<String>,
    proc: Option<Proc>,
}

impl Smtp {
    pub fn start() -> Smtp {
        Smtp::start_with(Tls::None, None)
    }

    /// A server that does not advertise PIPELINING.
    pub fn start_without_pipelining() -> Smtp {
        Smtp::start_args(Tls::None, None, &["--no-pipelining"])
    }

    pub fn start_with(tls: Tls, auth: Option<&str>) -> Smtp {
        Smtp::start_args(tls, auth, &[])
    }

    fn start_args(tls: Tls, auth: Option<&str>, extra: &[&str]) -> Smtp {
        let port = free_port();
        let control = free_port();
        let certdir = temp_dir("certs");
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--control-port".into(),
            control.to_string(),
            "--tls".into(),
            match tls {
                Tls::None => "none",
                Tls::Starttls => "starttls",
                Tls::Implicit => "implicit",
            }
            .into(),
            "--certdir".into(),
            certdir.display().to_string(),
        ];
        if let Some(auth) = auth {
            args.extend(["--auth".to_string(), auth.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut smtp = Smtp {
            port,
            control,
            certdir,
            args,
            proc: None,
        };
        smtp.restart();
        smtp
    }

    /// Stops the server (if running) and starts it again on the same ports;
    /// connections to the old process are cut.
    pub fn restart(&mut self) {
        self.proc = None;
        let mut cmd = Command::new("python3");
        cmd.arg(support("smtp_server.py")).args(&self.args);
        self.proc = Some(spawn_ready(&mut cmd, "smtp server"));
    }

    /// Relay URL for Mailroom.
    pub fn relay(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    /// What the server has seen (its control endpoint's JSON).
    async fn control(&self) -> Value {
        reqwest::get(format!("http://127.0.0.1:{}/", self.control))
            .await
            .expect("smtp control")
            .json()
            .await
            .expect("smtp control json")
    }

    pub async fn messages(&self) -> Vec<Value> {
        let body = self.control().await;
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    /// SMTP transactions seen so far: (pipelined, one command at a time).
    pub async fn transactions(&self) -> (i64, i64) {
        let body = self.control().await;
        let count = |k: &str| body["transactions"][k].as_i64().unwrap_or(0);
        (count("pipelined"), count("stepwise"))
    }

    pub async fn attempts(&self, address: &str) -> i64 {
        let body = self.control().await;
        body["attempts"][address.to_lowercase()]
            .as_i64()
            .unwrap_or(0)
    }

    /// Messages received for `rcpt`.
    pub async fn received_by(&self, rcpt: &str) -> Vec<Value> {
        self.messages()
            .await
            .into_iter()
            .filter(|m| {
                m["rcpt_to"].as_array().is_some_and(|r| {
                    r.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.eq_ignore_ascii_case(rcpt)))
                })
            })
            .collect()
    }

    pub async fn wait_for(&self, rcpt: &str) -> Value {
        eventually(
            Duration::from_secs(20),
            &format!("mail for {rcpt}"),
            || async { self.received_by(rcpt).await.into_iter().next() },
        )
        .await
    }
}

/// Webhook receiver verifying with the `standardwebhooks` PyPI library.
pub struct Receiver {
    pub port: u16,
    proc: Option<Proc>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let mut r = Receiver {
            port: free_port(),
            proc: None,
        };
        r.start_again();
        r
    }

    pub fn start_again(&mut self) {
        self.start_again_verifying(&[]);
    }

    /// Restarts on the same port, verifying with `secrets` from the first
    /// request on (no window in which a retry arrives unverified).
    pub fn start_again_verifying(&mut self, secrets: &[&str]) {
        let mut cmd = Command::new("python3");
        cmd.arg(support("webhook_receiver.py"))
            .args(["--port", &self.port.to_string()]);
        for s in secrets {
            cmd.args(["--secret", s]);
        }
        self.proc = Some(spawn_ready(&mut cmd, "webhook receiver"));
    }

    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub async fn configure(&self, secrets: &[&str], script: &[u16]) {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/_config", self.port))
            .json(&json!({"secrets": secrets, "script": script}))
            .send()
            .await
            .expect("receiver config");
        assert!(r.status().is_success());
    }

    pub async fn received(&self) -> Vec<Value> {
        reqwest::get(format!("http://127.0.0.1:{}/_received", self.port))
            .await
            .expect("receiver")
            .json()
            .await
            .expect("receiver json")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// SQLite + in-process queue and limiter.
    Embedded,
    /// Postgres + Redis.
    Postgres,
}

/// The backing services of one test.
pub struct Env {
    pub stack: Stack,
    pub database_url: Option<String>,
    pub redis: Option<Redis>,
    pub data_dir: PathBuf,
}

impl Env {
    pub async fn new(stack: Stack) -> Env {
        let (database_url, redis) = match stack {
            Stack::Embedded => (None, None),
            Stack::Postgres => (Some(shared_pg().create_db().await), Some(Redis::start())),
        };
        Env {
            stack,
            database_url,
            redis,
            data_dir: temp_dir("data"),
        }
    }

    /// Settings for a test app: fast sweeps and retries, private webhooks
    /// allowed (the receiver is on loopback).
    pub fn settings(&self, relays: Option<String>) -> Settings {
        Settings {
            listen: Some("127.0.0.1:0".into()),
            database_url: self.database_url.clone(),
            redis_url: self.redis.as_ref().map(Redis::url),
            redis_prefix: Some("mr".into()),
            data_dir: Some(self.data_dir.display().to_string()),
            relays,
            workers: Some(16),
            delivery_retry_schedule: Some("1s".into()),
            delivery_give_up_after: Some("1h".into()),
            delivery_lease: Some("5s".into()),
            sweep_interval: Some("200ms".into()),
            sweep_grace: Some("2s".into()),
            webhook_retry_schedule: Some("1s,1s,1s,1s,1s".into()),
            webhook_allow_private: Some(true),
            relay_timeout: Some("10s".into()),
            ..Settings::default()
        }
    }

    /// Environment variables for running the binary with the same settings.
    pub fn vars(&self, relays: Option<String>, port: u16) -> Vec<(String, String)> {
        let mut vars = vec![
            ("MAILROOM_LISTEN".to_string(), format!("127.0.0.1:{port}")),
            (
                "MAILROOM_DATA_DIR".into(),
                self.data_dir.display().to_string(),
            ),
            ("MAILROOM_DELIVERY_RETRY_SCHEDULE".into(), "1s".into()),
            ("MAILROOM_DELIVERY_LEASE".into(), "5s".into()),
            ("MAILROOM_SWEEP_INTERVAL".into(), "200ms".into()),
            ("MAILROOM_SWEEP_GRACE".into(), "2s".into()),
            (
                "MAILROOM_WEBHOOK_RETRY_SCHEDULE".into(),
                "1s,1s,1s,1s,1s".into(),
            ),
            ("MAILROOM_WEBHOOK_ALLOW_PRIVATE".into(), "true".into()),
            ("MAILROOM_WORKERS".into(), "16".into()),
            ("MAILROOM_LOG_FORMAT".into(), "json".into()),
            ("MAILROOM_REDIS_PREFIX".into(), "mr".into()),
        ];
        if let Some(url) = &self.database_url {
            vars.push(("DATABASE_URL".into(), url.clone()));
        }
        if let Some(redis) = &self.redis {
            vars.push(("REDIS_URL".into(), redis.url()));
        }
        if let Some(relays) = relays {
            vars.push(("MAILROOM_RELAYS".into(), relays));
        }
        vars
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// An HTTP client bound to one Mailroom and one key.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Client {
    pub fn with_key(&self, key: &str) -> Client {
        Client {
            base: self.base.clone(),
            key: key.to_string(),
            http: self.http.clone(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(reqwest::Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::POST, path, Some(body), &[])
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::PUT, path, Some(body), &[]).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(reqwest::Method::PATCH, path, Some(body), &[])
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(reqwest::Method::DELETE, path, None, &[]).await
    }

    /// Sends and expects a 202; returns the message id.
    pub async fn send(&self, body: Value) -> String {
        let r = self.post("/v1/send", body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "send failed: {}", r.body);
        r.body["id"].as_str().expect("id").to_string()
    }

    pub async fn message(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body
    }

    /// Waits until the message has the given status.
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_status_within(id, status, Duration::from_secs(30))
            .await
    }

    pub async fn wait_status_within(&self, id: &str, status: &str, within: Duration) -> Value {
        eventually(within, &format!("message {id} to be {status}"), || async {
            let m = self.get(&format!("/v1/messages/{id}")).await;
            (m.status == StatusCode::OK && m.body["status"] == status).then_some(m.body)
        })
        .await
    }

    pub async fn create_key(&self, body: Value) -> (String, String) {
        let r = self.post("/v1/keys", body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        (
            r.body["id"].as_str().expect("id").to_string(),
            r.body["key"].as_str().expect("key").to_string(),
        )
    }
}

/// Mailroom running inside the test process.
pub struct TestApp {
    pub api: Client,
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> TestApp {
        if std::env::var_os("MAILROOM_TEST_LOG").is_some() {
            mailroom::telemetry::init(Some(mailroom::config::LogFormat::Pretty));
        }
        let data_dir = PathBuf::from(settings.data_dir.clone().expect("data dir"));
        let config = Config::from_settings(settings).expect("config");
        let app = Application::build(config, Role::Serve)
            .await
            .expect("build app");
        let port = app.port().expect("port");
        let token = CancellationToken::new();
        let handle = tokio::spawn(app.run(token.clone()));
        let key = std::fs::read_to_string(data_dir.join("admin-key"))
            .map(|k| k.trim().to_string())
            .unwrap_or_default();
        TestApp {
            api: Client {
                base: format!("http://127.0.0.1:{port}"),
                key,
                http: reqwest::Client::new(),
            },
            token,
            handle: Some(handle),
        }
    }

    /// Starts against an environment with the given relay URL(s).
    pub async fn start(env: &Env, relays: Option<String>) -> TestApp {
        TestApp::spawn(env.settings(relays)).await
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Mailroom as the real binary, for kill/restart/signal tests.
pub struct ProcApp {
    pub api: Client,
    pub port: u16,
    child: Option<Child>,
    vars: Vec<(String, String)>,
    pub log: PathBuf,
}

impl ProcApp {
    pub async fn start(env: &Env, relays: Option<String>) -> ProcApp {
        let port = free_port();
        let vars = env.vars(relays, port);
        let log = env
            .data_dir
            .join(format!("log-{}.jsonl", uuid::Uuid::new_v4().simple()));
        let mut app = ProcApp {
            api: Client {
                base: format!("http://127.0.0.1:{port}"),
                key: String::new(),
                http: reqwest::Client::new(),
            },
            port,
            child: None,
            vars,
            log,
        };
        app.launch(&env.data_dir).await;
        app
    }

    async fn launch(&mut self, data_dir: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("mailroom binary");
        self.child = Some(child);
        let health = format!("{}/healthz", self.api.base);
        eventually(
            Duration::from_secs(30),
            "mailroom to answer /healthz",
            || async {
                reqwest::get(&health)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
        self.api.key = std::fs::read_to_string(data_dir.join("admin-key"))
            .map(|k| k.trim().to_string())
            .unwrap_or_default();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().expect("wait")
    }

    pub async fn restart(&mut self, data_dir: &Path) {
        self.kill9();
        self.launch(data_dir).await;
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcApp {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Builds a `mod embedded` and a `mod postgres` running each scenario on
/// that stack.
#[macro_export]
macro_rules! on_both_stacks {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Stack::Embedded).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Stack::Postgres).await
                }
            )*
        }
    };
}

/// The usual set-up: an environment on `stack`, a fresh aiosmtpd, and an
/// app relaying to it.
pub async fn app_with_smtp(stack: Stack) -> (Env, Smtp, TestApp) {
    let env = Env::new(stack).await;
    let smtp = Smtp::start();
    let app = TestApp::start(&env, Some(smtp.relay())).await;
    (env, smtp, app)
}

/// The event types of a message resource, in order.
pub fn event_types(message: &Value) -> Vec<&str> {
    field_strs(&message["events"], "type")
}

/// The string `field` of each object in the JSON array `list`.
pub fn field_strs<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list.as_array()
        .map(|items| items.iter().filter_map(|i| i[field].as_str()).collect())
        .unwrap_or_default()
}

/// A minimal valid send body.
pub fn code_to(to: &str) -> Value {
    json!({
        "template": "verification-code",
        "from": "Acme <no-reply@acme.test>",
        "to": [to],
        "data": {"code": "493817"}
    })
}
