//! Three real replica processes against real PostgreSQL, Redis and the mock provider:
//! one leader at a time, each message once and in order, never more than BATCH_SIZE
//! per interval, whatever happens to a replica or to Redis or PostgreSQL.

use std::time::{Duration, Instant};

use crate::support::cluster::{Cluster, assert_each_once, assert_fifo, assert_rate};
use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

const TTL: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(250);
const INTERVAL: Duration = Duration::from_millis(300);
const BATCH: usize = 2;
/// Claim-to-send spread tolerated by the rate check (see `assert_rate`).
const SLACK: Duration = Duration::from_millis(100);
const DRAIN: Duration = Duration::from_secs(90);

fn settings() -> ReplicaSettings {
    ReplicaSettings::fast()
        .lock_ttl(TTL)
        .lock_retry_interval(RETRY)
        .processing_interval(INTERVAL)
        .batch_size(BATCH as u32)
        .provider_timeout(secs(2))
}

async fn sent(env: &TestEnv) -> i64 {
    env.count("sent").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_each_message_once_in_order_within_the_rate() {
    let env = TestEnv::start().await;
    let cluster = Cluster::start(&env, 3, &settings()).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let ids = env.insert_messages(24).await;
    let started = Instant::now();
    while env.open_count().await > 0 {
        let leaders = cluster.leaders_among(&cluster.all()).await;
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        assert!(started.elapsed() < DRAIN, "queue did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
    assert_rate(&deliveries, BATCH, INTERVAL, SLACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_fails_over_and_its_claims_are_rescued() {
    // A slow provider keeps the leader inside a batch (two 1 s sends), so the kill
    // leaves claimed rows behind.
    let env = TestEnv::with_mock(&["--latency-ms", "1000"]).await;
    let mut cluster = Cluster::start(&env, 3, &settings()).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let ids = env.insert_messages(8).await;
    let db = env.db().await;
    wait_for(
        "the leader to be mid-batch",
        Duration::from_secs(30),
        || async {
            // A batch claimed within the last 500 ms still has over a second of sends
            // ahead of it, so its rows are still `sending` when the kill lands.
            let sending: i64 = db
                .query_one(
                    "SELECT count(*) FROM messages WHERE status = 'sending' \
                     AND claimed_at > now() - interval '500 milliseconds'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (sending > 0 && env.count("sent").await >= 2).then_some(())
        },
    )
    .await;
    // Kill whoever holds the fence now (the holder found at start could have changed).
    let fence = db
        .query_one("SELECT epoch, holder FROM dispatcher_leader", &[])
        .await
        .unwrap();
    let killed_epoch: i64 = fence.get(0);
    let holder: String = fence.get(1);
    let leader = cluster
        .replicas
        .iter()
        .position(|r| r.name == holder)
        .expect("the fence names a replica");
    cluster.replicas[leader].kill();
    let killed_at = Instant::now();
    let orphaned: Vec<i64> = db
        .query(
            "SELECT id FROM messages WHERE status = 'sending' AND claim_epoch = $1",
            &[&killed_epoch],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!orphaned.is_empty(), "the killed leader left claims behind");

    let survivors: Vec<usize> = cluster.all().into_iter().filter(|&i| i != leader).collect();
    let (new_leader, _) = cluster
        .wait_single_leader(&survivors, Duration::from_secs(20))
        .await;
    let failover = killed_at.elapsed();
    assert!(
        failover <= TTL + RETRY + Duration::from_secs(3),
        "failover took {failover:?}, bound is TTL + retry interval (+ slack for a busy machine)"
    );
    let new_epoch: i64 = db
        .query_one("SELECT epoch FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0);
    assert!(new_epoch > killed_epoch);

    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    let mut keys: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    keys.sort();
    assert_eq!(
        keys, ids,
        "every message delivered, including the rescued ones"
    );
    for d in &deliveries {
        let id: i64 = d.id;
        if d.times_seen > 1 {
            // The documented crash window: accepted, then the leader died before
            // recording it; resent under the same key.
            assert!(
                orphaned.contains(&id),
                "{id} delivered twice but was not in flight at the kill"
            );
        }
    }
    let repeated = deliveries.iter().filter(|d| d.times_seen > 1).count();
    assert!(
        repeated <= 1,
        "at most the one in-flight send can repeat, got {repeated}"
    );
    let rescued = cluster.replicas[new_leader].metrics().await;
    assert!(
        !rescued.contains("dispatcher_messages_rescued_total 0"),
        "the new leader rescued the orphaned claims"
    );
    assert_fifo_except(&deliveries, &orphaned);
}

/// FIFO holds for everything but the rescued messages (which went out late).
fn assert_fifo_except(deliveries: &[crate::support::provider::Delivery], rescued: &[i64]) {
    let kept: Vec<_> = deliveries
        .iter()
        .filter(|d| !rescued.contains(&d.id))
        .cloned()
        .collect();
    assert_fifo(&kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_stands_down_and_sends_nothing_more() {
    // Latency keeps the leader inside a batch, so the pause lands between two sends.
    let env = TestEnv::with_mock(&["--latency-ms", "300"]).await;
    let cluster = Cluster::start(&env, 3, &settings()).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let ids = env.insert_messages(30).await;
    let db = env.db().await;
    wait_for(
        "the leader to be mid-batch",
        Duration::from_secs(30),
        || async {
            let sending = env.count("sending").await;
            (sending > 0 && sent(&env).await >= 2).then_some(())
        },
    )
    .await;
    cluster.replicas[leader].pause();
    let paused_at = Instant::now();
    let old_epoch: i64 = db
        .query_one("SELECT epoch FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0);

    let others: Vec<usize> = cluster.all().into_iter().filter(|&i| i != leader).collect();
    let (new_leader, _) = cluster
        .wait_single_leader(&others, Duration::from_secs(20))
        .await;
    assert!(paused_at.elapsed() <= TTL + RETRY + Duration::from_secs(3));
    // Let the new leader work while the old one is frozen, then wake the old one.
    let before = sent(&env).await;
    wait_for(
        "the new leader to send",
        Duration::from_secs(30),
        || async { (sent(&env).await >= before + 4).then_some(()) },
    )
    .await;
    let resumed_at_us = chrono::Utc::now().timestamp_micros();
    cluster.replicas[leader].resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaders = cluster.leaders_among(&cluster.all()).await;
    assert_eq!(
        leaders,
        vec![new_leader],
        "the woken replica knows it lost the lease"
    );

    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_rate(&deliveries, BATCH, INTERVAL, SLACK);
    // Whatever the old leader had claimed but not yet sent was handed back, not sent
    // after it woke: every message sent under its epoch reached the provider before.
    let old_epoch_sent: Vec<i64> = db
        .query(
            "SELECT id FROM messages WHERE status = 'sent' AND claim_epoch = $1",
            &[&old_epoch],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for d in deliveries.iter().filter(|d| old_epoch_sent.contains(&d.id)) {
        assert!(
            d.first_seen_us < resumed_at_us,
            "message {} was sent by the deposed leader after it woke",
            d.id
        );
    }
    let logs = cluster.replicas[leader].logs();
    assert!(
        logs.contains("leadership ended"),
        "the old leader logged its loss"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_at_once_and_loses_nothing() {
    let env = TestEnv::start().await;
    // A long retry interval: only the release announcement can make the handover fast.
    let slow_lease = settings().lock_ttl(secs(30)).lock_retry_interval(secs(5));
    let mut cluster = Cluster::start(&env, 3, &slow_lease).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(20).await;
    wait_for(
        "some messages to go out",
        Duration::from_secs(30),
        || async { (sent(&env).await >= 4).then_some(()) },
    )
    .await;

    let started = Instant::now();
    let status = cluster.replicas[leader]
        .terminate(Duration::from_secs(20))
        .await;
    assert!(status.success());
    let others: Vec<usize> = cluster.all().into_iter().filter(|&i| i != leader).collect();
    let (_, _) = cluster
        .wait_single_leader(&others, Duration::from_secs(10))
        .await;
    let handover = started.elapsed();
    assert!(
        handover < Duration::from_millis(2500),
        "handover took {handover:?}; without the announcement it would wait for the 5s retry"
    );
    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
}

/// How many connections are subscribed to the leader's release announcements.
fn release_subscribers(env: &TestEnv) -> Option<i64> {
    let reply = env
        .redis
        .cli(&["PUBSUB", "NUMSUB", "message-dispatcher:lock:released"]);
    reply.lines().last()?.trim().parse().ok()
}

/// How many commands on a pub/sub channel Redis has refused (its ACL log merges
/// repeats into one entry with a count).
fn refused_channel_commands(env: &TestEnv) -> i64 {
    let log = env.redis.cli(&["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let mut refused = 0;
    let mut count = 0;
    for pair in lines.windows(2) {
        match pair[0] {
            "count" => count = pair[1].parse().unwrap_or(0),
            "reason" if pair[1] == "channel" => refused += count,
            _ => {}
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resubscribe_is_retried_until_it_holds() {
    let env = TestEnv::start().await;
    let _replica = env.replica("r1", &settings()).await;
    wait_for(
        "the replica to subscribe",
        Duration::from_secs(30),
        || async { (release_subscribers(&env) == Some(1)).then_some(()) },
    )
    .await;

    // The subscriber connection is dropped, and the subscription on the new connection
    // is refused (fred reports that refusal as a success).
    env.redis
        .cli(&["ACL", "SETUSER", "default", "resetchannels"]);
    env.redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    wait_for(
        "the resubscription to be refused",
        Duration::from_secs(30),
        || async { (refused_channel_commands(&env) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(release_subscribers(&env), Some(0));

    // Once Redis accepts again, the replica subscribes again without another reconnect.
    env.redis.cli(&["ACL", "SETUSER", "default", "allchannels"]);
    wait_for(
        "the replica to subscribe again",
        Duration::from_secs(60),
        || async { (release_subscribers(&env) == Some(1)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_pauses_dispatch_and_it_resumes_by_itself() {
    let mut env = TestEnv::start().await;
    let cluster = Cluster::start(&env, 3, &settings()).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let ids = env.insert_messages(30).await;
    wait_for(
        "some messages to go out",
        Duration::from_secs(30),
        || async { (sent(&env).await >= 4).then_some(()) },
    )
    .await;

    env.redis.stop().await;
    wait_for(
        "leadership to lapse",
        TTL + Duration::from_secs(5),
        || async {
            cluster
                .leaders_among(&cluster.all())
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let (status, health) = cluster.replicas[0].get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("degraded")));
    let paused_at = sent(&env).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sent(&env).await,
        paused_at,
        "no dispatch while no leader can be proven"
    );
    assert_eq!(env.count("sending").await, 0, "nothing left claimed");

    env.redis.start_again().await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
    assert_rate(&deliveries, BATCH, INTERVAL, SLACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_and_doubles_nothing() {
    let mut env = TestEnv::with_mock(&["--latency-ms", "40"]).await;
    let settings = settings().processing_interval(ms(100)).batch_size(5);
    let cluster = Cluster::start(&env, 3, &settings).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let ids = env.insert_messages(80).await;
    wait_for(
        "the drain to be under way",
        Duration::from_secs(30),
        || async { (sent(&env).await >= 10).then_some(()) },
    )
    .await;
    env.pg.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.pg.restart().await;
    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_eq!(env.count("sent").await, 80);
    for replica in &cluster.replicas {
        assert_eq!(
            replica.get("/health/ready").await.0,
            200,
            "{} recovered",
            replica.name
        );
    }
}

/// A batch held up mid-way (its results waiting for PostgreSQL) must not send its tail
/// back to back with the next batch: the provider never sees more than BATCH_SIZE in
/// any window of PROCESSING_INTERVAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stalled_by_postgres_does_not_burst_into_the_next() {
    let mut env = TestEnv::with_mock(&["--latency-ms", "200"]).await;
    let interval = Duration::from_secs(1);
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(3)
                .processing_interval(secs(1))
                .provider_timeout(secs(2)),
        )
        .await;
    let ids = env.insert_messages(15).await;
    wait_for("a batch to be half sent", Duration::from_secs(30), || async {
        let db = env.db().await;
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'sending'), count(*) FILTER (WHERE status = 'sent')
                 FROM messages",
                &[],
            )
            .await
            .unwrap();
        let (sending, sent): (i64, i64) = (row.get(0), row.get(1));
        (sending == 2 && sent % 3 == 1).then_some(())
    })
    .await;
    env.pg.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.pg.restart().await;
    env.wait_drained(DRAIN).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_rate(&deliveries, 3, interval, Duration::from_millis(50));
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_from_any_replica_is_cluster_wide_and_survives_restarts() {
    let env = TestEnv::start().await;
    let mut cluster = Cluster::start(&env, 3, &settings()).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let followers: Vec<usize> = cluster.all().into_iter().filter(|&i| i != leader).collect();

    let (status, body) = cluster.replicas[followers[0]]
        .post("/api/messaging/stop", None)
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("stopped")));
    env.insert_messages(6).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sent(&env).await,
        0,
        "the leader obeys a stop sent to a follower"
    );
    let (_, state) = cluster.replicas[leader].get("/api/messaging/status").await;
    assert_eq!(state["running"], false);

    let (status, body) = cluster.replicas[followers[1]]
        .post("/api/messaging/start", None)
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("started")));
    env.wait_drained(DRAIN).await;
    assert_eq!(sent(&env).await, 6);

    // Stopped, then every replica restarts: the stored state wins over AUTO_START=true.
    cluster.replicas[followers[0]]
        .post("/api/messaging/stop", None)
        .await;
    for replica in &mut cluster.replicas {
        assert!(replica.terminate(Duration::from_secs(20)).await.success());
    }
    for replica in &mut cluster.replicas {
        replica.restart();
    }
    for replica in &cluster.replicas {
        replica.wait_ready().await;
    }
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    env.insert_messages(4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sent(&env).await,
        6,
        "still stopped after restarting every replica"
    );
    let (_, state) = cluster.replicas[2].get("/api/messaging/status").await;
    assert_eq!(state["running"], false);
    assert_eq!(state["replicas"].as_array().unwrap().len(), 3, "{state}");

    cluster.replicas[2].post("/api/messaging/start", None).await;
    env.wait_drained(DRAIN).await;
    assert_eq!(sent(&env).await, 10);
}
