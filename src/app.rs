//! Building and running the application: the one place where adapters are
//! chosen (Postgres or SQLite, Redis or in-process, SMTP or capture), the
//! listener is bound (so tests can use port 0), and roles are started and
//! drained in order on shutdown: HTTP first, then workers, then commits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::{rebuild_queue, Policy, RetrySchedule, Sweeper, Worker};
use crate::domain::{now_ms, Mailbox};
use crate::http::{self, Ctx};
use crate::keys::{new_key, KeyLimits, KeyMode, Scope};
use crate::limiter::{Limiter, MemoryLimiter, RedisLimiter};
use crate::metrics::Metrics;
use crate::queue::{MemoryQueue, Queue, RedisQueue};
use crate::relay::RelayChain;
use crate::sending::{Committer, DkimSigner, Reserver, Sender, SenderSettings};
use crate::store::{SqlStore, Store};
use crate::templates::{builtins, TemplateEngine};
use crate::ttl_cache::TtlCache;
use crate::webhooks::Dispatcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API, workers, sweeper and webhook dispatcher in one process.
    Serve,
    /// HTTP API only.
    Api,
    /// Deliveries, sweeper and webhooks only.
    Worker,
}

impl Role {
    fn serves_http(self) -> bool {
        matches!(self, Role::Serve | Role::Api)
    }
    fn delivers(self) -> bool {
        matches!(self, Role::Serve | Role::Worker)
    }
}

/// Opens (and migrates) the store the configuration names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = match &config.database_url {
        Some(url) => url.expose().clone(),
        None => {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
            SqlStore::sqlite_url(&config.data_dir)
        }
    };
    let store = SqlStore::connect(&url, 32)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    Ok(Arc::new(store))
}

pub struct Application {
    ctx: Arc<Ctx>,
    listener: Option<TcpListener>,
    worker: Option<Arc<Worker>>,
    sweeper: Option<Sweeper>,
    dispatcher: Option<Arc<Dispatcher>>,
    commits: TaskTracker,
}

/// Where the first admin key is written on a fresh install.
pub fn first_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-key")
}

impl Application {
    pub async fn build(config: Config, role: Role) -> anyhow::Result<Application> {
        if role != Role::Serve && config.redis_url.is_none() {
            anyhow::bail!(
                "`mailroom api` and `mailroom worker` share work through Redis: set REDIS_URL \
                 (and DATABASE_URL to a Postgres both can reach), or run `mailroom serve`"
            );
        }
        let config = Arc::new(config);
        let store = open_store(&config).await?;
        // Built-ins are dated by the install that first stored them.
        let installed = now_ms();
        for mut t in builtins() {
            t.created_at = installed;
            store.seed_builtin(&t).await?;
        }
        let (queue, limiter): (Arc<dyn Queue>, Arc<dyn Limiter>) = match &config.redis_url {
            Some(url) => (
                Arc::new(RedisQueue::connect(url.expose(), &config.redis_prefix).await?),
                Arc::new(RedisLimiter::connect(url.expose(), &config.redis_prefix).await?),
            ),
            None => (Arc::new(MemoryQueue::new()), Arc::new(MemoryLimiter::new())),
        };
        let relays = RelayChain::from_config(&config.relays, config.relay_ca_file.as_deref())?;
        let metrics = Arc::new(Metrics::new());
        let commits = TaskTracker::new();
        // Two group-commit writers on Postgres: while one group commits the
        // next gathers, and groups stay large (four split the same load into
        // groups half the size, and Postgres spent ~30% more CPU per accept;
        // docs/performance.md, 2026-12-05). One, with the linger in
        // `sending::gather`, took 4-16% more accepts/s, but then one slow
        // commit or enqueue holds up every accept: two keep the tail short.
        // SQLite has one connection.
        let writers = if store.backend() == "sqlite" { 1 } else { 2 };
        let committer = Committer::start(store.clone(), queue.clone(), writers, &commits);
        let idempotency_ttl = config.idempotency_ttl.as_millis() as i64;
        let reserver = Reserver::start(store.clone(), idempotency_ttl, writers, &commits);
        let default_from = config
            .default_from
            .as_deref()
            .map(Mailbox::parse)
            .transpose()?;
        let sender = Sender::new(
            store.clone(),
            limiter.clone(),
            Arc::new(TemplateEngine::new()),
            committer,
            reserver,
            SenderSettings {
                default_from,
                max_attachment_bytes: config.max_attachment_bytes,
                dkim: DkimSigner::load(&config.dkim_keys)?,
            },
        );
        let ctx = Arc::new(Ctx {
            send_slots: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
            store: store.clone(),
            keys: TtlCache::new(crate::http::KEY_CACHE, 10_000),
            store_gauges: TtlCache::new(crate::metrics::STORE_GAUGES_TTL, 1),
            queue: queue.clone(),
            limiter,
            sender,
            metrics: metrics.clone(),
            config: config.clone(),
        });
        if role.serves_http() {
            bootstrap_key(store.as_ref(), &config.data_dir).await?;
        }
        let listener = if role.serves_http() {
            Some(
                TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding {}", config.listen))?,
            )
        } else {
            None
        };
        let (worker, sweeper, dispatcher) = if role.delivers() {
            if queue.is_volatile() {
                let pending = rebuild_queue(store.as_ref(), queue.as_ref()).await?;
                if pending > 0 {
                    tracing::info!(pending, "rebuilt the in-process queue from the store");
                }
            }
            // Recorded outcomes hand their webhooks to the dispatcher of
            // the same process.
            let dispatcher = Arc::new(Dispatcher::new(
                store.clone(),
                RetrySchedule::new(config.webhook_retry_schedule.clone()),
                config.webhook_timeout,
                config.webhook_allow_private,
                config.webhook_disable_after,
                metrics.clone(),
            )?);
            let worker = Arc::new(Worker {
                store: store.clone(),
                queue: queue.clone(),
                relays,
                relays_capture: config.relays.is_empty(),
                policy: Policy {
                    schedule: RetrySchedule::new(config.delivery_retry_schedule.clone()),
                    give_up_after: config.delivery_give_up_after,
                },
                lease: config.delivery_lease,
                concurrency: config.workers,
                owner: format!("w-{}", uuid::Uuid::new_v4().simple()),
                metrics: metrics.clone(),
                webhooks: dispatcher.clone(),
            });
            let sweeper = Sweeper {
                store: store.clone(),
                queue: queue.clone(),
                interval: config.sweep_interval,
                grace: config.sweep_grace,
            };
            (Some(worker), Some(sweeper), Some(dispatcher))
        } else {
            (None, None, None)
        };
        tracing::info!(role = ?role, listen = ?listener.as_ref().and_then(|l| l.local_addr().ok()), "{}", config.describe_backends());
        if config.relays.is_empty() {
            tracing::warn!("no MAILROOM_RELAYS configured: mail is CAPTURED (stored and readable via GET /v1/messages/{{id}}/raw), NOT sent");
        }
        for relay in config.relays.iter().filter(|r| r.sends_password_in_clear()) {
            tracing::warn!(relay = %relay.name, "tls=none with credentials: the relay password crosses the network unencrypted (use tls=starttls or smtps://)");
        }
        Ok(Application {
            ctx,
            listener,
            worker,
            sweeper,
            dispatcher,
            commits,
        })
    }

