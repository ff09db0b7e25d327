//! Lanes (docs/design.md#lanes): several rate domains, each with its own leader,
//! spread over the replicas; a stalled or killed leader loses its lanes within
//! seconds; every lane keeps its own rate.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::cluster::{Cluster, assert_each_once, assert_rate};
use crate::support::replica::run_command;
use crate::support::{Replica, ReplicaSettings, TestEnv, http, ms, secs, wait_for};

/// A DISPATCH_CONFIG with one http-json provider (the test's mock) and `lanes`, each
/// `batch_size` per `interval`, written into the test's directory.
fn write_config(env: &TestEnv, lanes: &[&str], batch_size: u32, interval: &str) -> String {
    let mut text = format!(
        "[[provider]]\nname = \"mock\"\nkind = \"http-json\"\nurl = \"{}\"\ntoken_env = \"SMS_API_TOKEN\"\n",
        env.provider_url
    );
    for lane in lanes {
        text.push_str(&format!(
            "\n[[lane]]\nname = \"{lane}\"\nbatch_size = {batch_size}\ninterval = \"{interval}\"\nproviders = [\"mock\"]\nsend_concurrency = 4\n"
        ));
    }
    let path = env.dir.path().join("dispatch.toml");
    std::fs::write(&path, text).expect("write DISPATCH_CONFIG");
    path.display().to_string()
}

/// Each lane's leader (replica id, epoch); `None`: no leader.
type Leaders = BTreeMap<String, Option<(String, i64)>>;

/// Each lane's leader as `GET /api/lanes` on `replica` shows it.
async fn lane_leaders(replica: &Replica) -> Option<Leaders> {
    let (status, body) = replica.get("/api/lanes").await;
    if status != 200 {
        return None;
    }
    Some(
        body["lanes"]
            .as_array()?
            .iter()
            .map(|lane| {
                let leader = lane["leader"].as_object().map(|leader| {
                    (
                        leader["replica_id"].as_str().unwrap_or("").to_string(),
                        leader["epoch"].as_i64().unwrap_or(0),
                    )
                });
                (lane["name"].as_str().unwrap_or("").to_string(), leader)
            })
            .collect(),
    )
}

/// How many lanes each replica leads.
fn loads(leaders: &Leaders) -> HashMap<String, usize> {
    let mut loads = HashMap::new();
    for (replica, _) in leaders.values().flatten() {
        *loads.entry(replica.clone()).or_default() += 1;
    }
    loads
}

/// Waits until every lane has a leader among `names` and each of them leads between
/// `least` and `most` lanes, the same for 2 s in a row (a settled spread, not a moment).
async fn wait_spread(
    via: &Replica,
    names: &[&str],
    least: usize,
    most: usize,
    timeout: Duration,
) -> Leaders {
    let deadline = Instant::now() + timeout;
    let mut settled: Option<(Leaders, Instant)> = None;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(leaders) = lane_leaders(via).await {
            let loads = loads(&leaders);
            let spread = leaders.values().all(|l| {
                l.as_ref()
                    .is_some_and(|(replica, _)| names.contains(&replica.as_str()))
            }) && names.iter().all(|name| {
                let n = loads.get(*name).copied().unwrap_or(0);
                (least..=most).contains(&n)
            });
            settled = match settled {
                Some((seen, since)) if spread && seen == leaders => {
                    if since.elapsed() >= secs(2) {
                        return seen;
                    }
                    Some((seen, since))
                }
                _ if spread => Some((leaders.clone(), Instant::now())),
                _ => None,
            };
            last = Some(leaders);
        }
        tokio::time::sleep(ms(200)).await;
    }
    panic!("no settled spread of the lanes within {timeout:?}; last seen: {last:?}");
}

/// Creates `n` messages in `lane` through `replica`; returns their ids.
async fn create_in_lane(replica: &Replica, lane: &str, n: usize) -> Vec<i64> {
    let body: Vec<Value> = (0..n)
        .map(|i| {
            json!({"phone_number": format!("+3161234{i:04}"), "content": format!("{lane} {i}"), "lane": lane})
        })
        .collect();
    let (status, created) = replica.post("/api/messages", Some(json!(body))).await;
    assert_eq!(status, 201, "{created}");
    created
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["lane"], lane);
            m["id"].as_i64().unwrap()
        })
        .collect()
}

