//! The lanes (docs/design.md#lanes): each lane's leader, schedule, queue and providers,
//! and per-lane start, stop and runtime configuration. Like the cluster-wide control,
//! the state lives in PostgreSQL, so any replica can be asked.

use bytes::Bytes;
use serde_json::{Value, json};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::messaging::{ConfigChange, enforceable, schedule_json};
use super::{ApiError, State, body, json, respond, with_state};
use crate::duration;
use crate::leadership::FenceTiming;
use crate::state::{LIVE_WITHIN, Lane};
use crate::store::LaneCounts;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let list = warp::path!("lanes")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state: State| async move { respond(list(state)).await });
    let start =
        warp::path!("lanes" / String / "start")
            .and(warp::post())
            .and(with_state(state.clone()))
            .then(|name: String, state: State| async move {
                respond(set_running(state, name, true)).await
            });
    let stop = warp::path!("lanes" / String / "stop")
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|name: String, state: State| async move {
            respond(set_running(state, name, false)).await
        });
    let config = warp::path!("lanes" / String / "config")
        .and(warp::put())
        .and(with_state(state))
        .and(body::json_bytes())
        .then(|name: String, state: State, body: Bytes| async move {
            respond(update_config(state, name, body)).await
        });
    list.or(start)
        .unify()
        .or(stop)
        .unify()
        .or(config)
        .unify()
        .boxed()
}

fn lane<'a>(state: &'a State, name: &str) -> Result<&'a Lane, ApiError> {
    state
        .lane(name)
        .ok_or_else(|| ApiError::NotFound(format!("there is no lane {name:?}")))
}

/// `GET /api/lanes`.
async fn list(state: State) -> Result<Response, ApiError> {
    let all_counts = state.store.lane_counts().await?;
    let spend = state.store.spend_today().await?;
    let replicas = state.store.live_replicas(LIVE_WITHIN).await?;
    let mut lanes = Vec::with_capacity(state.lanes.len());
    for lane in &state.lanes {
        let control = lane.store.control_record().await?;
        let leader = lane.store.leader_record().await?;
        let counts = all_counts
            .iter()
            .find(|c| c.lane == lane.spec.name)
            .cloned()
            .unwrap_or_default();
        let spent = crate::store::spend::lane_total(&spend, &lane.spec.name);
        lanes.push(lane_json(
            &state, lane, &control, &leader, &counts, &replicas, spent,
        ));
    }
    // Messages waiting in a lane the configuration no longer names are sent by nobody
    // until the lane comes back or they are moved: say so, never hide them.
    let unconfigured: Vec<Value> = all_counts
        .iter()
        .filter(|c| state.lane(&c.lane).is_none() && c.pending + c.sending > 0)
        .map(|c| json!({"name": c.lane, "pending": c.pending, "sending": c.sending}))
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "lanes": lanes, "unconfigured": unconfigured }),
    ))
}

