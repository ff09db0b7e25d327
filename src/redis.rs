//! Redis clients: one for commands (lock, cache) and one subscriber for the
//! "leader released" announcement.
//!
//! Connecting never blocks start-up: the API works from PostgreSQL alone. The first
//! connection is retried with the shared backoff (each attempt logged); after that,
//! fred's reconnect policy takes over. Commands carry a timeout well below the lock TTL
//! so a stalled Redis cannot stall leadership decisions.

use std::time::Duration;

use backon::Retryable;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{Config as FredConfig, ReconnectPolicy, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::retry::connect_backoff;

/// Builds the fred configuration from `REDIS_URL` or the parts.
fn fred_config(config: &RedisConfig) -> anyhow::Result<FredConfig> {
    let mut fred = match (&config.sentinel, &config.url) {
        (Some(sentinel), _) => FredConfig {
            server: ServerConfig::Sentinel {
                hosts: sentinel
                    .hosts
                    .iter()
                    .map(|(host, port)| Server::new(host.clone(), *port))
                    .collect(),
                service_name: sentinel.service.clone(),
                username: None,
                password: sentinel.password.as_ref().map(|p| p.expose().to_string()),
            },
            password: (!config.password.is_empty()).then(|| config.password.expose().to_string()),
            database: Some(config.db),
            ..FredConfig::default()
        },
        (None, Some(url)) => FredConfig::from_url(url.expose())?,
        (None, None) => FredConfig {
            server: ServerConfig::Centralized {
                server: Server::new(config.host.clone(), config.port),
            },
            password: (!config.password.is_empty()).then(|| config.password.expose().to_string()),
            database: Some(config.db),
            ..FredConfig::default()
        },
    };
    // Start-up retries are ours (logged, cancellable); fred reconnects after that.
    fred.fail_fast = true;
    Ok(fred)
}

fn builder(config: &RedisConfig, command_timeout: Duration) -> anyhow::Result<Builder> {
    let mut builder = Builder::from_config(fred_config(config)?);
    builder
        .with_performance_config(|perf| perf.default_command_timeout = command_timeout)
        .with_connection_config(|conn| {
            conn.connection_timeout = command_timeout.max(Duration::from_secs(1));
            conn.internal_command_timeout = command_timeout.max(Duration::from_secs(1));
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// The command client.
pub fn client(config: &RedisConfig, command_timeout: Duration) -> anyhow::Result<Client> {
    Ok(builder(config, command_timeout)?.build()?)
}

/// The pub/sub client (a separate connection, as Redis requires).
pub fn subscriber(
    config: &RedisConfig,
    command_timeout: Duration,
) -> anyhow::Result<SubscriberClient> {
    Ok(builder(config, command_timeout)?.build_subscriber_client()?)
}

/// Connects `client`, retrying with backoff and jitter until it answers or `cancel`
/// fires. Returns whether it connected.
pub async fn connect(
    client: &impl EventInterface,
    name: &'static str,
    cancel: &CancellationToken,
) -> bool {
    let attempt = || async { client.init().await.map(|_task| ()) };
    let retrying = attempt
        .retry(connect_backoff())
        .notify(|err: &fred::error::Error, wait: Duration| {
            tracing::warn!(client = name, error = %err.details(), retry_in_ms = wait.as_millis() as u64, "Redis not reachable yet");
        });
    tokio::select! {
        result = retrying => match result {
            Ok(()) => {
                tracing::info!(client = name, "connected to Redis");
                log_connection_events(client, name);
                true
            }
            Err(err) => {
                tracing::error!(client = name, error = %err.details(), "giving up on Redis");
                false
            }
        },
        () = cancel.cancelled() => false,
    }
}

fn log_connection_events(client: &impl EventInterface, name: &'static str) {
    client.on_error(move |(error, _server)| async move {
        tracing::warn!(client = name, error = %error.details(), "Redis connection error; reconnecting");
        Ok(())
    });
    client.on_reconnect(move |_server| async move {
        tracing::info!(client = name, "reconnected to Redis");
        Ok(())
    });
}
