//! Leadership v2 with real processes at the default lease (TTL 15 s, retry 2 s): a
//! crashed leader is replaced through PostgreSQL in well under its lease, a paused one
//! still at lease expiry, a PostgreSQL restart deposes nobody, and a replica with
//! LEADER_ELIGIBLE=false never leads.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::cluster::{Cluster, assert_each_once, assert_rate};
use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

/// How far apart the provider may see sends that started an interval apart: the
/// network and scheduling jitter the README documents for the rate limit.
const RATE_JITTER: Duration = Duration::from_millis(50);

/// The application's default lease, one message every 100 ms.
fn defaults() -> ReplicaSettings {
    ReplicaSettings::fast()
        .lock_ttl(secs(15))
        .lock_retry_interval(secs(2))
        .provider_timeout(secs(2))
        .batch_size(1)
        .processing_interval(ms(100))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

async fn holder(env: &TestEnv) -> (i64, String) {
    let (epoch, name, _) = term(env).await;
    (epoch, name)
}

/// The fence row's epoch, holder and when that term was acquired (microseconds).
async fn term(env: &TestEnv) -> (i64, String, i64) {
    let row = env
        .db()
        .await
        .query_one(
            "SELECT epoch, holder, (extract(epoch FROM acquired_at) * 1e6)::bigint \
             FROM dispatcher_leader",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The first request the provider received after `since_us` (microseconds).
async fn first_request_after(env: &TestEnv, since_us: i64) -> Option<i64> {
    let requests: Vec<serde_json::Value> = crate::support::http()
        .get(env.mock().url("/requests"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    requests
        .iter()
        .filter_map(|r| r["at_us"].as_i64())
        .filter(|at| *at > since_us)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_in_well_under_its_lease() {
    let env = TestEnv::start().await;
    let mut cluster = Cluster::start(&env, 3, &defaults()).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(300).await;
    wait_for("sends to flow", Duration::from_secs(30), || async {
        (env.count("sent").await >= 5).then_some(())
    })
    .await;
    // The followers watch the leader's session only once they have seen it recorded
    // (they look at the retry cadence): wait until both block on its lock.
    wait_for(
        "both followers waiting on the leader's lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = env
                .db()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_locks \
                 WHERE locktype = 'advisory' AND objsubid = 1 AND NOT granted",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (waiting >= 2).then_some(())
        },
    )
    .await;
    let (epoch, name) = holder(&env).await;
    let leader = cluster
        .replicas
        .iter()
        .position(|r| r.name == name)
        .unwrap();
    let killed_us = now_us();
    cluster.replicas[leader].kill();
    let (new_name, acquired_us) = wait_for("a new term", Duration::from_secs(60), || async {
        let (new_epoch, new_name, acquired_us) = term(&env).await;
        (new_epoch > epoch).then_some((new_name, acquired_us))
    })
    .await;
    assert_ne!(
        new_name, name,
        "the killed replica cannot have bumped the epoch"
    );
    // A send of the killed leader can reach the provider after the kill; the new
    // leader's sends all start after it acquired.
    let next_us = wait_for(
        "a send of the new leader",
        Duration::from_secs(60),
        || async { first_request_after(&env, acquired_us.max(killed_us)).await },
    )
    .await;
    let failover = Duration::from_micros((next_us - killed_us) as u64);
    // The target is under 2 s (scripts/bench/run.sh failover measures it); the lease
    // alone would take 15 s. 6 s leaves room for a busy machine and still proves
    // the lease was not waited out.
    assert!(
        failover < Duration::from_secs(6),
        "kill -> next send took {failover:?}"
    );
    let logs =
        cluster.replicas[(leader + 1) % 3].logs() + &cluster.replicas[(leader + 2) % 3].logs();
    assert!(
        logs.contains("took the lock over from a dead leader"),
        "the fast path was used"
    );

    env.wait_drained(Duration::from_secs(120)).await;
    let deliveries = env.deliveries().await;
    // The killed leader's in-flight send may repeat, with the same key (window 1).
    let mut keys: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    keys.sort();
    assert_eq!(keys, ids);
    assert!(deliveries.iter().filter(|d| d.times_seen > 1).count() <= 1);
    eprintln!("kill -> next send {failover:?}");
}

/// A paused leader keeps its PostgreSQL session, so the crash path cannot see it; its
/// fence session and its liveness beat stand still, and a follower replaces it within
/// seconds, whatever its 15 s lease (docs/design.md#a-stalled-leader). Woken, it sends
/// nothing: every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_within_3s_whatever_its_lease() {
    let env = TestEnv::start().await;
    let settings = ReplicaSettings::fast()
        .lock_ttl(secs(15))
        .lock_retry_interval(secs(1))
        .batch_size(1)
        .processing_interval(ms(100));
    let cluster = Cluster::start(&env, 2, &settings).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(60).await;
    wait_for("sends to flow", Duration::from_secs(30), || async {
        (env.count("sent").await >= 3).then_some(())
    })
    .await;
    let (epoch, _) = holder(&env).await;
    cluster.replicas[leader].pause();
    let paused = Instant::now();
    wait_for("a new epoch", Duration::from_secs(60), || async {
        (holder(&env).await.0 > epoch).then_some(())
    })
    .await;
    let took = paused.elapsed();
    assert!(
        took <= secs(3),
        "a paused leader was replaced only after {took:?} (lease 15 s)"
    );
    cluster.replicas[leader].resume();
    env.wait_drained(Duration::from_secs(120)).await;
    assert_each_once(&env.deliveries().await, &ids);
    eprintln!("pause -> new epoch {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_deposes_nobody_and_doubles_nothing() {
    let mut env = TestEnv::with_mock(&["--latency-ms", "50"]).await;
    let cluster = Cluster::start(&env, 3, &defaults()).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(100).await;
    wait_for("sends to flow", Duration::from_secs(30), || async {
        (env.count("sent").await >= 5).then_some(())
    })
    .await;
    let before = holder(&env).await;
    // Every session ends at once, the leader's included; nobody died.
    env.pg.restart().await;
    env.wait_drained(Duration::from_secs(120)).await;
    let after = holder(&env).await;
    assert_eq!(
        after, before,
        "the leader's lease was valid throughout: no takeover"
    );
    assert_each_once(&env.deliveries().await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_is_not_eligible_never_leads() {
    let env = TestEnv::start().await;
    let mut eligible = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .lock_ttl(secs(2))
                .lock_retry_interval(ms(250)),
        )
        .await;
    let bystander = env
        .replica(
            "r2",
            &ReplicaSettings::fast()
                .leader_eligible(false)
                .lock_ttl(secs(2))
                .lock_retry_interval(ms(250)),
        )
        .await;
    wait_for("r1 to lead", Duration::from_secs(30), || async {
        eligible.is_leader().await.then_some(())
    })
    .await;
    let (status, body) = bystander.get("/api/messaging/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["this_replica"]["eligible"], false);
    eligible.kill();
    env.create_messages(&bystander, &["held"]).await;
    // Several leases pass: nobody leads, nothing is sent, the API still works.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!bystander.is_leader().await);
    assert_eq!(env.count("pending").await, 1);
    assert_eq!(bystander.get("/api/messages").await.0, 200);
    assert!(bystander.logs().contains("LEADER_ELIGIBLE=false"));
}

/// Redis behind Sentinel: the primary is killed during dispatch; Sentinel promotes the
/// replica, the replicas of our service follow it, a leader is elected again, and
/// nothing is sent twice. A lease acquisition can be lost in asynchronous replication,
/// so two replicas may both believe they hold the key for a moment; the PostgreSQL
/// fence makes that harmless, which the provider's per-key counts show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_elects_again_and_doubles_nothing() {
    use crate::support::sentinel::{SERVICE, Sentinels};
    let env = TestEnv::with_mock(&["--latency-ms", "20"]).await;
    let mut sentinels = Sentinels::start().await;
    let settings = ReplicaSettings::fast()
        .redis_sentinels(sentinels.addresses(), SERVICE)
        .batch_size(2)
        .processing_interval(ms(200));
    let cluster = Cluster::start(&env, 3, &settings).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(80).await;
    wait_for("sends to flow", Duration::from_secs(30), || async {
        (env.count("sent").await >= 10).then_some(())
    })
    .await;
    let old_primary = sentinels.primary.port;
    sentinels.primary.kill();
    let replica = sentinels.replica.port;
    wait_for(
        "Sentinel to promote the replica",
        Duration::from_secs(60),
        || async { (sentinels.primary_port() == Some(replica)).then_some(()) },
    )
    .await;
    assert_ne!(old_primary, replica);
    env.wait_drained(Duration::from_secs(120)).await;
    cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    assert_each_once(&env.deliveries().await, &ids);
}

/// The leader's fence session, the one holding the leader lock, as the fence row
/// records it.
async fn fence_session(env: &TestEnv) -> Option<i32> {
    env.db()
        .await
        .query_one("SELECT session_pid FROM dispatcher_leader", &[])
        .await
        .unwrap()
        .get(0)
}

/// A live leader whose fence session is reset (an operator's `pg_terminate_backend`, a
/// proxy, a NAT or a PgBouncer dropping the connection) reconnects at once and keeps
/// its term: a follower that took the leader lock when the session ended sees the
/// leader's new session and lets go. Sends stop for a moment and go on, each once and
/// within the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_fence_session_does_not_depose_a_live_leader() {
    let env = TestEnv::start().await;
    let settings = defaults().processing_interval(ms(250));
    let cluster = Cluster::start(&env, 3, &settings).await;
    let (leader, _) = cluster
        .wait_single_leader(&cluster.all(), Duration::from_secs(30))
        .await;
    let ids = env.insert_messages(40).await;
    let before = holder(&env).await;
    for round in 0..3 {
        let pid = wait_for("the fence session", Duration::from_secs(30), || async {
            fence_session(&env).await
        })
        .await;
        let db = env.db().await;
        let ended: bool = db
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(ended, "round {round}: ended the fence session {pid}");
        wait_for(
            "the leader's new fence session",
            Duration::from_secs(30),
            || async {
                fence_session(&env)
                    .await
                    .filter(|new| *new != pid)
                    .map(|_| ())
            },
        )
        .await;
        // Past the moment a follower holding the lock would have taken over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            holder(&env).await,
            before,
            "round {round}: leadership moved after a session reset"
        );
    }
    env.wait_drained(Duration::from_secs(120)).await;
    assert_eq!(holder(&env).await, before);
    assert!(cluster.replicas[leader].is_leader().await);
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_rate(&deliveries, 1, Duration::from_millis(250), RATE_JITTER);
}

/// The leader's path to PostgreSQL stalls for 1.5 s (a network blip, a busy proxy) and
/// comes back: nothing ended, so nothing moves. The fence session is kept through the
/// silence (it holds the leader lock), sends pause while the epoch is unconfirmed and
/// go on after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_blip_on_the_leaders_path_does_not_move_leadership() {
    let env = TestEnv::start().await;
    let (pg_path, pg_url) = env.postgres_proxy().await;
    let settings = defaults().processing_interval(ms(250));
    let leader = env
        .replica("r1", &settings.clone().database_url(pg_url))
        .await;
    wait_for("r1 to lead", Duration::from_secs(30), || async {
        leader.is_leader().await.then_some(())
    })
    .await;
    let followers = [
        env.replica("r2", &settings).await,
        env.replica("r3", &settings).await,
    ];
    let ids = env.insert_messages(30).await;
    wait_for("sends to flow", Duration::from_secs(30), || async {
        (env.count("sent").await >= 3).then_some(())
    })
    .await;
    let before = holder(&env).await;
    for round in 0..2 {
        pg_path.pause();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        pg_path.resume();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            holder(&env).await,
            before,
            "round {round}: a 1.5 s blip on the leader's PostgreSQL path moved leadership"
        );
    }
    env.wait_drained(Duration::from_secs(120)).await;
    assert_eq!(holder(&env).await, before);
    for follower in &followers {
        assert!(!follower.is_leader().await);
    }
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_rate(&deliveries, 1, Duration::from_millis(250), RATE_JITTER);
}
