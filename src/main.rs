//! The `mailroom` binary: parse the command line, load configuration, start
//! logging, run the chosen role until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use mailroom::app::{open_store, Application, Role};
use mailroom::cli::{Cli, Command, KeyArgs, KeysCommand};
use mailroom::config::{Config, Settings};
use mailroom::domain::now_ms;
use mailroom::keys::{new_key, KeyLimits, KeyMode, Scope};

/// mimalloc: the request path allocates a lot (JSON, MIME, rows) across
/// threads, where glibc's malloc spent ~20% of the server's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Settings::from_toml(&text)?
        }
        None => Settings::default(),
    };
    Ok(Config::from_settings(cli.settings.clone().over(file))?)
}

async fn wait_for_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    token.cancel();
}

async fn run_role(config: Config, role: Role) -> anyhow::Result<()> {
    let app = Application::build(config, role).await?;
    let token = CancellationToken::new();
    tokio::spawn(wait_for_signal(token.clone()));
    app.run(token).await
}

async fn create_key(config: Config, args: KeyArgs) -> anyhow::Result<()> {
    let scopes = args
        .scopes
        .split(',')
        .map(|s| Scope::parse(s.trim()).with_context(|| format!("unknown scope {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mode = KeyMode::parse(&args.mode).context("--mode must be live or test")?;
    if args.burst.is_some() && args.rate_per_second.is_none() {
        anyhow::bail!("--burst needs --rate-per-second");
    }
    let timezone = args
        .timezone
        .as_deref()
        .map(|t| {
            t.parse::<chrono_tz::Tz>()
                .map(|tz| tz.name().to_string())
                .map_err(|_| {
                    anyhow::anyhow!("--timezone must be an IANA time zone such as Europe/Berlin")
                })
        })
        .transpose()?;
    let domains = args
        .allowed_from_domains
        .map(|d| {
            d.split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let limits = KeyLimits {
        rate_per_second: args.rate_per_second,
        burst: args.burst,
        daily_quota: args.daily_quota,
        monthly_quota: args.monthly_quota,
        per_recipient_hourly: args.per_recipient_hourly,
        timezone,
    };
    let store = open_store(&config).await?;
    let (key, plaintext) = new_key(args.name, scopes, mode, limits, domains, now_ms());
    store.create_key(&key).await?;
    let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
    println!(
        "Created key {} ({}), scopes {}, mode {}. It is shown once:",
        key.id,
        key.name,
        scopes.join(","),
        key.mode.as_str()
    );
    println!("{plaintext}");
    Ok(())
}

/// Runs the command; an error ends the process with status 1 and its
/// message and causes on stderr, never a backtrace (`RUST_BACKTRACE` is
/// for panics: a bad setting or an unreachable database is not one).
fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", message_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each once (many errors here already print
/// their source in their own message).
fn message_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = load_config(&cli)?;
    mailroom::telemetry::init(config.log_format);
    match cli.command {
        Command::Serve => run_role(config, Role::Serve).await,
        Command::Api => run_role(config, Role::Api).await,
        Command::Worker => run_role(config, Role::Worker).await,
        Command::Migrate => {
            open_store(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Create(args),
        } => create_key(config, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::message_chain;

    #[test]
    fn an_error_is_told_with_each_cause_once() {
        let inner = anyhow::anyhow!("pool timed out");
        let repeats = inner.context("store unavailable: pool timed out");
        let told = repeats.context("connecting to the database");
        assert_eq!(
            message_chain(&told),
            "connecting to the database: store unavailable: pool timed out"
        );
        let plain = anyhow::anyhow!("refused").context("connecting to the relay");
        assert_eq!(message_chain(&plain), "connecting to the relay: refused");
    }
}
