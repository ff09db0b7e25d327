//! Dependencies failing under a running replica, late dependencies, and shutdown.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::provider::holding_settings;
use crate::support::{ReplicaSettings, TestEnv, http, ms, secs, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_in_single_replica_mode_degrades_but_keeps_sending() {
    let mut env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .lock_enabled(false)
                .batch_size(5)
                .processing_interval(ms(200)),
        )
        .await;
    env.create_messages(&replica, &["before 1", "before 2"])
        .await;
    env.wait_drained(TEST_TIMEOUT).await;
    let (status, sent) = replica.get("/api/messages/sent").await;
    assert_eq!(status, 200);
    assert!(
        sent["messages"][0]["cached_at"].is_string(),
        "cached while Redis is up: {sent}"
    );

    env.redis.stop().await;
    let health = wait_for("health to report Redis down", TEST_TIMEOUT, || async {
        let (status, body) = replica.get("/health").await;
        (body["status"] == "degraded").then_some((status, body))
    })
    .await;
    assert_eq!(health.0, 200, "degraded is still 200");
    assert_eq!(health.1["dependencies"]["redis"], "unhealthy");
    assert_eq!(health.1["dependencies"]["database"], "healthy");

    env.create_messages(&replica, &["during 1", "during 2", "during 3"])
        .await;
    env.wait_drained(TEST_TIMEOUT).await;
    assert_eq!(
        env.mock().stats().await.unique_keys,
        5,
        "sends continue without Redis"
    );
    let (status, sent) = replica.get("/api/messages/sent?limit=10").await;
    assert_eq!(status, 200, "the sent list still answers");
    assert_eq!(sent["total"], 5);
    assert!(
        sent["messages"][0]["cached_at"].is_null(),
        "cached_at is null when Redis is down"
    );
    let metrics = replica.metrics().await;
    assert!(metrics.contains("dispatcher_dependency_up{dependency=\"redis\"} 0"));

    env.redis.start_again().await;
    wait_for("health to recover", TEST_TIMEOUT, || async {
        (replica.get("/health").await.1["status"] == "healthy").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_readiness_keeps_the_replica_and_resumes() {
    let mut env = TestEnv::start().await;
    let mut replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(5)
                .processing_interval(ms(200)),
        )
        .await;
    env.create_messages(&replica, &["one", "two"]).await;
    env.wait_drained(TEST_TIMEOUT).await;

    env.pg.stop().await;
    let (status, body) = wait_for("health to report PostgreSQL down", TEST_TIMEOUT, || async {
        let (status, body) = replica.get("/health").await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["dependencies"]["database"], "unhealthy");
    assert_eq!(replica.get("/health/ready").await.0, 503);
    assert_eq!(replica.get("/health/live").await.0, 200);
    let (status, body) = replica.get("/api/messages/sent").await;
    assert_eq!(
        status, 503,
        "API answers 503 while the database is down: {body}"
    );
    assert_eq!(body["error"]["code"], "unavailable");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        replica.is_running(),
        "the replica survives a database outage"
    );

    env.pg.restart().await;
    replica.wait_ready().await;
    env.create_messages(&replica, &["three", "four"]).await;
    env.wait_drained(TEST_TIMEOUT).await;
    assert_eq!(
        env.mock().stats().await.unique_keys,
        4,
        "work resumes after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_dependencies_are_picked_up_without_a_restart() {
    let mut env = TestEnv::start().await;
    env.pg.stop().await;
    env.redis.stop().await;
    let replica = env.spawn_replica("r1", &ReplicaSettings::fast());
    wait_for("liveness", TEST_TIMEOUT, || async {
        let response = http().get(replica.url("/health/live")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        replica.get("/health/ready").await.0,
        503,
        "not ready without PostgreSQL"
    );

    env.pg.restart().await;
    replica.wait_ready().await;
    assert!(
        !replica.is_leader().await,
        "no leader can be proven without Redis"
    );
    env.redis.start_again().await;
    wait_for("leadership once Redis is up", TEST_TIMEOUT, || async {
        replica.is_leader().await.then_some(())
    })
    .await;
    let logs = replica.logs();
    assert!(
        logs.contains("PostgreSQL not ready yet"),
        "each attempt is logged"
    );
    assert!(
        logs.contains("Redis not reachable yet"),
        "each attempt is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_stop_are_idempotent_and_stop_holds_messages() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &ReplicaSettings::fast().processing_interval(ms(200)))
        .await;
    for _ in 0..2 {
        let (status, body) = replica.post("/api/messaging/stop", None).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("stopped")));
    }
    env.create_messages(&replica, &["held 1", "held 2"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.mock().stats().await.requests,
        0,
        "nothing is sent while stopped"
    );
    assert_eq!(env.count("pending").await, 2);
    let (_, health) = replica.get("/health").await;
    assert_eq!(health["processing_status"], "stopped");

    let (status, body) = replica.post("/api/messaging/start", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("started")));
    let (status, body) = replica.post("/api/messaging/start", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("running")));
    env.wait_drained(TEST_TIMEOUT).await;
    for _ in 0..3 {
        assert_eq!(replica.post("/api/messaging/stop", None).await.0, 200);
        assert_eq!(replica.post("/api/messaging/start", None).await.0, 200);
    }
    assert!(replica.get("/health/live").await.0 == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_batch_finishes_in_flight_sends_and_returns_the_rest() {
    let env = TestEnv::with_scripted().await;
    let mut replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(3)
                .processing_interval(ms(200))
                .shutdown_timeout(secs(10)),
        )
        .await;
    let ids = env
        .create_messages(
            &replica,
            &[
                "a reply:sleep-1500",
                "b reply:sleep-1500",
                "c reply:sleep-1500",
            ],
        )
        .await;
    wait_for("the first send to start", TEST_TIMEOUT, || async {
        (!env
            .scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .is_empty())
        .then_some(())
    })
    .await;
    let status = replica.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    let db = env.db().await;
    let rows = db
        .query("SELECT id, status, attempts FROM messages ORDER BY id", &[])
        .await
        .unwrap();
    let state: Vec<(String, i32)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
    assert_eq!(
        state[0],
        ("sent".to_string(), 1),
        "the in-flight send finished and was recorded"
    );
    assert_eq!(
        state[1],
        ("pending".to_string(), 0),
        "unsent claims go back, attempt not counted"
    );
    assert_eq!(state[2], ("pending".to_string(), 0));
    assert_eq!(
        env.scripted().received().len(),
        1,
        "nothing new was sent after SIGTERM"
    );
    let logs = replica.logs();
    assert!(logs.contains("returned unsent claims to pending"), "{logs}");
}

/// A send still unanswered when the shutdown grace runs out is abandoned with its row
/// `sending`, and its batch stays open in the fence row, so a new leader waits out the
/// old term before its first batch. The batches after it were claimed, sent and
/// answered meanwhile (they share the send slots); they must leave it open too: a
/// close of theirs would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_abandoned_at_shutdown_stays_open_whatever_came_after_it() {
    let env = TestEnv::with_scripted().await;
    let settings = holding_settings(2).shutdown_timeout(secs(1));
    let mut replica = env.replica("r1", &settings).await;
    let ids = env
        .create_messages(
            &replica,
            &[
                "first reply:hold",
                "second",
                "third",
                "fourth",
                "fifth",
                "sixth",
            ],
        )
        .await;
    wait_for(
        "every message but the held one sent and recorded",
        TEST_TIMEOUT,
        || async { (env.count("sent").await == 5).then_some(()) },
    )
    .await;
    let status = replica.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    let db = env.db().await;
    let held: String = db
        .query_one("SELECT status FROM messages WHERE id = $1", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, "sending", "the abandoned send's outcome is unknown");
    let open: bool = db
        .query_one("SELECT batch_open FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0);
    assert!(open, "a later batch's close closed the abandoned batch");
    env.scripted().release_held();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_once_shutdown_begins() {
    let env = TestEnv::with_scripted().await;
    let mut replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(1)
                .shutdown_timeout(secs(10))
                .provider_timeout(secs(6)),
        )
        .await;
    env.create_messages(&replica, &["slow reply:sleep-3000"])
        .await;
    wait_for("the send to start", TEST_TIMEOUT, || async {
        (!env.scripted().received().is_empty()).then_some(())
    })
    .await;
    replica.signal(libc::SIGTERM);
    let (status, body) = wait_for(
        "readiness to fail during shutdown",
        Duration::from_secs(10),
        || async {
            let (status, body): (u16, Value) = replica.get("/health/ready").await;
            (status == 503).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "shutting down");
    let status = replica.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success());
    assert_eq!(env.count("sent").await, 1);
}

/// SIGTERM while PostgreSQL is down, in the middle of a batch whose results are held:
/// the replica exits within SHUTDOWN_TIMEOUT plus a few seconds (Kubernetes' grace),
/// leaving the held results to the next leader's rescue and the delivery cache, not
/// retrying PostgreSQL until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_postgres_is_down_exits_within_the_shutdown_timeout() {
    let mut env = TestEnv::with_scripted().await;
    let mut replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(4)
                .processing_interval(ms(200))
                .send_concurrency(2)
                .shutdown_timeout(secs(3)),
        )
        .await;
    let ids = env
        .create_messages(
            &replica,
            &[
                "a reply:sleep-1000",
                "b reply:sleep-1000",
                "c reply:sleep-1000",
                "d reply:sleep-1000",
            ],
        )
        .await;
    let first = env.delivery_key(ids[0]).await;
    wait_for("the first sends to start", TEST_TIMEOUT, || async {
        (!env.scripted().requests_for(&first).is_empty()).then_some(())
    })
    .await;
    env.pg.stop().await;
    // The first two answers arrive with PostgreSQL gone: their results are held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let terminated = Instant::now();
    let status = replica.terminate(Duration::from_secs(60)).await;
    let took = terminated.elapsed();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(
        took <= Duration::from_secs(8),
        "SIGTERM took {took:?} with SHUTDOWN_TIMEOUT=3s and PostgreSQL down"
    );
    println!("exited {took:?} after SIGTERM");
}

/// A panic in a task (here a batch's, injected in debug builds) ends the process, so
/// its orchestrator restarts it and the lease passes on. A replica that kept running
/// with the task dead held the lease and its fence session while nothing dispatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_task_ends_the_process_and_another_replica_takes_over() {
    let env = TestEnv::start().await;
    let settings = ReplicaSettings::fast()
        .lock_ttl(secs(15))
        .lock_retry_interval(secs(1));
    let panicking = settings
        .clone()
        .env("MESSAGE_DISPATCHER_TEST_PANIC_IN_BATCH", "1");
    let mut doomed = env.replica("doomed", &panicking).await;
    wait_for("the doomed replica to lead", TEST_TIMEOUT, || async {
        doomed.is_leader().await.then_some(())
    })
    .await;
    let healthy = env.replica("healthy", &settings).await;
    let ids = env.insert_messages(6).await;
    let status = doomed.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "a panic is a failure exit: {status:?}");
    env.wait_drained(TEST_TIMEOUT).await;
    assert!(healthy.is_leader().await);
    crate::support::cluster::assert_each_once(&env.deliveries().await, &ids);
    assert!(doomed.logs().contains("a task panicked"));
}
