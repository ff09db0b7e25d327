//! One replica's campaign: which election runs (Redis lease or single-replica mode),
//! when it starts (once the schema exists), and the listener that turns a leaving
//! leader's announcement into an immediate attempt by the followers.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{
    Elector, FenceTiming, Leadership, LeaseTiming, LiveElection, RedisLease, run_redis_elector,
    run_single_replica,
};
use crate::config::LockConfig;
use crate::metrics::Metrics;
use crate::redis;
use crate::retry::connect_backoff;
use crate::store::Store;

/// What one replica's campaign needs.
pub struct Campaign {
    pub lock: LockConfig,
    /// `LEADER_ELIGIBLE`: false never campaigns.
    pub eligible: bool,
    pub replica_id: String,
    pub store: Store,
    pub redis: Client,
    /// The pub/sub connection for release announcements (lock mode only).
    pub subscriber: Option<SubscriberClient>,
    pub leadership: Arc<Leadership>,
    pub metrics: Arc<Metrics>,
}

/// Runs the election in the configured mode once the schema exists, until `resign`
/// fires (then a leader releases the lock and announces it). The release listener is
/// spawned on `tasks` and stops with `shutdown`.
pub async fn run(
    campaign: Campaign,
    mut schema_ready: watch::Receiver<bool>,
    resign: CancellationToken,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    tokio::select! {
        ready = schema_ready.wait_for(|ready| *ready) => if ready.is_err() { return },
        () = resign.cancelled() => return,
    }
    if !campaign.eligible {
        tracing::info!("LEADER_ELIGIBLE=false: this replica serves the API and never leads");
        resign.cancelled().await;
        return;
    }
    let lock = &campaign.lock;
    let fence = FenceTiming::for_lease(lock.ttl);
    if !lock.enabled {
        run_single_replica(
            LiveElection {
                lease: RedisLease::new(campaign.redis.clone(), lock.key.clone(), lock.ttl),
                store: campaign.store,
            },
            campaign.leadership,
            campaign.replica_id,
            fence,
            resign,
        )
        .await;
        return;
    }
    let lease = RedisLease::new(campaign.redis.clone(), lock.key.clone(), lock.ttl);
    let released = Arc::new(Notify::new());
    if let Some(subscriber) = campaign.subscriber {
        tasks.spawn(
            listen_for_releases(
                subscriber,
                campaign.redis.clone(),
                lease.release_channel(),
                released.clone(),
                shutdown,
            )
            .in_current_span(),
        );
    }
    let elector = Elector {
        backend: LiveElection {
            lease,
            store: campaign.store,
        },
        timing: LeaseTiming {
            ttl: lock.ttl,
            retry_interval: lock.retry_interval,
        },
        leadership: campaign.leadership,
        metrics: campaign.metrics,
        replica_id: campaign.replica_id,
        released,
        fence,
    };
    run_redis_elector(elector, resign).await;
}

/// The release channel, and the channel a replica checks its subscription on.
struct ReleaseChannels {
    released: String,
    probe: String,
    /// Starts this listener's probes; other replicas' probes on the channel are ignored.
    probe_prefix: String,
}

/// How long a probe may take to come back before the subscription counts as missing.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Forwards "leader released the lock" announcements to the elector.
async fn listen_for_releases(
    subscriber: SubscriberClient,
    commands: Client,
    release_channel: String,
    released: Arc<Notify>,
    shutdown: CancellationToken,
) {
    if !redis::connect(&subscriber, "subscriber", &shutdown).await {
        return;
    }
    let channels = ReleaseChannels {
        probe: format!("{release_channel}:probe"),
        released: release_channel,
        probe_prefix: format!("{:016x}:", rand::random::<u64>()),
    };
    // The last of this listener's probes that came back.
    let (probe_seen, probes) = watch::channel(String::new());
    let mut messages = subscriber.message_rx();
    let forward = async {
        loop {
            match messages.recv().await {
                Ok(message) if *message.channel == *channels.probe => {
                    if let Some(probe) = message.value.as_string()
                        && probe.starts_with(&channels.probe_prefix)
                    {
                        probe_seen.send_replace(probe);
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => released.notify_one(),
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = keep_subscribed(&subscriber, &commands, &channels, probes) => {}
        () = forward => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), subscriber.quit()).await;
}

/// Subscribes to the release channel, and again after every reconnect (a new
/// connection has no subscriptions), each time retrying until a probe published on the
/// same subscription comes back. fred reports a SUBSCRIBE that Redis refused (an ACL
/// without the channel) as a success, and its own `manage_subscriptions` tries once
/// per reconnect and only logs a failure. Either left the replica deaf to release
/// announcements until the next reconnect, so every handover waited for
/// `LOCK_RETRY_INTERVAL`.
async fn keep_subscribed(
    subscriber: &SubscriberClient,
    commands: &Client,
    channels: &ReleaseChannels,
    probes: watch::Receiver<String>,
) {
    // Taken before the first attempt, so a reconnect during it is not missed.
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        let subscribe = || confirmed_subscription(subscriber, commands, channels, probes.clone());
        let _always_ok = subscribe
            .retry(connect_backoff())
            .notify(|err: &anyhow::Error, wait: Duration| {
                tracing::warn!(
                    error = %format!("{err:#}"),
                    retry_in_ms = wait.as_millis() as u64,
                    "not subscribed to release announcements; retrying"
                );
            })
            .await;
        tracing::debug!("subscribed to release announcements");
        if let Err(broadcast::error::RecvError::Closed) = reconnects.recv().await {
            return;
        }
    }
}

/// One SUBSCRIBE to both channels (Redis accepts or refuses it whole), confirmed by a
/// probe with a fresh value coming back on the probe channel.
async fn confirmed_subscription(
    subscriber: &SubscriberClient,
    commands: &Client,
    channels: &ReleaseChannels,
    mut probes: watch::Receiver<String>,
) -> anyhow::Result<()> {
    subscriber
        .subscribe(vec![channels.released.clone(), channels.probe.clone()])
        .await?;
    let probe = format!("{}{:016x}", channels.probe_prefix, rand::random::<u64>());
    let _receivers: i64 = commands.publish(&channels.probe, probe.as_str()).await?;
    tokio::time::timeout(PROBE_WAIT, probes.wait_for(|seen| *seen == probe))
        .await
        .map_err(|_| anyhow::anyhow!("the probe did not come back within {PROBE_WAIT:?}"))?
        .map_err(|_| anyhow::anyhow!("the listener stopped"))?;
    Ok(())
}
