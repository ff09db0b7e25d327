//! A local SMS provider (docs/testing.md#the-mock-provider): the oracle for "each message exactly once".
//!
//! It speaks one provider's dialect (`--dialect`): `http-json` (`POST /send`, 202 with
//! a `messageId`), `twilio` (`POST /2010-04-01/Accounts/{sid}/Messages.json`, a form,
//! Basic auth, 201 with a `sid`), `vonage` (`POST /sms/json`, a form with
//! `api_secret`, 200 with per-message `status`) or `infobip`
//! (`POST /sms/2/text/advanced`, JSON, `Authorization: App`, 200 with `messageId` and
//! `status.groupName`). The same `Idempotency-Key` always gets the same id and is
//! stored once, its repeats counted. `GET /deliveries` and `GET /stats` let demos,
//! tests and benchmarks check what arrived; `POST /control` scripts the next answers
//! (throttles, failures). It posts a delivery receipt for every newly accepted message,
//! as real providers do, to `--dlr-url` or to the callback URL the request names, in
//! its dialect (Twilio's signed with `X-Twilio-Signature`). `POST /inbound` with
//! `{"from", "text"}` delivers a recipient's reply (STOP, …) to `--inbound-url` in the
//! dialect's inbound format and answers with the dispatcher's status and body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response, json, with_status};

use crate::config::ProviderKind;

/// Options of `message-dispatcher mock-provider`.
#[derive(Debug, Clone)]
pub struct MockOptions {
    pub port: u16,
    /// Share of requests answered 500 without being accepted (0.0–1.0).
    pub fail_rate: f64,
    pub latency: Duration,
    /// Share of requests that take `slow_latency` instead of `latency` (0.0–1.0): a
    /// latency mix with a slow tail, for long batches.
    pub slow_rate: f64,
    pub slow_latency: Duration,
    /// When set, requests must carry it (`Authorization: Bearer <token>`, or in
    /// `auth_header` when that is set).
    pub token: Option<String>,
    pub auth_header: Option<String>,
    /// Where and how to post delivery receipts; `None`: only to the callback URL a
    /// request names.
    pub receipts: Option<ReceiptOptions>,
    /// Where `POST /inbound` delivers a recipient's reply; `None`: it answers 409.
    pub inbound: Option<InboundOptions>,
    pub dialect: ProviderKind,
}

/// The dispatcher's inbound endpoint, and how to authenticate there.
#[derive(Debug, Clone)]
pub struct InboundOptions {
    pub url: String,
    /// Sent as the receipts' token is: Bearer for http-json, `?token=` for Vonage and
    /// Infobip (Twilio signs with `--token` instead).
    pub token: Option<String>,
}

/// A recipient's reply to deliver, as `POST /inbound` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipientReply {
    /// The recipient who replies (E.164).
    from: String,
    /// Our sender they reply to.
    #[serde(default)]
    to: Option<String>,
    text: String,
}

/// Answers scripted through `POST /control`, taken by the next requests.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Script {
    /// The next this many requests are throttled (429, or the dialect's own code).
    #[serde(default)]
    throttle_next: u32,
    /// The `Retry-After` of those throttles, in seconds; none when absent.
    #[serde(default)]
    retry_after_secs: Option<u64>,
    /// The next this many requests are answered 500.
    #[serde(default)]
    fail_next: u32,
    /// The next this many requests take `--slow-ms` (a client with a shorter timeout
    /// hangs up first: an unknown outcome).
    #[serde(default)]
    slow_next: u32,
}

