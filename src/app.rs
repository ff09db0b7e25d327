//! Building and running one replica: the HTTP API, the database preparation, the
//! Redis connections, the elector, the dispatcher and the housekeeping loop, and the
//! order in which they stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use backon::Retryable;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cache::DeliveryCache;
use crate::config::LaneSpec;
use crate::config::{Config, Secret};
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::dispatch::{RouteSettings, Routing};
use crate::leadership::{self, FenceTiming, Leadership, Spread};
use crate::metrics::Metrics;
use crate::provider::{ProviderClient, Providers};
use crate::retry::connect_backoff;
use crate::state::{AppState, HEARTBEAT_INTERVAL, LIVE_WITHIN, Lane};
use crate::store::{RescuePolicy, Schedule};
use crate::store::{Store, StoreError};
use crate::version::BUILD;
use crate::{dependencies, http, redis};

pub struct Replica {
    listener: TcpListener,
    state: Arc<AppState>,
    /// Every configured provider, by name; each lane's dispatcher sends through those
    /// its lane names.
    providers: Arc<Providers>,
    subscriber: Option<SubscriberClient>,
}

/// How long past SHUTDOWN_TIMEOUT a replica may take to exit: the batches' cleanup
/// (`dispatch::batch::CLEANUP_GRACE`), then the lock's release, the registry, the HTTP
/// server and the connections, each bounded.
pub const EXIT_SLACK: Duration = Duration::from_millis(4500);

