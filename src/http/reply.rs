//! Turning a handler's result into a response: JSON with a status, and the bound on
//! how long a handler may take.

use std::time::Duration;

use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use super::ApiError;

/// `limit` from a query string: `default` when absent, else an integer from 1 to `max`
/// (a 400 naming the bounds otherwise).
pub(super) fn query_limit(
    query: &std::collections::HashMap<String, String>,
    default: i64,
    max: i64,
) -> Result<i64, ApiError> {
    match query.get("limit") {
        None => Ok(default),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be an integer from 1 to {max}"))
            }),
    }
}

/// An id `cursor` from a query string (a listing's `next_cursor`), if given.
pub(super) fn query_id_cursor(
    query: &std::collections::HashMap<String, String>,
) -> Result<Option<i64>, ApiError> {
    query
        .get("cursor")
        .map(|text| {
            text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::bad_request("cursor must be a positive integer (a next_cursor value)")
            })
        })
        .transpose()
}

/// A JSON response with a status.
pub(super) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// How long an API handler may take. PostgreSQL that stops answering (a stalled
/// network path) must not hold a client forever: it gets a 503 and can retry.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a handler (bounded by [`HANDLER_TIMEOUT`]) and turns its result into a
/// response.
pub(super) async fn respond(handler: impl Future<Output = Result<Response, ApiError>>) -> Response {
    match tokio::time::timeout(HANDLER_TIMEOUT, handler).await {
        Ok(result) => result.unwrap_or_else(ApiError::into_response),
        Err(_) => ApiError::Unavailable(format!(
            "PostgreSQL did not answer within {}s; try again shortly",
            HANDLER_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}