fn lane_settings(config: &str) -> ReplicaSettings {
    ReplicaSettings::fast()
        .env("DISPATCH_CONFIG", config)
        .env("SMS_API_TOKEN", "lane-test-token")
}

#[tokio::test]
async fn five_lanes_spread_over_three_replicas_each_at_its_own_rate() {
    let env = TestEnv::start().await;
    let names = ["default", "otp", "tr", "bulk", "alerts"];
    let config = write_config(&env, &names, 2, "500ms");
    let settings = lane_settings(&config);
    let cluster = Cluster::start(&env, 3, &settings).await;
    let replicas = ["r1", "r2", "r3"];

    let leaders = wait_spread(&cluster.replicas[0], &replicas, 1, 2, secs(40)).await;
    assert_eq!(leaders.len(), 5, "{leaders:?}");

    // Twelve messages per lane, all at once: each lane sends at its own rate, side by
    // side with the others.
    let mut ids_by_lane = HashMap::new();
    for lane in names {
        ids_by_lane.insert(lane, create_in_lane(&cluster.replicas[1], lane, 12).await);
    }
    let all: Vec<i64> = ids_by_lane.values().flatten().copied().collect();
    wait_for("every lane drained", secs(60), || async {
        let deliveries = env.deliveries().await;
        (deliveries.len() >= all.len()).then_some(())
    })
    .await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &all);
    for (lane, ids) in &ids_by_lane {
        let lane_deliveries: Vec<_> = deliveries
            .iter()
            .filter(|d| ids.contains(&d.id))
            .cloned()
            .collect();
        assert_eq!(lane_deliveries.len(), ids.len(), "lane {lane}");
        // In any 500 ms window at most 2 starts of this lane (the mock's clock stamps
        // arrival, a few ms after the start: 50 ms of slack).
        assert_rate(&lane_deliveries, 2, ms(500), ms(50));
    }
    // Lanes in parallel: all 60 went out in far less than the 3 s one lane would need
    // for its 12 alone times five.
    let first = deliveries.iter().map(|d| d.first_seen_us).min().unwrap();
    let last = deliveries.iter().map(|d| d.first_seen_us).max().unwrap();
    assert!(
        Duration::from_micros((last - first) as u64) < secs(12),
        "lanes ran one after another: {} ms",
        (last - first) / 1000
    );
    let (_, lanes) = cluster.replicas[2].get("/api/lanes").await;
    for lane in lanes["lanes"].as_array().unwrap() {
        assert_eq!(lane["pending"], 0, "{lane}");
        assert_eq!(lane["unit"], "messages");
        assert_eq!(lane["providers"][0]["name"], "mock");
    }
}

#[tokio::test]
async fn a_killed_replica_loses_its_lanes_and_each_sends_again_within_3s() {
    let env = TestEnv::start().await;
    let names = ["default", "otp", "tr", "bulk", "alerts"];
    let config = write_config(&env, &names, 2, "200ms");
    let settings = lane_settings(&config)
        .lock_ttl(secs(15))
        .lock_retry_interval(secs(1));
    let mut cluster = Cluster::start(&env, 3, &settings).await;
    let replicas = ["r1", "r2", "r3"];
    let leaders = wait_spread(&cluster.replicas[0], &replicas, 1, 2, secs(60)).await;
    let busiest = loads(&leaders)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(replica, _)| replica)
        .unwrap();
    let its_lanes: Vec<String> = leaders
        .iter()
        .filter(|(_, l)| l.as_ref().is_some_and(|(r, _)| *r == busiest))
        .map(|(lane, _)| lane.clone())
        .collect();
    let index = replicas.iter().position(|r| *r == busiest).unwrap();
    let survivor = (index + 1) % 3;

    cluster.replicas[index].kill();
    let killed_at = Instant::now();
    let mut ids = Vec::new();
    for lane in &its_lanes {
        ids.extend(create_in_lane(&cluster.replicas[survivor], lane, 1).await);
    }
    wait_for(
        "a send in each of the killed replica's lanes",
        secs(30),
        || async {
            let deliveries = env.deliveries().await;
            ids.iter()
                .all(|id| deliveries.iter().any(|d| d.id == *id))
                .then_some(())
        },
    )
    .await;
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed <= secs(3),
        "the lanes {its_lanes:?} of {busiest} sent again only after {elapsed:?}"
    );
    assert_each_once(&env.deliveries().await, &ids);
}

