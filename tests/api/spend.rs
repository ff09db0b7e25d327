//! Spend caps (docs/design.md#spend-caps): a lane whose provider has prices stops at
//! its daily cap, paused with reason `spend_cap`, the rest of its queue waiting with no
//! attempt spent; a higher cap through the API, or the UTC day's end, lets it go on.
//! Spend is in `/api/lanes`, the stats and the metrics.

use serde_json::{Value, json};

use crate::providers::{http_json, settings, write_config};
use crate::support::{Replica, TestEnv, http, secs, wait_for};

async fn put(replica: &Replica, path: &str, body: Value) -> (u16, Value) {
    let response = http()
        .put(replica.url(path))
        .json(&body)
        .send()
        .await
        .expect("PUT");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn default_lane(replica: &Replica) -> Value {
    let (_, lanes) = replica.get("/api/lanes").await;
    lanes["lanes"][0].clone()
}

async fn sent(replica: &Replica) -> i64 {
    let (_, stats) = replica.get("/api/messages/stats").await;
    stats["by_status"]["sent"].as_i64().unwrap_or(0)
}

/// Waits until the lane is paused for its spend cap with `count` messages sent.
async fn capped_at(replica: &Replica, count: i64) -> Value {
    wait_for(
        &format!("the lane paused for its spend cap with {count} sent"),
        secs(60),
        || async {
            let lane = default_lane(replica).await;
            (lane["paused_reason"] == "spend_cap" && sent(replica).await == count).then_some(lane)
        },
    )
    .await
}

/// One-segment messages to US numbers at 0.01 each, under a cap of 0.05 (the lane's
/// highest price, Britain's, is 0.05: near the cap a claim takes one message at a
/// time, counting the one in flight): exactly five go, then the lane pauses.
#[tokio::test]
async fn a_lane_stops_at_its_daily_spend_cap_until_the_cap_rises_or_the_day_ends() {
    let env = TestEnv::start().await;
    let config = write_config(
        &env,
        &http_json(
            "main",
            env.mock(),
            "price_per_segment = { default = 0.01, GB = 0.05 }",
        ),
        &["main"],
        "daily_spend_cap = 0.05\n",
    );
    let replica = env.replica("r1", &settings(&config)).await;
    let body: Vec<Value> = (0..12)
        .map(|i| json!({"phone_number": format!("+1415555{:04}", 100 + i), "content": format!("offer {i}")}))
        .collect();
    let (status, created) = replica.post("/api/messages", Some(json!(body))).await;
    assert_eq!(status, 201, "{created}");

    let lane = capped_at(&replica, 5).await;
    assert_eq!(lane["spend_today"], 0.05, "{lane}");
    assert_eq!(lane["daily_spend_cap"], 0.05, "{lane}");
    assert_eq!(env.mock().deliveries().await.len(), 5);
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(stats["by_status"]["pending"], 7, "{stats}");
    assert_eq!(
        stats["spend_today"],
        json!([{"lane": "default", "provider": "main", "amount": 0.05, "messages": 5}]),
        "{stats}"
    );
    let waiting = created[11]["id"].as_i64().unwrap();
    let (_, message) = replica.get(&format!("/api/messages/{waiting}")).await;
    assert_eq!(message["status"], "pending", "{message}");
    assert_eq!(message["attempts"], 0, "{message}");
    let (_, status) = replica.get("/api/messaging/status").await;
    assert_eq!(status["paused"]["reason"], "spend_cap", "{status}");
    assert!(
        status["paused"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("spent 0.05 today (UTC) of a daily cap of 0.05")),
        "{status}"
    );
    let metric = |series: &'static str| {
        let replica = &replica;
        async move { replica.metric(series).await.unwrap_or(-1.0) }
    };
    assert_eq!(
        metric("dispatcher_lane_paused{lane=\"default\",reason=\"spend_cap\"}").await,
        1.0
    );
    assert!((metric("dispatcher_lane_spend_today{lane=\"default\"}").await - 0.05).abs() < 1e-9);
    assert!(
        (metric("dispatcher_lane_daily_spend_cap{lane=\"default\"}").await - 0.05).abs() < 1e-9
    );
    assert!(
        (metric("dispatcher_spend_total{lane=\"default\",provider=\"main\"}").await - 0.05).abs()
            < 1e-9
    );

    // A bad cap is refused; a higher one lets three more through.
    for bad in [json!(-1), json!("lots"), json!(0.0000001)] {
        let (status, error) = put(
            &replica,
            "/api/lanes/default/config",
            json!({"daily_spend_cap": bad}),
        )
        .await;
        assert!(status == 400 || status == 422, "{bad}: {status} {error}");
    }
    let (status, config) = put(
        &replica,
        "/api/lanes/default/config",
        json!({"daily_spend_cap": 0.08}),
    )
    .await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["daily_spend_cap"], 0.08, "{config}");
    assert_eq!(config["configured"]["daily_spend_cap"], 0.05, "{config}");
    assert_eq!(config["overrides"]["daily_spend_cap"], 0.08, "{config}");
    capped_at(&replica, 8).await;
    assert_eq!(env.mock().deliveries().await.len(), 8);

    // The UTC day ends (today's spend moved to yesterday): the rest go, 0.04 < 0.08.
    env.db()
        .await
        .execute("UPDATE lane_spend SET day = day - 1", &[])
        .await
        .unwrap();
    wait_for(
        "every message sent and the pause lifted",
        secs(60),
        || async {
            let lane = default_lane(&replica).await;
            (sent(&replica).await == 12 && lane["paused_reason"].is_null()).then_some(())
        },
    )
    .await;
    assert_eq!(env.mock().deliveries().await.len(), 12);
    let lane = default_lane(&replica).await;
    assert_eq!(lane["spend_today"], 0.04, "{lane}");

    // Clearing the override brings the configured cap back.
    let (status, config) = put(
        &replica,
        "/api/lanes/default/config",
        json!({"daily_spend_cap": null}),
    )
    .await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["daily_spend_cap"], 0.05, "{config}");
    assert!(config["overrides"]["daily_spend_cap"].is_null(), "{config}");
}

