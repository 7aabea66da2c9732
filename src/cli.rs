//! The command line: roles (`serve`, `api`, `worker`), `migrate`, and
//! `keys create`. Every setting is a flag and an environment variable; see
//! `mailroom --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "mailroom",
    version,
    about = "Self-hosted transactional email HTTP API",
    long_about = "Mailroom accepts mail over HTTP (POST /v1/send), stores it, queues it and delivers it \
through SMTP relays, with honest per-recipient status, signed webhooks and per-key limits.\n\n\
With no DATABASE_URL and no REDIS_URL it runs on an embedded SQLite store and an in-process queue \
in MAILROOM_DATA_DIR; with no MAILROOM_RELAYS it captures mail instead of sending it.\n\n\
Settings come from built-in defaults, then an optional TOML file (--config), then environment \
variables and flags (which win). Durations are humantime: 1s, 5m, 2h."
)]
pub struct Cli {
    /// TOML file with settings (same names as the flags, with underscores)
    #[arg(long, global = true, env = "MAILROOM_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API, delivery workers, sweeper and webhook dispatcher in one process
    Serve,
    /// Run the HTTP API only (needs REDIS_URL; scale out with any number)
    Api,
    /// Run delivery workers, sweeper and webhook dispatcher only (needs REDIS_URL)
    Worker,
    /// Apply database migrations and exit
    Migrate,
    /// Manage API keys
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once (alone on the last line)
    Create(KeyArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// A name for the key
    #[arg(long)]
    pub name: String,
    /// Comma-separated scopes: send, read, admin
    #[arg(long, default_value = "send,read")]
    pub scopes: String,
    /// Requests per second (GCRA)
    #[arg(long)]
    pub rate_per_second: Option<f64>,
    /// Burst size for the rate limit
    #[arg(long)]
    pub burst: Option<i64>,
    /// Recipients per UTC day
    #[arg(long)]
    pub daily_quota: Option<i64>,
    /// Recipients per UTC month
    #[arg(long)]
    pub monthly_quota: Option<i64>,
    /// Messages per recipient address per hour
    #[arg(long)]
    pub per_recipient_hourly: Option<i64>,
    /// IANA time zone whose days and months the quotas count in (default UTC)
    #[arg(long)]
    pub timezone: Option<String>,
    /// Comma-separated domains the From address must be in
    #[arg(long)]
    pub allowed_from_domains: Option<String>,
    /// live or test (test keys capture mail, never send it)
    #[arg(long, default_value = "live")]
    pub mode: String,
}
