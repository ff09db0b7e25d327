//! The core promise under the faults that open its windows: a leader that lost its
//! Redis key mid-batch, a batch held up across a handover, a leader cut off from
//! PostgreSQL, `stop` in the middle of a batch, and results held at shutdown.
//!
//! Each test drives real replica processes against real servers, with a TCP proxy
//! between one replica and Redis or PostgreSQL where the fault is on one path only.

use std::time::{Duration, Instant};

use crate::support::cluster::{assert_each_once, assert_rate};
use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

const LOCK_KEY: &str = "message-dispatcher:lock";
/// How far apart the provider may see sends that started an interval apart: the
/// network and scheduling jitter the README documents for the rate limit.
const RATE_JITTER: Duration = Duration::from_millis(50);

async fn batch_open(env: &TestEnv) -> bool {
    env.db()
        .await
        .query_one("SELECT batch_open FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0)
}

/// The leader's path to Redis stalls mid-batch and the key is lost (a failover to a
/// lagging Redis replica, a restart without persistence, an eviction). Another replica
/// takes the key and a new epoch while the old leader still has a long batch claimed.
/// PostgreSQL fences the old leader's sends, and the new leader re-claims its rows
/// only once none of them can still be sent: every message reaches the provider once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_key_mid_batch_sends_nothing_the_new_leader_sends() {
    let env = TestEnv::with_mock(&["--latency-ms", "200"]).await;
    let (redis_path, redis_url) = env.redis_proxy().await;
    let settings = ReplicaSettings::fast()
        .batch_size(100)
        .processing_interval(secs(1))
        .lock_ttl(secs(8))
        .lock_retry_interval(ms(500))
        .provider_timeout(secs(1));
    let old = env
        .replica("r1", &settings.clone().redis_url(redis_url))
        .await;
    wait_for("r1 to lead", Duration::from_secs(30), || async {
        old.is_leader().await.then_some(())
    })
    .await;
    let new = env.replica("r2", &settings).await;
    let ids = env.insert_messages(100).await;
    // One batch of 100 sends of 200 ms each: 20 s of sending. Lose the key 40 sends in.
    wait_for("40 sends", Duration::from_secs(60), || async {
        (env.mock().stats().await.requests >= 40).then_some(())
    })
    .await;
    redis_path.pause();
    assert_eq!(env.redis.cli(&["DEL", LOCK_KEY]), "1");
    wait_for("r2 to lead", Duration::from_secs(30), || async {
        new.is_leader().await.then_some(())
    })
    .await;

    env.wait_drained(Duration::from_secs(120)).await;
    redis_path.resume();
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    let sent_by: i64 = env
        .db()
        .await
        .query_one(
            "SELECT count(DISTINCT claimed_by) FROM messages WHERE status = 'sent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent_by, 2, "both replicas sent part of the queue");
}

/// A batch held up by a PostgreSQL outage sends its tail late; then the leader hands
/// over (SIGTERM). The new leader must know when the last sends started, or its first
/// batch lands right after that late tail: at most BATCH_SIZE sends start within any
/// PROCESSING_INTERVAL, across the handover, as the provider sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_holds_across_a_handover_after_a_stalled_batch() {
    let mut env = TestEnv::with_mock(&["--latency-ms", "500"]).await;
    let settings = ReplicaSettings::fast()
        .batch_size(2)
        .processing_interval(secs(4))
        .provider_timeout(secs(2));
    let mut old = env.replica("r1", &settings).await;
    wait_for("r1 to lead", Duration::from_secs(30), || async {
        old.is_leader().await.then_some(())
    })
    .await;
    let new = env.replica("r2", &settings).await;
    let mut ids = env.insert_messages(2).await;
    wait_for("the first send", Duration::from_secs(30), || async {
        (env.mock().stats().await.requests >= 1).then_some(())
    })
    .await;
    // The first answer comes back while PostgreSQL is down: the batch's second send
    // can only start once the first result is recorded, seconds late.
    env.pg.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.pg.restart().await;
    wait_for(
        "the stalled batch to close",
        Duration::from_secs(60),
        || async { (env.count("sent").await == 2 && !batch_open(&env).await).then_some(()) },
    )
    .await;
    assert!(old.terminate(Duration::from_secs(30)).await.success());
    wait_for("r2 to lead", Duration::from_secs(30), || async {
        new.is_leader().await.then_some(())
    })
    .await;
    // The next batch is due (its interval after the stalled batch began) the moment
    // these arrive; the late tail of the stalled batch is less than an interval ago.
    ids.extend(env.insert_messages(2).await);
    env.wait_drained(Duration::from_secs(60)).await;

    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_rate(&deliveries, 2, Duration::from_secs(4), RATE_JITTER);
}