/// Delivery receipts the mock posts back for accepted messages.
#[derive(Debug, Clone)]
pub struct ReceiptOptions {
    pub url: String,
    /// Zero: posted (and answered) before the send itself is answered.
    pub delay: Duration,
    /// Share of receipts that say `undelivered`.
    pub undelivered_rate: f64,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Delivery {
    key: String,
    to: String,
    content: String,
    message_id: String,
    /// When the first request with this key arrived.
    first_seen: DateTime<Utc>,
    /// The same in microseconds since the Unix epoch, for scripts that check rates.
    first_seen_us: i64,
    times_seen: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Stats {
    requests: u64,
    accepted: u64,
    unique_keys: u64,
    duplicates: u64,
    injected_failures: u64,
    rejected: u64,
    /// Delivery receipts posted and answered 2xx, and those that were not.
    receipts_posted: u64,
    receipts_failed: u64,
}

/// One request as it arrived, whatever its answer: the oracle for the rate limit,
/// which counts every send, accepted or not.
#[derive(Debug, Clone, Serialize)]
struct Arrival {
    key: String,
    at_us: i64,
    status: u16,
}

#[derive(Default)]
struct Ledger {
    deliveries: HashMap<String, Delivery>,
    arrivals: Vec<Arrival>,
    stats: Stats,
    script: Script,
}

#[derive(Deserialize)]
struct SendBody {
    to: String,
    content: String,
}

/// A send request read in any dialect.
struct Request {
    to: String,
    content: String,
    /// Where to post this message's receipt, when the request names it.
    callback: Option<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    // A poisoned ledger is still a consistent ledger: every update is one insert.
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Binds the port and serves until `shutdown` completes.
pub async fn run(
    options: MockOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], options.port)))
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on port {}: {err}", options.port))?;
    tracing::info!(
        // The port bound, which `--port 0` leaves to the kernel.
        port = listener.local_addr().map_or(options.port, |a| a.port()),
        fail_rate = options.fail_rate,
        latency_ms = options.latency.as_millis() as u64,
        "mock provider listening"
    );
    warp::serve(routes(options))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}

fn routes(
    options: MockOptions,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let ledger: Shared = Arc::default();
    let options = Arc::new(options);
    let inbound_options = options.clone();
    let with_ledger = {
        let ledger = ledger.clone();
        warp::any().map(move || ledger.clone())
    };

    let dialect = options.dialect;
    let send_path = warp::path::full().and_then(move |path: warp::path::FullPath| async move {
        if is_send_path(dialect, path.as_str()) {
            Ok(())
        } else {
            Err(warp::reject::not_found())
        }
    });
    let send = send_path
        .untuple_one()
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .and(with_ledger.clone())
        .and(warp::any().map(move || options.clone()))
        .then(
            |headers: warp::http::HeaderMap,
             body: bytes::Bytes,
             ledger: Shared,
             options: Arc<MockOptions>| async move {
                send(&headers, &body, &ledger, &options).await
            },
        );
    let control = warp::path!("control")
        .and(warp::post())
        .and(warp::body::json())
        .and(with_ledger.clone())
        .map(|script: Script, ledger: Shared| {
            lock(&ledger).script = script.clone();
            json(&script).into_response()
        });
    let deliveries = warp::path!("deliveries")
        .and(warp::get())
        .and(with_ledger.clone())
        .map(|ledger: Shared| {
            let mut list: Vec<Delivery> = lock(&ledger).deliveries.values().cloned().collect();
            list.sort_by_key(|d| (d.first_seen_us, d.key.clone()));
            json(&list).into_response()
        });
    let reset = warp::path!("deliveries")
        .and(warp::delete())
        .and(with_ledger.clone())
        .map(|ledger: Shared| {
            *lock(&ledger) = Ledger::default();
            StatusCode::NO_CONTENT.into_response()
        });
    let requests = warp::path!("requests")
        .and(warp::get())
        .and(with_ledger.clone())
        .map(|ledger: Shared| json(&lock(&ledger).arrivals).into_response());
    let stats = warp::path!("stats")
        .and(warp::get())
        .and(with_ledger)
        .map(|ledger: Shared| json(&lock(&ledger).stats).into_response());
    let inbound = {
        let options = inbound_options;
        warp::path!("inbound")
            .and(warp::post())
            .and(warp::body::content_length_limit(1 << 16))
            .and(warp::body::json())
            .then(move |reply: RecipientReply| {
                let options = options.clone();
                async move { deliver_reply(reply, &options).await }
            })
    };
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| json(&serde_json::json!({"status": "ok"})).into_response());

    send.or(deliveries)
        .unify()
        .or(control)
        .unify()
        .or(requests)
        .unify()
        .or(reset)
        .unify()
        .or(stats)
        .unify()
        .or(health)
        .unify()
        .or(inbound)
        .unify()
        .recover(|rejection: warp::Rejection| async move {
            let (status, message) = if rejection.is_not_found() {
                (StatusCode::NOT_FOUND, "not found")
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                (StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            } else {
                (StatusCode::BAD_REQUEST, "bad request")
            };
            Ok::<_, Infallible>(
                with_status(json(&serde_json::json!({ "error": message })), status).into_response(),
            )
        })
        .unify()
}

