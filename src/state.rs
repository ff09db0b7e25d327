//! What the HTTP handlers and the replica's background tasks share: one value per
//! replica, built by `app::Replica::build`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fred::prelude::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::DeliveryCache;
use crate::config::Config;
use crate::leadership::Leadership;
use crate::metrics::Metrics;
use crate::store::Schedule;
use crate::store::Store;

/// How often a replica checks its dependencies and refreshes its registry heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A replica whose heartbeat is older than this is not listed as live.
pub const LIVE_WITHIN: Duration = Duration::from_secs(10);

/// What the HTTP handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub redis: Client,
    pub cache: DeliveryCache,
    pub leadership: Arc<Leadership>,
    pub metrics: Arc<Metrics>,
    /// Set once migrations are applied (or found applied) and AUTO_START is settled.
    pub schema_ready: AtomicBool,
    /// Cancelled when shutdown begins; readiness answers 503 from then on.
    pub shutdown: CancellationToken,
    /// Pokes the dispatcher (new messages, start, config change).
    pub wake: Arc<Notify>,
}

impl AppState {
    /// The batch size and interval in force: configured values unless overridden.
    pub fn configured_schedule(&self) -> Schedule {
        Schedule {
            batch_size: self.config.dispatch.batch_size,
            interval: self.config.dispatch.interval,
        }
    }
}
