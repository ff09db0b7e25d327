//! The command line (README.md#commands): one binary, one subcommand per job.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use backon::Retryable;
use clap::{Parser, Subcommand};
use tracing::Instrument;

use crate::app::Replica;
use crate::config::ProviderKind;
use crate::config::{Config, LogFormat};
use crate::provider::mock::{self, MockOptions};
use crate::retry::connect_backoff;
use crate::store::{Store, StoreError};
use crate::telemetry;
use crate::version::LONG_VERSION;

/// Exit status for invalid configuration or arguments.
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "message-dispatcher", version = LONG_VERSION, about = "Dispatches queued SMS messages from PostgreSQL to a provider, from one fenced leader among many replicas")]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a replica: HTTP API, leadership and scheduler (the default).
    Serve,
    /// Apply the embedded sql/ migrations and exit.
    Migrate,
    /// Insert demo messages.
    Seed {
        #[arg(long, default_value_t = 10)]
        count: u64,
    },
    /// Run a local SMS provider for demos and tests.
    MockProvider {
        #[arg(long, default_value_t = 3001)]
        port: u16,
        /// Share of requests answered 500 (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        fail_rate: f64,
        /// Delay before each answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Share of requests answered after --slow-ms instead (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        slow_rate: f64,
        /// Delay of the slow share, in milliseconds.
        #[arg(long, default_value_t = 1500)]
        slow_ms: u64,
        /// Require this token (as `Authorization: Bearer <token>`, or in --auth-header).
        #[arg(long)]
        token: Option<String>,
        /// Header that carries the token instead of Authorization.
        #[arg(long)]
        auth_header: Option<String>,
        /// POST a delivery receipt for every accepted message to this URL (the
        /// dispatcher's /api/delivery-receipts).
        #[arg(long)]
        dlr_url: Option<String>,
        /// Delay before each receipt, in milliseconds. 0 posts it before the send is
        /// even answered: the receipt always beats the send result.
        #[arg(long, default_value_t = 1000)]
        dlr_delay_ms: u64,
        /// Share of receipts that say `undelivered` (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
        undelivered_rate: f64,
        /// Bearer token for the receipts and inbound messages (the dispatcher's
        /// DLR_TOKEN or API_TOKEN).
        #[arg(long)]
        dlr_token: Option<String>,
        /// Where `POST /inbound` on the mock delivers a recipient's reply, in the
        /// dialect's format (the dispatcher's /api/providers/{name}/inbound).
        #[arg(long)]
        inbound_url: Option<String>,
        /// The provider API to imitate: http-json, twilio, vonage or infobip. The
        /// token is then Twilio's auth token, Vonage's api_secret or Infobip's API key,
        /// and receipts go in that provider's format (Twilio's signed with the token).
        #[arg(long, default_value = "http-json", value_parser = parse_dialect)]
        dialect: ProviderKind,
    },
    /// Exit 0 if /health/ready answers 200 (for container health checks).
    Healthcheck {
        /// Default: http://127.0.0.1:$SERVER_PORT/health/ready
        #[arg(long)]
        url: Option<String>,
    },
}

fn parse_dialect(text: &str) -> Result<ProviderKind, String> {
    ProviderKind::parse(text)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("must be between 0.0 and 1.0".into())
    }
}

impl Cli {
    pub async fn run(self) -> ExitCode {
        match self.command.unwrap_or(Command::Serve) {
            Command::Serve => with_config(serve).await,
            Command::Migrate => with_config(migrate).await,
            Command::Seed { count } => with_config(move |config| seed(config, count)).await,
            Command::MockProvider {
                port,
                fail_rate,
                latency_ms,
                slow_rate,
                slow_ms,
                token,
                auth_header,
                dlr_url,
                dlr_delay_ms,
                undelivered_rate,
                dlr_token,
                inbound_url,
                dialect,
            } => {
                init_logging_from_env();
                let options = MockOptions {
                    port,
                    fail_rate,
                    latency: Duration::from_millis(latency_ms),
                    slow_rate,
                    slow_latency: Duration::from_millis(slow_ms),
                    token,
                    auth_header,
                    receipts: dlr_url.map(|url| mock::ReceiptOptions {
                        url,
                        delay: Duration::from_millis(dlr_delay_ms),
                        undelivered_rate,
                        token: dlr_token.clone().filter(|t| !t.is_empty()),
                    }),
                    inbound: inbound_url.map(|url| mock::InboundOptions {
                        url,
                        token: dlr_token.filter(|t| !t.is_empty()),
                    }),
                    dialect,
                };
                report(mock::run(options, shutdown_signal()).await)
            }
            Command::Healthcheck { url } => healthcheck(url).await,
        }
    }
}

/// Loads the configuration (exit 2 with one line on error), sets up logging, runs `job`.
async fn with_config<F, Fut>(job: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(&config.log_level, config.log_format);
    let span = tracing::info_span!("replica", replica_id = %config.replica_id);
    report(job(config).instrument(span).await)
}

/// Exit 0, or 1 with the error; 2 when no retry can help (a changed migration, a
/// pooler in transaction mode).
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "exiting with an error");
            eprintln!("error: {err:#}");
            match err.downcast_ref::<StoreError>() {
                Some(StoreError::MigrationChanged(_) | StoreError::TransactionPooling(_)) => {
                    ExitCode::from(EXIT_CONFIG)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logging for commands that need no configuration: honour LOG_LEVEL/LOG_FORMAT when
/// they are valid, defaults otherwise.
fn init_logging_from_env() {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let format = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("text") => LogFormat::Text,
        _ => LogFormat::Json,
    };
    telemetry::init(&level, format);
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let open_files = crate::http::raise_open_files_limit();
    tracing::debug!(
        open_files,
        http_connection_cap = crate::http::connection_cap(),
        "file descriptors"
    );
    let replica = Replica::build(config).await?;
    replica.run_until_stopped(shutdown_signal()).await
}

/// Connects with backoff for up to a minute (the database may still be starting).
async fn connect_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::new(&config.database)?;
    let ping = || store.ping();
    ping.retry(connect_backoff().with_total_delay(Some(Duration::from_secs(60))))
        .notify(|err, wait| {
            tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "PostgreSQL not reachable yet");
        })
        .await
        .context("PostgreSQL did not answer within a minute")?;
    Ok(store)
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = connect_store(&config).await?;
    store.refuse_transaction_pooling().await?;
    let report = store.migrate().await?;
    tracing::info!(applied = ?report.applied, already_applied = report.already_applied, "migrations done");
    println!(
        "migrations: {} applied, {} already applied",
        report.applied.len(),
        report.already_applied
    );
    Ok(())
}

async fn seed(config: Config, count: u64) -> anyhow::Result<()> {
    let store = connect_store(&config).await?;
    if config.auto_migrate {
        store.migrate().await?;
    }
    let inserted = store.seed(count).await?;
    tracing::info!(inserted, "seeded demo messages");
    println!("seeded {inserted} messages");
    Ok(())
}

async fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var("SERVER_PORT")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "8080".into());
        format!("http://127.0.0.1:{port}/health/ready")
    });
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            eprintln!("healthcheck: {err}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(response) if response.status() == reqwest::StatusCode::OK => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("healthcheck: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("healthcheck: {url}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