/// Answers one request and logs its arrival (time, key, status) for `/requests`.
async fn send(
    headers: &warp::http::HeaderMap,
    body: &[u8],
    ledger: &Shared,
    options: &MockOptions,
) -> Response {
    // When the request arrived, before any injected latency: when a real provider saw it.
    let now = Utc::now();
    let response = answer(headers, body, ledger, options, now).await;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    lock(ledger).arrivals.push(Arrival {
        key,
        at_us: now.timestamp_micros(),
        status: response.status().as_u16(),
    });
    response
}

async fn answer(
    headers: &warp::http::HeaderMap,
    body: &[u8],
    ledger: &Shared,
    options: &MockOptions,
    now: DateTime<Utc>,
) -> Response {
    let dialect = options.dialect;
    lock(ledger).stats.requests += 1;
    if let Some(token) = &options.token {
        if !authorized(
            dialect,
            headers,
            body,
            token,
            options.auth_header.as_deref(),
        ) {
            lock(ledger).stats.rejected += 1;
            return refusal(dialect, Refusal::Credentials);
        }
    }
    let slow_next = {
        let mut guard = lock(ledger);
        let slow = guard.script.slow_next > 0;
        guard.script.slow_next = guard.script.slow_next.saturating_sub(1);
        slow
    };
    let latency =
        if slow_next || (options.slow_rate > 0.0 && rand::random::<f64>() < options.slow_rate) {
            options.slow_latency
        } else {
            options.latency
        };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let scripted = {
        let mut guard = lock(ledger);
        let script = &mut guard.script;
        if script.throttle_next > 0 {
            script.throttle_next -= 1;
            Some(Refusal::Throttled(script.retry_after_secs))
        } else if script.fail_next > 0 {
            script.fail_next -= 1;
            Some(Refusal::Failure)
        } else {
            None
        }
    };
    let injected = options.fail_rate > 0.0 && rand::random::<f64>() < options.fail_rate;
    if let Some(why) = scripted.or(injected.then_some(Refusal::Failure)) {
        lock(ledger).stats.injected_failures += 1;
        return refusal(dialect, why);
    }
    let request = match read_request(dialect, body) {
        Ok(request) if !request.to.is_empty() && !request.content.is_empty() => request,
        Ok(_) => {
            lock(ledger).stats.rejected += 1;
            return refusal(dialect, Refusal::Bad("to and content are required".into()));
        }
        Err(problem) => {
            lock(ledger).stats.rejected += 1;
            return refusal(dialect, Refusal::Bad(problem));
        }
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("no-key-{}", random_uuid()));

    let shared = ledger;
    let (message_id, first) = {
        let mut guard = lock(shared);
        let ledger = &mut *guard;
        ledger.stats.accepted += 1;
        match ledger.deliveries.get_mut(&key) {
            Some(existing) => {
                existing.times_seen += 1;
                ledger.stats.duplicates += 1;
                (existing.message_id.clone(), false)
            }
            None => {
                let message_id = message_id(dialect);
                ledger.deliveries.insert(
                    key.clone(),
                    Delivery {
                        key,
                        to: request.to.clone(),
                        content: request.content,
                        message_id: message_id.clone(),
                        first_seen: now,
                        first_seen_us: now.timestamp_micros(),
                        times_seen: 1,
                    },
                );
                ledger.stats.unique_keys += 1;
                (message_id, true)
            }
        }
    };
    // The callback the request names carries what it needs (Vonage's and Infobip's a
    // `?token=`); `--dlr-url` is the account's own setting, sent `--dlr-token` as real
    // providers would: in the URL, or as a Bearer token to an http-json dispatcher.
    let receipt_to = match (&request.callback, &options.receipts) {
        (Some(url), _) => Some((url.clone(), None)),
        (None, Some(receipts)) => Some((receipts.url.clone(), receipts.token.clone())),
        (None, None) => None,
    };
    if let (true, Some((url, token))) = (first, receipt_to) {
        let receipt = Receipt {
            url,
            dialect,
            message_id: message_id.clone(),
            delay: options
                .receipts
                .as_ref()
                .map_or(Duration::from_millis(200), |r| r.delay),
            undelivered_rate: options
                .receipts
                .as_ref()
                .map_or(0.0, |r| r.undelivered_rate),
            token,
            signing_key: options.token.clone().unwrap_or_default(),
        };
        let post = post_receipt(receipt, shared.clone());
        if options.receipts.as_ref().is_some_and(|r| r.delay.is_zero()) {
            post.await;
        } else {
            tokio::spawn(post);
        }
    }
    accepted(dialect, &message_id, &request.to)
}