#[tokio::test]
async fn a_stalled_leader_loses_its_lane_within_3s_and_sends_nothing_when_it_wakes() {
    a_stalled_leader_loses_its_lane(false).await;
}

/// The leader froze in the middle of a claim, with the lane's fence row locked: the
/// follower ends that transaction and takes over at its next reading. (It used to end
/// it only after 2 s and then watch a whole stall anew: 3.2–3.4 s.)
#[tokio::test]
async fn a_leader_stalled_in_a_claim_loses_its_lane_within_3s() {
    a_stalled_leader_loses_its_lane(true).await;
}

/// SIGSTOPs the leader of lane `otp` and measures when the lane has a new leader;
/// `in_a_claim`: a transaction of ours (as the application names itself) holds the
/// lane's fence row locked from the moment of the stop, as a claim the leader froze in
/// would (unless the leader's own claim already holds it).
async fn a_stalled_leader_loses_its_lane(in_a_claim: bool) {
    let env = TestEnv::start().await;
    let names = ["default", "otp"];
    let config = write_config(&env, &names, 1, "100ms");
    let settings = lane_settings(&config)
        .lock_ttl(secs(15))
        .lock_retry_interval(secs(1));
    let cluster = Cluster::start(&env, 2, &settings).await;
    let leaders = wait_spread(&cluster.replicas[0], &["r1", "r2"], 1, 1, secs(60)).await;
    let (stalled_id, epoch) = leaders["otp"].clone().unwrap();
    let stalled = if stalled_id == "r1" { 0 } else { 1 };
    let other = 1 - stalled;

    // A steady stream through the lane, so the stalled process has claims in hand.
    let mut ids = create_in_lane(&cluster.replicas[other], "otp", 40).await;
    wait_for("the lane sending", secs(10), || async {
        (env.deliveries().await.len() >= 3).then_some(())
    })
    .await;
    cluster.replicas[stalled].pause();
    let paused_at = Instant::now();
    let frozen_claim = if in_a_claim {
        let client = env.pg.client().await;
        client
            .batch_execute(
                "SET application_name = 'message-dispatcher'; SET lock_timeout = '200ms'; BEGIN",
            )
            .await
            .unwrap();
        let held = client
            .query(
                "SELECT epoch FROM dispatcher_leader WHERE lane = 'otp' FOR UPDATE",
                &[],
            )
            .await;
        eprintln!("fence row of otp held by this test: {}", held.is_ok());
        Some(client)
    } else {
        None
    };
    let moved = wait_for("a new leader of the lane", secs(20), || async {
        let leaders = lane_leaders(&cluster.replicas[other]).await?;
        let (replica, new_epoch) = leaders["otp"].clone()?;
        (new_epoch > epoch && replica != stalled_id).then(|| paused_at.elapsed())
    })
    .await;
    assert!(
        moved <= secs(3),
        "the lane moved {moved:?} after its leader stalled (lease 15 s)"
    );
    eprintln!("the lane moved {moved:?} after its leader stalled");
    drop(frozen_claim);
    ids.extend(create_in_lane(&cluster.replicas[other], "otp", 5).await);
    wait_for("the lane drained by its new leader", secs(30), || async {
        (env.deliveries().await.len() >= ids.len()).then_some(())
    })
    .await;
    // Woken, the old leader finds itself fenced: it sends nothing more.
    cluster.replicas[stalled].resume();
    wait_for("the woken replica steps down", secs(20), || async {
        cluster.replicas[stalled]
            .metrics()
            .await
            .contains(r#"dispatcher_is_leader{lane="otp"} 0"#)
            .then_some(())
    })
    .await;
    tokio::time::sleep(secs(2)).await;
    let stats = env.mock().stats().await;
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert_each_once(&env.deliveries().await, &ids);
}

#[tokio::test]
async fn lanes_are_named_at_intake_and_in_filters() {
    let env = TestEnv::start().await;
    let config = write_config(&env, &["default", "otp"], 2, "200ms");
    let replica = env.replica("r1", &lane_settings(&config)).await;
    let (status, body) = replica
        .post(
            "/api/messages",
            Some(json!({"phone_number": "+905551234567", "content": "x", "lane": "nope"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "lane", "{body}");
    let ids = create_in_lane(&replica, "otp", 1).await;
    let (status, listed) = replica.get("/api/messages?lane=otp").await;
    assert_eq!(status, 200);
    assert_eq!(listed["messages"][0]["id"], ids[0]);
    let (status, _) = replica.get("/api/messages?lane=nope").await;
    assert_eq!(status, 400);
    // The API's description names the lanes a request may give, so a client (or a
    // fuzzer) built from it sends no lane that is refused.
    let (_, doc) = replica.get("/openapi.json").await;
    let list_lane = doc["paths"]["/api/messages"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "lane")
        .unwrap();
    assert_eq!(
        list_lane["schema"]["enum"],
        json!(["default", "otp", ""]),
        "{list_lane}"
    );
    assert_eq!(
        doc["components"]["schemas"]["CancelFilter"]["properties"]["lane"]["enum"],
        json!(["default", "otp", null])
    );
    let (status, body) = replica.post("/api/lanes/otp/stop", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("stopped")));
    let (_, lanes) = replica.get("/api/lanes").await;
    let running: HashMap<String, bool> = lanes["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["running"] == true,
            )
        })
        .collect();
    assert!(!running["otp"]);
    assert!(running["default"], "a lane stops alone");
    let response = http()
        .put(replica.url("/api/lanes/otp/config"))
        .json(&json!({"batch_size": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, lanes) = replica.get("/api/lanes").await;
    assert_eq!(lanes["lanes"][1]["batch_size"], 7, "{lanes}");
    let (status, _) = replica.post("/api/lanes/nope/start", None).await;
    assert_eq!(status, 404);

    // A lane the configuration no longer names: its messages are shown, not hidden.
    env.db()
        .await
        .execute(
            "INSERT INTO messages (phone_number, content, lane) VALUES ('+905551234567', 'x', 'gone')",
            &[],
        )
        .await
        .unwrap();
    let (_, lanes) = replica.get("/api/lanes").await;
    assert_eq!(
        lanes["unconfigured"],
        json!([{"name": "gone", "pending": 1, "sending": 0}]),
        "{lanes}"
    );
}

#[tokio::test]
async fn a_bad_dispatch_config_exits_2_naming_the_line_and_key() {
    let env = TestEnv::start().await;
    let path = env.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[provider]]\nname = \"p\"\nkind = \"http-json\"\nurl = \"http://127.0.0.1:1/send\"\ntoken_env = \"SMS_API_TOKEN\"\n\n[[lane]]\nname = \"default\"\nbatch_size = 0\ninterval = \"1s\"\nproviders = [\"p\"]\n",
    )
    .unwrap();
    let vars = env
        .settings()
        .env("DISPATCH_CONFIG", &path.display().to_string())
        .env("SMS_API_TOKEN", "t")
        .to_env();
    let (status, output) = run_command(&["serve"], &vars);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("line 9"), "{output}");
    assert!(output.contains("batch_size"), "{output}");
}