    /// The bound HTTP port (for tests that bind port 0).
    pub fn port(&self) -> Option<u16> {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();
        if let Some(worker) = self.worker {
            tasks.spawn(worker.run(background.clone()));
        }
        if let Some(sweeper) = self.sweeper {
            tasks.spawn(sweeper.run(background.clone()));
        }
        // The dispatcher stops after the worker: the outcomes the worker
        // records while it drains hand their webhooks to a dispatcher that
        // still posts them (a delivery handed to one that had stopped would
        // wait for its lease to run out).
        let webhooks = CancellationToken::new();
        let webhook_tasks = TaskTracker::new();
        if let Some(dispatcher) = self.dispatcher {
            webhook_tasks.spawn(dispatcher.run(webhooks.clone()));
        }
        match self.listener {
            Some(listener) => {
                axum::serve(listener, http::router(self.ctx))
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await?;
            }
            None => {
                drop(self.ctx);
                shutdown.cancelled().await;
            }
        }
        tracing::info!("HTTP stopped; draining deliveries and webhooks");
        background.cancel();
        tasks.close();
        tasks.wait().await;
        webhooks.cancel();
        webhook_tasks.close();
        webhook_tasks.wait().await;
        self.commits.close();
        self.commits.wait().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// On a store with no active key, creates an admin key and writes it to
/// `<data_dir>/admin-key` (mode 0600), so a fresh install is usable at once.
async fn bootstrap_key(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    if store.count_active_keys().await? > 0 {
        return Ok(());
    }
    let (key, plaintext) = new_key(
        "bootstrap admin".into(),
        vec![Scope::Admin, Scope::Send, Scope::Read],
        KeyMode::Live,
        KeyLimits::default(),
        Vec::new(),
        now_ms(),
    );
    std::fs::create_dir_all(data_dir)?;
    let path = first_key_path(data_dir);
    write_private(&path, &format!("{plaintext}\n"))?;
    store.create_key(&key).await?;
    tracing::warn!(path = %path.display(), key_id = %key.id, "created the first admin key; read it from this file (mode 0600) and keep it safe");
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
