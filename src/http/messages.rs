//! Messages: create (idempotent), list, fetch, retry, cancel, stats.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::reply::{query_id_cursor, query_limit};
use super::{ApiError, State, body, json, respond, with_state};
use crate::domain::{
    IdempotencyKey, MessageContent, MessageStatus, PhoneNumber, Priority, Region, parse_time,
};
use crate::state::AppState;
use crate::store::{Inserted, ListFilter, Message, NewMessage, StatusChange};

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
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(body::json_bytes())
        .then(
            |state: State, key: Option<String>, body: Bytes| async move {
                respond(create(state, key, body)).await
            },
        );
    let stats = warp::path!("messages" / "stats")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state: State| async move { respond(stats(state)).await });
    let get = warp::path!("messages" / i64)
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|id: i64, state: State| async move { respond(get(state, id)).await });
    let retry = warp::path!("messages" / i64 / "retry")
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|id: i64, state: State| async move { respond(retry(state, id)).await });
    let cancel = warp::path!("messages" / i64 / "cancel")
        .and(warp::post())
        .and(with_state(state.clone()))
        .then(|id: i64, state: State| async move { respond(cancel(state, id)).await });
    let retry_all =
        warp::path!("messages" / "retry")
            .and(warp::post())
            .and(with_state(state.clone()))
            .and(body::json_bytes())
            .then(|state: State, body: Bytes| async move {
                respond(bulk(state, body, Bulk::Retry)).await
            });
    let cancel_all =
        warp::path!("messages" / "cancel")
            .and(warp::post())
            .and(with_state(state))
            .and(body::json_bytes())
            .then(|state: State, body: Bytes| async move {
                respond(bulk(state, body, Bulk::Cancel)).await
            });
    sent.or(stats)
        .unify()
        .or(list)
        .unify()
        .or(create)
        .unify()
        .or(get)
        .unify()
        .or(retry)
        .unify()
        .or(cancel)
        .unify()
        .or(retry_all)
        .unify()
        .or(cancel_all)
        .unify()
        .boxed()
}

/// The sent-list shape (README.md#http-api).
#[derive(Serialize)]
struct SentView<'a> {
    id: i64,
    phone_number: &'a str,
    content: Option<&'a str>,
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

impl<'a> DetailView<'a> {
    /// Without a look at the delivery cache.
    fn of(message: &'a Message) -> Self {
        Self {
            message,
            cached_at: None,
        }
    }
}

/// A page: `limit` and `cursor` from the query string, and whether the exact total is
/// asked for (`total=exact`; otherwise it is counted up to `TOTAL_BOUND`).
struct PageParams {
    limit: i64,
    cursor: Option<i64>,
    exact_total: bool,
}

fn page_params(query: &HashMap<String, String>) -> Result<PageParams, ApiError> {
    let limit = query_limit(query, DEFAULT_LIMIT, MAX_LIMIT)?;
    let cursor = query_id_cursor(query)?;
    let exact_total = match query.get("total").map(String::as_str) {
        None | Some("bounded") => false,
        Some("exact") => true,
        Some(_) => return Err(ApiError::bad_request("total must be exact or bounded")),
    };
    Ok(PageParams {
        limit,
        cursor,
        exact_total,
    })
}

/// A page of a listing: its messages as shown, its total and the next cursor.
fn page_answer(messages: &impl serde::Serialize, page: &crate::store::Page) -> Response {
    json(
        StatusCode::OK,
        &json!({
            "messages": messages,
            "total": page.total,
            "total_exact": page.total_exact,
            "next_cursor": page.next_cursor
        }),
    )
}

