//! What the HTTP handlers and the replica's background tasks share: one value per
//! replica, built by `app::Replica::build`.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fred::prelude::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::DeliveryCache;
use crate::config::{Config, LaneSpec};
use crate::leadership::{Leadership, Spread};
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
    /// The lanes, in the order the configuration names them (docs/design.md#lanes).
    pub lanes: Vec<Lane>,
    /// Which replica should lead which lane.
    pub spread: Arc<Spread>,
    pub metrics: Arc<Metrics>,
    /// Set once migrations are applied (or found applied) and AUTO_START is settled.
    pub schema_ready: AtomicBool,
    /// Cancelled when shutdown begins; readiness answers 503 from then on.
    pub shutdown: CancellationToken,
}

/// One lane as this replica serves it.
pub struct Lane {
    pub spec: LaneSpec,
    /// The store acting on this lane's fence and control rows.
    pub store: Store,
    pub leadership: Arc<Leadership>,
    /// Pokes the lane's dispatcher (new messages, start, config change).
    pub wake: Arc<Notify>,
}

impl Lane {
    /// The configured schedule (before runtime overrides).
    pub fn configured_schedule(&self) -> Schedule {
        Schedule {
            batch_size: self.spec.batch_size,
            interval: self.spec.interval,
            unit: self.spec.unit,
        }
    }

    /// The daily spend cap in force: the operator's override over the configured one
    /// (docs/design.md#spend-caps).
    pub fn daily_spend_cap(
        &self,
        control: &crate::store::ControlRecord,
    ) -> Option<crate::spend::Micros> {
        control.daily_spend_cap.or(self.spec.daily_spend_cap)
    }
}

impl AppState {
    pub fn lane(&self, name: &str) -> Option<&Lane> {
        self.lanes.iter().find(|lane| lane.spec.name == name)
    }

    /// The lane `default`, which every configuration has; `/api/messaging/config` and
    /// the status's schedule are its.
    pub fn default_lane(&self) -> &Lane {
        self.lane(crate::store::DEFAULT_LANE)
            .or(self.lanes.first())
            .expect("the configuration always has the default lane")
    }

    /// The default lane's configured schedule.
    pub fn configured_schedule(&self) -> Schedule {
        self.default_lane().configured_schedule()
    }

    /// Pokes every lane's dispatcher.
    pub fn wake_all(&self) {
        for lane in &self.lanes {
            lane.wake.notify_one();
        }
    }

    /// Whether this replica leads any lane now.
    pub fn leads_any(&self) -> bool {
        self.lanes
            .iter()
            .any(|lane| lane.leadership.current().is_some())
    }
}