#[tokio::test]
async fn one_recipients_messages_go_one_at_a_time_in_creation_order() {
    // Each answer takes 150 ms; eight sends may be in flight.
    let env = TestEnv::with_mock(&["--latency-ms", "150"]).await;
    let settings = ReplicaSettings::fast()
        .batch_size(20)
        .processing_interval(ms(100))
        .send_concurrency(8)
        .auto_start(false);
    let replica = env.replica("r1", &settings).await;
    let same = "+31612340000";
    let body: Vec<Value> = (0..12)
        .map(|i| {
            let to = if i % 2 == 0 {
                same.to_string()
            } else {
                format!("+316123401{i:02}")
            };
            json!({"phone_number": to, "content": format!("message {i}")})
        })
        .collect();
    let (status, created) = replica.post("/api/messages", Some(json!(body))).await;
    assert_eq!(status, 201, "{created}");
    let ids: Vec<i64> = created
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    replica.post("/api/messaging/start", None).await;
    wait_for("all sent", secs(30), || async {
        (env.deliveries().await.len() >= ids.len()).then_some(())
    })
    .await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    let mut to_one: Vec<_> = deliveries.iter().filter(|d| d.to == same).collect();
    to_one.sort_by_key(|d| d.id);
    for pair in to_one.windows(2) {
        let gap = pair[1].first_seen_us - pair[0].first_seen_us;
        assert!(
            gap >= 140_000,
            "message {} reached the provider {gap} us after message {} to the same number, \
             before its answer",
            pair[1].id,
            pair[0].id
        );
    }
    // Other numbers still went side by side.
    let mut others: Vec<i64> = deliveries
        .iter()
        .filter(|d| d.to != same)
        .map(|d| d.first_seen_us)
        .collect();
    others.sort();
    assert!(
        others.windows(2).any(|w| w[1] - w[0] < 100_000),
        "sends to different numbers ran one at a time: {others:?}"
    );
}

