//! One replica's campaign: which election runs (Redis lease or single-replica mode),
//! one per lane (docs/design.md#lanes), when it starts (once the schema exists), and
//! the listener that turns a leaving leader's announcement into an immediate attempt
//! by the followers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{
    Elector, FenceTiming, Leadership, LeaseTiming, LiveElection, RedisLease, Spread,
    run_redis_elector, run_single_replica,
};
use crate::config::LockConfig;
use crate::metrics::Metrics;
use crate::redis;
use crate::retry::connect_backoff;
use crate::store::{DEFAULT_LANE, Store};

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
    /// Each lane, and this replica's view of its leadership.
    pub lanes: Vec<Arc<Leadership>>,
    pub spread: Arc<Spread>,
    pub metrics: Arc<Metrics>,
}

/// The Redis key of a lane's lease: `DISTRIBUTED_LOCK_KEY` itself for `default`, so a
/// rolling upgrade from a release without lanes keeps one leader.
pub fn lane_lock_key(base: &str, lane: &str) -> String {
    if lane == DEFAULT_LANE {
        base.to_string()
    } else {
        format!("{base}:lane:{lane}")
    }
}

/// A lane's "the leader let the lock go" announcements, from the release listener to
/// the lane's elector, with the announcing replica's id.
#[derive(Default)]
pub struct ReleaseSignal {
    notify: Notify,
    announcer: Mutex<Option<String>>,
}

impl ReleaseSignal {
    pub fn raise(&self, announcer: Option<String>) {
        *self.announcer.lock().unwrap_or_else(|p| p.into_inner()) = announcer;
        self.notify.notify_one();
    }

    /// Waits for the next announcement; the announcer, when it said who it is.
    pub async fn wait(&self) -> Option<String> {
        self.notify.notified().await;
        self.announcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
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
    let lease_of = |lane: &str| {
        RedisLease::new(
            campaign.redis.clone(),
            lane_lock_key(&lock.key, lane),
            lock.ttl,
        )
    };
    let mut electors = Vec::with_capacity(campaign.lanes.len());
    if !lock.enabled {
        for leadership in &campaign.lanes {
            let lane = leadership.lane();
            let span = tracing::info_span!("lane", lane = %lane);
            electors.push(tokio::spawn(
                run_single_replica(
                    LiveElection {
                        lease: lease_of(lane),
                        store: campaign.store.for_lane(lane),
                    },
                    leadership.clone(),
                    campaign.replica_id.clone(),
                    fence,
                    resign.clone(),
                )
                .instrument(span),
            ));
        }
    } else {
        let signals: Vec<(String, Arc<ReleaseSignal>)> = campaign
            .lanes
            .iter()
            .map(|leadership| {
                (
                    lease_of(leadership.lane()).release_channel(),
                    Arc::default(),
                )
            })
            .collect();
        if let Some(subscriber) = campaign.subscriber {
            tasks.spawn(
                listen_for_releases(
                    subscriber,
                    campaign.redis.clone(),
                    signals.iter().cloned().collect(),
                    format!("{}:released:probe", lane_lock_key(&lock.key, DEFAULT_LANE)),
                    shutdown,
                )
                .in_current_span(),
            );
        }
        for (leadership, (_, released)) in campaign.lanes.iter().zip(signals) {
            let lane = leadership.lane();
            let elector = Elector {
                backend: LiveElection {
                    lease: lease_of(lane),
                    store: campaign.store.for_lane(lane),
                },
                lane: lane.to_string(),
                timing: LeaseTiming {
                    ttl: lock.ttl,
                    retry_interval: lock.retry_interval,
                },
                leadership: leadership.clone(),
                metrics: campaign.metrics.clone(),
                replica_id: campaign.replica_id.clone(),
                released,
                fence,
                spread: campaign.spread.clone(),
            };
            let span = tracing::info_span!("lane", lane = %lane);
            electors.push(tokio::spawn(
                run_redis_elector(elector, resign.clone()).instrument(span),
            ));
        }
    }
    for elector in electors {
        let _ = elector.await;
    }
}

/// The lanes' release channels, and the channel a replica checks its subscription on.
struct ReleaseChannels {
    released: HashMap<String, Arc<ReleaseSignal>>,
    probe: String,
    /// Starts this listener's probes; other replicas' probes on the channel are ignored.
    probe_prefix: String,
}

/// How long a probe may take to come back before the subscription counts as missing.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Forwards "leader released the lock" announcements to the lanes' electors. `probe`
/// is the default lane's probe channel (`<key>:released:probe`), as before lanes.
async fn listen_for_releases(
    subscriber: SubscriberClient,
    commands: Client,
    released: HashMap<String, Arc<ReleaseSignal>>,
    probe: String,
    shutdown: CancellationToken,
) {
    if !redis::connect(&subscriber, "subscriber", &shutdown).await {
        return;
    }
    let channels = ReleaseChannels {
        probe,
        released,
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
                Ok(message) => {
                    if let Some(signal) = channels.released.get(&*message.channel) {
                        signal.raise(message.value.as_string());
                    }
                }
                // Announcements were lost: every lane tries at once.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for signal in channels.released.values() {
                        signal.raise(None);
                    }
                }
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
    let mut names: Vec<String> = channels.released.keys().cloned().collect();
    names.push(channels.probe.clone());
    subscriber.subscribe(names).await?;
    let probe = format!("{}{:016x}", channels.probe_prefix, rand::random::<u64>());
    let _receivers: i64 = commands.publish(&channels.probe, probe.as_str()).await?;
    tokio::time::timeout(PROBE_WAIT, probes.wait_for(|seen| *seen == probe))
        .await
        .map_err(|_| anyhow::anyhow!("the probe did not come back within {PROBE_WAIT:?}"))?
        .map_err(|_| anyhow::anyhow!("the listener stopped"))?;
    Ok(())
}
