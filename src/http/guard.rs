//! What every `/api` request passes before its route.
//!
//! - **The schema is ready.** While the replica applies migrations at start, every
//!   data route answers 503 with `Retry-After`: a half-migrated schema would answer
//!   500s (a column that does not exist yet).
//! - **A request that changes something comes from the replica's own origin** (403
//!   otherwise) **and carries JSON if it carries a body** (415 otherwise). A browser
//!   sends a cross-site form or `text/plain` POST without asking, with the user's
//!   network position behind it; it always says where it comes from in `Origin` (and
//!   `Sec-Fetch-Site`), and it cannot send `application/json` across sites without a
//!   CORS preflight, which this API never grants. So with or without `API_TOKEN`, no
//!   other site can create messages or stop the cluster through an operator's browser.
//!   Clients that are not browsers (curl, the console's own page, other services) send
//!   no `Origin`, or the replica's own.

use std::sync::atomic::Ordering;

use warp::Filter;
use warp::http::{HeaderMap, Method, header};

use super::{ApiError, State, body, with_state};

/// Rejects what must not reach an `/api` route (see the module documentation).
pub fn api(state: State) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(with_state(state))
        .and_then(
            |method: Method, path: warp::path::FullPath, headers: HeaderMap, state: State| async move {
                let form_allowed = is_provider_callback(path.as_str());
                check(&method, &headers, &state, form_allowed).map_err(warp::reject::custom)
            },
        )
        .untuple_one()
}

/// `/api/providers/{name}/receipts` and `/inbound`: providers post forms (Twilio,
/// Vonage), and each callback proves itself (a signature, `DLR_TOKEN`), so a form body
/// is taken there.
fn is_provider_callback(path: &str) -> bool {
    path.strip_prefix("/api/providers/")
        .and_then(|rest| {
            rest.strip_suffix("/receipts")
                .or_else(|| rest.strip_suffix("/inbound"))
        })
        .is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

fn check(
    method: &Method,
    headers: &HeaderMap,
    state: &State,
    form_allowed: bool,
) -> Result<(), ApiError> {
    if !state.schema_ready.load(Ordering::Acquire) {
        return Err(ApiError::NotReady);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !same_origin(origin, headers, &state.config.allowed_origins) {
            return Err(ApiError::Forbidden(format!(
                "requests from {origin} may not change anything here: only the replica's own \
                 origin, or one listed in API_ALLOWED_ORIGINS"
            )));
        }
    } else if text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return Err(ApiError::Forbidden(
            "a cross-site browser request may not change anything here".into(),
        ));
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || text(header::CONTENT_LENGTH).is_some_and(|n| n.trim() != "0");
    if has_body && !form_allowed && !text(header::CONTENT_TYPE).is_some_and(body::is_json) {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(())
}

/// Whether `origin` (`scheme://host[:port]`) is the address the request was sent to
/// (`Host`, or `X-Forwarded-Host` behind a proxy: a browser cannot set it on a
/// cross-site request without a preflight) or one of `allowed`.
fn same_origin(origin: &str, headers: &HeaderMap, allowed: &[String]) -> bool {
    let Ok(url) = reqwest::Url::parse(origin) else {
        return false;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| *a == url.origin().ascii_serialization())
    {
        return true;
    }
    let default_port = if url.scheme() == "https" { 443 } else { 80 };
    [
        header::HOST,
        header::HeaderName::from_static("x-forwarded-host"),
    ]
    .into_iter()
    .filter_map(|name| headers.get(name)?.to_str().ok())
    .flat_map(|value| value.split(','))
    .any(|authority| authority_matches(authority.trim(), host, port, default_port))
}

/// `authority` (`host[:port]`, `[v6]:port`) names `host` (`[v6]` in brackets, as
/// URLs write it) and `port`.
fn authority_matches(authority: &str, host: &str, port: u16, default_port: u16) -> bool {
    let (name, given) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, rest)) => (
                &authority[..address.len() + 2],
                rest.strip_prefix(':').map(str::parse::<u16>),
            ),
            None => return false,
        },
        None => match authority.rsplit_once(':') {
            Some((name, p)) => (name, Some(p.parse::<u16>())),
            None => (authority, None),
        },
    };
    let given = match given {
        None => default_port,
        Some(Ok(p)) => p,
        Some(Err(_)) => return false,
    };
    name.eq_ignore_ascii_case(host) && given == port
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_the_replicas_own_origin_is_the_same() {
        let host = headers(&[("host", "127.0.0.1:8081")]);
        assert!(same_origin("http://127.0.0.1:8081", &host, &[]));
        assert!(!same_origin("http://127.0.0.1:8082", &host, &[]));
        assert!(!same_origin("http://evil.example", &host, &[]));
        assert!(!same_origin("null", &host, &[]));
        let default_port = headers(&[("host", "ops.example.com")]);
        // Behind a TLS-terminating proxy that keeps Host.
        assert!(same_origin("https://ops.example.com", &default_port, &[]));
        assert!(same_origin("http://ops.example.com", &default_port, &[]));
        assert!(!same_origin(
            "https://ops.example.com:8443",
            &default_port,
            &[]
        ));
        assert!(same_origin("http://OPS.example.com:80", &default_port, &[]));
        let proxied = headers(&[
            ("host", "dispatcher:8080"),
            ("x-forwarded-host", "ops.example.com:443"),
        ]);
        assert!(same_origin("https://ops.example.com", &proxied, &[]));
        let allowed = ["https://console.example.com".to_string()];
        assert!(same_origin("https://console.example.com", &host, &allowed));
        let v6 = headers(&[("host", "[::1]:8081")]);
        assert!(same_origin("http://[::1]:8081", &v6, &[]));
        assert!(!same_origin("http://[::1]:8082", &v6, &[]));
    }
}