/// Whether `path` is where the dialect takes messages.
fn is_send_path(dialect: ProviderKind, path: &str) -> bool {
    match dialect {
        ProviderKind::HttpJson => path == "/send",
        ProviderKind::Twilio => path
            .strip_prefix("/2010-04-01/Accounts/")
            .and_then(|rest| rest.strip_suffix("/Messages.json"))
            .is_some_and(|sid| !sid.is_empty() && !sid.contains('/')),
        ProviderKind::Vonage => path == "/sms/json",
        ProviderKind::Infobip => path == "/sms/2/text/advanced",
    }
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// Whether the request carries `token` the way the dialect carries credentials.
fn authorized(
    dialect: ProviderKind,
    headers: &warp::http::HeaderMap,
    body: &[u8],
    token: &str,
    auth_header: Option<&str>,
) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match dialect {
        ProviderKind::HttpJson => match auth_header {
            Some(name) => header(name) == Some(token),
            None => header("authorization").and_then(|v| v.strip_prefix("Bearer ")) == Some(token),
        },
        ProviderKind::Twilio => {
            use base64::Engine;
            header("authorization")
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|pair| pair.split_once(':').map(|(_, secret)| secret == token))
                .unwrap_or(false)
        }
        ProviderKind::Vonage => form(body).get("api_secret").map(String::as_str) == Some(token),
        ProviderKind::Infobip => {
            header("authorization").and_then(|v| v.strip_prefix("App ")) == Some(token)
        }
    }
}

fn read_request(dialect: ProviderKind, body: &[u8]) -> Result<Request, String> {
    match dialect {
        ProviderKind::HttpJson => {
            let parsed: SendBody =
                serde_json::from_slice(body).map_err(|err| format!("bad body: {err}"))?;
            Ok(Request {
                to: parsed.to,
                content: parsed.content,
                callback: None,
            })
        }
        ProviderKind::Twilio => {
            let mut form = form(body);
            let has_sender = form.contains_key("From") || form.contains_key("MessagingServiceSid");
            if !has_sender {
                return Err("From or MessagingServiceSid is required".into());
            }
            Ok(Request {
                to: form.remove("To").unwrap_or_default(),
                content: form.remove("Body").unwrap_or_default(),
                callback: form.remove("StatusCallback"),
            })
        }
        ProviderKind::Vonage => {
            let mut form = form(body);
            Ok(Request {
                to: form.remove("to").unwrap_or_default(),
                content: form.remove("text").unwrap_or_default(),
                callback: form.remove("callback"),
            })
        }
        ProviderKind::Infobip => {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|err| format!("bad body: {err}"))?;
            let message = &value["messages"][0];
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            Ok(Request {
                to: text(&message["destinations"][0]["to"]),
                content: text(&message["text"]),
                callback: message["notifyUrl"].as_str().map(str::to_string),
            })
        }
    }
}

/// Why a request was not accepted.
enum Refusal {
    Credentials,
    Throttled(Option<u64>),
    Failure,
    Bad(String),
}

/// The dialect's answer to a refused request.
fn refusal(dialect: ProviderKind, refusal: Refusal) -> Response {
    use serde_json::json as j;
    let reply = |status: StatusCode, value: serde_json::Value| {
        with_status(json(&value), status).into_response()
    };
    let retry_after = match &refusal {
        Refusal::Throttled(Some(secs)) => Some(*secs),
        _ => None,
    };
    let mut response = match (dialect, refusal) {
        // Vonage answers 200 with a status code per message.
        (ProviderKind::Vonage, refusal) => {
            let (status, text) = match refusal {
                Refusal::Credentials => ("4", "Bad Credentials".to_string()),
                Refusal::Throttled(_) => ("1", "Throttled".to_string()),
                Refusal::Failure => ("5", "Internal Error".to_string()),
                Refusal::Bad(problem) => ("2", problem),
            };
            reply(
                StatusCode::OK,
                j!({"message-count": "1", "messages": [{"status": status, "error-text": text}]}),
            )
        }
        (ProviderKind::Twilio, refusal) => {
            let (status, code, message) = match refusal {
                Refusal::Credentials => {
                    (StatusCode::UNAUTHORIZED, 20003, "Authenticate".to_string())
                }
                Refusal::Throttled(_) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    20429,
                    "Too Many Requests".to_string(),
                ),
                Refusal::Failure => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    20500,
                    "Internal Server Error".to_string(),
                ),
                Refusal::Bad(problem) => (StatusCode::BAD_REQUEST, 21602, problem),
            };
            reply(
                status,
                j!({"code": code, "message": message, "status": status.as_u16()}),
            )
        }
        (_, refusal) => {
            let (status, id, text) = match refusal {
                Refusal::Credentials => (
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "invalid token".to_string(),
                ),
                Refusal::Throttled(_) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOO_MANY_REQUESTS",
                    "slow down".to_string(),
                ),
                Refusal::Failure => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "GENERAL_ERROR",
                    "injected failure".to_string(),
                ),
                Refusal::Bad(problem) => (StatusCode::BAD_REQUEST, "BAD_REQUEST", problem),
            };
            if dialect == ProviderKind::Infobip {
                reply(
                    status,
                    j!({"requestError": {"serviceException": {"messageId": id, "text": text}}}),
                )
            } else {
                reply(status, j!({ "error": text }))
            }
        }
    };
    if let Some(secs) = retry_after {
        if let Ok(value) = warp::http::HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert("retry-after", value);
        }
    }
    response
}