/// The claim itself (the store, no replica), near and at the cap: sends in flight that
/// reserved more than is left (long messages, a lowered cap, a dead leader's claims)
/// make it wait, not fail; a pause for refused credentials is not overwritten by the
/// cap's, so its alert and probe go on; without one, the cap's pause is recorded.
#[tokio::test]
async fn the_claim_waits_for_sends_in_flight_and_keeps_a_credentials_pause() {
    use message_dispatcher::config::Unit;
    use message_dispatcher::spend::Micros;
    use message_dispatcher::store::{Claim, ClaimScope, Schedule, Store};
    use std::time::Duration;

    let env = TestEnv::start().await;
    let settings = env.settings();
    let (status, output) = crate::support::replica::run_command(&["migrate"], &settings.to_env());
    assert!(status.success(), "{output}");
    let store = Store::new(&settings.to_config().database).unwrap();
    env.insert_messages(30).await;
    store.apply_auto_start(true, "test").await.unwrap();
    let epoch = store.bump_epoch("test").await.unwrap();
    let schedule = Schedule {
        batch_size: 10,
        interval: Duration::ZERO,
        unit: Unit::Messages,
    };
    let scope = ClaimScope {
        probe_due: true,
        provider: Some("default".into()),
        usable: vec!["default".into()],
        probe_only: false,
        quiet_hours: None,
        daily_spend_cap: Some(Micros(100_000)),
        highest_price: Some(Micros(10_000)),
    };
    let claim = || async {
        store
            .claim_batch(epoch, "test", schedule, Duration::ZERO, 1, &scope)
            .await
            .expect("the claim runs")
            .claim
    };
    let db = env.db().await;
    let pause = || async {
        db.query_one(
            "SELECT paused_reason FROM dispatcher_control WHERE lane = 'default'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
    };

    // Twenty rows in flight at the highest price reserve 200,000 of the 100,000 left.
    db.execute(
        "UPDATE messages SET status = 'sending', claim_epoch = $1, attempts = 1
         WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT 20)",
        &[&epoch.0],
    )
    .await
    .unwrap();
    assert!(matches!(claim().await, Claim::NotDue(_)), "waits for them");
    assert_eq!(pause().await, None);

    // The day's spend reaches the cap while the provider refuses our credentials.
    db.batch_execute(
        "INSERT INTO lane_spend (lane, day, provider, amount_micros, messages)
         VALUES ('default', (now() AT TIME ZONE 'UTC')::date, 'default', 100000, 10);
         UPDATE dispatcher_control SET paused_reason = 'provider_auth' WHERE lane = 'default';",
    )
    .await
    .unwrap();
    assert!(matches!(claim().await, Claim::Paused(reason) if reason == "spend_cap"));
    assert_eq!(pause().await.as_deref(), Some("provider_auth"));

    // Without it, the cap's pause is recorded, with the day's figures.
    db.execute(
        "UPDATE dispatcher_control SET paused_reason = NULL WHERE lane = 'default'",
        &[],
    )
    .await
    .unwrap();
    assert!(matches!(claim().await, Claim::Paused(reason) if reason == "spend_cap"));
    assert_eq!(pause().await.as_deref(), Some("spend_cap"));
    let detail: String = db
        .query_one(
            "SELECT paused_detail FROM dispatcher_control WHERE lane = 'default'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(detail, "spent 0.10 today (UTC) of a daily cap of 0.10");
}

/// A cap set at run time on a lane whose provider has no prices could never hold: 422.
#[tokio::test]
async fn a_cap_on_a_lane_without_prices_is_refused() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &env.settings()).await;
    let (status, error) = put(
        &replica,
        "/api/messaging/config",
        json!({"daily_spend_cap": 5}),
    )
    .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "daily_spend_cap", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no price_per_segment")),
        "{error}"
    );
    let (_, lanes) = replica.get("/api/lanes").await;
    assert!(lanes["lanes"][0]["daily_spend_cap"].is_null(), "{lanes}");
}
