//! A local SMS provider (docs/testing.md#the-mock-provider): the oracle for "each message exactly once".
//!
//! `POST /send` answers 202 with a `messageId`; the same `Idempotency-Key` always gets
//! the same id and is stored once, its repeats counted. `GET /deliveries` and
//! `GET /stats` let demos, tests and benchmarks check what arrived. With `--dlr-url`
//! it posts a delivery receipt for every newly accepted message, as real providers do.

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
    /// Where and how to post delivery receipts; `None`: no receipts.
    pub receipts: Option<ReceiptOptions>,
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
}

#[derive(Deserialize)]
struct SendBody {
    to: String,
    content: String,
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
    let with_ledger = {
        let ledger = ledger.clone();
        warp::any().map(move || ledger.clone())
    };

    let send = warp::path!("send")
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
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| json(&serde_json::json!({"status": "ok"})).into_response());

    send.or(deliveries)
        .unify()
        .or(requests)
        .unify()
        .or(reset)
        .unify()
        .or(stats)
        .unify()
        .or(health)
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
    let reply = |status: StatusCode, value: serde_json::Value| {
        with_status(json(&value), status).into_response()
    };
    lock(ledger).stats.requests += 1;
    if let Some(token) = &options.token {
        let presented = match &options.auth_header {
            Some(name) => headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            None => headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string),
        };
        if presented.as_deref() != Some(token.as_str()) {
            lock(ledger).stats.rejected += 1;
            return reply(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid token"}),
            );
        }
    }
    let latency = if options.slow_rate > 0.0 && rand::random::<f64>() < options.slow_rate {
        options.slow_latency
    } else {
        options.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if options.fail_rate > 0.0 && rand::random::<f64>() < options.fail_rate {
        lock(ledger).stats.injected_failures += 1;
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "injected failure"}),
        );
    }
    let parsed: SendBody = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(err) => {
            lock(ledger).stats.rejected += 1;
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("bad body: {err}")}),
            );
        }
    };
    if parsed.to.is_empty() || parsed.content.is_empty() {
        lock(ledger).stats.rejected += 1;
        return reply(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "to and content are required"}),
        );
    }
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
                let message_id = random_uuid();
                ledger.deliveries.insert(
                    key.clone(),
                    Delivery {
                        key,
                        to: parsed.to,
                        content: parsed.content,
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
    if let (true, Some(receipts)) = (first, &options.receipts) {
        let post = post_receipt(receipts.clone(), message_id.clone(), shared.clone());
        if receipts.delay.is_zero() {
            post.await;
        } else {
            tokio::spawn(post);
        }
    }
    reply(
        StatusCode::ACCEPTED,
        serde_json::json!({"message": "Accepted", "messageId": message_id}),
    )
}

/// Posts one receipt after the configured delay, trying a few times: the dispatcher
/// may be restarting.
async fn post_receipt(options: ReceiptOptions, message_id: String, ledger: Shared) {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default()
    });
    tokio::time::sleep(options.delay).await;
    let undelivered =
        options.undelivered_rate > 0.0 && rand::random::<f64>() < options.undelivered_rate;
    let mut body = serde_json::json!({
        "message_id": message_id,
        "status": if undelivered { "undelivered" } else { "delivered" },
        "delivered_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    });
    if undelivered {
        body["error_code"] = "absent_subscriber".into();
    }
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let mut request = client.post(&options.url).json(&body);
        if let Some(token) = &options.token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                lock(&ledger).stats.receipts_posted += 1;
                return;
            }
            Ok(response) => {
                tracing::warn!(status = response.status().as_u16(), %message_id, "receipt refused");
                // A 4xx will not change on a retry.
                if response.status().is_client_error() {
                    break;
                }
            }
            Err(err) => tracing::warn!(error = %err, %message_id, "receipt not delivered"),
        }
    }
    lock(&ledger).stats.receipts_failed += 1;
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
