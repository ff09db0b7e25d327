//! The HTTP API (README.md#http-api), served by every replica.
//!
//! Routes match the path before the method, so an unknown path is a 404 and a known
//! path with the wrong method a 405. Handlers return `Result<Response, ApiError>`;
//! every warp rejection goes through [`error::recover`], so no request ever gets a
//! non-JSON error.

mod activity;
mod auth;
mod body;
mod console;
mod error;
mod guard;
mod health;
mod inbound;
mod lanes;
mod messages;
mod messaging;
mod openapi;
mod opt_outs;
mod providers;
mod receipts;
mod reply;
mod serve;
mod webhooks;

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};

pub use error::ApiError;
pub use providers::twilio_signature;
pub use serve::{connection_cap, raise_open_files_limit, serve};

use auth::{authorized, bearer_required};
use reply::{json, respond};

use crate::state::AppState;

type State = Arc<AppState>;

/// Every route of the API.
pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let lanes: Vec<String> = state
        .config
        .plan
        .lanes
        .iter()
        .map(|lane| lane.name.clone())
        .collect();
    let providers: Vec<String> = state
        .config
        .plan
        .providers
        .iter()
        .map(|provider| provider.name.clone())
        .collect();
    let spec = Arc::new(openapi::for_replica(
        state.config.message_max_length,
        &lanes,
        &providers,
    ));
    let open = health::routes(state.clone())
        .or(warp::path!("openapi.json")
            .and(warp::get())
            .map(move || openapi::document(&spec)))
        .unify()
        .or(console::routes())
        .unify();
    // Receipts and inbound messages authenticate on their own (DLR_TOKEN, a provider's
    // signature), so they come before the rest.
    let api = warp::path("api").and(guard::api(state.clone())).and(
        receipts::routes(state.clone())
            .or(providers::routes(state.clone()))
            .unify()
            .or(authorized(state.clone()).and(
                messaging::routes(state.clone())
                    .or(lanes::routes(state.clone()))
                    .unify()
                    .or(activity::routes(state.clone()))
                    .unify()
                    .or(messages::routes(state.clone()))
                    .unify()
                    .or(opt_outs::routes(state.clone()))
                    .unify()
                    .or(webhooks::routes(state.clone()))
                    .unify(),
            ))
            .unify(),
    );
    let metrics = state.metrics.clone();
    open.or(api)
        .unify()
        .or(method_not_allowed())
        .unify()
        .recover(error::recover)
        .unify()
        .with(warp::log::custom(move |info| {
            let route = openapi::route_template(info.path())
                .or_else(|| console::route_template(info.path()))
                .unwrap_or("unmatched");
            let method = info.method().as_str();
            metrics
                .http_requests
                .with_label_values(&[method, route, info.status().as_str()])
                .inc();
            metrics
                .http_request_duration
                .with_label_values(&[method, route])
                .observe(info.elapsed().as_secs_f64());
            tracing::debug!(
                method,
                path = info.path(),
                status = info.status().as_u16(),
                elapsed_ms = info.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }))
        .map(Reply::into_response)
        .boxed()
}

/// The last route: a documented path asked with a method it does not take gets 405
/// with the `Allow` header (RFC 9110). Anything else falls through, so the other
/// routes' own rejections (bad body, missing token, …) still decide the answer.
fn method_not_allowed() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path::full().and(warp::method()).and_then(
        |path: warp::path::FullPath, method: warp::http::Method| async move {
            let mut allowed = openapi::allowed_methods(path.as_str());
            allowed.extend(console::allowed_methods(path.as_str()));
            if allowed.is_empty() || allowed.iter().any(|m| m == method.as_str()) {
                return Err(warp::reject::not_found());
            }
            let mut response = ApiError::MethodNotAllowed.into_response();
            if let Ok(value) = warp::http::HeaderValue::from_str(&allowed.join(", ")) {
                response
                    .headers_mut()
                    .insert(warp::http::header::ALLOW, value);
            }
            Ok(response)
        },
    )
}

/// Passes the state to a handler.
fn with_state(state: State) -> impl Filter<Extract = (State,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}
