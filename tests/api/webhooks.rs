//! Status webhooks (docs/design.md#status-webhooks) against a real receiver: every
//! status change posted, signed per the Standard Webhooks specification (checked here
//! with the specification's algorithm, not the replica's code), retried with the same
//! `webhook-id`, given up after the retry window and replayed, and never lost when the
//! replica that should post it is killed.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};
use warp::Filter;

use crate::support::replica::run_command;
use crate::support::{Replica, ReplicaSettings, TestEnv, secs, wait_for};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 500 to the first request of each webhook-id, 200 after.
    FailFirst,
    AlwaysFail,
    Accept,
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    answered: u16,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A customer's endpoint: answers as its mode says and keeps every request.
struct Receiver {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(mode));
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (m, r) = (mode.clone(), received.clone());
        let route = warp::post()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(
                move |path: warp::path::FullPath,
                      headers: warp::http::HeaderMap,
                      body: bytes::Bytes| {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let id = header("webhook-id");
                    let mut received = r.lock().unwrap();
                    let seen = received.iter().any(|x| x.id == id);
                    let answered = match *m.lock().unwrap() {
                        Mode::FailFirst if !seen => 500,
                        Mode::AlwaysFail => 500,
                        _ => 200,
                    };
                    received.push(Received {
                        path: path.as_str().to_string(),
                        id,
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body: String::from_utf8_lossy(&body).into_owned(),
                        answered,
                    });
                    warp::reply::with_status(
                        String::new(),
                        warp::http::StatusCode::from_u16(answered).unwrap(),
                    )
                },
            );
        tokio::spawn(async move {
            warp::serve(
                route.recover(|_| async { Ok::<_, Infallible>(warp::http::StatusCode::NOT_FOUND) }),
            )
            .incoming(listener)
            .run()
            .await;
        });
        Self {
            port,
            mode,
            received,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The accepted request of the event of `event_type` about message `id`.
    async fn accepted(&self, event_type: &str, id: i64) -> Received {
        wait_for(
            &format!("{event_type} of message {id} accepted"),
            secs(60),
            || async {
                self.received().into_iter().find(|r| {
                    let body = r.json();
                    r.answered == 200 && body["type"] == event_type && body["data"]["id"] == id
                })
            },
        )
        .await
    }
}

/// The specification's check: base64 HMAC-SHA256, keyed with the secret's bytes, of
/// "id.timestamp.body", among the header's space-separated `v1,` signatures.
fn signature_is_valid(request: &Received) -> bool {
    use aws_lc_rs::hmac;
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let signed = format!("{}.{}.{}", request.id, request.timestamp, request.body);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), signed.as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    );
    request.signature.split(' ').any(|s| s == expected)
}

fn webhook_settings(env: &TestEnv, receiver: &Receiver) -> ReplicaSettings {
    env.settings()
        .env("STATUS_WEBHOOK_URL", &receiver.url("/hooks"))
        .env("STATUS_WEBHOOK_SECRET", SECRET)
}

