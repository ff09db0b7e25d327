//! Real providers (docs/design.md#provider-kinds, #failover, #throttling): each kind's
//! dialect against the mock provider speaking it, failover between two real provider
//! processes, a throttle with `Retry-After`, and Twilio's signed status callbacks.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::provider::MockProvider;
use crate::support::{Replica, ReplicaSettings, TestEnv, free_port, http, ms, secs, wait_for};

/// `[[provider]]` tables plus one `default` lane sending through `providers` in order,
/// one message at a time; written into the test's directory.
pub(crate) fn write_config(
    env: &TestEnv,
    providers: &str,
    lane_providers: &[&str],
    extra: &str,
) -> String {
    let names: Vec<String> = lane_providers.iter().map(|p| format!("\"{p}\"")).collect();
    let text = format!(
        "{providers}\n[[lane]]\nname = \"default\"\nbatch_size = 10\ninterval = \"200ms\"\n\
         providers = [{}]\nsend_concurrency = 1\n{extra}",
        names.join(", ")
    );
    let path = env.dir.path().join("dispatch.toml");
    std::fs::write(&path, text).expect("write DISPATCH_CONFIG");
    path.display().to_string()
}

pub(crate) fn http_json(name: &str, mock: &MockProvider, extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"{name}\"\nkind = \"http-json\"\nurl = \"{}\"\n\
         token_env = \"SMS_API_TOKEN\"\n{extra}\n",
        mock.send_url()
    )
}

pub(crate) fn settings(config: &str) -> ReplicaSettings {
    ReplicaSettings::fast()
        .env("DISPATCH_CONFIG", config)
        .env("SMS_API_TOKEN", "provider-test-token")
}

async fn create(replica: &Replica, count: usize) -> Vec<i64> {
    let body: Vec<Value> = (0..count)
        .map(|i| json!({"phone_number": format!("+9055501{:05}", i), "content": format!("message {i}")}))
        .collect();
    let (status, created) = replica.post("/api/messages", Some(json!(body))).await;
    assert_eq!(status, 201, "{created}");
    created
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect()
}

/// Waits until every message in `ids` is sent; returns them as the API shows them.
pub(crate) async fn wait_sent(replica: &Replica, ids: &[i64], timeout: Duration) -> Vec<Value> {
    wait_for("every message sent", timeout, || async {
        let mut messages = Vec::new();
        for id in ids {
            let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
            if message["status"] != "sent" {
                return None;
            }
            messages.push(message);
        }
        Some(messages)
    })
    .await
}

async fn script(mock: &MockProvider, script: Value) {
    let response = http()
        .post(mock.url("/control"))
        .json(&script)
        .send()
        .await
        .expect("POST /control");
    assert!(response.status().is_success());
}

fn delivered_keys(deliveries: &[crate::support::provider::Delivery]) -> HashSet<String> {
    deliveries.iter().map(|d| d.key.clone()).collect()
}

