//! What the API lets in: strict bodies (unknown, repeated and mistyped fields are
//! named, not dropped), JSON only, E.164 phone numbers, no cross-site writes, no
//! requests against a half-migrated schema, no interval that lifts the rate limit.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Replica, ReplicaSettings, TestEnv, http, wait_for};

/// Sends `body` as it is, with `headers`; the status and the JSON answer.
async fn raw(
    replica: &Replica,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = http().request(method, replica.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_json(replica: &Replica, path: &str, body: &str) -> (u16, Value) {
    raw(
        replica,
        reqwest::Method::POST,
        path,
        Some(body),
        &[("content-type", "application/json")],
    )
    .await
}

/// The 422's field and index.
fn located(answer: &(u16, Value)) -> (Option<&str>, Option<u64>) {
    assert_eq!(answer.0, 422, "{answer:?}");
    assert_eq!(answer.1["error"]["code"], "validation_failed", "{answer:?}");
    (
        answer.1["error"]["field"].as_str(),
        answer.1["error"]["index"].as_u64(),
    )
}

/// A typo such as `sendAt` or `expire_at` must never be dropped without a word (the
/// message would go out at once). Every body is parsed into a typed struct that refuses unknown, repeated and
/// mistyped fields, with a 422 naming the field and the item; nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typos_repeats_and_wrong_types_are_refused_by_name() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let refused = [
        (
            r#"{"phone_number": "+905551111111", "content": "hi", "sendAt": "2030-01-01T00:00:00Z"}"#,
            Some("sendAt"),
            None,
        ),
        (
            r#"[{"phone_number": "+905551111111", "content": "a"},
                {"phone_number": "+905551111112", "content": "b", "expire_at": "2030-01-01T00:00:00Z"}]"#,
            Some("expire_at"),
            Some(1),
        ),
        (
            r#"{"phone_number": "+905551111111", "content": "a", "content": "b"}"#,
            Some("content"),
            None,
        ),
        (
            r#"[{"phone_number": "+905551111111", "content": "a", "priority": "3"}]"#,
            Some("priority"),
            Some(0),
        ),
        (r#"{"content": "no number"}"#, Some("phone_number"), None),
        (
            r#"{"phone_number": 905551111111, "content": "a"}"#,
            Some("phone_number"),
            None,
        ),
    ];
    for (body, field, index) in refused {
        let answer = post_json(&replica, "/api/messages", body).await;
        assert_eq!(located(&answer), (field, index), "{body}: {answer:?}");
    }
    // Receipts and the runtime configuration are typed the same way.
    let answer = post_json(
        &replica,
        "/api/delivery-receipts",
        r#"{"message_id": "p-1", "status": "delivered", "deliveredAt": "2030-01-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(located(&answer), (Some("deliveredAt"), None));
    let answer = raw(
        &replica,
        reqwest::Method::PUT,
        "/api/messaging/config",
        Some(r#"{"batchSize": 5}"#),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(located(&answer), (Some("batchSize"), None));
    // serde reads a struct from an array too: `[null, null]` cleared both overrides.
    for body in ["[null, null]", "[5, \"1s\"]"] {
        let answer = raw(
            &replica,
            reqwest::Method::PUT,
            "/api/messaging/config",
            Some(body),
            &[("content-type", "application/json")],
        )
        .await;
        assert_eq!(located(&answer), (Some("body"), None), "{body}");
    }
    let answer = post_json(&replica, "/api/messages", r#"[["+905551111111", "hi"]]"#).await;
    assert_eq!(located(&answer), (Some("body"), Some(0)));
    assert_eq!(env.count("pending").await, 0, "nothing was created");
    // A filter takes a number as stored, too (rows from before E.164 intake).
    assert_eq!(
        replica.get("/api/messages?phone_number=0000000000").await.0,
        200
    );
}

/// A body that is not `application/json` is a 415, whatever it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let body = r#"{"phone_number": "+905551111111", "content": "hi"}"#;
    for headers in [
        vec![("content-type", "text/plain")],
        vec![("content-type", "application/x-www-form-urlencoded")],
        vec![],
    ] {
        let answer = raw(
            &replica,
            reqwest::Method::POST,
            "/api/messages",
            Some(body),
            &headers,
        )
        .await;
        assert_eq!(answer.0, 415, "{headers:?}: {answer:?}");
        assert_eq!(answer.1["error"]["code"], "unsupported_media_type");
    }
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messaging/start",
        Some("go"),
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(answer.0, 415, "{answer:?}");
    let answer = post_json(&replica, "/api/messages", body).await;
    assert_eq!(answer.0, 201, "{answer:?}");
    assert_eq!(env.count("pending").await, 1);
}

/// Phone numbers are E.164 with a real country code (libphonenumber): `0000000000` and
/// 19-digit numbers were accepted before. National formats only with DEFAULT_REGION;
/// the stored form is E.164 and the API shows the ISO country.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_are_e164_and_show_their_country() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    for bad in [
        "0000000000",
        "9999999999999999999",
        "+9999999999999999999",
        "+0005551111111",
        "05551111111",
        "+90 555 111 11 11",
    ] {
        let body = json!({"phone_number": bad, "content": "x"}).to_string();
        let answer = post_json(&replica, "/api/messages", &body).await;
        assert_eq!(located(&answer), (Some("phone_number"), None), "{bad}");
    }
    let body = json!({"phone_number": "+14155552671", "content": "x"}).to_string();
    let (status, created) = post_json(&replica, "/api/messages", &body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["phone_number"], "+14155552671");
    assert_eq!(created["country"], "US");

    let national = env
        .replica(
            "tr",
            &ReplicaSettings::fast()
                .auto_start(false)
                .default_region("TR"),
        )
        .await;
    let body = json!({"phone_number": "05551111111", "content": "x"}).to_string();
    let (status, created) = post_json(&national, "/api/messages", &body).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["phone_number"], "+905551111111", "stored as E.164");
    assert_eq!(created["country"], "TR");
    let body = json!({"phone_number": "0000000000", "content": "x"}).to_string();
    let answer = post_json(&national, "/api/messages", &body).await;
    assert_eq!(located(&answer), (Some("phone_number"), None));
    assert_eq!(env.count("pending").await, 2);
}