async fn list_sent(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let page = page_params(&query)?;
    let filter = ListFilter {
        status: Some(MessageStatus::Sent),
        ..ListFilter::default()
    };
    let page = state
        .store
        .list_messages(&filter, page.cursor, page.limit, page.exact_total)
        .await?;
    let ids: Vec<i64> = page.messages.iter().map(|m| m.id).collect();
    let cached = state.cache.cached_at(&ids).await;
    let messages: Vec<SentView> = page
        .messages
        .iter()
        .map(|m| SentView {
            id: m.id,
            phone_number: &m.phone_number,
            content: m.content.as_deref(),
            sent: m.sent,
            created_at: m.created_at,
            sent_at: m.sent_at,
            message_id: m.message_id.as_deref(),
            cached_at: cached.get(&m.id).copied(),
        })
        .collect();
    Ok(page_answer(&messages, &page))
}

/// A phone number to filter by: its E.164 form when it is a valid number (so a search
/// finds what intake stored), else the text itself when it is digits with an optional
/// `+`, as rows from before E.164 intake may hold it.
fn phone_filter(text: &str, region: Option<Region>) -> Result<String, String> {
    match PhoneNumber::parse(text, region) {
        Ok(number) => Ok(number.as_str().to_string()),
        Err(_) => {
            // At most 20 characters, as the column holds.
            let digits = text.strip_prefix('+').unwrap_or(text);
            if !digits.is_empty() && text.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
            {
                Ok(text.to_string())
            } else {
                Err(format!(
                    "phone_number: {text:?} must be at most 20 digits with an optional leading +"
                ))
            }
        }
    }
}

/// A lane filter must name a configured lane: a typo would show an empty list.
fn known_lane(state: &AppState, lane: &str) -> Result<String, String> {
    if state.lane(lane).is_some() {
        Ok(lane.to_string())
    } else {
        let known: Vec<&str> = state.lanes.iter().map(|l| l.spec.name.as_str()).collect();
        Err(format!(
            "lane: there is no lane {lane:?}; configured: {}",
            known.join(", ")
        ))
    }
}

/// The filters of `GET /api/messages`; a bad value is a 400 naming the parameter.
fn list_filter(state: &AppState, query: &HashMap<String, String>) -> Result<ListFilter, ApiError> {
    let region = state.config.default_region;
    // An empty `status=` has always meant "any"; the other filters take what they get.
    let given = |name: &str| query.get(name).map(String::as_str);
    let status = match given("status").filter(|v| !v.is_empty()) {
        None => None,
        Some(text) => Some(MessageStatus::parse(text).ok_or_else(|| {
            let known: Vec<&str> = MessageStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!(
                "status must be one of {} (got {text:?})",
                known.join(", ")
            ))
        })?),
    };
    let phone_number = given("phone_number")
        .map(|text| phone_filter(text, region).map_err(ApiError::bad_request))
        .transpose()?;
    let time = |name: &'static str| -> Result<Option<DateTime<Utc>>, ApiError> {
        given(name)
            .map(|text| {
                parse_time(name, text).map_err(|err| ApiError::bad_request(err.to_string()))
            })
            .transpose()
    };
    let lane = given("lane")
        .filter(|v| !v.is_empty())
        .map(|lane| known_lane(state, lane).map_err(ApiError::bad_request))
        .transpose()?;
    Ok(ListFilter {
        status,
        phone_number,
        since: time("since")?,
        until: time("until")?,
        lane,
    })
}

async fn list(state: State, query: HashMap<String, String>) -> Result<Response, ApiError> {
    let page = page_params(&query)?;
    let filter = list_filter(&state, &query)?;
    let page = state
        .store
        .list_messages(&filter, page.cursor, page.limit, page.exact_total)
        .await?;
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
    Ok(page_answer(&messages, &page))
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
    let change = state.store.retry_failed(id).await?;
    let message = changed(change, id, "only failed messages can be retried")?;
    if let Some(lane) = state.lane(&message.lane) {
        lane.wake.notify_one();
    }
    Ok(json(StatusCode::OK, &DetailView::of(&message)))
}

async fn cancel(state: State, id: i64) -> Result<Response, ApiError> {
    let change = state.store.cancel_pending(id).await?;
    let message = changed(change, id, "only pending messages can be cancelled")?;
    state.metrics.messages_cancelled.inc();
    tracing::info!(message_id = id, "message cancelled");
    Ok(json(StatusCode::OK, &DetailView::of(&message)))
}