async fn create(replica: &Replica, body: Value) -> i64 {
    let (status, created) = replica.post("/api/messages", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_i64().unwrap()
}

async fn wait_status(replica: &Replica, id: i64, status: &str) -> Value {
    wait_for(&format!("message {id} {status}"), secs(30), || async {
        let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
        (message["status"] == status).then_some(message)
    })
    .await
}

#[tokio::test]
async fn every_status_change_is_posted_signed_and_retried_with_the_same_webhook_id() {
    let env = TestEnv::start().await;
    let receiver = Receiver::start(Mode::FailFirst).await;
    let replica = env.replica("r1", &webhook_settings(&env, &receiver)).await;

    let sent = create(
        &replica,
        json!({"phone_number": "+905558880001", "content": "hello"}),
    )
    .await;
    let sent_message = wait_status(&replica, sent, "sent").await;
    let (status, _) = replica
        .post(
            "/api/delivery-receipts",
            Some(json!({"message_id": sent_message["message_id"], "status": "delivered"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = reqwest::Client::new()
        .put(replica.url("/api/opt-outs/+905558880002"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 201);
    let blocked = create(
        &replica,
        json!({"phone_number": "+905558880002", "content": "stop?"}),
    )
    .await;
    let (status, _) = replica.post("/api/messaging/stop", None).await;
    assert_eq!(status, 200);
    let cancelled = create(
        &replica,
        json!({"phone_number": "+905558880003", "content": "never mind",
               "status_callback_url": receiver.url("/own")}),
    )
    .await;
    let (status, _) = replica
        .post(&format!("/api/messages/{cancelled}/cancel"), None)
        .await;
    assert_eq!(status, 200);

    let now = chrono::Utc::now().timestamp();
    for (event_type, id, path) in [
        ("message.sent", sent, "/hooks"),
        ("message.delivered", sent, "/hooks"),
        ("message.blocked", blocked, "/hooks"),
        ("message.cancelled", cancelled, "/own"),
    ] {
        let accepted = receiver.accepted(event_type, id).await;
        assert_eq!(accepted.path, path, "{event_type}");
        let attempts: Vec<Received> = receiver
            .received()
            .into_iter()
            .filter(|r| r.id == accepted.id)
            .collect();
        assert!(accepted.id.starts_with("msg_"), "{accepted:?}");
        assert_eq!(
            attempts[0].answered, 500,
            "{event_type}: the first attempt failed"
        );
        assert!(attempts.len() >= 2, "{event_type}: retried");
        for attempt in &attempts {
            assert!(signature_is_valid(attempt), "{event_type}: {attempt:?}");
            assert_eq!(attempt.body, attempts[0].body, "the same body every time");
            let timestamp: i64 = attempt.timestamp.parse().unwrap();
            assert!((timestamp - now).abs() < 300, "{attempt:?}");
        }
        let body = accepted.json();
        assert_eq!(body["data"]["id"], id);
        assert!(body["timestamp"].is_string(), "{body}");
    }
    // A forged signature (another secret) is told apart by the same check.
    let mut forged = receiver.accepted("message.sent", sent).await;
    forged.body = forged
        .body
        .replace("hello", "HELLO")
        .replace("sent", "sent ");
    assert!(!signature_is_valid(&forged));
    assert_eq!(
        replica
            .metric("dispatcher_webhook_deliveries_total{outcome=\"delivered\"}")
            .await,
        Some(4.0)
    );
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_its_replay_delivers_it_with_the_same_id() {
    let env = TestEnv::start().await;
    let receiver = Receiver::start(Mode::AlwaysFail).await;
    let replica = env
        .replica(
            "r1",
            &webhook_settings(&env, &receiver).env("STATUS_WEBHOOK_RETRY_FOR", "2s"),
        )
        .await;
    let id = create(
        &replica,
        json!({"phone_number": "+905558880011", "content": "hi"}),
    )
    .await;
    wait_status(&replica, id, "sent").await;
    let event = wait_for("a dead letter", secs(60), || async {
        let (_, page) = replica.get("/api/webhooks/failed").await;
        page["events"]
            .as_array()
            .and_then(|events| events.first().cloned())
    })
    .await;
    assert_eq!(event["type"], "message.sent", "{event}");
    assert_eq!(event["message_id"], id);
    assert!(event["attempts"].as_i64().unwrap() >= 2, "{event}");
    assert!(
        event["last_error"].as_str().unwrap().contains("HTTP 500"),
        "{event}"
    );
    let webhook_id = event["webhook_id"].as_str().unwrap().to_string();

    receiver.set(Mode::Accept);
    let (status, replayed) = replica
        .post(&format!("/api/webhooks/{}/replay", event["id"]), None)
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["status"], "pending");
    let accepted = receiver.accepted("message.sent", id).await;
    assert_eq!(accepted.id, webhook_id, "a replay keeps the webhook-id");
    assert!(signature_is_valid(&accepted));
    let (status, _) = replica
        .post(&format!("/api/webhooks/{}/replay", event["id"]), None)
        .await;
    assert_eq!(status, 409, "only a dead letter is replayed");
    let (status, _) = replica.post("/api/webhooks/999999/replay", None).await;
    assert_eq!(status, 404);
    assert!(
        replica
            .metric("dispatcher_webhook_deliveries_total{outcome=\"failed\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    );
}

/// The event is written in the transaction that records the send: a replica killed
/// while the receiver refuses it leaves it to the next replica, which delivers it.
#[tokio::test]
async fn an_event_outlives_the_replica_that_could_not_deliver_it() {
    let env = TestEnv::start().await;
    let receiver = Receiver::start(Mode::AlwaysFail).await;
    let settings = webhook_settings(&env, &receiver);
    let mut first = env.replica("r1", &settings).await;
    let id = create(
        &first,
        json!({"phone_number": "+905558880021", "content": "hi"}),
    )
    .await;
    wait_status(&first, id, "sent").await;
    wait_for("a refused attempt", secs(30), || async {
        receiver.received().into_iter().find(|r| r.answered == 500)
    })
    .await;
    first.kill();

    receiver.set(Mode::Accept);
    let second = env.replica("r2", &settings).await;
    let accepted = receiver.accepted("message.sent", id).await;
    assert!(signature_is_valid(&accepted));
    let ids: std::collections::HashSet<String> =
        receiver.received().into_iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1, "one event, however many attempts");
    drop(second);
}

#[tokio::test]
async fn webhook_settings_are_checked_at_start_and_at_intake() {
    let env = TestEnv::start().await;
    for (vars, named) in [
        (
            vec![("STATUS_WEBHOOK_URL", "http://127.0.0.1:9/hooks")],
            "STATUS_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("STATUS_WEBHOOK_URL", "http://127.0.0.1:9/hooks"),
                ("STATUS_WEBHOOK_SECRET", "not-a-secret"),
            ],
            "STATUS_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("STATUS_WEBHOOK_URL", "ftp://example"),
                ("STATUS_WEBHOOK_SECRET", SECRET),
            ],
            "STATUS_WEBHOOK_URL",
        ),
    ] {
        let mut settings = env.settings();
        for (name, value) in &vars {
            settings = settings.env(name, value);
        }
        let (status, output) = run_command(&["migrate"], &settings.to_env());
        assert_eq!(status.code(), Some(2), "{vars:?}: {output}");
        assert!(output.contains(named), "{vars:?}: {output}");
    }
    // Without a secret, a message cannot name its own endpoint.
    let replica = env.replica("r1", &env.settings()).await;
    let (status, error) = replica
        .post(
            "/api/messages",
            Some(json!({"phone_number": "+905558880031", "content": "hi",
                        "status_callback_url": "https://example.com/hooks"})),
        )
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "status_callback_url");
}

/// A receipt that turns an undelivered message into a failed one (both undelivered to
/// the customer) writes no second `message.undelivered` with a new webhook-id; a later
/// `delivered` still writes its event.
#[tokio::test]
async fn a_message_has_one_undelivered_event_however_many_undelivered_receipts() {
    let env = TestEnv::start().await;
    let receiver = Receiver::start(Mode::Accept).await;
    let replica = env.replica("r1", &webhook_settings(&env, &receiver)).await;
    let id = create(
        &replica,
        json!({"phone_number": "+905558880011", "content": "hello"}),
    )
    .await;
    let message = wait_status(&replica, id, "sent").await;
    for receipt in ["undelivered", "failed", "delivered"] {
        let (status, answer) = replica
            .post(
                "/api/delivery-receipts",
                Some(json!({"message_id": message["message_id"], "status": receipt})),
            )
            .await;
        assert_eq!(status, 200, "{receipt}: {answer}");
    }
    let events: Vec<String> = env
        .db()
        .await
        .query(
            "SELECT type FROM webhook_events WHERE message_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        events,
        ["message.sent", "message.undelivered", "message.delivered"]
    );
}

/// A dead letter stays until its message is gone: once retention has removed the
/// message, the prune forgets it; one whose message remains stays listed.
#[tokio::test]
async fn dead_letters_of_removed_messages_are_pruned() {
    use message_dispatcher::store::Store;
    let env = TestEnv::start().await;
    let settings = env.settings();
    let (status, output) = crate::support::replica::run_command(&["migrate"], &settings.to_env());
    assert!(status.success(), "{output}");
    let ids = env.insert_messages(2).await;
    let db = env.db().await;
    for (webhook_id, message_id) in [("msg_kept", ids[0]), ("msg_orphan", ids[1])] {
        db.execute(
            "INSERT INTO webhook_events (webhook_id, message_id, type, payload, status)
             VALUES ($1, $2, 'message.sent', '{}', 'failed')",
            &[&webhook_id, &message_id],
        )
        .await
        .unwrap();
    }
    db.execute("DELETE FROM messages WHERE id = $1", &[&ids[1]])
        .await
        .unwrap();
    let store = Store::new(&settings.to_config().database).unwrap();
    assert_eq!(store.prune_orphaned_dead_letters().await.unwrap(), 1);
    let left: Vec<String> = db
        .query("SELECT webhook_id FROM webhook_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["msg_kept"]);
}
