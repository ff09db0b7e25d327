//! Probes of the dependencies (PostgreSQL, Redis): what `/health`, readiness and
//! `dispatcher_dependency_up` report. The routes that serve them are `http::health`.

use std::time::Duration;

use fred::prelude::*;
use serde::Serialize;

use crate::metrics::Metrics;
use crate::store::Store;

const REDIS_PING_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Unhealthy,
}

impl From<bool> for Status {
    fn from(up: bool) -> Self {
        if up { Self::Healthy } else { Self::Unhealthy }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Dependencies {
    pub database: Status,
    pub redis: Status,
}

/// Checks both dependencies now (concurrently, each bounded) and updates the gauges.
pub async fn check(store: &Store, redis: &Client, metrics: &Metrics) -> Dependencies {
    let database = async { store.ping().await.is_ok() };
    let redis = async {
        if !redis.is_connected() {
            return false;
        }
        let ping = redis.ping::<String>(None);
        matches!(
            tokio::time::timeout(REDIS_PING_TIMEOUT, ping).await,
            Ok(Ok(_))
        )
    };
    let (database, redis) = tokio::join!(database, redis);
    metrics.set_dependency("database", database);
    metrics.set_dependency("redis", redis);
    Dependencies {
        database: database.into(),
        redis: redis.into(),
    }
}