#[tokio::test]
async fn a_failing_provider_opens_its_breaker_and_the_second_delivers_everything() {
    let env = TestEnv::start().await;
    let failing = MockProvider::start(&["--fail-rate", "1.0"]).await;
    let providers = http_json(
        "first",
        &failing,
        "breaker_failures = 3\nbreaker_cooldown = \"60s\"",
    ) + &http_json("second", env.mock(), "");
    let config = write_config(&env, &providers, &["first", "second"], "");
    let replica = env.replica("r1", &settings(&config)).await;
    let ids = create(&replica, 30).await;

    let messages = wait_sent(&replica, &ids, secs(60)).await;
    for message in &messages {
        assert_eq!(message["provider"], "second", "{message}");
    }
    let keys: HashSet<String> = messages
        .iter()
        .map(|m| m["delivery_key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered_keys(&env.mock().deliveries().await), keys);
    let first = failing.stats().await;
    assert_eq!(first.accepted, 0);
    assert!(
        first.requests <= 3,
        "the breaker opened after 3 failures in a row, yet the failing provider got {} requests",
        first.requests
    );
    let (_, lanes) = replica.get("/api/lanes").await;
    let states: Vec<(&str, &str)> = lanes["lanes"][0]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("first", "open"), ("second", "closed")]);
    let metrics = replica.metrics().await;
    assert!(
        metrics
            .contains("dispatcher_provider_breaker_state{lane=\"default\",provider=\"first\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_message_whose_outcome_is_unknown_is_never_sent_through_another_provider() {
    let env = TestEnv::start().await;
    let slow = MockProvider::start(&["--slow-ms", "4000"]).await;
    // The first two requests outlast the 1 s timeout: their outcome is unknown, the
    // breaker opens, and the rest go through the second provider while those two wait
    // for the first one's probe.
    script(&slow, json!({"slow_next": 2})).await;
    let providers = http_json(
        "first",
        &slow,
        "timeout = \"1s\"\nbreaker_failures = 2\nbreaker_cooldown = \"2s\"",
    ) + &http_json("second", env.mock(), "");
    let config = write_config(&env, &providers, &["first", "second"], "");
    let replica = env.replica("r1", &settings(&config)).await;
    let ids = create(&replica, 20).await;

    let messages = wait_sent(&replica, &ids, secs(90)).await;
    let first = delivered_keys(&slow.deliveries().await);
    let second = delivered_keys(&env.mock().deliveries().await);
    assert!(
        first.is_disjoint(&second),
        "keys sent to both: {:?}",
        first.intersection(&second).collect::<Vec<_>>()
    );
    let db = env.db().await;
    let pinned: Vec<String> = db
        .query(
            "SELECT delivery_key::text FROM messages WHERE pinned_provider = 'first'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(pinned.len(), 2, "the two timed-out messages are pinned");
    for message in &messages {
        let key = message["delivery_key"].as_str().unwrap();
        let provider = message["provider"].as_str().unwrap();
        let owner = if first.contains(key) {
            "first"
        } else {
            "second"
        };
        assert_eq!(provider, owner, "{message}");
        assert!(first.contains(key) || second.contains(key), "{message}");
        if pinned.iter().any(|p| p == key) {
            assert_eq!(provider, "first", "a pinned message moved: {message}");
        }
    }
    assert!(
        second.len() >= 10,
        "the rest went through the second provider"
    );
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_the_provider_and_the_throttled_message_goes_next() {
    let env = TestEnv::start().await;
    script(
        env.mock(),
        json!({"throttle_next": 1, "retry_after_secs": 3}),
    )
    .await;
    let providers = http_json("only", env.mock(), "");
    let config = write_config(&env, &providers, &["only"], "");
    // A throttle's pause is capped at RETRY_BACKOFF_MAX: above the 3 s asked here.
    let settings = settings(&config).retry_backoff(ms(100), secs(30));
    let replica = env.replica("r1", &settings).await;
    let ids = create(&replica, 5).await;
    let messages = wait_sent(&replica, &ids, secs(60)).await;

    let (_, arrivals) = {
        let response = http()
            .get(env.mock().url("/requests"))
            .send()
            .await
            .unwrap();
        ((), response.json::<Vec<Value>>().await.unwrap())
    };
    assert_eq!(arrivals[0]["status"], 429, "{arrivals:?}");
    let throttled = arrivals[0]["key"].as_str().unwrap();
    assert_eq!(
        arrivals[1]["key"], throttled,
        "the throttled message goes next: {arrivals:?}"
    );
    let paused_us = arrivals[1]["at_us"].as_i64().unwrap() - arrivals[0]["at_us"].as_i64().unwrap();
    assert!(paused_us >= 3_000_000, "paused only {paused_us} µs");
    assert_eq!(arrivals.len(), 6, "{arrivals:?}");
    let throttled_message = messages
        .iter()
        .find(|m| m["delivery_key"] == throttled)
        .unwrap();
    assert_eq!(
        throttled_message["attempts"], 1,
        "a throttle spends no attempt: {throttled_message}"
    );
    let metrics = replica.metrics().await;
    assert!(
        metrics.contains(
            "dispatcher_provider_sends_total{lane=\"default\",outcome=\"throttled\",provider=\"only\"} 1"
        ),
        "{metrics}"
    );
}

/// A replica sending through one provider of `kind` (the mock speaking its dialect on
/// a port chosen here), and that mock, posting receipts to the replica's
/// `/api/providers/{kind}/receipts` with `token` as its secret, and recipients' replies
/// (its `POST /inbound`) to `/api/providers/{kind}/inbound`.
pub(crate) async fn dialect_pair(
    env: &TestEnv,
    kind: &str,
    keys: &str,
    token: &str,
) -> (Replica, MockProvider) {
    let port = free_port();
    let providers = format!(
        "[[provider]]\nname = \"{kind}\"\nkind = \"{kind}\"\nbase_url = \"http://127.0.0.1:{port}\"\n\
         token_env = \"PROVIDER_SECRET\"\n{keys}\n"
    );
    let config = write_config(env, &providers, &[kind], "from = \"ACME\"\n");
    let replica = env
        .replica(
            "r1",
            &settings(&config)
                .env("PROVIDER_SECRET", token)
                .dlr_token("receipts-token"),
        )
        .await;
    let receipts = replica.url(&format!("/api/providers/{kind}/receipts"));
    let inbound = replica.url(&format!("/api/providers/{kind}/inbound"));
    let mock = MockProvider::start_on(
        port,
        &[
            "--inbound-url",
            &inbound,
            "--dialect",
            kind,
            "--token",
            token,
            "--dlr-url",
            &receipts,
            "--dlr-token",
            "receipts-token",
            "--dlr-delay-ms",
            "1500",
        ],
    )
    .await;
    (replica, mock)
}

async fn wait_delivered(replica: &Replica, id: i64) -> Value {
    wait_for("the delivery receipt", secs(30), || async {
        let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
        (message["delivery_status"] == "delivered").then_some(message)
    })
    .await
}

#[tokio::test]
async fn twilio_sends_with_its_dialect_and_only_signed_callbacks_count() {
    let env = TestEnv::start().await;
    let (replica, mock) = dialect_pair(
        &env,
        "twilio",
        "account_sid = \"AC0123456789abcdef0123456789abcdef\"",
        "twilio-auth-token",
    )
    .await;
    let ids = create(&replica, 1).await;
    let sent = wait_sent(&replica, &ids, secs(30)).await;
    let sid = sent[0]["message_id"].as_str().unwrap().to_string();
    assert!(sid.starts_with("SM"), "{}", sent[0]);
    assert_eq!(sent[0]["provider"], "twilio");

    // Forged: no signature, a wrong one, one over another URL. Each 403, none counted.
    let receipts = replica.url("/api/providers/twilio/receipts");
    let form = [("MessageSid", sid.as_str()), ("MessageStatus", "failed")];
    let other_url = message_dispatcher::http::twilio_signature(
        "twilio-auth-token",
        "https://elsewhere.example/api/providers/twilio/receipts",
        &form.map(|(k, v)| (k.to_string(), v.to_string())),
    );
    for signature in [None, Some("AAAA"), Some(other_url.as_str())] {
        let mut request = http().post(&receipts).form(&form);
        if let Some(signature) = signature {
            request = request.header("X-Twilio-Signature", signature);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 403, "signature {signature:?}");
    }
    // The mock's own callback is signed: it counts.
    let delivered = wait_delivered(&replica, ids[0]).await;
    assert_eq!(delivered["delivery_error"], Value::Null, "{delivered}");
    let metrics = replica.metrics().await;
    assert!(
        metrics.contains("dispatcher_delivery_receipts_total{status=\"failed\"} 0"),
        "a forged receipt was counted: {metrics}"
    );
    assert!(mock.stats().await.receipts_posted >= 1);
}

#[tokio::test]
async fn vonage_and_infobip_send_in_their_dialects_and_their_receipts_apply() {
    for (kind, keys) in [("vonage", "api_key = \"abcd1234\""), ("infobip", "")] {
        let env = TestEnv::start().await;
        let (replica, mock) = dialect_pair(&env, kind, keys, "provider-secret").await;
        // Unicode text: Vonage must be told type=unicode (the mock keeps what arrived).
        let (status, created) = replica
            .post(
                "/api/messages",
                Some(json!({"phone_number": "+905550000001", "content": "Günaydın ✓"})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_i64().unwrap();
        let sent = wait_sent(&replica, &[id], secs(30)).await;
        assert_eq!(sent[0]["provider"], kind);
        let deliveries = mock.deliveries().await;
        assert_eq!(deliveries.len(), 1, "{kind}");
        assert_eq!(deliveries[0].content, "Günaydın ✓", "{kind}");
        assert_eq!(
            deliveries[0].to, "905550000001",
            "{kind}: no + in the number"
        );
        assert_eq!(
            sent[0]["message_id"].as_str(),
            Some(deliveries[0].message_id.as_str()),
            "{kind}"
        );
        wait_delivered(&replica, id).await;
        if kind == "vonage" {
            // Vonage may also be set to send its receipts as GET, in the query string.
            let response = http()
                .get(replica.url(&format!(
                    "/api/providers/vonage/receipts?messageId={}&status=delivered&token=receipts-token",
                    deliveries[0].message_id
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "vonage GET receipt");
        }
        // A receipt without the token is refused.
        let response = http()
            .post(replica.url(&format!("/api/providers/{kind}/receipts")))
            .json(&json!({"messageId": "x", "status": "delivered", "results": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{kind}");
    }
}

/// A receipt that comes through one provider's endpoint speaks only for that
/// provider's messages: it cannot mark another provider's message, whatever id it
/// names (Twilio's, say, whose own endpoint demands a signature).
#[tokio::test]
async fn a_receipt_through_one_providers_endpoint_never_touches_anothers_message() {
    let env = TestEnv::start().await;
    let other = MockProvider::start(&[]).await;
    let providers = http_json("first", env.mock(), "") + &http_json("second", &other, "");
    let config = write_config(&env, &providers, &["first", "second"], "");
    let replica = env.replica("r1", &settings(&config)).await;
    let ids = create(&replica, 1).await;
    let sent = wait_sent(&replica, &ids, secs(30)).await;
    assert_eq!(sent[0]["provider"], "first");
    let id = sent[0]["message_id"].as_str().unwrap();
    let receipt = json!({"message_id": id, "status": "failed", "error_code": "forged"});
    let (status, answer) = replica
        .post("/api/providers/second/receipts", Some(receipt))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["receipts"][0]["outcome"], "held", "{answer}");
    let (_, message) = replica.get(&format!("/api/messages/{}", ids[0])).await;
    assert_eq!(message["delivery_status"], Value::Null, "{message}");
    let receipt = json!({"message_id": id, "status": "delivered"});
    let (_, answer) = replica
        .post("/api/providers/first/receipts", Some(receipt))
        .await;
    assert_eq!(answer["receipts"][0]["outcome"], "applied", "{answer}");
    // The receipt kept for `second` never applies to `first`'s message either.
    let (_, message) = replica.get(&format!("/api/messages/{}", ids[0])).await;
    assert_eq!(message["delivery_status"], "delivered", "{message}");
    assert_eq!(message["delivery_error"], Value::Null, "{message}");
}
