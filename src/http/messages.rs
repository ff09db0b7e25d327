//! Messages: create, list, fetch, retry.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{ApiError, State, body, json, respond, with_state};
use crate::domain::{MessageContent, MessageStatus, PhoneNumber};
use crate::store::queue::{Message, NewMessage, RetryRequest};

/// Most messages one `POST /api/messages` may create.
const MAX_CREATE: usize = 1000;
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    let query = warp::query::<HashMap<String, String>>();
    let sent = warp::path!("messages" / "sent")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(query)
        .then(|state: State, query: HashMap<String, String>| async move {
            respond(list_sent(state, query)).await
        });
    let list = warp::path!("messages")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and(query)
        .then(|state: State, query: HashMap<String, String>| async move {
            respond(list(state, query)).await
        });
    let create = warp::path!("messages")
        .and(warp::post())
        .and(with_state(state.clone()))
        .and(body::json_value())
        .then(|state: State, body: Value| async move { respond(create(state, body)).await });
    let get = warp::path!("messages" / i64)
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|id: i64, state: State| async move { respond(get(state, id)).await });
    let retry = warp::path!("messages" / i64 / "retry")
        .and(warp::post())
        .and(with_state(state))
        .then(|id: i64, state: State| async move { respond(retry(state, id)).await });
    sent.or(list)
        .unify()
        .or(create)
        .unify()
        .or(get)
        .unify()
        .or(retry)
        .unify()
        .boxed()
}

/// The sent-list shape (SPEC §7).
#[derive(Serialize)]
struct SentView<'a> {
    id: i64,
    phone_number: &'a str,
    content: &'a str,
    sent: bool,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    message_id: Option<&'a str>,
    cached_at: Option<DateTime<Utc>>,
}

/// The full shape: every stored field plus `cached_at`.
#[derive(Serialize)]
struct DetailView<'a> {
    #[serde(flatten)]
    message: &'a Message,
    cached_at: Option<DateTime<Utc>>,
}

/// `limit` and `cursor` from the query string.
fn page_params(query: &HashMap<String, String>) -> Result<(i64, Option<i64>), ApiError> {
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}"))
            })?,
    };
    let cursor = match query.get("cursor") {
        None => None,
        Some(text) => Some(text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::bad_request("cursor must be a positive integer (a next_cursor value)")
        })?),
    };
    Ok((limit, cursor))
}

async fn list_sent(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let (limit, cursor) = page_params(&query)?;
    let page = state
        .store
        .list_messages(Some(MessageStatus::Sent), cursor, limit)
        .await?;
    let ids: Vec<i64> = page.messages.iter().map(|m| m.id).collect();
    let cached = state.cache.cached_at(&ids).await;
    let messages: Vec<SentView> = page
        .messages
        .iter()
        .map(|m| SentView {
            id: m.id,
            phone_number: &m.phone_number,
            content: &m.content,
            sent: m.sent,
            created_at: m.created_at,
            sent_at: m.sent_at,
            message_id: m.message_id.as_deref(),
            cached_at: cached.get(&m.id).copied(),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({"messages": messages, "total": page.total, "next_cursor": page.next_cursor}),
    ))
}

async fn list(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let (limit, cursor) = page_params(&query)?;
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(text) => Some(MessageStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status must be one of pending, sending, sent, failed (got {text:?})"
            ))
        })?),
    };
    let page = state.store.list_messages(status, cursor, limit).await?;
    let ids: Vec<i64> = page
        .messages
        .iter()
        .filter(|m| m.sent)
        .map(|m| m.id)
        .collect();
    let cached = state.cache.cached_at(&ids).await;
    let messages: Vec<DetailView> = page
        .messages
        .iter()
        .map(|message| DetailView {
            message,
            cached_at: cached.get(&message.id).copied(),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({"messages": messages, "total": page.total, "next_cursor": page.next_cursor}),
    ))
}

async fn get(state: State, id: i64) -> Result<Response, ApiError> {
    let message = state
        .store
        .get_message(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("message {id} does not exist")))?;
    let cached = state.cache.cached_at(&[id]).await;
    Ok(json(
        StatusCode::OK,
        &DetailView {
            message: &message,
            cached_at: cached.get(&id).copied(),
        },
    ))
}

async fn retry(state: State, id: i64) -> Result<Response, ApiError> {
    match state.store.retry_failed(id).await? {
        RetryRequest::Retried(message) => {
            state.wake.notify_one();
            Ok(json(
                StatusCode::OK,
                &DetailView {
                    message: &message,
                    cached_at: None,
                },
            ))
        }
        RetryRequest::NotFound => Err(ApiError::NotFound(format!("message {id} does not exist"))),
        RetryRequest::NotFailed(status) => Err(ApiError::Conflict(format!(
            "message {id} is {}; only failed messages can be retried",
            status.as_str()
        ))),
    }
}

/// `POST /api/messages`: one object, or an array of up to 1000. The answer mirrors the
/// input: an object for an object, an array for an array.
async fn create(state: State, body: Value) -> Result<Response, ApiError> {
    let (items, single) = match body {
        Value::Array(items) => (items, false),
        object @ Value::Object(_) => (vec![object], true),
        _ => {
            return Err(ApiError::validation(
                "body",
                "expected a message object or an array of message objects",
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::validation(
            "body",
            "the array is empty; send at least one message",
        ));
    }
    if items.len() > MAX_CREATE {
        return Err(ApiError::validation(
            "body",
            format!(
                "{} messages in one request; the maximum is {MAX_CREATE}",
                items.len()
            ),
        ));
    }
    let max_chars = state.config.message_max_length;
    let messages = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let parsed = parse_new_message(item, max_chars);
            if single {
                parsed
            } else {
                parsed.map_err(|err| err.at_index(index))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let created = state.store.insert_messages(&messages).await?;
    state.wake.notify_one();
    let views: Vec<DetailView> = created
        .iter()
        .map(|message| DetailView {
            message,
            cached_at: None,
        })
        .collect();
    if single {
        Ok(json(StatusCode::CREATED, &views[0]))
    } else {
        Ok(json(StatusCode::CREATED, &views))
    }
}

fn parse_new_message(item: &Value, max_chars: usize) -> Result<NewMessage, ApiError> {
    let Value::Object(fields) = item else {
        return Err(ApiError::validation(
            "body",
            "each message must be an object",
        ));
    };
    let text = |name: &'static str| -> Result<&str, ApiError> {
        match fields.get(name) {
            None | Some(Value::Null) => {
                Err(ApiError::validation(name, format!("{name} is required")))
            }
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ApiError::validation(
                name,
                format!("{name} must be a string"),
            )),
        }
    };
    let validation =
        |err: crate::domain::ValidationError| ApiError::validation(err.field, err.to_string());
    Ok(NewMessage {
        phone_number: PhoneNumber::parse(text("phone_number")?).map_err(validation)?,
        content: MessageContent::parse(text("content")?, max_chars).map_err(validation)?,
    })
}
