//! The Redis lease itself, and a batch slower than the lease TTL.

use std::time::Duration;

use fred::prelude::*;
use message_dispatcher::domain::LeaseToken;
use message_dispatcher::leadership::RedisLease;

use crate::support::cluster::Cluster;
use crate::support::redis::Redis;
use crate::support::{ReplicaSettings, TestEnv, ms, secs};

async fn connected_client(redis: &Redis) -> Client {
    let config = ReplicaSettings::fast().redis_url(redis.url()).to_config();
    let client = message_dispatcher::redis::client(&config.redis, Duration::from_secs(1)).unwrap();
    client.init().await.expect("connect to test Redis");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_extends_or_releases_and_an_expired_lease_is_taken_over() {
    let redis = Redis::start().await;
    let client = connected_client(&redis).await;
    let ttl = Duration::from_millis(600);
    let a = RedisLease::new(client.clone(), "test:lock", ttl);
    let b = RedisLease::new(client.clone(), "test:lock", ttl);

    let token_a = a
        .try_acquire()
        .await
        .unwrap()
        .expect("free lock is acquired");
    assert!(
        b.try_acquire().await.unwrap().is_none(),
        "a held lock is busy"
    );
    let foreign = LeaseToken::generate();
    assert!(
        !b.extend(&foreign).await.unwrap(),
        "a foreign token cannot extend"
    );
    assert!(
        !b.release(&foreign).await.unwrap(),
        "a foreign token cannot release"
    );
    assert_eq!(
        a.holder_token().await.unwrap().as_deref(),
        Some(token_a.as_str())
    );

    assert!(a.extend(&token_a).await.unwrap(), "the holder extends");
    let pttl: i64 = client.pttl("test:lock").await.unwrap();
    assert!(
        pttl > 400 && pttl <= 600,
        "extension resets the TTL, pttl={pttl}"
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    let token_b = b
        .try_acquire()
        .await
        .unwrap()
        .expect("an expired lease is taken over");
    assert!(
        !a.extend(&token_a).await.unwrap(),
        "the old holder's extension fails"
    );
    assert!(
        !a.release(&token_a).await.unwrap(),
        "and it cannot delete the new holder's key"
    );
    assert_eq!(
        b.holder_token().await.unwrap().as_deref(),
        Some(token_b.as_str())
    );
    assert!(b.release(&token_b).await.unwrap());
    assert!(b.holder_token().await.unwrap().is_none());
}

/// A send slower than the TTL: the lease is extended meanwhile, so the batch completes
/// under the same epoch and no other replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_slower_than_the_ttl_keeps_the_lease() {
    let env = TestEnv::with_scripted().await;
    let settings = ReplicaSettings::fast()
        .lock_ttl(secs(1))
        .lock_retry_interval(ms(250))
        .provider_timeout(secs(6))
        .batch_size(2)
        .processing_interval(ms(100));
    let cluster = Cluster::start(&env, 2, &settings).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(20))
        .await;
    let db = env.db().await;
    let epoch_before: i64 = db
        .query_one("SELECT epoch FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0);
    let ids = env
        .create_messages(
            &cluster.replicas[leader],
            &["slow reply:sleep-2500", "slow reply:sleep-2500"],
        )
        .await;
    env.wait_drained(Duration::from_secs(30)).await;
    let rows = db
        .query("SELECT status, claim_epoch FROM messages ORDER BY id", &[])
        .await
        .unwrap();
    for row in &rows {
        assert_eq!(row.get::<_, String>(0), "sent");
        assert_eq!(
            row.get::<_, Option<i64>>(1),
            Some(epoch_before),
            "sent under the original epoch"
        );
    }
    let epoch_after: i64 = db
        .query_one("SELECT epoch FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        epoch_after, epoch_before,
        "no takeover during a 5 s batch with a 1 s lease"
    );
    assert_eq!(cluster.leaders_among(&cluster.all()).await, vec![leader]);
    env.scripted()
        .assert_each_requested_once(&env.delivery_keys(&ids).await);
    let extensions = cluster.replicas[leader]
        .metric("dispatcher_lock_operations_total{op=\"extend\",result=\"ok\"}")
        .await
        .unwrap_or(0.0);
    assert!(
        extensions >= 4.0,
        "the lease was extended during the batch ({extensions} extensions)"
    );
}