/// A change to every message a filter selects.
#[derive(Debug, Clone, Copy)]
enum Bulk {
    /// `failed` → `pending`, due now, attempts reset.
    Retry,
    /// `pending` → `cancelled`.
    Cancel,
}

/// The filter of `POST /api/messages/retry` and `/cancel`: the console's filter on
/// screen. `status` must be the one the action applies to (`failed` for retry,
/// `pending` for cancel), so the body says what the operator saw.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkFilter {
    status: String,
    #[serde(default)]
    phone_number: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    lane: Option<String>,
}

/// `POST /api/messages/retry` → `{"retried": n}`, `POST /api/messages/cancel` →
/// `{"cancelled": n}`: every message the filter selects, in bounded steps.
async fn bulk(state: State, body: Bytes, action: Bulk) -> Result<Response, ApiError> {
    let filter: BulkFilter = body::parse(&body)?;
    let (from, answer) = match action {
        Bulk::Retry => (MessageStatus::Failed, "retried"),
        Bulk::Cancel => (MessageStatus::Pending, "cancelled"),
    };
    if MessageStatus::parse(&filter.status) != Some(from) {
        return Err(ApiError::validation(
            "status",
            format!(
                "status must be {:?}: only {} messages can be {answer} (got {:?})",
                from.as_str(),
                from.as_str(),
                filter.status
            ),
        ));
    }
    let lane = filter
        .lane
        .as_deref()
        .map(|lane| {
            known_lane(&state, lane).map_err(|problem| ApiError::validation("lane", problem))
        })
        .transpose()?;
    let region = state.config.default_region;
    let time = |name: &'static str, text: Option<String>| {
        text.map(|t| {
            parse_time(name, &t).map_err(|err| ApiError::validation(err.field, err.to_string()))
        })
        .transpose()
    };
    let selection = ListFilter {
        status: Some(from),
        phone_number: filter
            .phone_number
            .map(|text| {
                phone_filter(&text, region)
                    .map_err(|problem| ApiError::validation("phone_number", problem))
            })
            .transpose()?,
        since: time("since", filter.since)?,
        until: time("until", filter.until)?,
        lane,
    };
    let changed = match action {
        Bulk::Retry => state.store.retry_all(&selection).await?,
        Bulk::Cancel => state.store.cancel_all(&selection).await?,
    };
    match action {
        Bulk::Retry if changed > 0 => state.wake_all(),
        Bulk::Cancel => state.metrics.messages_cancelled.inc_by(changed),
        Bulk::Retry => {}
    }
    tracing::info!(
        changed,
        ?selection,
        action = answer,
        "bulk action through the API"
    );
    Ok(json(StatusCode::OK, &json!({ answer: changed })))
}

/// The changed message, or 404 / 409 saying why not.
fn changed(change: StatusChange, id: i64, rule: &str) -> Result<Message, ApiError> {
    match change {
        StatusChange::Changed(message) => Ok(*message),
        StatusChange::NotFound => Err(ApiError::NotFound(format!("message {id} does not exist"))),
        StatusChange::Refused(status) => Err(ApiError::Conflict(format!(
            "message {id} is {}; {rule}",
            status.as_str()
        ))),
        StatusChange::ContentRemoved => Err(ApiError::Conflict(format!(
            "message {id} has no text any more (CONTENT_RETENTION removed it); it cannot be \
             sent again: create a new message"
        ))),
    }
}

/// The counters, and what each lane spent this UTC day through each provider.
async fn stats(state: State) -> Result<Response, ApiError> {
    let stats = state.store.message_stats().await?;
    let spend = state.store.spend_today().await?;
    let mut body = serde_json::to_value(stats).unwrap_or_default();
    body["spend_today"] = serde_json::to_value(spend).unwrap_or_default();
    Ok(json(StatusCode::OK, &body))
}