/// Redis commands must answer well inside the lease, or the elector treats them as
/// failed and retries.
fn redis_command_timeout(config: &Config) -> Duration {
    (config.lock.ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

impl Replica {
    /// Binds the HTTP port and builds every client. Touches no dependency yet.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let address = SocketAddr::from(([0, 0, 0, 0], config.server_port));
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (SERVER_PORT)"))?;
        let metrics = Arc::new(Metrics::new());
        let store = Store::new(&config.database).context("invalid database settings")?;
        let command_timeout = redis_command_timeout(&config);
        let redis_client =
            redis::client(&config.redis, command_timeout).context("invalid Redis settings")?;
        let subscriber = if config.lock.enabled {
            Some(redis::subscriber(&config.redis, command_timeout)?)
        } else {
            None
        };
        let mut clients = Vec::with_capacity(config.plan.providers.len());
        for spec in &config.plan.providers {
            let receipts_token = config.dlr_token.as_ref().or(config.api_token.as_ref());
            let client =
                ProviderClient::new(spec, receipts_token.map(Secret::expose), metrics.clone())
                    .with_context(|| format!("SMS provider client {:?}", spec.name))?;
            clients.push(Arc::new(client));
        }
        let providers = Arc::new(Providers::new(clients));
        let mut lanes = Vec::with_capacity(config.plan.lanes.len());
        for spec in &config.plan.lanes {
            metrics.register_providers(&spec.name, spec.providers.iter().map(String::as_str));
            lanes.push(Lane {
                spec: spec.clone(),
                store: store.for_lane(&spec.name),
                leadership: Arc::new(Leadership::new(metrics.clone(), &spec.name)),
                wake: Arc::new(Notify::new()),
            });
        }
        let names: Vec<String> = lanes.iter().map(|lane| lane.spec.name.clone()).collect();
        metrics.register_lanes(names.iter().map(String::as_str));
        let spread = Arc::new(Spread::new(
            &config.replica_id,
            &names,
            config.lock.retry_interval,
        ));
        let state = Arc::new(AppState {
            cache: DeliveryCache::new(redis_client.clone(), config.cache_ttl),
            lanes,
            spread,
            config: Arc::new(config),
            store,
            redis: redis_client,
            metrics,
            schema_ready: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        });
        Ok(Self {
            listener,
            state,
            providers,
            subscriber,
        })
    }

    /// The port actually bound (useful with `SERVER_PORT=0`).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// Runs until `stop` resolves, then shuts down in order: no new batch; in-flight
    /// sends finish (bounded by `SHUTDOWN_TIMEOUT`) and unsent claims return; the
    /// lock is released and followers told; the replica leaves the registry; the HTTP
    /// server drains.
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            providers,
            subscriber,
        } = self;
        let config = state.config.clone();
        let shutdown = state.shutdown.clone();
        let tasks = TaskTracker::new();
        tracing::info!(
            port = listener.local_addr().map_or(0, |a| a.port()),
            version = BUILD.version,
            commit = BUILD.commit,
            lock_enabled = config.lock.enabled,
            leader_eligible = config.leader_eligible,
            lanes = %state
                .lanes
                .iter()
                .map(|lane| lane.spec.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            dispatch_config = ?config.plan.source,
            "replica starting"
        );
        for lane in &state.lanes {
            let spec = &lane.spec;
            tracing::info!(
                lane = %spec.name,
                batch_size = spec.batch_size,
                interval = %crate::duration::format(spec.interval),
                unit = spec.unit.as_str(),
                send_concurrency = spec.send_concurrency,
                providers = %spec.providers.join(","),
                "lane configured"
            );
        }

        for warning in config.demo_defaults() {
            tracing::warn!("demo default in force: {warning}");
        }

        let http_stop = CancellationToken::new();
        let http_task =
            tokio::spawn(http::serve(listener, state.clone(), http_stop.clone()).in_current_span());

        let (schema_tx, schema_rx) = watch::channel(false);
        let (fatal_tx, fatal_rx) = oneshot::channel();
        tasks.spawn(prepare_database(state.clone(), schema_tx, fatal_tx).in_current_span());
        {
            let (redis, shutdown) = (state.redis.clone(), shutdown.clone());
            tasks.spawn(
                async move { redis::connect(&redis, "commands", &shutdown).await }
                    .in_current_span(),
            );
        }
        tasks.spawn(housekeeping(state.clone()).in_current_span());
        {
            let ready = state.clone();
            tasks.spawn(
                crate::retention::run(
                    state.store.clone(),
                    config.retention,
                    state.metrics.clone(),
                    move || ready.schema_ready.load(Ordering::Acquire),
                    shutdown.clone(),
                )
                .in_current_span(),
            );
        }
        {
            let ready = state.clone();
            tasks.spawn(
                crate::webhooks::run(
                    state.store.clone(),
                    config.webhooks.clone(),
                    state.metrics.clone(),
                    move || ready.schema_ready.load(Ordering::Acquire),
                    shutdown.clone(),
                )
                .in_current_span(),
            );
        }
        // Stopped after the dispatcher, so its last results are charted too.
        let activity_stop = CancellationToken::new();
        tasks.spawn(
            crate::dispatch::activity::record(
                state.store.clone(),
                state.metrics.clone(),
                activity_stop.clone(),
            )
            .in_current_span(),
        );

        let resign = CancellationToken::new();
        let campaign = leadership::Campaign {
            lock: config.lock.clone(),
            eligible: config.leader_eligible,
            replica_id: config.replica_id.clone(),
            store: state.store.clone(),
            redis: state.redis.clone(),
            subscriber,
            lanes: state
                .lanes
                .iter()
                .map(|lane| lane.leadership.clone())
                .collect(),
            spread: state.spread.clone(),
            metrics: state.metrics.clone(),
        };
        let elector_task = tokio::spawn(
            leadership::campaign::run(
                campaign,
                schema_rx,
                resign.clone(),
                shutdown.clone(),
                tasks.clone(),
            )
            .in_current_span(),
        );
        let mut dispatchers = Vec::with_capacity(state.lanes.len());
        for lane in &state.lanes {
            let live = crate::dispatch::Live {
                store: lane.store.clone(),
                cache: state.cache.clone(),
            };
            let settings = dispatch_settings(&config, &lane.spec);
            let dispatcher = Dispatcher {
                backend: live.clone(),
                provider: providers.clone(),
                routing: Routing::new(&settings.providers, config.dispatch.retry.max),
                leadership: lane.leadership.clone(),
                metrics: state.metrics.clone(),
                settings,
                wake: lane.wake.clone(),
                pacer: Default::default(),
                recorder: crate::dispatch::Recorder::new(live),
                pause: Default::default(),
                recipients: Default::default(),
            };
            let span = tracing::info_span!("lane", lane = %lane.spec.name);
            let _entered = span.enter();
            dispatchers.push(dispatcher.spawn(shutdown.clone())?);
        }
        let dispatcher_task = futures::future::join_all(dispatchers);

        let fatal = async {
            match fatal_rx.await {
                Ok(err) => err,
                Err(_) => std::future::pending().await,
            }
        };
        let failure = tokio::select! {
            () = stop => None,
            err = fatal => Some(err),
        };
        tracing::info!("shutdown requested; finishing in-flight work");
        // In-flight sends get SHUTDOWN_TIMEOUT, and everything after them is bounded
        // too, so the process is gone within SHUTDOWN_TIMEOUT + EXIT_SLACK whatever
        // PostgreSQL and Redis do: past an orchestrator's grace it would be killed
        // mid-write. What is left undone (results held for PostgreSQL, unsent claims)
        // the next leader's rescue settles, from the delivery cache where it can.
        let exit_by = tokio::time::Instant::now() + config.dispatch.shutdown_timeout + EXIT_SLACK;
        let left = |most: Duration| {
            most.min(exit_by.saturating_duration_since(tokio::time::Instant::now()))
        };
        shutdown.cancel();
        if tokio::time::timeout_at(exit_by, dispatcher_task)
            .await
            .is_err()
        {
            tracing::warn!("the dispatcher did not stop in time; exiting without it");
        }
        activity_stop.cancel();
        resign.cancel();
        let _ = tokio::time::timeout(left(Duration::from_secs(2)), elector_task).await;
        if state.schema_ready.load(Ordering::Acquire) {
            let deregister = state.store.deregister(&config.replica_id);
            if let Ok(Err(err)) =
                tokio::time::timeout(left(Duration::from_secs(1)), deregister).await
            {
                tracing::warn!(error = %err, "could not leave the replica registry");
            }
        }
        http_stop.cancel();
        let _ = tokio::time::timeout(left(Duration::from_secs(2)), http_task).await;
        tasks.close();
        let _ = tokio::time::timeout(left(Duration::from_secs(1)), tasks.wait()).await;
        let _ = tokio::time::timeout(left(Duration::from_millis(500)), state.redis.quit()).await;
        tracing::info!("replica stopped");
        match failure {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }
}

/// The longest request timeout of the lane's providers: the rescue must wait out the
/// slowest send of the lane, whichever provider it went to (docs/design.md#rescue).
fn longest_timeout(config: &Config, lane: &LaneSpec) -> Duration {
    lane.providers
        .iter()
        .filter_map(|name| config.plan.provider(name))
        .map(|provider| provider.settings.timeout)
        .max()
        .unwrap_or(config.provider.timeout)
}

fn dispatch_settings(config: &Config, lane: &LaneSpec) -> DispatchSettings {
    let fence = FenceTiming::for_lease(config.lock.ttl);
    DispatchSettings {
        replica_id: config.replica_id.clone(),
        lane: lane.name.clone(),
        configured: Schedule {
            batch_size: lane.batch_size,
            interval: lane.interval,
            unit: lane.unit,
        },
        rescue: RescuePolicy {
            wait: fence.rescue_wait(ProviderClient::longest_exchange(longest_timeout(
                config, lane,
            ))),
            max_attempts: config.dispatch.max_attempts,
        },
        fence,
        retry: config.dispatch.retry,
        max_attempts: config.dispatch.max_attempts,
        send_concurrency: lane.send_concurrency,
        shutdown_timeout: config.dispatch.shutdown_timeout,
        poll: config
            .lock
            .retry_interval
            .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        probe_every: config.lock.retry_interval,
        providers: lane
            .providers
            .iter()
            .filter_map(|name| config.plan.provider(name))
            .map(|provider| RouteSettings {
                name: provider.name.clone(),
                breaker: provider.breaker,
                from: provider.from.as_ref().map(|from| from.as_str().to_string()),
                prices: provider.prices.clone(),
            })
            .collect(),
        from: lane.from.as_ref().map(|from| from.as_str().to_string()),
        quiet_hours: lane.quiet_hours,
        daily_spend_cap: lane.daily_spend_cap,
    }
}

/// Waits for PostgreSQL (backoff with jitter, each attempt logged), applies migrations
/// when `AUTO_MIGRATE` is on or waits for them otherwise, and settles `AUTO_START`.
/// An applied migration that has changed is not retried: it goes to `fatal`, and the
/// replica stops with the configuration exit status.
async fn prepare_database(
    state: Arc<AppState>,
    schema_ready: watch::Sender<bool>,
    fatal: oneshot::Sender<StoreError>,
) {
    let config = &state.config;
    let attempt = || async {
        state.store.refuse_transaction_pooling().await?;
        if config.auto_migrate {
            let report = state.store.migrate().await?;
            if !report.applied.is_empty() {
                tracing::info!(applied = ?report.applied, "database migrated");
            }
        } else if !state.store.schema_is_current().await? {
            return Err(StoreError::Migration(
                "schema is not migrated yet (AUTO_MIGRATE=false): run `message-dispatcher migrate`"
                    .into(),
            ));
        }
        let lanes: Vec<&str> = state.lanes.iter().map(|l| l.spec.name.as_str()).collect();
        state.store.ensure_lanes(&lanes).await?;
        state
            .store
            .publish_intake_rules(
                config.message_max_length,
                config.webhooks.url.is_some(),
                &config.replica_id,
            )
            .await?;
        state
            .store
            .apply_auto_start(config.dispatch.auto_start, &config.replica_id)
            .await
    };
    let prepared = attempt
        .retry(connect_backoff())
        .when(|err| {
            !matches!(
                err,
                StoreError::MigrationChanged(_) | StoreError::TransactionPooling(_)
            )
        })
        .notify(|err, wait| {
            tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "PostgreSQL not ready yet");
        });
    tokio::select! {
        result = prepared => match result {
            Ok(()) => {
                tracing::info!("database ready");
                warn_about_unconfigured_lanes(&state).await;
                for lane in &state.lanes {
                    if let Ok(control) = lane.store.control_record().await {
                        let names = if config.plan.source.is_some() {
                            ("the lane's batch_size", "the lane's interval")
                        } else {
                            ("BATCH_SIZE", "PROCESSING_INTERVAL")
                        };
                        warn_about_overrides(
                            &lane.spec.name,
                            names,
                            &lane.configured_schedule(),
                            &control,
                        );
                    }
                }
                if let Err(err) = state
                    .store
                    .heartbeat(&config.replica_id, BUILD.version, config.leader_eligible)
                    .await
                {
                    tracing::debug!(error = %err, "heartbeat not recorded");
                }
                state.schema_ready.store(true, Ordering::Release);
                schema_ready.send_replace(true);
            }
            Err(err) => {
                tracing::error!(error = %err, "giving up on the database");
                let _ = fatal.send(err);
            }
        },
        () = state.shutdown.cancelled() => {}
    }
}