fn lane_json(
    state: &State,
    lane: &Lane,
    control: &crate::store::ControlRecord,
    leader: &crate::store::LeaderRecord,
    counts: &LaneCounts,
    replicas: &[crate::store::ReplicaRecord],
    spent_today: crate::spend::Micros,
) -> Value {
    let spec = &lane.spec;
    let schedule = lane.configured_schedule().overridden_by(control);
    // A holder whose replica is gone from the registry is no leader.
    let leader_alive = leader
        .holder
        .as_ref()
        .is_some_and(|holder| replicas.iter().any(|r| &r.replica_id == holder));
    // The leader's breakers and throttles as of its last batch (docs/design.md#failover);
    // a cooldown that has ended since reads as half-open.
    let reported = |name: &str| -> Option<&Value> {
        leader
            .routing
            .as_ref()?
            .get("providers")?
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
    };
    let now = chrono::Utc::now();
    let providers: Vec<Value> = spec
        .providers
        .iter()
        .filter_map(|name| state.config.plan.provider(name))
        .map(|provider| {
            let report = reported(&provider.name);
            let until = |key: &str| {
                report
                    .and_then(|r| r[key].as_str())
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .filter(|t| *t > now)
            };
            let open_until = until("open_until");
            let state = match report.and_then(|r| r["state"].as_str()) {
                Some("open") if open_until.is_none() => "half_open",
                Some(state @ ("open" | "half_open")) => state,
                _ => "closed",
            };
            json!({
                "name": provider.name,
                "kind": provider.kind.as_str(),
                "state": state,
                "open_until": open_until,
                "throttled_until": until("throttled_until"),
                "failures_in_a_row": report.and_then(|r| r["failures_in_a_row"].as_u64()).unwrap_or(0),
                "failure_share": report.and_then(|r| r["failure_share"].as_f64()).unwrap_or(0.0),
            })
        })
        .collect();
    let rate_factor = leader
        .routing
        .as_ref()
        .and_then(|r| r["rate_factor"].as_f64())
        .unwrap_or(1.0);
    json!({
        "name": spec.name,
        "leader": (leader_alive && leader.epoch > 0).then(|| json!({
            "replica_id": leader.holder,
            "epoch": leader.epoch,
            "since": leader.acquired_at,
        })),
        "assigned_to": state.spread.assignee(&spec.name),
        "running": control.running,
        "paused_reason": control.paused.as_ref().map(|p| p.reason.as_str()),
        "batch_size": schedule.batch_size,
        "interval": duration::format(schedule.interval),
        "interval_ms": schedule.interval.as_millis() as u64,
        "unit": spec.unit.as_str(),
        "send_concurrency": spec.send_concurrency,
        "countries": spec.countries,
        "quiet_hours": spec.quiet_hours.map(|q| q.to_string()),
        "spend_today": spent_today.units(),
        "daily_spend_cap": lane.daily_spend_cap(control).map(crate::spend::Micros::units),
        "configured_rate_per_second": finite(schedule.rate_per_second()),
        "effective_rate_per_second": finite(schedule.rate_per_second() * rate_factor),
        "rate_factor": rate_factor,
        "achieved_rate_per_second": counts.sent_last_minute as f64 / 60.0,
        "pending": counts.pending,
        "sending": counts.sending,
        "sent_last_minute": counts.sent_last_minute,
        "last_batch_at": leader.last_batch_at,
        "providers": providers,
        "config": schedule_json(lane, control),
    })
}

/// JSON has no infinity: an unlimited rate (interval 0) is `null`.
fn finite(rate: f64) -> Option<f64> {
    rate.is_finite().then_some(rate)
}

/// `POST /api/lanes/{name}/start|stop`.
async fn set_running(state: State, name: String, running: bool) -> Result<Response, ApiError> {
    let lane = lane(&state, &name)?;
    let by = format!("api@{}", state.config.replica_id);
    let changed = lane.store.set_lane_running(running, &by).await?;
    lane.wake.notify_one();
    if !running {
        // Answer only once the lane's leader can start nothing more.
        let fence = FenceTiming::for_lease(state.config.lock.ttl);
        tokio::time::sleep(fence.stop_settles_after()).await;
    }
    let status = match (running, changed) {
        (true, true) => "started",
        (true, false) => "running",
        (false, _) => "stopped",
    };
    tracing::info!(lane = %name, running, changed, "lane's desired state set through the API");
    Ok(json(
        StatusCode::OK,
        &json!({"lane": name, "status": status, "changed": changed}),
    ))
}

/// `PUT /api/lanes/{name}/config`: as `PUT /api/messaging/config`, for one lane.
async fn update_config(state: State, name: String, body: Bytes) -> Result<Response, ApiError> {
    let lane = lane(&state, &name)?;
    let change = body::parse::<ConfigChange>(&body)?.validate()?;
    enforceable(&state, lane, &change)?;
    let by = format!("api@{}", state.config.replica_id);
    let control = lane.store.set_overrides(&change, &by).await?;
    lane.wake.notify_one();
    tracing::info!(lane = %name, ?change, "lane's runtime configuration changed through the API");
    Ok(json(StatusCode::OK, &schedule_json(lane, &control)))
}
