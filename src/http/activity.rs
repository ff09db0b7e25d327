//! `GET /api/messages/activity?minutes=15`: sent, failed and retried per second, the
//! operator console's chart (see `dispatch::activity` for how it is written).

use std::collections::HashMap;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{ApiError, State, json, respond, with_state};
use crate::store::activity::KEEP_MINUTES;

const DEFAULT_MINUTES: u32 = 15;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("messages" / "activity")
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<HashMap<String, String>>())
        .then(|state: State, query: HashMap<String, String>| async move {
            respond(activity(state, query)).await
        })
        .boxed()
}

fn minutes(query: &HashMap<String, String>) -> Result<u32, ApiError> {
    match query.get("minutes") {
        None => Ok(DEFAULT_MINUTES),
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=KEEP_MINUTES).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "minutes must be an integer from 1 to {KEEP_MINUTES}"
                ))
            }),
    }
}

async fn activity(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let minutes = minutes(&query)?;
    Ok(json(StatusCode::OK, &state.store.activity(minutes).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_bounded() {
        let query = |v: &str| HashMap::from([("minutes".to_string(), v.to_string())]);
        assert_eq!(minutes(&HashMap::new()).ok(), Some(15));
        assert_eq!(minutes(&query("1")).ok(), Some(1));
        assert_eq!(minutes(&query("60")).ok(), Some(60));
        for bad in ["0", "61", "-1", "1.5", "", "x"] {
            assert!(minutes(&query(bad)).is_err(), "{bad:?}");
        }
    }
}
