//! `/api/opt-outs`: the numbers never sent to again (docs/operations.md#opt-outs).
//!
//! `PUT /api/opt-outs/{phone}` lists a number (optional body `{"source": "..."}`),
//! `DELETE` takes it off, `GET` shows one entry or a page of the list. The number in
//! the path is read like a message's (E.164, `%2B` for the `+`, or national with
//! `DEFAULT_REGION`), so `+90 555…` sent any way finds the same entry.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::reply::query_limit;
use super::{ApiError, State, body, json, respond, with_state};
use crate::domain::PhoneNumber;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;
/// The longest `source` an operator may name; `inbound:<provider>` is written by us.
const MAX_SOURCE: usize = 100;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let list = warp::path!("opt-outs")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .then(|state: State, query: HashMap<String, String>| async move {
            respond(list(state, query)).await
        });
    let one = warp::path!("opt-outs" / String);
    let get = one
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|phone: String, state: State| async move { respond(get(state, phone)).await });
    let put = one
        .and(warp::put())
        .and(with_state(state.clone()))
        .and(warp::header::optional::<String>("content-type"))
        .and(body::any_bytes())
        .then(
            |phone: String, state: State, content_type: Option<String>, body: Bytes| async move {
                respond(put(state, phone, content_type, body)).await
            },
        );
    let delete = one
        .and(warp::delete())
        .and(with_state(state))
        .then(|phone: String, state: State| async move { respond(delete(state, phone)).await });
    list.or(get)
        .unify()
        .or(put)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The optional body of a PUT.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutOptOut {
    /// Who asked (a CRM import, a support ticket); `api` when absent.
    #[serde(default)]
    source: Option<String>,
}

/// The number in the path, percent-decoded and read as intake reads numbers; a 422
/// naming `phone_number` otherwise.
fn path_phone(state: &State, segment: &str) -> Result<PhoneNumber, ApiError> {
    let decoded = percent_decode(segment).ok_or_else(|| {
        ApiError::validation(
            "phone_number",
            "phone_number: bad percent-encoding in the path",
        )
    })?;
    PhoneNumber::parse(&decoded, state.config.default_region)
        .map_err(|err| ApiError::validation(err.field, err.to_string()))
}

/// `%XX` sequences decoded; `None` when one is malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn list(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let limit = query_limit(&query, DEFAULT_LIMIT, MAX_LIMIT)?;
    // A `+` left unencoded in the query string arrives as a space; digits alone are
    // read as the number they spell.
    let cursor = query
        .get("cursor")
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .map(|c| format!("+{}", c.trim_start_matches('+')));
    if let Some(cursor) = &cursor {
        if cursor.len() > 21 || !cursor[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::bad_request(
                "cursor must be a next_cursor value: + and digits",
            ));
        }
    }
    let page = state.store.list_opt_outs(cursor.as_deref(), limit).await?;
    Ok(json(StatusCode::OK, &page))
}

async fn get(state: State, phone: String) -> Result<Response, ApiError> {
    let phone = path_phone(&state, &phone)?;
    match state.store.opt_out_of(phone.as_str()).await? {
        Some(entry) => Ok(json(StatusCode::OK, &entry)),
        None => Err(ApiError::NotFound(format!(
            "{} is not on the opt-out list",
            phone.as_str()
        ))),
    }
}

async fn put(
    state: State,
    phone: String,
    content_type: Option<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let phone = path_phone(&state, &phone)?;
    let request: PutOptOut = if body.iter().all(u8::is_ascii_whitespace) {
        PutOptOut::default()
    } else if content_type.as_deref().is_some_and(body::is_json) {
        body::parse(&body)?
    } else {
        return Err(ApiError::UnsupportedMediaType);
    };
    let source = match request.source {
        None => "api".to_string(),
        Some(source) => {
            let source = source.trim().to_string();
            if source.is_empty()
                || source.len() > MAX_SOURCE
                || !source.bytes().all(|b| (b' '..=b'~').contains(&b))
            {
                return Err(ApiError::validation(
                    "source",
                    format!("source: must be 1 to {MAX_SOURCE} printable ASCII characters"),
                ));
            }
            source
        }
    };
    let (entry, created) = state.store.opt_out(phone.as_str(), &source).await?;
    if created {
        state
            .metrics
            .opt_out_changes
            .with_label_values(&["opt_out", "api"])
            .inc();
        tracing::info!(source = %entry.source, "number put on the opt-out list");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &entry))
}

async fn delete(state: State, phone: String) -> Result<Response, ApiError> {
    let phone = path_phone(&state, &phone)?;
    if state.store.opt_in(phone.as_str()).await? {
        state
            .metrics
            .opt_out_changes
            .with_label_values(&["opt_in", "api"])
            .inc();
        tracing::info!("number taken off the opt-out list");
        Ok(json(
            StatusCode::OK,
            &json!({"phone_number": phone.as_str(), "opted_out": false}),
        ))
    } else {
        Err(ApiError::NotFound(format!(
            "{} is not on the opt-out list",
            phone.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn a_path_number_is_percent_decoded() {
        assert_eq!(
            percent_decode("%2B905551234567").as_deref(),
            Some("+905551234567")
        );
        assert_eq!(
            percent_decode("+905551234567").as_deref(),
            Some("+905551234567")
        );
        assert_eq!(percent_decode("%2b1"), Some("+1".into()));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz1"), None);
    }
}