/// When `replica` logged `message` for `lane` last (its JSON log's timestamp).
fn last_logged(
    replica: &Replica,
    message: &str,
    lane: &str,
) -> Option<chrono::DateTime<chrono::Utc>> {
    replica
        .logs()
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["message"] == message && entry["lane"] == lane)
        .find_map(|entry| entry["timestamp"].as_str()?.parse().ok())
}

#[tokio::test]
async fn a_replica_joining_takes_only_its_share_handed_over_at_once() {
    let env = TestEnv::start().await;
    let names = ["default", "otp", "tr", "bulk"];
    let config = write_config(&env, &names, 2, "200ms");
    // A 2 s retry interval: a handover that waited for a follower's next attempt would
    // take up to 2.4 s; announced, it takes a few milliseconds.
    let settings = lane_settings(&config)
        .lock_ttl(secs(8))
        .lock_retry_interval(secs(2));
    let first = [
        env.replica("r1", &settings).await,
        env.replica("r2", &settings).await,
    ];
    let before = wait_spread(&first[0], &["r1", "r2"], 2, 2, secs(60)).await;
    let joiner = env.replica("r3", &settings).await;
    let after = wait_spread(&first[0], &["r1", "r2", "r3"], 1, 2, secs(60)).await;
    let moved: Vec<&String> = names
        .iter()
        .map(|n| n.to_string())
        .filter_map(|lane| {
            let key = before.keys().find(|k| **k == lane)?;
            (before[key].as_ref().map(|l| &l.0) != after[key].as_ref().map(|l| &l.0)).then_some(key)
        })
        .collect();
    let joined = loads(&after).get("r3").copied().unwrap_or(0);
    assert!(
        (1..=2).contains(&joined),
        "r3 leads {joined} of 4 lanes: {after:?}"
    );
    assert!(
        moved.len() <= 2,
        "{} lanes moved for one joiner: {before:?} -> {after:?}",
        moved.len()
    );
    let replicas = [&first[0], &first[1], &joiner];
    for lane in moved {
        let (from, _) = before[lane].clone().unwrap();
        let (to, _) = after[lane].clone().unwrap();
        let from = replicas
            .iter()
            .find(|r| r.logs().contains(&format!("\"replica_id\":\"{from}\"")))
            .unwrap();
        let to = replicas
            .iter()
            .find(|r| r.logs().contains(&format!("\"replica_id\":\"{to}\"")))
            .unwrap();
        let ended = last_logged(from, "leadership ended", lane).expect("the old leader's end");
        let began = last_logged(to, "became leader", lane).expect("the new leader's start");
        let gap = (began - ended).to_std().unwrap_or_default();
        eprintln!("lane {lane}: handed over in {gap:?}");
        assert!(
            gap < secs(1),
            "lane {lane} took {gap:?} to change hands: not announced?"
        );
    }
}