/// An id in the provider's own shape.
fn message_id(dialect: ProviderKind) -> String {
    let hex = random_uuid().replace('-', "");
    match dialect {
        ProviderKind::Twilio => format!("SM{hex}"),
        ProviderKind::Vonage => hex[..16].to_uppercase(),
        _ => random_uuid(),
    }
}

/// The dialect's answer to an accepted message.
fn accepted(dialect: ProviderKind, message_id: &str, to: &str) -> Response {
    use serde_json::json as j;
    let (status, body) = match dialect {
        ProviderKind::HttpJson => (
            StatusCode::ACCEPTED,
            j!({"message": "Accepted", "messageId": message_id}),
        ),
        ProviderKind::Twilio => (
            StatusCode::CREATED,
            j!({"sid": message_id, "status": "queued", "to": to, "error_code": null, "error_message": null}),
        ),
        ProviderKind::Vonage => (
            StatusCode::OK,
            j!({"message-count": "1", "messages": [{"to": to, "message-id": message_id, "status": "0"}]}),
        ),
        ProviderKind::Infobip => (
            StatusCode::OK,
            j!({"bulkId": random_uuid(), "messages": [{"to": to, "messageId": message_id,
                "status": {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED",
                           "description": "Message sent to next instance"}}]}),
        ),
    };
    with_status(json(&body), status).into_response()
}

/// One receipt to post.
struct Receipt {
    url: String,
    dialect: ProviderKind,
    message_id: String,
    delay: Duration,
    undelivered_rate: f64,
    /// `DLR_TOKEN`: a Bearer token for http-json, `?token=` for Vonage and Infobip
    /// (Twilio signs instead).
    token: Option<String>,
    /// Twilio signs its callbacks with the auth token.
    signing_key: String,
}

/// Posts one receipt after the configured delay, trying a few times: the dispatcher
/// may be restarting.
async fn post_receipt(receipt: Receipt, ledger: Shared) {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default()
    });
    tokio::time::sleep(receipt.delay).await;
    let undelivered =
        receipt.undelivered_rate > 0.0 && rand::random::<f64>() < receipt.undelivered_rate;
    let id = receipt.message_id.as_str();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let url = match (&receipt.token, receipt.dialect) {
            (Some(token), ProviderKind::Vonage | ProviderKind::Infobip) => {
                let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
                let separator = if receipt.url.contains('?') { '&' } else { '?' };
                format!("{}{separator}token={token}", receipt.url)
            }
            _ => receipt.url.clone(),
        };
        let mut request = match receipt.dialect {
            ProviderKind::HttpJson => {
                let mut body = serde_json::json!({
                    "message_id": id,
                    "status": if undelivered { "undelivered" } else { "delivered" },
                    "delivered_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                });
                if undelivered {
                    body["error_code"] = "absent_subscriber".into();
                }
                client.post(&receipt.url).json(&body)
            }
            ProviderKind::Twilio => {
                let params: Vec<(String, String)> = vec![
                    ("MessageSid".into(), id.into()),
                    (
                        "MessageStatus".into(),
                        if undelivered {
                            "undelivered"
                        } else {
                            "delivered"
                        }
                        .into(),
                    ),
                    (
                        "ErrorCode".into(),
                        if undelivered { "30003" } else { "" }.into(),
                    ),
                ];
                let signature =
                    crate::http::twilio_signature(&receipt.signing_key, &receipt.url, &params);
                client
                    .post(&receipt.url)
                    .header("X-Twilio-Signature", signature)
                    .form(&params)
            }
            ProviderKind::Vonage => client.post(&url).form(&[
                ("messageId", id),
                ("status", if undelivered { "expired" } else { "delivered" }),
                ("err-code", if undelivered { "27" } else { "0" }),
            ]),
            ProviderKind::Infobip => client.post(&url).json(&serde_json::json!({"results": [{
                "messageId": id,
                "status": {"groupName": if undelivered { "UNDELIVERABLE" } else { "DELIVERED" }},
                "error": {"name": if undelivered { "EC_ABSENT_SUBSCRIBER" } else { "NO_ERROR" }},
                "doneAt": Utc::now().to_rfc3339(),
            }]})),
        };
        if let (Some(token), ProviderKind::HttpJson) = (&receipt.token, receipt.dialect) {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                lock(&ledger).stats.receipts_posted += 1;
                return;
            }
            Ok(response) => {
                tracing::warn!(
                    status = response.status().as_u16(),
                    message_id = id,
                    "receipt refused"
                );
                // A 4xx will not change on a retry.
                if response.status().is_client_error() {
                    break;
                }
            }
            Err(err) => tracing::warn!(error = %err, message_id = id, "receipt not delivered"),
        }
    }
    lock(&ledger).stats.receipts_failed += 1;
}

