//! Open routes: health, readiness, liveness, version and metrics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use super::{State, json, with_state};
use crate::dependencies::{self, Status};
use crate::version::BUILD;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let health = warp::path!("health")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(health);
    let live = warp::path!("health" / "live")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &json!({"status": "alive"})));
    let ready = warp::path!("health" / "ready")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(ready);
    let version = warp::path!("version")
        .and(warp::get())
        .map(|| json(StatusCode::OK, &BUILD));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .then(metrics);
    health
        .or(live)
        .unify()
        .or(ready)
        .unify()
        .or(version)
        .unify()
        .or(metrics)
        .unify()
        .boxed()
}

/// Overall health: `unhealthy` (503) only when PostgreSQL is down, since nothing can
/// be dispatched or recorded without it; `degraded` when Redis is down (no leader can
/// be proven, the API still works) or dispatch is paused (`paused_reason`: the
/// provider refuses our credentials).
async fn health(state: State) -> Response {
    let deps = dependencies::check(&state.store, &state.redis, &state.metrics).await;
    let (status, code) = match deps {
        dependencies::Dependencies {
            database: Status::Unhealthy,
            ..
        } => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
        dependencies::Dependencies {
            redis: Status::Unhealthy,
            ..
        } => ("degraded", StatusCode::OK),
        _ => ("healthy", StatusCode::OK),
    };
    let running = state.metrics.scheduler_running.get() == 1;
    // Kept from PostgreSQL by every replica's housekeeping (and at once by the leader).
    let paused_reason = crate::metrics::PAUSE_REASONS.into_iter().find(|reason| {
        state
            .metrics
            .dispatch_paused
            .with_label_values(&[reason])
            .get()
            == 1
    });
    let status = match (status, paused_reason) {
        ("healthy", Some(_)) if running => "degraded",
        _ => status,
    };
    json(
        code,
        &json!({
            "status": status,
            "processing_status": if running { "running" } else { "stopped" },
            "paused_reason": paused_reason,
            "leader": state.leads_any(),
            "replica_id": state.config.replica_id,
            "version": BUILD,
            "dependencies": deps,
        }),
    )
}

/// Ready to take traffic: PostgreSQL answers, migrations are applied, and shutdown
/// has not begun.
async fn ready(state: State) -> Response {
    let not_ready = |reason: &str| {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": reason}),
        )
    };
    if state.shutdown.is_cancelled() {
        return not_ready("shutting down");
    }
    if !state.schema_ready.load(Ordering::Acquire) {
        return not_ready("database not migrated or not reachable yet");
    }
    if state.store.ping().await.is_err() {
        state.metrics.set_dependency("database", false);
        return not_ready("database unavailable");
    }
    json(StatusCode::OK, &json!({"status": "ready"}))
}

/// Prometheus text format. Queue gauges are read from PostgreSQL at scrape time
/// (bounded), as are the dependency gauges; if PostgreSQL does not answer, the last
/// queue values stay and `dependency_up` says why.
async fn metrics(state: State) -> Response {
    dependencies::check(&state.store, &state.redis, &state.metrics).await;
    if state.schema_ready.load(Ordering::Acquire) {
        if let Ok(Ok(stats)) =
            tokio::time::timeout(Duration::from_secs(2), state.store.queue_stats()).await
        {
            for status in crate::domain::MessageStatus::ALL {
                let count = stats
                    .counts
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                state
                    .metrics
                    .queue_messages
                    .with_label_values(&[status.as_str()])
                    .set(count);
            }
            state.metrics.oldest_pending_age.set(
                stats
                    .oldest_pending_age
                    .map_or(0.0, |age| age.as_secs_f64()),
            );
            for (priority, age) in &stats.oldest_pending_age_by_priority {
                state
                    .metrics
                    .oldest_pending_age_by_priority
                    .with_label_values(&[&priority.to_string()])
                    .set(age.map_or(0.0, |age| age.as_secs_f64()));
            }
        }
        if let Ok(Ok(age)) =
            tokio::time::timeout(Duration::from_secs(2), state.store.oldest_transaction_age()).await
        {
            state.metrics.oldest_transaction_age.set(age.max(0));
        }
        let spend = tokio::time::timeout(Duration::from_secs(2), state.store.spend_today()).await;
        for lane in &state.lanes {
            let name = lane.spec.name.as_str();
            if let Ok(Ok(control)) =
                tokio::time::timeout(Duration::from_secs(2), lane.store.control_record()).await
            {
                let schedule = lane.configured_schedule().overridden_by(&control);
                state
                    .metrics
                    .configured_rate
                    .with_label_values(&[name])
                    .set(schedule.rate_per_second());
                for reason in crate::metrics::PAUSE_REASONS {
                    let paused = control.paused.as_ref().is_some_and(|p| p.reason == reason);
                    state
                        .metrics
                        .lane_paused
                        .with_label_values(&[name, reason])
                        .set(i64::from(paused));
                }
                match lane.daily_spend_cap(&control) {
                    Some(cap) => state
                        .metrics
                        .lane_spend_cap
                        .with_label_values(&[name])
                        .set(cap.units()),
                    None => {
                        let _ = state.metrics.lane_spend_cap.remove_label_values(&[name]);
                    }
                }
            }
            if let Ok(Ok(spend)) = &spend {
                state
                    .metrics
                    .lane_spend_today
                    .with_label_values(&[name])
                    .set(crate::store::spend::lane_total(spend, name).units());
            }
        }
    }
    warp::reply::with_header(
        state.metrics.render(),
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response()
}
