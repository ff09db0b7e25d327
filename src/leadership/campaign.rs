//! One replica's campaign: which election runs (Redis lease or single-replica mode),
//! when it starts (once the schema exists), and the listener that turns a leaving
//! leader's announcement into an immediate attempt by the followers.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{
    Elector, FenceTiming, Leadership, LeaseTiming, RedisLease, run_redis_elector,
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
            campaign.store,
            campaign.leadership,
            campaign.replica_id,
            fence,
            resign,
        )
        .await;
        return;
    }
    let lease = RedisLease::new(campaign.redis, lock.key.clone(), lock.ttl);
    let released = Arc::new(Notify::new());
    if let Some(subscriber) = campaign.subscriber {
        tasks.spawn(
            listen_for_releases(
                subscriber,
                lease.release_channel(),
                released.clone(),
                shutdown,
            )
            .in_current_span(),
        );
    }
    let elector = Elector {
        lease,
        timing: LeaseTiming {
            ttl: lock.ttl,
            retry_interval: lock.retry_interval,
        },
        store: campaign.store,
        leadership: campaign.leadership,
        metrics: campaign.metrics,
        replica_id: campaign.replica_id,
        released,
        fence,
    };
    run_redis_elector(elector, resign).await;
}

/// Forwards "leader released the lock" announcements to the elector.
async fn listen_for_releases(
    subscriber: SubscriberClient,
    channel: String,
    released: Arc<Notify>,
    shutdown: CancellationToken,
) {
    if !redis::connect(&subscriber, "subscriber", &shutdown).await {
        return;
    }
    let _resubscriber = subscriber.manage_subscriptions();
    let mut messages = subscriber.message_rx();
    let subscribe = || subscriber.subscribe(channel.clone());
    let subscribed = tokio::select! {
        result = subscribe.retry(connect_backoff()) => result.is_ok(),
        () = shutdown.cancelled() => false,
    };
    if !subscribed {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            message = messages.recv() => match message {
                Ok(_) => released.notify_one(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => released.notify_one(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), subscriber.quit()).await;
}
