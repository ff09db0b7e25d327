//! Providers for tests: the real `mock-provider` subcommand as a process, and a
//! scripted in-process server whose answer each message's content chooses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Reply;

use super::{
    ReplicaSettings, TempDir, binary, die_with_test, http, secs, wait_for, wait_logged_port,
};

/// One entry of the mock provider's `/deliveries`.
#[derive(Debug, Clone, Deserialize)]
pub struct Delivery {
    pub key: String,
    /// The message the key belongs to (`TestEnv::deliveries` fills it in; -1 for a key
    /// that is no message's).
    #[serde(default)]
    pub id: i64,
    pub to: String,
    pub content: String,
    pub message_id: String,
    pub first_seen_us: i64,
    pub times_seen: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    pub unique_keys: u64,
    pub duplicates: u64,
    pub injected_failures: u64,
    pub rejected: u64,
    pub receipts_posted: u64,
    pub receipts_failed: u64,
}

/// `message-dispatcher mock-provider` as a real process.
pub struct MockProvider {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl MockProvider {
    /// On a port the kernel chooses when it binds (read back from its log), so no
    /// other process can take the port between a pick and the bind.
    pub async fn start(extra_args: &[&str]) -> Self {
        Self::start_on(0, extra_args).await
    }

    /// On a port chosen beforehand (so replicas can be told it before it runs), or 0.
    pub async fn start_on(port: u16, extra_args: &[&str]) -> Self {
        let dir = TempDir::new("mock");
        let log_path = dir.path().join("mock.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary());
        command
            .args(["mock-provider", "--port", &port.to_string()])
            .args(extra_args)
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "warn,message_dispatcher::provider::mock=info")
            .stdout(log)
            .stderr(Stdio::null());
        die_with_test(&mut command);
        let child = command.spawn().expect("start mock provider");
        let port = match port {
            0 => wait_logged_port(&log_path, "mock provider listening"),
            port => port,
        };
        let provider = Self {
            port,
            child,
            _dir: dir,
        };
        let url = provider.url("/health");
        wait_for("the mock provider", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                http()
                    .get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
        provider
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn send_url(&self) -> String {
        self.url("/send")
    }

    pub async fn deliveries(&self) -> Vec<Delivery> {
        http()
            .get(self.url("/deliveries"))
            .send()
            .await
            .expect("GET /deliveries")
            .json()
            .await
            .expect("deliveries JSON")
    }

    pub async fn stats(&self) -> Stats {
        http()
            .get(self.url("/stats"))
            .send()
            .await
            .expect("GET /stats")
            .json()
            .await
            .expect("stats JSON")
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request the scripted provider received.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: Option<String>,
    pub to: String,
    pub content: String,
    pub headers: HashMap<String, String>,
    pub at: Instant,
}

/// An in-process provider that answers according to the message content:
///
/// - `reply:500` → always 500; `reply:500-once` → 500 the first time for a key, then 202
/// - `reply:400` → 400 (a bad number)
/// - `reply:429-after-N` → 429 with `Retry-After: N`
/// - `reply:200` → 200 with a `messageId`; `reply:200-noid` → 200 without one
/// - `reply:sleep-MS` → waits MS milliseconds, then 202
/// - answers PostgreSQL would refuse if stored as they come: `reply:202-nul-id` (a NUL
///   byte in `messageId`), `reply:202-long-id` (a 100,000-character `messageId`),
///   `reply:500-nul-body` (a NUL byte in the error body), `reply:500-huge-body` (a
///   4 MiB error body), `reply:503-retry-after-huge` (`Retry-After:
///   99999999999999999`), and `reply:302` (a redirect)
/// - anything else → 202 `{"message": "Accepted", "messageId": "id-<key>"}`
///
/// While [`ScriptedProvider::refuse_credentials`] is on, every request gets 401.
#[derive(Clone)]
pub struct ScriptedProvider {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// Answers to `reply:hold` wait until this turns true.
    release: tokio::sync::watch::Sender<bool>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl ScriptedProvider {
    pub async fn start() -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let (release, released) = tokio::sync::watch::channel(false);
        let refusing: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let refuse = refusing.clone();
        let route = warp::path!("send")
            .and(warp::post())
            .and(warp::header::headers_cloned())
            .and(warp::body::json::<serde_json::Value>())
            .then(
                move |headers: warp::http::HeaderMap, body: serde_json::Value| {
                    let log = log.clone();
                    let released = released.clone();
                    let refuse = refuse.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        if refuse {
                            return refused(&log, &headers, &body);
                        }
                        answer(&log, released, &headers, &body).await
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Self {
            addr,
            received,
            release,
            refusing,
        }
    }

    /// From now on every request gets 401 (`true`), or the usual answers (`false`): our
    /// credentials were revoked, or fixed on the provider's side.
    pub fn refuse_credentials(&self, refuse: bool) {
        self.refusing
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets every `reply:hold` answer go, held or still to come.
    pub fn release_held(&self) {
        self.release.send_replace(true);
    }

    pub fn send_url(&self) -> String {
        format!("http://{}/send", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Requests for one idempotency key (a message's `delivery_key`: see
    /// `TestEnv::delivery_keys`).
    pub fn requests_for(&self, key: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect()
    }

    /// Every one of `keys` reached the provider exactly once.
    pub fn assert_each_requested_once(&self, keys: &[String]) {
        for key in keys {
            assert_eq!(self.requests_for(key).len(), 1, "message {key} sent once");
        }
    }
}

/// A replica for tests that hold the first message's answer (`reply:hold`): batches of
/// `batch_size` back to back, two sends in flight, and a provider timeout longer than
/// any wait of a test, so the held send never times out first.
pub fn holding_settings(batch_size: u32) -> ReplicaSettings {
    ReplicaSettings::fast()
        .batch_size(batch_size)
        .processing_interval(Duration::ZERO)
        .send_concurrency(2)
        .provider_timeout(secs(300))
}

/// A 401 for a request, logged like the others.
fn refused(
    log: &Mutex<Vec<Received>>,
    headers: &warp::http::HeaderMap,
    body: &serde_json::Value,
) -> warp::reply::Response {
    log.lock().unwrap().push(Received {
        key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        to: body["to"].as_str().unwrap_or_default().to_string(),
        content: body["content"].as_str().unwrap_or_default().to_string(),
        headers: HashMap::new(),
        at: Instant::now(),
    });
    warp::reply::with_status("invalid credentials", StatusCode::UNAUTHORIZED).into_response()
}

async fn answer(
    log: &Mutex<Vec<Received>>,
    mut released: tokio::sync::watch::Receiver<bool>,
    headers: &warp::http::HeaderMap,
    body: &serde_json::Value,
) -> warp::reply::Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let content = body["content"].as_str().unwrap_or_default().to_string();
    let seen_before = {
        let mut log = log.lock().unwrap();
        let seen = log.iter().filter(|r| r.key == key).count();
        log.push(Received {
            key: key.clone(),
            to: body["to"].as_str().unwrap_or_default().to_string(),
            content: content.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        v.to_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            at: Instant::now(),
        });
        seen
    };
    let id = format!("id-{}", key.unwrap_or_default());
    let accepted = || {
        warp::reply::with_status(
            warp::reply::json(&serde_json::json!({"message": "Accepted", "messageId": id})),
            StatusCode::ACCEPTED,
        )
        .into_response()
    };
    let status = |code: u16, text: &str| {
        warp::reply::with_status(text.to_string(), StatusCode::from_u16(code).unwrap())
            .into_response()
    };
    let directive = content
        .split_whitespace()
        .find_map(|word| word.strip_prefix("reply:"))
        .unwrap_or("");
    match directive {
        "500" => status(500, "provider down"),
        "500-once" if seen_before == 0 => status(500, "provider hiccup"),
        "400" => status(400, "invalid phone number"),
        "200" => warp::reply::json(&serde_json::json!({"message_id": id})).into_response(),
        "200-noid" => warp::reply::json(&serde_json::json!({"message": "ok"})).into_response(),
        "202-nul-id" => warp::reply::with_status(
            warp::reply::json(&serde_json::json!({"messageId": format!("{id}\u{0}x")})),
            StatusCode::ACCEPTED,
        )
        .into_response(),
        "202-long-id" => warp::reply::with_status(
            warp::reply::json(&serde_json::json!({"messageId": "x".repeat(100_000)})),
            StatusCode::ACCEPTED,
        )
        .into_response(),
        "500-nul-body" => status(500, "broken\u{0}body"),
        "500-huge-body" => status(500, &"e".repeat(4 << 20)),
        "503-retry-after-huge" => {
            let mut response = status(503, "busy");
            response
                .headers_mut()
                .insert("retry-after", "99999999999999999".parse().unwrap());
            response
        }
        "302" => {
            let mut response = status(302, "moved");
            response
                .headers_mut()
                .insert("location", "http://127.0.0.1:1/elsewhere".parse().unwrap());
            response
        }
        other => {
            if let Some(secs) = other.strip_prefix("429-after-") {
                let mut response = status(429, "slow down");
                response
                    .headers_mut()
                    .insert("retry-after", secs.parse().unwrap());
                return response;
            }
            if let Some(ms) = other.strip_prefix("sleep-") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            }
            if other == "hold" {
                let _ = released.wait_for(|go| *go).await;
            }
            accepted()
        }
    }
}

/// A mock provider started on port 0 serves on the port it logs, which the harness
/// reads back: no port is picked before the bind, so none can be taken meanwhile.
#[tokio::test]
async fn a_mock_on_port_zero_serves_on_the_port_it_logs() {
    let first = MockProvider::start(&[]).await;
    let second = MockProvider::start(&[]).await;
    assert_ne!(first.port, 0);
    assert_ne!(first.port, second.port);
    for mock in [&first, &second] {
        let health = http().get(mock.url("/health")).send().await.unwrap();
        assert!(health.status().is_success());
    }
}