/// Logs each lane that holds messages waiting to be sent but that DISPATCH_CONFIG no
/// longer names: nobody sends them until the lane is configured again or they are moved.
async fn warn_about_unconfigured_lanes(state: &AppState) {
    let Ok(counts) = state.store.lane_counts().await else {
        return;
    };
    for counts in counts {
        if state.lane(&counts.lane).is_none() && counts.pending + counts.sending > 0 {
            tracing::error!(
                lane = %counts.lane,
                pending = counts.pending,
                sending = counts.sending,
                "messages wait in a lane DISPATCH_CONFIG does not name; nobody sends them. \
                 Configure the lane again, or move them: UPDATE messages SET lane = 'default' \
                 WHERE lane = '<lane>' AND status = 'pending'"
            );
        }
    }
}

/// Logs each runtime override stored in PostgreSQL that shadows an environment
/// value: a replica restarted with a new `BATCH_SIZE` still obeys the override, and
/// its operator should read that in the log rather than find it out.
fn warn_about_overrides(
    lane: &str,
    (batch_size_name, interval_name): (&str, &str),
    configured: &Schedule,
    control: &crate::store::ControlRecord,
) {
    let by = |set: Option<&crate::store::SetBy>| {
        set.map_or_else(
            || "an unknown client".to_string(),
            |set| {
                format!(
                    "{} at {}",
                    set.by.as_deref().unwrap_or("an unknown client"),
                    set.at.to_rfc3339()
                )
            },
        )
    };
    if let Some(batch_size) = control.batch_size {
        tracing::warn!(
            override_value = batch_size,
            environment_value = configured.batch_size,
            set_by = by(control.batch_size_set.as_ref()),
            lane,
            "a runtime override stored in PostgreSQL shadows {batch_size_name}; clear it with \
             PUT /api/lanes/{lane}/config {{\"batch_size\": null}}"
        );
    }
    if let Some(interval) = control.interval {
        tracing::warn!(
            override_value = %crate::duration::format(interval),
            environment_value = %crate::duration::format(configured.interval),
            set_by = by(control.interval_set.as_ref()),
            lane,
            "a runtime override stored in PostgreSQL shadows {interval_name}; clear it with \
             PUT /api/lanes/{lane}/config {{\"processing_interval\": null}}"
        );
    }
}

