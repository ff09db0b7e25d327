//! Cluster-wide control: start, stop, status and runtime configuration. The state is
//! stored in PostgreSQL, so any replica can be asked and whichever leads obeys.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{ApiError, State, body, json, respond, with_state};
use crate::config::MAX_BATCH_SIZE;
use crate::duration;
use crate::leadership::FenceTiming;
use crate::spend::Micros;
use crate::state::LIVE_WITHIN;
use crate::state::Lane;
use crate::store::{ControlRecord, OverrideChange};

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let start = warp::path!("messaging" / "start")
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|state: State| async move { respond(set_running(state, true)).await });
    let stop = warp::path!("messaging" / "stop")
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|state: State| async move { respond(set_running(state, false)).await });
    let status = warp::path!("messaging" / "status")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state: State| async move { respond(status(state)).await });
    let config = warp::path!("messaging" / "config")
        .and(warp::put())
        .and(with_state(state))
        .and(body::json_bytes())
        .then(|state: State, body: Bytes| async move { respond(update_config(state, body)).await });
    start
        .or(stop)
        .unify()
        .or(status)
        .unify()
        .or(config)
        .unify()
        .boxed()
}

async fn set_running(state: State, running: bool) -> Result<Response, ApiError> {
    let by = format!("api@{}", state.config.replica_id);
    let changed = state.store.set_running(running, &by).await?;
    state.wake_all();
    if !running {
        // Answer only once the leader can start nothing more (see `FenceTiming`).
        let fence = FenceTiming::for_lease(state.config.lock.ttl);
        tokio::time::sleep(fence.stop_settles_after()).await;
    }
    state.metrics.scheduler_running.set(i64::from(running));
    let (status, message) = match (running, changed) {
        (true, true) => (
            "started",
            "message processing started for the whole cluster",
        ),
        (true, false) => ("running", "message processing was already running"),
        (false, true) => (
            "stopped",
            "message processing stopped for the whole cluster; no new send starts",
        ),
        (false, false) => ("stopped", "message processing was already stopped"),
    };
    tracing::info!(running, changed, "desired state set through the API");
    Ok(json(
        StatusCode::OK,
        &json!({"status": status, "message": message}),
    ))
}

/// The schedule in force, the configured (environment) values, and each override
/// stored in PostgreSQL with who set it and when: an override shadows the
/// environment, and the operator should see that, not guess it.
pub(super) fn schedule_json(lane: &Lane, control: &ControlRecord) -> Value {
    let configured = lane.configured_schedule();
    let schedule = configured.overridden_by(control);
    let cap = lane.daily_spend_cap(control);
    json!({
        "daily_spend_cap": cap.map(Micros::units),
        "batch_size": schedule.batch_size,
        "processing_interval": duration::format(schedule.interval),
        "processing_interval_ms": schedule.interval.as_millis() as u64,
        "configured": {
            "batch_size": configured.batch_size,
            "processing_interval": duration::format(configured.interval),
            "daily_spend_cap": lane.spec.daily_spend_cap.map(Micros::units),
        },
        "overrides": {
            "batch_size": control.batch_size,
            "processing_interval": control.interval.map(duration::format),
            "batch_size_set": control.batch_size.and(control.batch_size_set.as_ref()),
            "processing_interval_set": control.interval.and(control.interval_set.as_ref()),
            "daily_spend_cap": control.daily_spend_cap.map(Micros::units),
            "daily_spend_cap_set": control.daily_spend_cap.and(control.daily_spend_cap_set.as_ref()),
        },
        "updated_at": control.updated_at,
        "updated_by": control.updated_by,
    })
}

async fn status(state: State) -> Result<Response, ApiError> {
    let control = state.store.control_record().await?;
    let leader = state.store.leader_record().await?;
    let replicas = state.store.live_replicas(LIVE_WITHIN).await?;
    let schedule = state.configured_schedule().overridden_by(&control);
    let next_batch_at: Option<DateTime<Utc>> = control.running.then(|| {
        let interval =
            chrono::Duration::from_std(schedule.interval).unwrap_or(chrono::Duration::MAX);
        let next = leader
            .last_batch_at
            .map_or_else(Utc::now, |last| last + interval);
        next.max(Utc::now())
    });
    let leader_alive = leader
        .holder
        .as_ref()
        .is_some_and(|holder| replicas.iter().any(|r| &r.replica_id == holder));
    let term = state.default_lane().leadership.current();
    Ok(json(
        StatusCode::OK,
        &json!({
            "running": control.running,
            "paused_reason": control.paused.as_ref().map(|p| p.reason.as_str()),
            "paused": control.paused,
            "leader": leader.holder.as_ref().map(|holder| json!({
                "replica_id": holder,
                "epoch": leader.epoch,
                "since": leader.acquired_at,
                "alive": leader_alive,
            })),
            "last_batch_at": leader.last_batch_at,
            "next_batch_at": next_batch_at,
            "batch_size": schedule.batch_size,
            "processing_interval": duration::format(schedule.interval),
            "processing_interval_ms": schedule.interval.as_millis() as u64,
            "config": schedule_json(state.default_lane(), &control),
            "this_replica": {
                "replica_id": state.config.replica_id,
                "eligible": state.config.leader_eligible,
                "leader": term.is_some(),
                "epoch": term.map(|t| t.epoch.0),
            },
            "replicas": replicas,
        }),
    ))
}

