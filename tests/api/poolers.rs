//! A connection pooler between the replicas and PostgreSQL: PgBouncer in transaction
//! mode is refused at start with the configuration exit status; in session mode the
//! replicas send, and a killed leader is replaced with nothing sent twice.

use std::time::Duration;

use crate::support::cluster::assert_each_once;
use crate::support::pgbouncer::PgBouncer;
use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_is_refused_at_start_with_exit_2() {
    let env = TestEnv::start().await;
    for mode in ["transaction", "statement"] {
        let bouncer = PgBouncer::start(env.pg.port, mode).await;
        let settings = ReplicaSettings::fast().database_url(bouncer.url());
        let mut replica = env.spawn_replica(&format!("behind-{mode}"), &settings);
        let status = replica.wait_exit(TEST_TIMEOUT).await;
        assert_eq!(status.code(), Some(2), "{mode}: {}", replica.logs());
        assert!(
            replica.logs().contains("pool_mode = session"),
            "{mode}: the log says what to do: {}",
            replica.logs()
        );
        let (status, output) = run_command(&["migrate"], &settings.connected_to(&env).to_env());
        assert_eq!(status.code(), Some(2), "migrate behind {mode}: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_works_and_a_killed_leader_is_replaced() {
    let env = TestEnv::start().await;
    let bouncer = PgBouncer::start(env.pg.port, "session").await;
    let settings = ReplicaSettings::fast()
        .database_url(bouncer.url())
        .batch_size(10)
        .processing_interval(Duration::from_millis(200));
    let mut replicas = [
        env.replica("a", &settings).await,
        env.replica("b", &settings).await,
    ];
    let mut ids = env
        .create_messages(&replicas[0], &["one", "two", "three"])
        .await;
    env.wait_drained(TEST_TIMEOUT).await;

    let leader = wait_for("a leader", TEST_TIMEOUT, || async {
        for (i, replica) in replicas.iter().enumerate() {
            if replica.is_leader().await {
                return Some(i);
            }
        }
        None
    })
    .await;
    replicas[leader].kill();
    let survivor = &replicas[1 - leader];
    ids.extend(
        env.create_messages(survivor, &["four", "five", "six"])
            .await,
    );
    env.wait_drained(TEST_TIMEOUT).await;
    assert!(survivor.is_leader().await, "{}", bouncer.log());
    assert_each_once(&env.deliveries().await, &ids);
}

/// The start-up check holds two connections at once; a pool of one lends only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_connection_starts_and_sends() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("one", &ReplicaSettings::fast().env("DB_POOL_SIZE", "1"))
        .await;
    let ids = env.create_messages(&replica, &["one", "two"]).await;
    env.wait_drained(TEST_TIMEOUT).await;
    assert_each_once(&env.deliveries().await, &ids);
}