/// Without API_TOKEN, a page on another site could make an operator's browser create
/// messages or stop the cluster with a `text/plain` form post. A foreign Origin gets
/// 403 on every route that changes something; the replica's own origin goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_site_cannot_change_anything_through_a_browser() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let evil = [
        ("origin", "http://evil.example"),
        ("content-type", "text/plain"),
    ];
    let body = r#"{"phone_number": "+905551111111", "content": "spam"}"#;
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messages",
        Some(body),
        &evil,
    )
    .await;
    assert_eq!(answer.0, 403, "{answer:?}");
    assert_eq!(answer.1["error"]["code"], "forbidden");
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messaging/stop",
        None,
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(answer.0, 403, "{answer:?}");
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messaging/stop",
        None,
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(answer.0, 403, "{answer:?}");
    let (_, status) = replica.get("/api/messaging/status").await;
    assert_eq!(status["running"], true, "the cluster was not stopped");
    assert_eq!(env.count("pending").await + env.count("sent").await, 0);

    // The console's own page (same origin) and clients without Origin go through.
    let own = format!("http://127.0.0.1:{}", replica.port());
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messages",
        Some(body),
        &[("origin", &own), ("content-type", "application/json")],
    )
    .await;
    assert_eq!(answer.0, 201, "{answer:?}");
    let answer = raw(
        &replica,
        reqwest::Method::POST,
        "/api/messaging/stop",
        None,
        &[("origin", &own)],
    )
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
    // Reading is not changing: a foreign Origin may GET (CORS keeps the answer from it).
    let answer = raw(
        &replica,
        reqwest::Method::GET,
        "/api/messages",
        None,
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
}

/// A replica that starts against a fresh database applies the migrations while its
/// HTTP port is already open. Every data route answers 503 with Retry-After until the
/// schema is ready, never a 500 from a table or column that does not exist yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_the_migrations_get_503_with_retry_after() {
    const MIGRATION_LOCK: i64 = 0x006d_7367_6469_7370;
    let env = TestEnv::start().await;
    // Another replica is migrating: this one waits for the lock meanwhile.
    let migrating = env.db().await;
    migrating
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let replica = env.spawn_replica("r1", &ReplicaSettings::fast());
    let body = r#"{"phone_number": "+905551111111", "content": "early"}"#;
    let mut answered = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let Ok(response) = http().get(replica.url("/api/messages")).send().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        assert_eq!(response.status(), 503);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
        let answer = post_json(&replica, "/api/messages", body).await;
        assert_eq!(answer.0, 503, "{answer:?}");
        assert_eq!(answer.1["error"]["code"], "not_ready");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered > 0,
        "the replica never answered while migrations waited"
    );
    migrating
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    replica.wait_ready().await;
    let answer = post_json(&replica, "/api/messages", body).await;
    assert_eq!(answer.0, 201, "{answer:?}");
}