/// Applies delivery receipts that arrived before their message's send result, and
/// drops what the stats no longer read. Every replica does it; each step is idempotent.
async fn tidy_messages(store: &crate::store::Store) {
    match store.apply_held_receipts(None).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            applied = n,
            "applied delivery receipts that arrived before their send results"
        ),
        Err(err) => tracing::debug!(error = %err, "held receipts not applied yet"),
    }
    let pruned = tokio::join!(
        store.prune_held_receipts(),
        store.prune_sent_seconds(),
        store.prune_activity()
    );
    if let (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) = pruned {
        tracing::debug!(error = %err, "pruning skipped");
    }
}

/// Every few seconds: check the dependencies (gauges, logs), refresh this replica's
/// registry heartbeat and the desired-state gauge, and tidy the message tables.
async fn housekeeping(state: Arc<AppState>) {
    let mut database_up = true;
    loop {
        let deps = dependencies::check(&state.store, &state.redis, &state.metrics).await;
        let up = deps.database == dependencies::Status::Healthy;
        if up != database_up {
            if up {
                tracing::info!("PostgreSQL answers again");
            } else {
                tracing::warn!("PostgreSQL does not answer; dispatch and readiness wait for it");
            }
            database_up = up;
        }
        if up && state.schema_ready.load(Ordering::Acquire) {
            if let Err(err) = state
                .store
                .heartbeat(
                    &state.config.replica_id,
                    BUILD.version,
                    state.config.leader_eligible,
                )
                .await
            {
                tracing::debug!(error = %err, "heartbeat not recorded");
            }
            match state.store.live_replicas(LIVE_WITHIN).await {
                Ok(replicas) => state
                    .spread
                    .observe(&replicas, state.config.leader_eligible),
                Err(err) => tracing::debug!(error = %err, "live replicas not read"),
            }
            if let Ok(control) = state.store.control_record().await {
                state
                    .metrics
                    .scheduler_running
                    .set(i64::from(control.running));
                for reason in crate::metrics::PAUSE_REASONS {
                    let paused = control.paused.as_ref().is_some_and(|p| p.reason == reason);
                    state
                        .metrics
                        .dispatch_paused
                        .with_label_values(&[reason])
                        .set(i64::from(paused));
                }
            }
            tidy_messages(&state.store).await;
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rescue_waits_out_the_lanes_own_provider_timeout() {
        let path = std::env::temp_dir().join(format!("md-rescue-wait-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[[provider]]\nname = \"slow\"\nkind = \"http-json\"\nurl = \"http://127.0.0.1:1/send\"\n\
             token_env = \"SMS_API_TOKEN\"\ntimeout = \"20s\"\n\n\
             [[lane]]\nname = \"default\"\nbatch_size = 2\ninterval = \"1s\"\nproviders = [\"slow\"]\n",
        )
        .unwrap();
        let config = Config::from_vars([
            ("DISPATCH_CONFIG".to_string(), path.display().to_string()),
            ("SMS_API_TOKEN".to_string(), "t".to_string()),
            ("SMS_API_TIMEOUT".to_string(), "6s".to_string()),
        ])
        .unwrap();
        let _ = std::fs::remove_file(&path);
        let settings = dispatch_settings(&config, &config.plan.lanes[0]);
        assert!(
            settings.rescue.wait > Duration::from_secs(20),
            "a send may take the provider's 20 s; the rescue waits {:?}",
            settings.rescue.wait
        );
    }
}
