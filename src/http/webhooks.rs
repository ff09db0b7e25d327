//! `/api/webhooks`: status webhooks that were given up on (dead letters) and their
//! replay (docs/operations.md#status-webhooks).

use std::collections::HashMap;

use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::reply::{query_id_cursor, query_limit};
use super::{ApiError, State, json, respond, with_state};
use crate::store::webhooks::Replay;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let failed = warp::path!("webhooks" / "failed")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .then(|state: State, query: HashMap<String, String>| async move {
            respond(failed(state, query)).await
        });
    let replay = warp::path!("webhooks" / i64 / "replay")
        .and(warp::post())
        .and(with_state(state))
        .then(|id: i64, state: State| async move { respond(replay(state, id)).await });
    failed.or(replay).unify().boxed()
}

async fn failed(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let limit = query_limit(&query, DEFAULT_LIMIT, MAX_LIMIT)?;
    let cursor = query_id_cursor(&query)?;
    let (events, next_cursor) = state.store.failed_webhooks(cursor, limit).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"events": events, "next_cursor": next_cursor}),
    ))
}

async fn replay(state: State, id: i64) -> Result<Response, ApiError> {
    match state.store.replay_webhook(id).await? {
        Replay::Replayed(event) => {
            tracing::info!(webhook_id = %event.webhook_id, "status webhook replayed");
            Ok(json(StatusCode::OK, &event))
        }
        Replay::NotFound => Err(ApiError::NotFound(format!(
            "webhook event {id} does not exist"
        ))),
        Replay::NotFailed(status) => Err(ApiError::Conflict(format!(
            "webhook event {id} is {status}; only a failed one is replayed"
        ))),
    }
}