/// Delivers one reply to the dispatcher's inbound endpoint in the dialect's format,
/// once, and answers `{"status", "body"}` with the dispatcher's answer (409 when no
/// `--inbound-url` is set, 502 when the dispatcher cannot be reached).
async fn deliver_reply(reply: RecipientReply, options: &MockOptions) -> Response {
    let Some(inbound) = &options.inbound else {
        return with_status(
            json(&serde_json::json!({"error": "start the mock with --inbound-url"})),
            StatusCode::CONFLICT,
        )
        .into_response();
    };
    let to = reply.to.clone().unwrap_or_else(|| "+15005550006".into());
    let client = reqwest::Client::new();
    let with_token = |url: &str| match &inbound.token {
        Some(token) => {
            let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}token={token}")
        }
        None => url.to_string(),
    };
    let request = match options.dialect {
        ProviderKind::HttpJson => {
            let request = client.post(&inbound.url).json(&serde_json::json!({
                "from": reply.from, "to": to, "text": reply.text,
            }));
            match &inbound.token {
                Some(token) => request.bearer_auth(token),
                None => request,
            }
        }
        ProviderKind::Twilio => {
            let params: Vec<(String, String)> = vec![
                (
                    "MessageSid".into(),
                    format!("SM{}", random_uuid().replace('-', "")),
                ),
                ("From".into(), reply.from.clone()),
                ("To".into(), to),
                ("Body".into(), reply.text.clone()),
                ("NumMedia".into(), "0".into()),
            ];
            let signature = crate::http::twilio_signature(
                options.token.as_deref().unwrap_or_default(),
                &inbound.url,
                &params,
            );
            client
                .post(&inbound.url)
                .header("X-Twilio-Signature", signature)
                .form(&params)
        }
        ProviderKind::Vonage => client
            .post(with_token(&inbound.url))
            .json(&serde_json::json!({
                "msisdn": reply.from.trim_start_matches('+'),
                "to": to.trim_start_matches('+'),
                "messageId": random_uuid(),
                "text": reply.text,
                "type": "text",
                "message-timestamp": Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
            })),
        ProviderKind::Infobip => client
            .post(with_token(&inbound.url))
            .json(&serde_json::json!({
                "results": [{
                    "messageId": random_uuid(),
                    "from": reply.from.trim_start_matches('+'),
                    "to": to.trim_start_matches('+'),
                    "text": reply.text,
                    "cleanText": "",
                    "keyword": "",
                    "receivedAt": Utc::now().to_rfc3339(),
                    "smsCount": 1,
                }],
                "messageCount": 1,
                "pendingMessageCount": 0,
            })),
    };
    match request.timeout(Duration::from_secs(10)).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            json(&serde_json::json!({"status": status, "body": body})).into_response()
        }
        Err(err) => with_status(
            json(&serde_json::json!({"error": format!("could not reach the dispatcher: {err}")})),
            StatusCode::BAD_GATEWAY,
        )
        .into_response(),
    }
}

/// A random RFC 4122 version-4 UUID.
fn random_uuid() -> String {
    let bits = (rand::random::<u128>() & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