/// `POST /api/messages`: one object, or an array of up to 1000. The answer mirrors the
/// input: an object for an object, an array for an array. 201 when anything was
/// created; 200 when every item repeated an idempotency key (the original rows).
async fn create(
    state: State,
    header_key: Option<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rules = IntakeRules {
        webhooks_signed: state.config.webhooks.secret.is_some(),
        max_chars: state.config.message_max_length,
        max_segments: state.config.message_max_segments,
        region: state.config.default_region,
        lanes: &state,
    };
    let (items, single) = body::one_or_many::<CreateMessage>(&body, MAX_CREATE, "message")?;
    let mut messages = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let message = item.validate(&rules);
            if single {
                message
            } else {
                message.map_err(|err| err.at_index(index))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if header_key.is_some() && !single {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "the Idempotency-Key header applies to a single message; give each array item its own idempotency_key",
        ));
    }
    if let Some(header) = header_key {
        let key = IdempotencyKey::parse(&header)
            .map_err(|err| ApiError::validation("Idempotency-Key", err.to_string()))?;
        match &messages[0].idempotency_key {
            Some(body_key) if *body_key != key => {
                return Err(ApiError::validation(
                    "idempotency_key",
                    "the Idempotency-Key header and the body's idempotency_key differ",
                ));
            }
            _ => messages[0].idempotency_key = Some(key),
        }
    }
    let rows = match state.store.insert_messages(&messages).await? {
        Inserted::Rows(rows) => rows,
        Inserted::KeyConflict { index, existing_id } => {
            let at = if single {
                String::new()
            } else {
                format!("[{index}] ")
            };
            return Err(ApiError::IdempotencyConflict(format!(
                "{at}idempotency key {:?} was used for message {existing_id}, with a different payload",
                messages[index]
                    .idempotency_key
                    .as_ref()
                    .map_or("", IdempotencyKey::as_str)
            )));
        }
    };
    let any_created = rows.iter().any(|(_, created)| *created);
    let blocked = rows
        .iter()
        .filter(|(message, created)| *created && message.status == MessageStatus::Blocked)
        .count();
    if blocked > 0 {
        state
            .metrics
            .messages_blocked
            .with_label_values(&["intake"])
            .inc_by(blocked as u64);
        tracing::info!(
            count = blocked,
            "messages to numbers on the opt-out list: blocked, never sent"
        );
    }
    for lane in &state.lanes {
        if rows
            .iter()
            .any(|(message, created)| *created && message.lane == lane.spec.name)
        {
            lane.wake.notify_one();
        }
    }
    let status = if any_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let views: Vec<DetailView> = rows
        .iter()
        .map(|(message, _)| DetailView::of(message))
        .collect();
    if single {
        Ok(json(status, &views[0]))
    } else {
        Ok(json(status, &views))
    }
}

/// A message's own webhook endpoint: an http or https URL of at most 2,048 bytes, taken
/// only when the replicas can sign what they post there.
fn callback_url(url: &str, signed: bool) -> Result<String, ApiError> {
    let field = "status_callback_url";
    if !signed {
        return Err(ApiError::validation(
            field,
            "status_callback_url: status webhooks are signed, and STATUS_WEBHOOK_SECRET is not set",
        ));
    }
    let valid = url.len() <= 2048
        && reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if valid {
        Ok(url.to_string())
    } else {
        Err(ApiError::validation(
            field,
            "status_callback_url: must be an http or https URL with a host, at most 2048 bytes",
        ))
    }
}

/// What a message must obey at intake: `MESSAGE_MAX_LENGTH`, `MESSAGE_MAX_SEGMENTS`,
/// the region national-format numbers are read in (`DEFAULT_REGION`), and the lanes
/// (a named lane must exist; otherwise the routes choose).
struct IntakeRules<'a> {
    /// `STATUS_WEBHOOK_SECRET` is set: a message may name its own webhook endpoint.
    webhooks_signed: bool,
    max_chars: usize,
    max_segments: u32,
    region: Option<Region>,
    lanes: &'a AppState,
}