/// The leader can still reach Redis but no longer PostgreSQL (a partition, a starved
/// pool): it must resign so that a replica that can reach PostgreSQL takes over and
/// drains the queue, and it must not campaign again while it cannot reach PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_postgres_resigns_and_another_drains_the_queue() {
    let env = TestEnv::with_mock(&["--latency-ms", "100"]).await;
    let (pg_path, pg_url) = env.postgres_proxy().await;
    let settings = ReplicaSettings::fast()
        .batch_size(5)
        .processing_interval(ms(200));
    let mut old = env
        .replica("r1", &settings.clone().database_url(pg_url))
        .await;
    wait_for("r1 to lead", Duration::from_secs(30), || async {
        old.is_leader().await.then_some(())
    })
    .await;
    let new = env.replica("r2", &settings).await;
    let ids = env.insert_messages(40).await;
    wait_for("a few sends", Duration::from_secs(30), || async {
        (env.mock().stats().await.requests >= 5).then_some(())
    })
    .await;
    pg_path.cut();
    let cut_at = Instant::now();

    // Bound (TTL 2 s, retry 250 ms, timeout 2 s): the leader resigns after 2 × TTL
    // without PostgreSQL, the follower acquires at once (announced release), and the
    // cut leader's claims are rescued after the fence window + SMS_API_TIMEOUT + 1 s.
    // About 9 s, plus the drain; 60 s leaves room for a busy machine.
    env.wait_drained(Duration::from_secs(60)).await;
    let drained = cut_at.elapsed();
    assert!(new.is_leader().await, "r2 took over");
    assert!(
        !old.is_leader().await,
        "r1 does not lead without PostgreSQL"
    );
    assert!(old.is_running(), "r1 stays up");
    let logs = old.logs();
    assert!(
        logs.contains("cannot reach PostgreSQL"),
        "r1 says why it resigned"
    );
    pg_path.resume();
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    eprintln!("queue drained {drained:?} after the cut");
}

/// `stop` answers only once the leader can start nothing more: sends waiting in a
/// claimed batch stay unsent and go back to pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_slow_batch_starts_nothing_after_its_answer() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(10)
                .processing_interval(ms(200)),
        )
        .await;
    let contents: Vec<String> = (0..10)
        .map(|i| format!("slow {i} reply:sleep-300"))
        .collect();
    let contents: Vec<&str> = contents.iter().map(String::as_str).collect();
    env.create_messages(&replica, &contents).await;
    wait_for("two sends", Duration::from_secs(30), || async {
        (env.scripted().received().len() >= 2).then_some(())
    })
    .await;
    let (status, _) = replica.post("/api/messaging/stop", None).await;
    assert_eq!(status, 200);
    let answered = Instant::now();
    wait_for("the batch to settle", Duration::from_secs(30), || async {
        (env.count("sending").await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = env
        .scripted()
        .received()
        .iter()
        .filter(|r| r.at > answered)
        .count();
    // A request already on its way when the answer left may arrive just after it;
    // with SEND_CONCURRENCY 1 there is at most one.
    assert!(late <= 1, "{late} sends arrived after stop answered");
    let sent = env.count("sent").await;
    assert_eq!(sent + env.count("pending").await, 10, "the rest went back");
    assert!(sent < 10, "the batch was stopped before its end");
}

/// A result the provider gave while PostgreSQL is down is held in memory; if the
/// replica must then stop (SIGTERM, grace over), the result is not lost: the next
/// leader learns it and records the message as sent instead of sending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_held_through_sigterm_during_a_postgres_outage_is_not_resent() {
    let mut env = TestEnv::with_scripted().await;
    let settings = ReplicaSettings::fast()
        .batch_size(1)
        .shutdown_timeout(secs(2))
        .provider_timeout(secs(2));
    let mut old = env.replica("r1", &settings).await;
    let ids = env.create_messages(&old, &["held reply:sleep-800"]).await;
    wait_for("the send", Duration::from_secs(30), || async {
        (!env.scripted().received().is_empty()).then_some(())
    })
    .await;
    env.pg.stop().await;
    // The provider answers 800 ms after the request; the answer is then held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(old.terminate(Duration::from_secs(30)).await.success());
    env.pg.restart().await;

    let _new = env.replica("r2", &settings).await;
    wait_for(
        "the message to be recorded as sent",
        Duration::from_secs(60),
        || async { (env.count("sent").await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .len(),
        1,
        "the accepted message was not sent again"
    );
}

/// The reply to a committed group write is lost (a connection reset between
/// PostgreSQL and the replica after the COMMIT): the replica retries the write on a
/// new connection and must recognise the rows it recorded itself, not report that a
/// newer leader rescued them, so `messages_sent_total` counts every send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_a_committed_result_write_still_counts_the_sends() {
    let env = TestEnv::with_scripted().await;
    let (pg_path, pg_url) = env.postgres_proxy().await;
    let settings = crate::support::provider::holding_settings(2)
        .database_url(pg_url)
        .lock_ttl(secs(15));
    let replica = env.replica("r1", &settings).await;
    let ids = env
        .create_messages(&replica, &["first reply:hold", "second reply:hold"])
        .await;
    let keys = env.delivery_keys(&ids).await;
    wait_for("both sends in flight", Duration::from_secs(30), || async {
        keys.iter()
            .all(|key| !env.scripted().requests_for(key).is_empty())
            .then_some(())
    })
    .await;
    // From now on PostgreSQL's answers to UPDATEs (their command tag) are lost on the
    // way; the statements themselves commit.
    pg_path.drop_replies(b"UPDATE ");
    env.scripted().release_held();
    wait_for(
        "the results committed (their replies lost)",
        Duration::from_secs(30),
        || async { (env.count("sent").await == 2).then_some(()) },
    )
    .await;
    // The connections break; the replica writes again on new ones.
    pg_path.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg_path.resume();
    wait_for("both sends counted", Duration::from_secs(60), || async {
        (replica
            .metric(r#"dispatcher_messages_sent_total{lane="default"}"#)
            .await
            == Some(2.0))
        .then_some(())
    })
    .await;
    assert!(
        !replica
            .logs()
            .contains("a newer leader rescued this message"),
        "the replica took its own committed results for a rescue"
    );
    env.scripted().assert_each_requested_once(&keys);
}
