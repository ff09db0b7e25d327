//! The HTTP API (README.md#http-api), served by every replica.
//!
//! Routes match the path before the method, so an unknown path is a 404 and a known
//! path with the wrong method a 405. Handlers return `Result<Response, ApiError>`;
//! every warp rejection goes through [`error::recover`], so no request ever gets a
//! non-JSON error.

mod activity;
mod body;
mod console;
mod error;
mod guard;
mod health;
mod messages;
mod messaging;
mod openapi;
mod receipts;
mod serve;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

pub use error::ApiError;
pub use serve::{connection_cap, raise_open_files_limit, serve};

use crate::state::AppState;

type State = Arc<AppState>;

/// Every route of the API.
pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let max_content_chars = state.config.message_max_length;
    let open = health::routes(state.clone())
        .or(warp::path!("openapi.json")
            .and(warp::get())
            .map(move || openapi::document(max_content_chars)))
        .unify()
        .or(console::routes())
        .unify();
    // Receipts authenticate on their own (DLR_TOKEN), so they come before the rest.
    let api = warp::path("api").and(guard::api(state.clone())).and(
        receipts::routes(state.clone())
            .or(authorized(state.clone()).and(
                messaging::routes(state.clone())
                    .or(activity::routes(state.clone()))
                    .unify()
                    .or(messages::routes(state.clone()))
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

/// A JSON response with a status.
fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// How long an API handler may take. PostgreSQL that stops answering (a stalled
/// network path) must not hold a client forever: it gets a 503 and can retry.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a handler (bounded by [`HANDLER_TIMEOUT`]) and turns its result into a
/// response.
async fn respond(handler: impl Future<Output = Result<Response, ApiError>>) -> Response {
    match tokio::time::timeout(HANDLER_TIMEOUT, handler).await {
        Ok(result) => result.unwrap_or_else(ApiError::into_response),
        Err(_) => ApiError::Unavailable(format!(
            "PostgreSQL did not answer within {}s; try again shortly",
            HANDLER_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// When `API_TOKEN` is set, requires `Authorization: Bearer <token>`.
fn authorized(state: State) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    bearer_required(state, |config| config.api_token.as_ref())
}

/// Requires `Authorization: Bearer <token>` when `token` names one (open otherwise),
/// compared so that the time taken tells nothing of the token ([`tokens_match`]).
fn bearer_required(
    state: State,
    token: fn(&crate::config::Config) -> Option<&crate::config::Secret>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(with_state(state))
        .and_then(move |header: Option<String>, state: State| async move {
            let Some(token) = token(&state.config) else {
                return Ok(());
            };
            let presented = header.as_deref().and_then(bearer_token).unwrap_or("");
            if tokens_match(presented.as_bytes(), token.expose().as_bytes()) {
                Ok(())
            } else {
                Err(warp::reject::custom(ApiError::Unauthorized))
            }
        })
        .untuple_one()
}

/// The token of an `Authorization: Bearer <token>` header. The scheme name is
/// case-insensitive (RFC 7235); the token is taken as it is.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether a presented token is the expected one, in a time that depends on neither
/// token's content nor on the expected one's length: both are hashed (SHA-256) and
/// the fixed-size digests compared without an early exit. Comparing the tokens
/// themselves would return at once on a length mismatch, telling an attacker the
/// token's length.
fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    use aws_lc_rs::digest::{SHA256, digest};
    let (a, b) = (digest(&SHA256, presented), digest(&SHA256, expected));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, tokens_match};

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"secret", b"secret"));
        assert!(!tokens_match(b"secret", b"secreT"));
        assert!(!tokens_match(b"secret", b"secret!"));
        assert!(!tokens_match(b"secre", b"secret"));
        assert!(!tokens_match(b"", b"secret"));
        assert!(tokens_match(b"", b""));
    }
}