/// One message of `POST /api/messages`, as sent. Unknown fields are refused (a typo
/// such as `sendAt` must not be dropped silently, sending the message at once).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateMessage {
    phone_number: String,
    content: String,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    send_at: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    priority: Option<i64>,
    /// The lane to send through; absent: the first route that matches, else `default`.
    #[serde(default)]
    lane: Option<String>,
    /// The sender; absent: the lane's, else the provider's.
    #[serde(default)]
    from: Option<String>,
    /// `transactional` goes out in quiet hours; `marketing` (or none) waits.
    #[serde(default)]
    category: Option<String>,
    /// Where this message's status webhooks go, instead of `STATUS_WEBHOOK_URL`.
    #[serde(default)]
    status_callback_url: Option<String>,
}

impl CreateMessage {
    /// The message with every value checked (domain types), or a 422 naming the field.
    fn validate(self, rules: &IntakeRules) -> Result<NewMessage, ApiError> {
        let validation =
            |err: crate::domain::ValidationError| ApiError::validation(err.field, err.to_string());
        let time = |name: &'static str, text: Option<String>| {
            text.map(|t| parse_time(name, &t).map_err(validation))
                .transpose()
        };
        let send_at = time("send_at", self.send_at)?;
        let expires_at = time("expires_at", self.expires_at)?;
        if let (Some(send_at), Some(expires_at)) = (send_at, expires_at) {
            if expires_at <= send_at {
                return Err(ApiError::validation(
                    "expires_at",
                    "expires_at: must be after send_at",
                ));
            }
        }
        let phone_number =
            PhoneNumber::parse(&self.phone_number, rules.region).map_err(validation)?;
        let content = MessageContent::parse(&self.content, rules.max_chars, rules.max_segments)
            .map_err(validation)?;
        let state = rules.lanes;
        let lane = match self.lane {
            Some(lane) => {
                known_lane(state, &lane).map_err(|problem| ApiError::validation("lane", problem))?
            }
            None => state
                .config
                .plan
                .route(
                    crate::domain::country_of(phone_number.as_str()).as_deref(),
                    phone_number.as_str(),
                )
                .to_string(),
        };
        if let Some(spec) = state.lane(&lane).map(|l| &l.spec) {
            let country = crate::domain::country_of(phone_number.as_str());
            if !spec.countries.is_empty()
                && !country.as_ref().is_some_and(|c| spec.countries.contains(c))
            {
                return Err(ApiError::validation(
                    "phone_number",
                    format!(
                        "phone_number: {} is in {}; lane {:?} sends only to {}",
                        phone_number.as_str(),
                        country.as_deref().unwrap_or("no known country"),
                        spec.name,
                        spec.countries.join(", ")
                    ),
                ));
            }
            let segments = crate::encoding::segment(content.as_str()).segments;
            if spec.unit == crate::config::Unit::Segments && segments > spec.batch_size {
                return Err(ApiError::validation(
                    "content",
                    format!(
                        "content: takes {segments} SMS segments, more than lane {:?} sends per \
                         interval ({})",
                        spec.name, spec.batch_size
                    ),
                ));
            }
        }
        Ok(NewMessage {
            phone_number,
            content,
            idempotency_key: self
                .idempotency_key
                .as_deref()
                .map(IdempotencyKey::parse)
                .transpose()
                .map_err(validation)?,
            send_at,
            expires_at,
            priority: self
                .priority
                .map_or(Ok(Priority::default()), Priority::parse)
                .map_err(validation)?,
            lane,
            from: self
                .from
                .as_deref()
                .map(crate::domain::Sender::parse)
                .transpose()
                .map_err(validation)?,
            category: self
                .category
                .as_deref()
                .map(crate::domain::Category::parse)
                .transpose()
                .map_err(validation)?,
            status_callback_url: self
                .status_callback_url
                .map(|url| callback_url(&url, rules.webhooks_signed))
                .transpose()?,
        })
    }
}