/// An interval override must be a whole number of milliseconds: 500 µs was stored as
/// 0 s, which lifts the rate limit. `0s` stays what it always meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_below_a_millisecond_is_refused() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let put = |interval: &'static str| {
        let replica = &replica;
        async move {
            raw(
                replica,
                reqwest::Method::PUT,
                "/api/messaging/config",
                Some(&json!({"processing_interval": interval}).to_string()),
                &[("content-type", "application/json")],
            )
            .await
        }
    };
    for bad in ["500us", "999999ns", "1.5ms", "1s200us"] {
        let answer = put(bad).await;
        assert_eq!(
            located(&answer),
            (Some("processing_interval"), None),
            "{bad}"
        );
    }
    let (_, status) = replica.get("/api/messaging/status").await;
    assert_eq!(status["processing_interval"], "200ms", "nothing was stored");
    for good in ["250ms", "1.5s", "0s"] {
        let answer = put(good).await;
        assert_eq!(answer.0, 200, "{good}: {answer:?}");
    }
}

/// Every HTTP request is counted by method, route pattern and status, and timed by
/// method and route; the route is the pattern, never an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_counted_by_route_pattern() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let ids = env.create_messages(&replica, &["one"]).await;
    for _ in 0..3 {
        assert_eq!(
            replica.get(&format!("/api/messages/{}", ids[0])).await.0,
            200
        );
    }
    assert_eq!(replica.get("/api/messages/999999").await.0, 404);
    assert_eq!(replica.get("/nope").await.0, 404);
    let metrics = replica.metrics().await;
    let value = |series: &str| crate::support::replica::metric_value(&metrics, series);
    assert_eq!(
        value(
            r#"dispatcher_http_requests_total{method="GET",route="/api/messages/{id}",status="200"}"#
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        value(
            r#"dispatcher_http_requests_total{method="GET",route="/api/messages/{id}",status="404"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            r#"dispatcher_http_requests_total{method="POST",route="/api/messages",status="201"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(r#"dispatcher_http_requests_total{method="GET",route="unmatched",status="404"}"#),
        Some(1.0)
    );
    assert!(
        value(
            r#"dispatcher_http_request_duration_seconds_count{method="GET",route="/api/messages/{id}"}"#
        ) >= Some(4.0)
    );
    assert!(
        !metrics.contains(&format!("/api/messages/{}\"", ids[0])),
        "an id in a label"
    );
}

/// Priorities are served strictly in order, so a stream of priority-3 messages above
/// the rate starves priority 0: the stats and metrics show the oldest pending age of
/// each priority, so that is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_age_is_shown_per_priority() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let body = json!([
        {"phone_number": "+905551111111", "content": "routine", "priority": 0},
        {"phone_number": "+905551111112", "content": "urgent", "priority": 3}
    ])
    .to_string();
    assert_eq!(post_json(&replica, "/api/messages", &body).await.0, 201);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, stats) = replica.get("/api/messages/stats").await;
    let ages = &stats["oldest_pending_age_seconds_by_priority"];
    assert!(ages["0"].as_f64().unwrap() >= 1.0, "{stats}");
    assert!(ages["3"].as_f64().unwrap() >= 1.0, "{stats}");
    assert!(ages["1"].is_null() && ages["2"].is_null(), "{stats}");
    wait_for(
        "the per-priority gauge",
        Duration::from_secs(30),
        || async {
            let age = replica
                .metric(
                    r#"dispatcher_oldest_pending_message_age_by_priority_seconds{priority="0"}"#,
                )
                .await?;
            (age >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        replica
            .metric(r#"dispatcher_oldest_pending_message_age_by_priority_seconds{priority="1"}"#)
            .await,
        Some(0.0)
    );
}
