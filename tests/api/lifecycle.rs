//! The message lifecycle against real servers: idempotent intake through two replicas,
//! scheduled, expiring and prioritised messages, cancel racing the claim, segment
//! counts, delivery receipts (also before the send result), stats, and the in-place
//! upgrade of an existing database.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::support::{
    MockProvider, Replica, ReplicaSettings, TestEnv, free_port, http, ms, secs, wait_for,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn post_json(url: String, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = http().post(url).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Posts a message that must be refused with 422 naming `field`; returns the error.
async fn refused(replica: &Replica, body: &Value, headers: &[(&str, &str)], field: &str) -> Value {
    let (status, error) = post_json(replica.url("/api/messages"), body, headers).await;
    assert_eq!(status, 422, "{headers:?} {body}: {error}");
    assert_eq!(error["error"]["field"], field, "{error}");
    error
}

async fn message(replica: &Replica, id: i64) -> Value {
    let (status, body) = replica.get(&format!("/api/messages/{id}")).await;
    assert_eq!(status, 200, "GET message {id}: {body}");
    body
}

/// Waits until message `id` has `status`; returns it.
async fn wait_status(replica: &Replica, id: i64, status: &str) -> Value {
    wait_for(
        &format!("message {id} to be {status}"),
        TEST_TIMEOUT,
        || async {
            let body = message(replica, id).await;
            (body["status"] == status).then_some(body)
        },
    )
    .await
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

async fn stop_cluster(replica: &Replica) {
    assert_eq!(replica.post("/api/messaging/stop", None).await.0, 200);
}

async fn start_cluster(replica: &Replica) {
    assert_eq!(replica.post("/api/messaging/start", None).await.0, 200);
}

/// Two arrays with the same idempotency keys in opposite orders, at once, through two
/// replicas, round after round: each gets its rows (one creates them, the other finds
/// them), never a 503 for a deadlock inside PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_keys_in_opposite_orders_never_deadlock() {
    let env = TestEnv::start().await;
    let settings = ReplicaSettings::fast();
    let (r1, r2) = tokio::join!(env.replica("r1", &settings), env.replica("r2", &settings));
    stop_cluster(&r1).await;
    for round in 0..15 {
        let items: Vec<Value> = (0..200)
            .map(|i| {
                json!({"phone_number": format!("+9055511{:05}", i), "content": format!("m{i}"),
                       "idempotency_key": format!("r{round}-k{i}")})
            })
            .collect();
        let forward = json!(items);
        let backward = json!(items.iter().rev().collect::<Vec<_>>());
        let ((s1, b1), (s2, b2)) = tokio::join!(
            post_json(r1.url("/api/messages"), &forward, &[]),
            post_json(r2.url("/api/messages"), &backward, &[])
        );
        assert!(
            [200, 201].contains(&s1) && [200, 201].contains(&s2),
            "round {round}: {s1} {} / {s2} {}",
            b1["error"],
            b2["error"]
        );
        assert_eq!(
            [s1, s2].iter().filter(|s| **s == 201).count(),
            1,
            "round {round}: one request created the rows"
        );
        assert_eq!(b1[0]["id"], b2[199]["id"]);
    }
    assert_eq!(env.count("pending").await, 15 * 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_create_one_row_even_racing_through_two_replicas() {
    let env = TestEnv::start().await;
    let settings = ReplicaSettings::fast();
    let (r1, r2) = tokio::join!(env.replica("r1", &settings), env.replica("r2", &settings));
    stop_cluster(&r1).await;

    // 24 repeats of one key, all at once, alternating between the replicas.
    let body = json!({"phone_number": "+905551110000", "content": "one code"});
    let answers = futures::future::join_all((0..24).map(|i| {
        let url = if i % 2 == 0 { &r1 } else { &r2 }.url("/api/messages");
        let body = body.clone();
        async move { post_json(url, &body, &[("Idempotency-Key", "otp-4711")]).await }
    }))
    .await;
    let ids: HashSet<i64> = answers
        .iter()
        .map(|(status, body)| {
            assert!(*status == 200 || *status == 201, "{status} {body}");
            body["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every repeat answers the same message");
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(created, 1, "exactly one request created it");
    let rows: i64 = env
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM messages WHERE idempotency_key = 'otp-4711'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    assert_eq!(answers[0].1["idempotency_key"], "otp-4711");

    // The same key with another payload: 409, nothing created.
    let (status, conflict) = post_json(
        r2.url("/api/messages"),
        &json!({"phone_number": "+905551110000", "content": "another text"}),
        &[("Idempotency-Key", "otp-4711")],
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");

    // Keys in an array: a repeated item returns its original row; 201 when anything
    // was created, 200 when nothing was; a conflict anywhere creates nothing.
    let batch = json!([
        {"phone_number": "+905551110001", "content": "a", "idempotency_key": "k-a"},
        {"phone_number": "+905551110001", "content": "a", "idempotency_key": "k-a"},
        {"phone_number": "+905551110002", "content": "b"},
        {"phone_number": "+905551110000", "content": "one code", "idempotency_key": "otp-4711"}
    ]);
    let (status, rows) = post_json(r1.url("/api/messages"), &batch, &[]).await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(rows[0]["id"], rows[1]["id"]);
    assert_eq!(rows[3]["id"].as_i64(), ids.iter().next().copied());
    let (status, again) =
        post_json(r2.url("/api/messages"), &json!([batch[0], batch[3]]), &[]).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again[0]["id"], rows[0]["id"]);
    let before = env.count("pending").await;
    let (status, conflict) = post_json(
        r1.url("/api/messages"),
        &json!([
            {"phone_number": "+905551110003", "content": "new"},
            {"phone_number": "+905551110001", "content": "changed", "idempotency_key": "k-a"}
        ]),
        &[],
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert!(
        conflict["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1]")
    );
    assert_eq!(
        env.count("pending").await,
        before,
        "a conflict creates nothing"
    );

    // Bad keys and misuse: 422 naming the field.
    for (headers, body, field) in [
        (
            vec![("Idempotency-Key", "has space")],
            body.clone(),
            "Idempotency-Key",
        ),
        (
            vec![],
            json!({"phone_number": "+905551110000", "content": "x", "idempotency_key": ""}),
            "idempotency_key",
        ),
        (
            vec![],
            json!({"phone_number": "+905551110000", "content": "x", "idempotency_key": "k".repeat(256)}),
            "idempotency_key",
        ),
        (
            vec![],
            json!({"phone_number": "+905551110000", "content": "x", "idempotency_key": 7}),
            "idempotency_key",
        ),
        (
            vec![("Idempotency-Key", "k-b")],
            json!([body.clone()]),
            "Idempotency-Key",
        ),
        (
            vec![("Idempotency-Key", "k-b")],
            json!({"phone_number": "+905551110000", "content": "x", "idempotency_key": "k-c"}),
            "idempotency_key",
        ),
    ] {
        refused(&r1, &body, &headers, field).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_at_is_respected_and_expired_messages_never_reach_the_provider() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(10)
                .processing_interval(ms(500)),
        )
        .await;

    // A message validity that ends while the cluster is stopped: expired at the claim.
    stop_cluster(&replica).await;
    let expires_at = Utc::now() + chrono::Duration::milliseconds(800);
    let (status, doomed) = post_json(
        replica.url("/api/messages"),
        &json!({"phone_number": "+905552220000", "content": "too late", "expires_at": rfc3339(expires_at)}),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{doomed}");
    let doomed_id = doomed["id"].as_i64().unwrap();
    wait_for("the validity to end", TEST_TIMEOUT, || async {
        (Utc::now() > expires_at + chrono::Duration::milliseconds(200)).then_some(())
    })
    .await;

    let send_at = Utc::now() + chrono::Duration::seconds(3);
    let (status, scheduled) = post_json(
        replica.url("/api/messages"),
        &json!({"phone_number": "+905552220001", "content": "campaign", "send_at": rfc3339(send_at),
                "expires_at": rfc3339(send_at + chrono::Duration::hours(1))}),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{scheduled}");
    let scheduled_id = scheduled["id"].as_i64().unwrap();
    let now_id = env.create_messages(&replica, &["right away"]).await[0];
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(stats["scheduled"], 1, "{stats}");
    start_cluster(&replica).await;

    let expired = wait_status(&replica, doomed_id, "expired").await;
    assert!(
        expired["last_error"]
            .as_str()
            .unwrap()
            .contains("expired at"),
        "{expired}"
    );
    wait_status(&replica, now_id, "sent").await;
    wait_status(&replica, scheduled_id, "sent").await;
    let deliveries = env.deliveries().await;
    let delivered: HashSet<i64> = deliveries.iter().map(|d| d.id).collect();
    assert!(
        !delivered.contains(&doomed_id),
        "an expired message was sent"
    );
    let campaign = deliveries.iter().find(|d| d.id == scheduled_id).unwrap();
    // Never before send_at; after it within one interval (plus a generous margin for
    // a busy machine: the bound that matters is the lower one).
    let sent_us = campaign.first_seen_us;
    assert!(
        sent_us >= send_at.timestamp_micros(),
        "sent {} µs before its send_at",
        send_at.timestamp_micros() - sent_us
    );
    assert!(
        sent_us <= (send_at + chrono::Duration::seconds(5)).timestamp_micros(),
        "sent {} ms after its send_at",
        (sent_us - send_at.timestamp_micros()) / 1000
    );
    let expired_total = replica.metric("dispatcher_messages_expired_total").await;
    assert_eq!(expired_total, Some(1.0));

    // expires_at must be after send_at.
    let body = json!({"phone_number": "+905552220002", "content": "x", "send_at": rfc3339(send_at),
                      "expires_at": rfc3339(send_at)});
    refused(&replica, &body, &[], "expires_at").await;
    for bad in [
        "tomorrow",
        "2026-12-01T10:00:00",
        "2026-13-01T10:00:00Z",
        "",
    ] {
        let body = json!({"phone_number": "+905552220002", "content": "x", "send_at": bad});
        refused(&replica, &body, &[], "send_at").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expires_while_claimed_is_not_sent() {
    // Each send takes 6 s and one send runs at a time: the second message of the batch
    // waits behind the first, and its 3 s validity ends meanwhile.
    let env = TestEnv::with_mock(&["--latency-ms", "6000"]).await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(2)
                .processing_interval(ms(200))
                .provider_timeout(secs(20)),
        )
        .await;
    wait_for("leadership", TEST_TIMEOUT, || async {
        replica.is_leader().await.then_some(())
    })
    .await;
    let expires_at = Utc::now() + chrono::Duration::seconds(3);
    let (status, rows) = post_json(
        replica.url("/api/messages"),
        &json!([
            {"phone_number": "+905553330000", "content": "first"},
            {"phone_number": "+905553330001", "content": "short-lived", "expires_at": rfc3339(expires_at)}
        ]),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{rows}");
    let (first, second) = (
        rows[0]["id"].as_i64().unwrap(),
        rows[1]["id"].as_i64().unwrap(),
    );
    wait_status(&replica, first, "sent").await;
    let expired = wait_status(&replica, second, "expired").await;
    assert!(
        expired["last_error"]
            .as_str()
            .unwrap()
            .contains("while claimed"),
        "it was claimed before its validity ended: {expired}"
    );
    assert_eq!(
        expired["attempts"], 0,
        "the attempt that never happened is not counted"
    );
    let delivered: Vec<i64> = env.deliveries().await.into_iter().map(|d| d.id).collect();
    assert_eq!(delivered, vec![first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_goes_first_and_fifo_within_a_priority() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(2)
                .processing_interval(ms(300)),
        )
        .await;
    stop_cluster(&replica).await;
    let items: Vec<Value> = [(0, "a"), (0, "b"), (3, "c"), (1, "d"), (3, "e"), (0, "f")]
        .iter()
        .enumerate()
        .map(|(i, (priority, name))| {
            json!({"phone_number": format!("+90555444000{i}"), "content": name, "priority": priority})
        })
        .collect();
    let (status, rows) = post_json(replica.url("/api/messages"), &json!(items), &[]).await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(rows[2]["priority"], 3);
    start_cluster(&replica).await;
    env.wait_drained(TEST_TIMEOUT).await;
    let order: Vec<String> = env
        .deliveries()
        .await
        .into_iter()
        .map(|d| d.content)
        .collect();
    assert_eq!(order, ["c", "e", "d", "a", "b", "f"]);

    for bad in [json!(4), json!(-1), json!(1.5), json!("3")] {
        let body = json!({"phone_number": "+905554440000", "content": "x", "priority": bad});
        refused(&replica, &body, &[], "priority").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_races_the_claim_and_a_message_is_claimed_or_cancelled_never_both() {
    let env = TestEnv::start().await;
    let settings = ReplicaSettings::fast()
        .batch_size(5)
        .processing_interval(Duration::ZERO);
    let (r1, r2) = tokio::join!(env.replica("r1", &settings), env.replica("r2", &settings));
    let contents: Vec<String> = (0..300).map(|i| format!("race {i}")).collect();
    let ids = env
        .create_messages(
            &r1,
            &contents.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
    // Cancel every message through both replicas while the leader claims them (one
    // client: building a TLS-capable client per request would take longer than the race).
    let client = http();
    let answers = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let replica = if i % 2 == 0 { &r1 } else { &r2 };
        let request = client.post(replica.url(&format!("/api/messages/{id}/cancel")));
        async move {
            let response = request.send().await.expect("POST cancel");
            let status = response.status().as_u16();
            (
                *id,
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                ),
            )
        }
    }))
    .await;
    env.wait_drained(TEST_TIMEOUT).await;
    let delivered: HashSet<i64> = env.deliveries().await.into_iter().map(|d| d.id).collect();
    let stored: HashMap<i64, String> = env
        .db()
        .await
        .query("SELECT id, status FROM messages", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut cancelled = 0;
    for (id, (status, body)) in &answers {
        let stored = &stored[id];
        match status {
            200 => {
                cancelled += 1;
                assert_eq!(stored, "cancelled");
                assert!(!delivered.contains(id), "cancelled {id} was sent");
            }
            409 => {
                assert_eq!(stored, "sent", "{body}");
                assert!(delivered.contains(id));
            }
            other => panic!("cancel {id}: {other} {body}"),
        }
    }
    assert_eq!(delivered.len() + cancelled, ids.len());
    println!("{cancelled} cancelled, {} sent", delivered.len());

    let (status, _) = r1.post("/api/messages/999999/cancel", None).await;
    assert_eq!(status, 404);
    let cancelled_total = r1
        .metric("dispatcher_messages_cancelled_total")
        .await
        .unwrap()
        + r2.metric("dispatcher_messages_cancelled_total")
            .await
            .unwrap();
    assert_eq!(cancelled_total, cancelled as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_shows_its_encoding_and_segments() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .message_max_length(1000)
                .message_max_segments(3),
        )
        .await;
    stop_cluster(&replica).await;
    let cases = [
        ("a".repeat(160), "gsm7", 1),
        ("a".repeat(161), "gsm7", 2),
        ("€".repeat(80), "gsm7", 1),
        ("€".repeat(81), "gsm7", 2),
        (format!("{}{{", "a".repeat(159)), "gsm7", 2),
        ("ş".repeat(70), "ucs2", 1),
        ("ş".repeat(71), "ucs2", 2),
        ("😀".repeat(35), "ucs2", 1),
        ("😀".repeat(36), "ucs2", 2),
    ];
    let body: Vec<Value> = cases
        .iter()
        .map(|(content, ..)| json!({"phone_number": "+905555550000", "content": content}))
        .collect();
    let (status, rows) = post_json(replica.url("/api/messages"), &json!(body), &[]).await;
    assert_eq!(status, 201, "{rows}");
    for ((content, encoding, segments), row) in cases.iter().zip(rows.as_array().unwrap()) {
        assert_eq!(row["encoding"], *encoding, "{content}");
        assert_eq!(row["segments"], *segments, "{content}");
    }
    let listed = replica.get("/api/messages?limit=1").await.1;
    assert_eq!(listed["messages"][0]["segments"], 2);

    // 4 segments where 3 are allowed.
    let body = json!({"phone_number": "+905555550000", "content": "a".repeat(460)});
    let error = refused(&replica, &body, &[], "content").await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("segments")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_receipts_apply_even_before_the_send_result_and_stay_final() {
    // The mock posts each receipt before it answers the send (--dlr-delay-ms 0): the
    // receipt always arrives before the dispatcher can record the provider's id.
    let env = TestEnv::start().await;
    let mock_port = free_port();
    let mock_url = format!("http://127.0.0.1:{mock_port}/send");
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .provider_url(&mock_url)
                .batch_size(10)
                .processing_interval(ms(200))
                .api_token("api-secret")
                .dlr_token("dlr-secret"),
        )
        .await;
    let receipts_url = replica.url("/api/delivery-receipts");
    let mock = MockProvider::start_on(
        mock_port,
        &[
            "--dlr-url",
            &receipts_url,
            "--dlr-delay-ms",
            "0",
            "--dlr-token",
            "dlr-secret",
        ],
    )
    .await;
    let api = [("Authorization", "Bearer api-secret")];
    let body: Vec<Value> = (0..5)
        .map(|i| json!({"phone_number": format!("+90555666000{i}"), "content": format!("dlr {i}")}))
        .collect();
    let (status, rows) = post_json(replica.url("/api/messages"), &json!(body), &api).await;
    assert_eq!(status, 201, "{rows}");
    let ids: Vec<i64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();

    let db = env.db().await;
    wait_for("every receipt applied", TEST_TIMEOUT, || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM messages WHERE status = 'sent' AND delivery_status = 'delivered'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 5).then_some(())
    })
    .await;
    let stats = mock.stats().await;
    assert_eq!((stats.receipts_posted, stats.receipts_failed), (5, 0));
    let held: i64 = db
        .query_one("SELECT count(*) FROM delivery_receipts_pending", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "every early receipt was applied and forgotten");

    let client = http();
    let receipt = |body: Value, token: &'static str| {
        let request = client.post(&receipts_url).bearer_auth(token).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let provider_id = {
        let stored: Value = client
            .get(replica.url(&format!("/api/messages/{}", ids[0])))
            .bearer_auth("api-secret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stored["delivery_status"], "delivered");
        assert!(stored["delivered_at"].is_string());
        stored["message_id"].as_str().unwrap().to_string()
    };
    // A duplicate, and a later failure: `delivered` stays.
    for status in ["delivered", "undelivered"] {
        let (code, answer) = receipt(
            json!({"message_id": provider_id, "status": status, "error_code": "X1"}),
            "dlr-secret",
        )
        .await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["outcome"], "already_delivered");
    }
    let row = db
        .query_one(
            "SELECT delivery_status, delivery_error FROM messages WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "delivered");
    assert_eq!(row.get::<_, Option<&str>>(1), None);

    // An id no message carries: kept for later, answered `held`.
    let (code, answer) = receipt(
        json!([{"message_id": "no-such-id", "status": "failed", "delivered_at": "2026-12-01T10:00:00Z"}]),
        "dlr-secret",
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer[0]["outcome"], "held");

    // Wrong tokens: the API token does not open the receipts when DLR_TOKEN is set.
    for token in ["api-secret", "wrong"] {
        let (code, _) = receipt(
            json!({"message_id": provider_id, "status": "delivered"}),
            token,
        )
        .await;
        assert_eq!(code, 401, "{token}");
    }
    // Bad receipts: 422 naming the field (and the index in an array).
    for (body, field) in [
        (json!({"message_id": "m", "status": "read"}), "status"),
        (
            json!({"message_id": "m", "status": "delivered", "colour": "red"}),
            "colour",
        ),
        (json!({"status": "delivered"}), "message_id"),
        (
            json!({"message_id": "m", "status": "delivered", "delivered_at": "soon"}),
            "delivered_at",
        ),
        (
            json!([{"message_id": "m", "status": "delivered"}, {"message_id": 5, "status": "delivered"}]),
            "message_id",
        ),
    ] {
        let (code, error) = receipt(body.clone(), "dlr-secret").await;
        assert_eq!(code, 422, "{body}: {error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }

    let stats: Value = client
        .get(replica.url("/api/messages/stats"))
        .bearer_auth("api-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["by_status"]["sent"], 5, "{stats}");
    assert_eq!(stats["by_status"]["pending"], 0, "{stats}");
    assert_eq!(stats["delivery"]["delivered"], 5, "{stats}");
    assert_eq!(stats["delivery"]["awaiting"], 0, "{stats}");
    assert_eq!(stats["sent_last_hour"], 5, "{stats}");
    assert!(stats["oldest_pending_age_seconds"].is_null(), "{stats}");
    let metrics = replica.metrics().await;
    let receipts = crate::support::replica::metric_value(
        &metrics,
        "dispatcher_delivery_receipts_total{status=\"delivered\"}",
    );
    assert_eq!(receipts, Some(6.0), "5 from the mock, 1 by hand");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_held_for_a_send_in_flight_is_applied_once_the_result_is_recorded() {
    // The scripted provider names its ids `id-<key>` and answers `reply:sleep-…` late,
    // so the receipt can be posted while the send is in flight.
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().provider_timeout(secs(20)))
        .await;
    let id = env.create_messages(&replica, &["reply:sleep-5000"]).await[0];
    let key = env.delivery_key(id).await;
    wait_for("the send to be in flight", TEST_TIMEOUT, || async {
        (!env.scripted().requests_for(&key).is_empty()).then_some(())
    })
    .await;
    let (status, answer) = replica
        .post(
            "/api/delivery-receipts",
            Some(json!({"message_id": format!("id-{key}"), "status": "undelivered", "error_code": "absent"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"], "held", "the result was not recorded yet");
    let sent = wait_for("the receipt to be applied", TEST_TIMEOUT, || async {
        let body = message(&replica, id).await;
        (body["delivery_status"] == "undelivered").then_some(body)
    })
    .await;
    assert_eq!(sent["status"], "sent");
    assert_eq!(sent["delivery_error"], "absent");
    // A later `delivered` still moves `undelivered` on (only `delivered` is final).
    let (_, answer) = replica
        .post(
            "/api/delivery-receipts",
            Some(json!({"message_id": format!("id-{key}"), "status": "delivered"})),
        )
        .await;
    assert_eq!(answer["outcome"], "applied");
    assert_eq!(message(&replica, id).await["delivery_status"], "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_phone_number_and_creation_time() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    stop_cluster(&replica).await;
    let first = env.create_messages(&replica, &["one", "two"]).await;
    let middle = Utc::now();
    wait_for("the clock to move on", TEST_TIMEOUT, || async {
        (Utc::now() > middle + chrono::Duration::milliseconds(20)).then_some(())
    })
    .await;
    let second = env.create_messages(&replica, &["three"]).await;
    let query = |q: String| {
        let replica = &replica;
        async move {
            let (status, page) = replica.get(&format!("/api/messages?{q}")).await;
            assert_eq!(status, 200, "{q}: {page}");
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_i64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    let middle = urlencode(&rfc3339(middle));
    assert_eq!(query(format!("since={middle}")).await, second);
    assert_eq!(
        query(format!("until={middle}")).await,
        first.iter().rev().copied().collect::<Vec<_>>()
    );
    // create_messages numbers phones by position: the first of each call shares one.
    assert_eq!(
        query("phone_number=%2B905550000000".into()).await,
        vec![second[0], first[0]]
    );
    assert_eq!(query("status=cancelled".into()).await, Vec::<i64>::new());
    for bad in [
        "since=yesterday",
        "until=2026-01-01",
        "phone_number=abc",
        "status=lost",
    ] {
        let (status, error) = replica.get(&format!("/api/messages?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {error}");
        let name = bad.split('=').next().unwrap();
        assert!(
            error["error"]["message"].as_str().unwrap().contains(name),
            "{error}"
        );
    }
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_database_upgrades_in_place() {
    use message_dispatcher::store::migrations::{MIGRATIONS, checksum};
    let env = TestEnv::start().await;
    let db = env.db().await;
    // The schema as it was before the lifecycle migration, with rows in it.
    db.batch_execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                         checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    for migration in MIGRATIONS.iter().filter(|m| m.version <= 5) {
        db.batch_execute(migration.sql).await.unwrap();
        db.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                &migration.version,
                &migration.name,
                &checksum(migration.sql),
            ],
        )
        .await
        .unwrap();
    }
    db.batch_execute(
        "INSERT INTO messages (phone_number, content) SELECT '+9055577700' || lpad(s::text, 2, '0'), 'old ' || s
         FROM generate_series(1, 6) s;
         UPDATE messages SET status = 'sent', sent_at = now(), provider_message_id = 'p-' || id WHERE id <= 2;
         UPDATE messages SET status = 'failed', last_error = 'rejected' WHERE id = 3;",
    )
    .await
    .unwrap();

    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast().batch_size(10).auto_start(false),
        )
        .await;
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(stats["by_status"]["sent"], 2, "{stats}");
    assert_eq!(stats["by_status"]["failed"], 1, "{stats}");
    assert_eq!(stats["delivery"]["awaiting"], 2, "{stats}");
    assert_eq!(stats["by_status"]["pending"], 3, "{stats}");
    start_cluster(&replica).await;
    env.wait_drained(TEST_TIMEOUT).await;
    let sent = env.count("sent").await;
    assert_eq!(sent, 5);
    let generated: i64 = db
        .query_one("SELECT count(*) FROM messages WHERE sent", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        generated, 5,
        "the generated `sent` column keeps its meaning"
    );
    let old = message(&replica, 1).await;
    assert_eq!(
        (old["priority"].as_i64(), old["encoding"].as_str()),
        (Some(0), Some("gsm7"))
    );
    // The counters agree with a count of the table.
    let (_, stats) = replica.get("/api/messages/stats").await;
    let counted: HashMap<String, i64> = db
        .query("SELECT status, count(*) FROM messages GROUP BY status", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (status, n) in counted {
        assert_eq!(stats["by_status"][&status], n, "{status}: {stats}");
    }
}

/// `POST /api/messages/retry` and `/cancel` act on every message a filter selects (the
/// console's filter on screen) and say how many; the status in the filter must be the
/// one the action applies to: one request, not one per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_retry_and_cancel_take_a_filter_and_count() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    stop_cluster(&replica).await;
    let db = env.db().await;
    db.batch_execute(
        "INSERT INTO messages (phone_number, content, status, attempts, last_error)
         SELECT CASE WHEN s % 2 = 0 THEN '+905551110000' ELSE '+905551110001' END,
                'failed ' || s, 'failed', 1, 'HTTP 401'
         FROM generate_series(1, 2500) AS s;
         INSERT INTO messages (phone_number, content)
         SELECT '+905552220000', 'pending ' || s FROM generate_series(1, 30) AS s;",
    )
    .await
    .unwrap();
    let post = |path: &'static str, body: Value| {
        let url = replica.url(path);
        async move { post_json(url, &body, &[]).await }
    };
    let (status, answer) = post(
        "/api/messages/retry",
        json!({"status": "failed", "phone_number": "+905551110000"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"retried": 1250}),
        "more than one step of 1,000"
    );
    assert_eq!(env.count("failed").await, 1250);
    let (status, answer) = post(
        "/api/messages/cancel",
        json!({"status": "pending", "phone_number": "+905552220000", "until": "2999-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"cancelled": 30}));
    // Only the 1,250 retried ones are pending now; the rest still failed.
    assert_eq!(env.count("pending").await, 1250);
    let attempts: i64 = db
        .query_one(
            "SELECT count(*) FROM messages WHERE status = 'pending' AND attempts = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        attempts, 1250,
        "a retried message starts its attempts again"
    );

    // The filter's status must be the one the action applies to; unknown fields and
    // lanes are refused.
    for (path, body, field) in [
        (
            "/api/messages/retry",
            json!({"status": "pending"}),
            "status",
        ),
        (
            "/api/messages/cancel",
            json!({"status": "failed"}),
            "status",
        ),
        (
            "/api/messages/cancel",
            json!({"status": "pending", "phone": "+1"}),
            "phone",
        ),
        (
            "/api/messages/cancel",
            json!({"status": "pending", "lane": "otp"}),
            "lane",
        ),
    ] {
        let (status, answer) = post(path, body).await;
        assert_eq!(status, 422, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let cancelled = replica
        .metric("dispatcher_messages_cancelled_total")
        .await
        .unwrap();
    assert_eq!(cancelled, 30.0);
}