/// `PUT /api/messaging/config`: `{"batch_size": 5, "processing_interval": "30s",
/// "daily_spend_cap": 80}`.
/// A field set to `null` clears the override (back to the configured value).
async fn update_config(state: State, body: Bytes) -> Result<Response, ApiError> {
    let change = body::parse::<ConfigChange>(&body)?.validate()?;
    enforceable(&state, state.default_lane(), &change)?;
    let by = format!("api@{}", state.config.replica_id);
    let control = state.store.set_overrides(&change, &by).await?;
    state.default_lane().wake.notify_one();
    tracing::info!(?change, "runtime configuration changed through the API");
    Ok(json(
        StatusCode::OK,
        &schedule_json(state.default_lane(), &control),
    ))
}

/// A spend cap set at run time must be one the lane can hold: every provider it sends
/// through needs a price for every country it sends to, as the configuration requires
/// of a configured cap (docs/design.md#spend-caps).
pub(super) fn enforceable(
    state: &State,
    lane: &Lane,
    change: &OverrideChange,
) -> Result<(), ApiError> {
    if !matches!(change.daily_spend_cap, Some(Some(_))) {
        return Ok(());
    }
    let unpriced: Vec<&str> = lane
        .spec
        .providers
        .iter()
        .filter(|name| {
            !state
                .config
                .plan
                .provider(name)
                .and_then(|p| p.prices.as_ref())
                .is_some_and(|p| p.covers(&lane.spec.countries))
        })
        .map(String::as_str)
        .collect();
    if unpriced.is_empty() {
        return Ok(());
    }
    Err(ApiError::validation(
        "daily_spend_cap",
        format!(
            "daily_spend_cap cannot be held by lane {:?}: provider(s) {} have no price_per_segment \
             for every country the lane sends to (set one in DISPATCH_CONFIG)",
            lane.spec.name,
            unpriced.join(", ")
        ),
    ))
}

/// The body of `PUT /api/messaging/config`. Each field: absent = unchanged, `null` =
/// back to the configured value, a value = the new override.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigChange {
    #[serde(default, deserialize_with = "present")]
    batch_size: Option<Option<serde_json::Number>>,
    #[serde(default, deserialize_with = "present")]
    processing_interval: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    daily_spend_cap: Option<Option<f64>>,
}

/// A field that is present: `null` becomes `Some(None)`, where a plain `Option`
/// would not tell it from an absent field.
fn present<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ConfigChange {
    pub(super) fn validate(self) -> Result<OverrideChange, ApiError> {
        let check = |name: &'static str, problem: String| {
            ApiError::validation(name, format!("{name} {problem}"))
        };
        let change = OverrideChange {
            batch_size: self
                .batch_size
                .map(|value| value.map(|n| parse_batch_size(&n)).transpose())
                .transpose()
                .map_err(|problem| check("batch_size", problem))?,
            interval: self
                .processing_interval
                .map(|value| value.map(|text| parse_interval(&text)).transpose())
                .transpose()
                .map_err(|problem| check("processing_interval", problem))?,
            daily_spend_cap: self
                .daily_spend_cap
                .map(|value| value.map(Micros::from_units).transpose())
                .transpose()
                .map_err(|problem| check("daily_spend_cap", format!("is {problem}")))?,
        };
        if change.batch_size.is_none()
            && change.interval.is_none()
            && change.daily_spend_cap.is_none()
        {
            return Err(ApiError::validation(
                "body",
                "nothing to change; send batch_size, processing_interval and/or daily_spend_cap",
            ));
        }
        Ok(change)
    }
}

fn parse_batch_size(value: &serde_json::Number) -> Result<u32, String> {
    // JSON has one number type: 5.0 is the integer 5, as JSON Schema says too.
    let whole = value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    });
    whole
        .filter(|n| (1..=u64::from(MAX_BATCH_SIZE)).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| format!("must be an integer from 1 to {MAX_BATCH_SIZE}"))
}

/// An interval the fence row can hold exactly: whole milliseconds. `0s` means back to
/// back (the rate is the batch size per claim); anything between 0 and 1 ms would be
/// stored as 0 and lift the rate limit, so it is refused with the rest.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = duration::parse(text).map_err(|problem| format!("is invalid: {problem}"))?;
    if interval.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "is {text:?}: give a whole number of milliseconds (like \"250ms\"); the rate is kept to the millisecond"
        ));
    }
    Ok(interval)
}
