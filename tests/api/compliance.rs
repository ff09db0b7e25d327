//! Compliance (docs/design.md#opt-outs, #countries): the opt-out list through the API,
//! recipients' STOP and START replies in each provider's format (posted by the mock
//! provider, as a real one would), `blocked` at intake and at claim (a blocked message
//! never reaches the provider), and a lane's countries refusing others at intake.

use serde_json::{Value, json};

use crate::providers::{dialect_pair, http_json, settings, wait_sent, write_config};
use crate::support::provider::MockProvider;
use crate::support::{Replica, TestEnv, free_port, http, secs};

async fn send(
    method: reqwest::Method,
    replica: &Replica,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http().request(method, replica.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The mock provider delivers a recipient's reply; returns the dispatcher's status and
/// answer.
async fn reply(mock: &MockProvider, from: &str, text: &str) -> (u16, String) {
    let answer: Value = http()
        .post(mock.url("/inbound"))
        .json(&json!({"from": from, "text": text}))
        .send()
        .await
        .expect("POST /inbound")
        .json()
        .await
        .expect("the mock's answer");
    (
        answer["status"].as_u64().expect("the dispatcher's status") as u16,
        answer["body"].as_str().unwrap_or_default().to_string(),
    )
}

async fn create_one(replica: &Replica, phone: &str, content: &str) -> Value {
    let (status, created) = replica
        .post(
            "/api/messages",
            Some(json!({"phone_number": phone, "content": content})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created
}

fn sent_to(deliveries: &[crate::support::provider::Delivery], phone: &str) -> usize {
    deliveries.iter().filter(|d| d.to == phone).count()
}

#[tokio::test]
async fn the_opt_out_list_is_kept_read_paged_and_emptied_through_the_api() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &env.settings()).await;
    let put =
        |path: &'static str, body: Option<Value>| send(reqwest::Method::PUT, &replica, path, body);

    let (status, entry) = put("/api/opt-outs/+905551234567", None).await;
    assert_eq!(status, 201, "{entry}");
    assert_eq!(entry["phone_number"], "+905551234567");
    assert_eq!(entry["country"], "TR");
    assert_eq!(entry["source"], "api");
    // The same number spelled %2B: listed already, the first entry kept.
    let (status, again) = put(
        "/api/opt-outs/%2B905551234567",
        Some(json!({"source": "crm"})),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["source"], "api");
    assert_eq!(again["since"], entry["since"]);
    let (status, _) = put(
        "/api/opt-outs/+905551234568",
        Some(json!({"source": "support ticket 7"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = put("/api/opt-outs/+14155550100", None).await;
    assert_eq!(status, 201);

    let (status, error) = put("/api/opt-outs/12", None).await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "phone_number", "{error}");
    let (status, error) = put(
        "/api/opt-outs/+905551234569",
        Some(json!({"sourse": "typo"})),
    )
    .await;
    assert_eq!(status, 422, "{error}");

    let (status, entry) = replica.get("/api/opt-outs/+905551234568").await;
    assert_eq!(status, 200);
    assert_eq!(entry["source"], "support ticket 7");

    // Pages in number order.
    let (_, first) = replica.get("/api/opt-outs?limit=2").await;
    let numbers = |page: &Value| -> Vec<String> {
        page["opt_outs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["phone_number"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(numbers(&first), ["+14155550100", "+905551234567"]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, second) = replica
        .get(&format!("/api/opt-outs?limit=2&cursor=%2B{}", &cursor[1..]))
        .await;
    assert_eq!(numbers(&second), ["+905551234568"]);
    assert_eq!(second["next_cursor"], Value::Null);
    // The cursor pasted as it came: its `+` unencoded reads as a space in a query.
    let (_, pasted) = replica
        .get(&format!("/api/opt-outs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(numbers(&pasted), ["+905551234568"], "{pasted}");
    // Anything else is refused, not passed to PostgreSQL (the fuzzer sent a NUL byte).
    let (status, refused) = replica.get("/api/opt-outs?cursor=%E0%A6%99%00x").await;
    assert_eq!(status, 400, "{refused}");

    let (status, removed) = send(
        reqwest::Method::DELETE,
        &replica,
        "/api/opt-outs/+905551234567",
        None,
    )
    .await;
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["opted_out"], false);
    let (status, _) = send(
        reqwest::Method::DELETE,
        &replica,
        "/api/opt-outs/+905551234567",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = replica.get("/api/opt-outs/+905551234567").await;
    assert_eq!(status, 404);
    let metrics = replica.metrics().await;
    for series in [
        "dispatcher_opt_out_changes_total{change=\"opt_out\",source=\"api\"} 3",
        "dispatcher_opt_out_changes_total{change=\"opt_in\",source=\"api\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
}

/// A STOP reply through the mock provider (http-json, with the DLR_TOKEN) lists the
/// number; the next message to it is blocked at intake and never reaches the provider,
/// while a message to another number goes out. START takes the number off the list.
#[tokio::test]
async fn a_stop_reply_blocks_the_next_message_and_start_lets_them_through_again() {
    let env = TestEnv::start().await;
    // The provider's port first: the mock starts once the replica's URL is known.
    let port = free_port();
    let config = write_config(
        &env,
        &format!(
            "[[provider]]\nname = \"main\"\nkind = \"http-json\"\nurl = \"http://127.0.0.1:{port}/send\"\n\
             token_env = \"SMS_API_TOKEN\"\n"
        ),
        &["main"],
        "",
    );
    let replica = env
        .replica("r1", &settings(&config).dlr_token("inbound-token"))
        .await;
    let inbound = replica.url("/api/providers/main/inbound");
    let mock = MockProvider::start_on(
        port,
        &["--inbound-url", &inbound, "--dlr-token", "inbound-token"],
    )
    .await;
    let stopped = "+905551110001";
    let other = "+905551110002";

    // Without the token: refused, nothing listed.
    let response = http()
        .post(&inbound)
        .json(&json!({"from": stopped, "to": "ACME", "text": "STOP"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let (status, answer) = reply(&mock, stopped, "Stop by at five, please").await;
    assert_eq!(
        (status, answer.contains("ignored")),
        (200, true),
        "{answer}"
    );
    let (status, _) = replica.get(&format!("/api/opt-outs/{stopped}")).await;
    assert_eq!(
        status, 404,
        "a message that is not a keyword changes nothing"
    );

    let (status, answer) = reply(&mock, stopped, " stop. ").await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("opted_out"), "{answer}");
    let (status, entry) = replica.get(&format!("/api/opt-outs/{stopped}")).await;
    assert_eq!(status, 200);
    assert_eq!(entry["source"], "inbound:main");

    let blocked = create_one(&replica, stopped, "to the number that said STOP").await;
    assert_eq!(blocked["status"], "blocked", "{blocked}");
    assert!(
        blocked["last_error"]
            .as_str()
            .unwrap()
            .contains("opted out"),
        "{blocked}"
    );
    let free = create_one(&replica, other, "to another number").await;
    wait_sent(&replica, &[free["id"].as_i64().unwrap()], secs(30)).await;
    let deliveries = mock.deliveries().await;
    assert_eq!(sent_to(&deliveries, stopped), 0, "{deliveries:?}");
    assert_eq!(sent_to(&deliveries, other), 1, "{deliveries:?}");
    let (_, still) = replica
        .get(&format!("/api/messages/{}", blocked["id"]))
        .await;
    assert_eq!(
        (still["status"].as_str(), still["attempts"].as_i64()),
        (Some("blocked"), Some(0))
    );
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(stats["by_status"]["blocked"], 1, "{stats}");
    assert_eq!(
        replica
            .metric("dispatcher_messages_blocked_total{stage=\"intake\"}")
            .await,
        Some(1.0)
    );

    let (status, answer) = reply(&mock, stopped, "START").await;
    assert_eq!(status, 200);
    assert!(answer.contains("opted_in"), "{answer}");
    let (status, _) = replica.get(&format!("/api/opt-outs/{stopped}")).await;
    assert_eq!(status, 404);
    let again = create_one(&replica, stopped, "after START").await;
    assert_eq!(again["status"], "pending", "{again}");
    wait_sent(&replica, &[again["id"].as_i64().unwrap()], secs(30)).await;
    assert_eq!(sent_to(&mock.deliveries().await, stopped), 1);
}

/// A number listed while its message waits in the queue: the claim blocks the message
/// instead of sending it, and the lane goes on with the rest.
#[tokio::test]
async fn a_number_listed_while_its_message_waits_is_blocked_at_the_claim() {
    let env = TestEnv::start().await;
    let config = write_config(&env, &http_json("main", env.mock(), ""), &["main"], "");
    let replica = env.replica("r1", &settings(&config)).await;
    let (status, _) = replica.post("/api/messaging/stop", None).await;
    assert_eq!(status, 200);
    let listed = "+905553330001";
    let waiting = create_one(&replica, listed, "queued before the opt-out").await;
    let others: Vec<i64> = [
        create_one(&replica, "+905553330002", "before").await,
        create_one(&replica, "+905553330003", "after").await,
    ]
    .iter()
    .map(|m| m["id"].as_i64().unwrap())
    .collect();
    assert_eq!(waiting["status"], "pending");
    let (status, _) = send(
        reqwest::Method::PUT,
        &replica,
        &format!("/api/opt-outs/{listed}"),
        None,
    )
    .await;
    assert_eq!(status, 201);

    let (status, _) = replica.post("/api/messaging/start", None).await;
    assert_eq!(status, 200);
    wait_sent(&replica, &others, secs(30)).await;
    let (_, message) = replica
        .get(&format!("/api/messages/{}", waiting["id"]))
        .await;
    assert_eq!(message["status"], "blocked", "{message}");
    assert_eq!(message["attempts"], 0, "a blocked claim spends no attempt");
    assert_eq!(sent_to(&env.mock().deliveries().await, listed), 0);
    assert_eq!(
        replica
            .metric("dispatcher_messages_blocked_total{stage=\"claim\"}")
            .await,
        Some(1.0)
    );
}

/// Twilio's, Vonage's and Infobip's inbound webhooks, as the mock provider speaking
/// each dialect posts them, list the sender; Twilio's only when signed.
#[tokio::test]
async fn stop_replies_in_twilio_vonage_and_infobip_formats_list_the_sender() {
    for (kind, keys, sender) in [
        (
            "twilio",
            "account_sid = \"AC0123456789abcdef0123456789abcdef\"",
            "+905554440001",
        ),
        ("vonage", "api_key = \"abcd1234\"", "+905554440002"),
        ("infobip", "", "+905554440003"),
    ] {
        let env = TestEnv::start().await;
        let (replica, mock) = dialect_pair(&env, kind, keys, "provider-secret").await;
        let inbound = replica.url(&format!("/api/providers/{kind}/inbound"));
        if kind == "twilio" {
            let forged = http()
                .post(&inbound)
                .form(&[("From", sender), ("To", "+15005550006"), ("Body", "STOP")])
                .send()
                .await
                .unwrap();
            assert_eq!(forged.status(), 403, "an unsigned Twilio request");
        } else {
            let forged = http()
                .post(&inbound)
                .json(&json!({"msisdn": sender, "results": [{"from": sender, "text": "STOP"}], "text": "STOP"}))
                .send()
                .await
                .unwrap();
            assert_eq!(forged.status(), 401, "{kind} without the token");
        }
        let (status, _) = replica.get(&format!("/api/opt-outs/{sender}")).await;
        assert_eq!(status, 404, "{kind}: nothing listed by a refused request");

        let (status, answer) = reply(&mock, sender, "UNSUBSCRIBE").await;
        assert_eq!(status, 200, "{kind}: {answer}");
        if kind == "twilio" {
            assert!(answer.contains("<Response>"), "TwiML for Twilio: {answer}");
        }
        let (status, entry) = replica.get(&format!("/api/opt-outs/{sender}")).await;
        assert_eq!(status, 200, "{kind}");
        assert_eq!(entry["source"], format!("inbound:{kind}"), "{kind}");
        let blocked = create_one(&replica, sender, "after the reply").await;
        assert_eq!(blocked["status"], "blocked", "{kind}: {blocked}");

        let (status, _) = reply(&mock, sender, "unstop").await;
        assert_eq!(status, 200, "{kind}");
        let (status, _) = replica.get(&format!("/api/opt-outs/{sender}")).await;
        assert_eq!(status, 404, "{kind}: UNSTOP takes the number off the list");
    }
}

/// A lane with `countries` takes numbers of those countries only; a route or a named
/// lane that sends another there gets a 422 naming the number, and nothing is stored.
#[tokio::test]
async fn a_lane_with_countries_refuses_numbers_of_other_countries_at_intake() {
    let env = TestEnv::start().await;
    let config = write_config(
        &env,
        &http_json("main", env.mock(), ""),
        &["main"],
        "\n[[lane]]\nname = \"tr\"\nbatch_size = 10\ninterval = \"200ms\"\n\
         providers = [\"main\"]\ncountries = [\"TR\", \"cy\"]\n",
    );
    let replica = env.replica("r1", &settings(&config)).await;
    let (status, created) = replica
        .post(
            "/api/messages",
            Some(json!([
                {"phone_number": "+905551230001", "content": "to TR", "lane": "tr"},
                {"phone_number": "+35799123456", "content": "to CY", "lane": "tr"}
            ])),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, error) = replica
        .post(
            "/api/messages",
            Some(json!([
                {"phone_number": "+905551230002", "content": "to TR", "lane": "tr"},
                {"phone_number": "+14155550100", "content": "to US", "lane": "tr"}
            ])),
        )
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "phone_number", "{error}");
    assert_eq!(error["error"]["index"], 1, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("US") && message.contains("TR, CY"),
        "{message}"
    );
    // The default lane has no list: the US number goes there.
    let (status, _) = replica
        .post(
            "/api/messages",
            Some(json!({"phone_number": "+14155550100", "content": "to US"})),
        )
        .await;
    assert_eq!(status, 201);
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(
        stats["by_status"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_i64().unwrap())
            .sum::<i64>(),
        3,
        "the refused request stored nothing: {stats}"
    );
    let (_, lanes) = replica.get("/api/lanes").await;
    let tr = lanes["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "tr")
        .unwrap();
    assert_eq!(tr["countries"], json!(["TR", "CY"]));
}

/// Quiet hours (`QUIET_HOURS`, here from an hour before now to an hour after, in
/// Istanbul's time): a message to Turkey is held in the queue, due at the window's end
/// there, attempt unspent; a transactional one to Turkey and one to Japan (six hours
/// ahead, outside the window) go at once. Neither country moves its clocks. Then the
/// hour is made to pass (the held row made due, on a replica without quiet hours): the
/// held message is an ordinary queued one, and goes out.
#[tokio::test]
async fn quiet_hours_hold_a_message_until_the_window_opens_in_the_recipients_zone() {
    use chrono::{DateTime, Duration, Timelike, Utc};
    let env = TestEnv::start().await;
    let now = Utc::now();
    let minute = now
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap();
    let ends: DateTime<Utc> = minute + Duration::minutes(61);
    let istanbul = |t: DateTime<Utc>| (t + Duration::hours(3)).format("%H:%M").to_string();
    let window = format!(
        "{}-{}",
        istanbul(minute - Duration::hours(1)),
        istanbul(ends)
    );
    let mut replica = env
        .replica("r1", &env.settings().env("QUIET_HOURS", &window))
        .await;
    let (_, lanes) = replica.get("/api/lanes").await;
    assert_eq!(lanes["lanes"][0]["quiet_hours"], window.as_str());

    let held = create_one(&replica, "+905556660001", "a campaign, in the night").await;
    let (status, urgent) = replica
        .post(
            "/api/messages",
            Some(
                json!({"phone_number": "+905556660002", "content": "your code: 123456",
                        "category": "transactional"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{urgent}");
    assert_eq!(urgent["category"], "transactional");
    let japan = create_one(&replica, "+819012345678", "daytime in Tokyo").await;
    let ids = |m: &[&Value]| -> Vec<i64> { m.iter().map(|m| m["id"].as_i64().unwrap()).collect() };
    wait_sent(&replica, &ids(&[&urgent, &japan]), secs(30)).await;

    // Held in the queue, due when the window ends in Istanbul, its attempt unspent.
    let waiting =
        crate::support::wait_for("the held message back in the queue", secs(30), || async {
            let (_, message) = replica.get(&format!("/api/messages/{}", held["id"])).await;
            let due: DateTime<Utc> = message["next_attempt_at"].as_str()?.parse().ok()?;
            (message["status"] == "pending" && due == ends).then_some(message)
        })
        .await;
    assert_eq!(waiting["attempts"], 0, "{waiting}");
    assert_eq!(sent_to(&env.mock().deliveries().await, "+905556660001"), 0);
    assert!(
        replica
            .metric("dispatcher_messages_held_total{lane=\"default\",reason=\"quiet_hours\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    );

    replica.terminate(secs(30)).await;
    let db = env.db().await;
    db.execute(
        "UPDATE messages SET next_attempt_at = now() WHERE id = $1",
        &[&held["id"].as_i64().unwrap()],
    )
    .await
    .unwrap();
    let replica = env.replica("r2", &env.settings()).await;
    wait_sent(&replica, &ids(&[&held]), secs(30)).await;
    assert_eq!(sent_to(&env.mock().deliveries().await, "+905556660001"), 1);
}

/// A bad `quiet_hours` in the file, or `QUIET_HOURS`, stops the replica with exit 2
/// naming it.
#[tokio::test]
async fn a_bad_quiet_hours_window_is_refused_at_start() {
    let env = TestEnv::start().await;
    let (status, output) = crate::support::replica::run_command(
        &["migrate"],
        &env.settings().env("QUIET_HOURS", "9pm-8am").to_env(),
    );
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("QUIET_HOURS"), "{output}");
    let config = write_config(
        &env,
        &http_json("main", env.mock(), ""),
        &["main"],
        "quiet_hours = \"21:00-21:00\"\n",
    );
    let (status, output) = crate::support::replica::run_command(
        &["migrate"],
        &settings(&config).connected_to(&env).to_env(),
    );
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("quiet_hours"), "{output}");
}
