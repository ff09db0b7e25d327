//! The dispatch cycle against real servers: FIFO, batch size, result classification,
//! retries without head-of-line blocking, and the claim's row locking.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use message_dispatcher::dispatch::Recorder;
use message_dispatcher::domain::{Epoch, MessageStatus};
use message_dispatcher::store::claims::{CLAIM, MARK_SENT_GROUP};
use message_dispatcher::store::{
    Claim, ClaimScope, KnownDelivery, ListFilter, OpenedBatch, OverrideChange, Recorded,
    RescuePolicy, Schedule, Store,
};

use crate::support::cluster::{assert_each_once, assert_fifo};
use crate::support::provider::{Delivery, holding_settings};
use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A claim that may send through any provider: the statements below are tested for
/// themselves, not for routing.
fn any_provider(probe_due: bool) -> ClaimScope {
    ClaimScope {
        probe_due,
        provider: Some("default".into()),
        usable: vec!["default".into()],
        probe_only: false,
        quiet_hours: None,
        daily_spend_cap: None,
        highest_price: None,
    }
}

/// Applies the migrations, as `message-dispatcher migrate` does with `settings`.
fn migrate(settings: &ReplicaSettings) {
    let (status, output) = run_command(&["migrate"], &settings.to_env());
    assert!(status.success(), "{output}");
}

/// A migrated database and a store on it, with dispatch started, as a leader's.
async fn started_store(env: &TestEnv) -> Store {
    let settings = env.settings();
    migrate(&settings);
    let store = Store::new(&settings.to_config().database).unwrap();
    store.apply_auto_start(true, "test").await.unwrap();
    store
}

/// Splits deliveries (microsecond timestamps, ascending) into batches: sends of one
/// batch are milliseconds apart, batches a whole interval apart.
fn batch_sizes(times_us: &[i64], gap_us: i64) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut previous: Option<i64> = None;
    for &t in times_us {
        match previous {
            Some(p) if t - p < gap_us => *sizes.last_mut().unwrap() += 1,
            _ => sizes.push(1),
        }
        previous = Some(t);
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_fifo_in_batches_of_batch_size_and_nothing_when_empty() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(3)
                .processing_interval(ms(1500)),
        )
        .await;
    wait_for("leadership", TEST_TIMEOUT, || async {
        replica.is_leader().await.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        env.mock().stats().await.requests,
        0,
        "an empty queue makes no request"
    );

    let contents: Vec<String> = (1..=7).map(|i| format!("fifo {i}")).collect();
    let ids = env
        .create_messages(
            &replica,
            &contents.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
    env.wait_drained(TEST_TIMEOUT).await;

    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
    let times: Vec<i64> = deliveries.iter().map(|d| d.first_seen_us).collect();
    assert_eq!(
        batch_sizes(&times, 700_000),
        vec![3, 3, 1],
        "batches of BATCH_SIZE, then the rest"
    );
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            !(700_000..1_400_000).contains(&gap),
            "batches start an interval apart, gap {gap}us"
        );
    }
}

/// The leader claims the next batch while the current one is still sending (see
/// `dispatch::batch::Handoff`); the next batch's sends must still wait for the current
/// one's, so that with `SEND_CONCURRENCY` 1 the provider sees one request at a time,
/// in creation order, across batch boundaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_batches_keep_fifo_and_one_send_in_flight() {
    let latency = Duration::from_millis(30);
    let deliveries = drain_back_to_back(4, 1, latency, 24).await;
    assert_fifo(&deliveries);
    assert_in_flight_at_most(&deliveries, 1, latency);
}

/// Drains `count` messages through one replica (`BATCH_SIZE` `batch_size`, interval 0,
/// `SEND_CONCURRENCY` `concurrency`) into a mock provider that answers each request
/// `latency` after it arrives, and returns what the provider received, every message
/// checked delivered once.
async fn drain_back_to_back(
    batch_size: u32,
    concurrency: usize,
    latency: Duration,
    count: usize,
) -> Vec<Delivery> {
    let latency_ms = latency.as_millis().to_string();
    let env = TestEnv::with_mock(&["--latency-ms", &latency_ms]).await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(batch_size)
                .processing_interval(Duration::ZERO)
                .send_concurrency(concurrency),
        )
        .await;
    let contents: Vec<String> = (1..=count).map(|i| format!("message {i}")).collect();
    let ids = env
        .create_messages(
            &replica,
            &contents.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
    env.wait_drained(TEST_TIMEOUT).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    deliveries
}

/// No more than `limit` requests were at the provider at once. The mock answers each
/// request `latency` after it arrives, so requests that arrived less than that apart
/// (5/6 of it here; overlapping requests arrive within a millisecond or two of each
/// other) were in flight together.
fn assert_in_flight_at_most(deliveries: &[Delivery], limit: usize, latency: Duration) {
    let mut arrivals: Vec<i64> = deliveries.iter().map(|d| d.first_seen_us).collect();
    arrivals.sort_unstable();
    let together = latency.as_micros() as i64 * 5 / 6;
    for (i, &at) in arrivals.iter().enumerate() {
        let in_flight = arrivals[..=i]
            .iter()
            .filter(|&&t| at - t < together)
            .count();
        assert!(
            in_flight <= limit,
            "{in_flight} requests in flight at once at {at}us (limit {limit}): {arrivals:?}"
        );
    }
}

/// A batch claimed while the previous one finishes keeps sending while that one's
/// results wait for PostgreSQL. Here they wait on a row lock: once the first message
/// is being sent (each send takes a second), the test locks its row, so the write of
/// its result blocks, and with it the first batch, until the test lets go. Before
/// batches ran as tasks of their own, the second batch was driven only up to its
/// middle send and then left waiting for the first, its in-flight send with it (one
/// the provider accepted then had no delivery entry either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_sending_while_the_previous_one_waits_for_its_results() {
    let env = TestEnv::with_mock(&["--latency-ms", "1000"]).await;
    migrate(&env.settings());
    let ids = env.insert_messages(8).await;
    let _replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(4)
                .processing_interval(Duration::ZERO)
                .send_concurrency(1),
        )
        .await;
    wait_for("the first message being sent", TEST_TIMEOUT, || async {
        (env.count("sending").await > 0).then_some(())
    })
    .await;
    let mut db = env.db().await;
    let hold = db.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM messages WHERE id = $1 FOR UPDATE",
        &[&ids[0]],
    )
    .await
    .unwrap();

    wait_for("all 8 messages at the provider", TEST_TIMEOUT, || async {
        (env.mock().stats().await.requests >= 8).then_some(())
    })
    .await;
    assert_eq!(env.count("sent").await, 0, "the first result is still held");
    hold.commit().await.unwrap();

    env.wait_drained(TEST_TIMEOUT).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
    assert_eq!(env.count("sent").await, 8);
}

/// The rescue returns our own epoch's claims once they are as old as the rescue wait
/// (fence window + longest exchange + margin: 0.5 + 1.3 + 2 = 3.8 s here). A batch of
/// ten one-second sends is older than that halfway through, when the leader claims
/// ahead; the rescue, due by then, must wait for the running batch, or it would put
/// the messages still being sent or waiting back to pending, and the claim right after
/// it would send them a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rescue_never_takes_rows_of_the_batch_being_sent() {
    let env = TestEnv::with_mock(&["--latency-ms", "1000"]).await;
    migrate(&env.settings());
    let ids = env.insert_messages(10).await;
    let _replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(10)
                .processing_interval(Duration::ZERO)
                .send_concurrency(1)
                .lock_ttl(ms(1500))
                .lock_retry_interval(ms(400))
                .provider_timeout(ms(1200)),
        )
        .await;
    env.wait_drained(TEST_TIMEOUT).await;
    let deliveries = env.deliveries().await;
    assert_each_once(&deliveries, &ids);
    assert_fifo(&deliveries);
    assert_eq!(env.count("sent").await, 10);
    // A message rescued and claimed again would already show it here (its second
    // send may come only after the queue looks drained): one claim each.
    let claimed_again: Vec<i64> = env
        .db()
        .await
        .query(
            "SELECT id FROM messages WHERE attempts <> 1 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(claimed_again.is_empty(), "claimed twice: {claimed_again:?}");
}

/// A slow answer holds only its own send slot. With `SEND_CONCURRENCY` 2 and the
/// first message's answer held, the rest of its batch goes out through the other slot.
/// (Sends buffered in order kept every finished send's slot behind the held one, so
/// nothing more started until it answered: a provider's slow answer cut the throughput
/// of the whole batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_answer_does_not_hold_back_the_rest_of_its_batch() {
    let env = TestEnv::with_scripted().await;
    let replica = env.replica("r1", &holding_settings(6)).await;
    // One request, so one claim takes all six.
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
    let provider = env.scripted();
    let keys = env.delivery_keys(&ids).await;
    wait_for(
        "the five others to reach the provider while the first one's answer is held",
        TEST_TIMEOUT,
        || async {
            keys[1..]
                .iter()
                .all(|key| !provider.requests_for(key).is_empty())
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        provider.requests_for(&keys[0]).len(),
        1,
        "the held one is out"
    );
    provider.release_held();
    env.wait_drained(TEST_TIMEOUT).await;
    provider.assert_each_requested_once(&keys);
    assert_eq!(env.count("sent").await, 6);
}

/// Nor does it hold back the next batch: that batch's sends take the slots the
/// previous batch frees, once every message of it has started. Before, the next batch
/// waited for every answer of the previous one, so here the third and fourth messages
/// waited for the first one's held answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_answer_does_not_hold_back_the_next_batch() {
    let env = TestEnv::with_scripted().await;
    let replica = env.replica("r1", &holding_settings(2)).await;
    let ids = env
        .create_messages(&replica, &["first reply:hold", "second", "third", "fourth"])
        .await;
    let provider = env.scripted();
    let keys = env.delivery_keys(&ids).await;
    wait_for(
        "the next batch to reach the provider while the first answer is held",
        TEST_TIMEOUT,
        || async {
            keys[1..]
                .iter()
                .all(|key| !provider.requests_for(key).is_empty())
                .then_some(())
        },
    )
    .await;
    wait_for("all but the held one recorded", TEST_TIMEOUT, || async {
        (env.count("sent").await == 3).then_some(())
    })
    .await;
    provider.release_held();
    env.wait_drained(TEST_TIMEOUT).await;
    provider.assert_each_requested_once(&keys);
    assert_eq!(env.count("sent").await, 4);
}

/// The batches share their `SEND_CONCURRENCY` slots: across a batch boundary no more
/// sends are in flight than within a batch. Batches of three at concurrency 2 put a
/// boundary inside every other pair of slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_batches_share_their_send_slots() {
    let latency = Duration::from_millis(60);
    let deliveries = drain_back_to_back(3, 2, latency, 30).await;
    assert_in_flight_at_most(&deliveries, 2, latency);
}

/// The largest `SEND_CONCURRENCY` the configuration accepts still dispatches: the send
/// slots are a semaphore, which refuses (panics on) more than 2^61 permits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_send_concurrency_still_dispatches() {
    let env = TestEnv::with_mock(&[]).await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(5)
                .processing_interval(Duration::ZERO)
                .send_concurrency(usize::MAX),
        )
        .await;
    let ids = env
        .create_messages(&replica, &["one", "two", "three", "four", "five", "six"])
        .await;
    env.wait_drained(TEST_TIMEOUT).await;
    assert_each_once(&env.deliveries().await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_send_retries_later_without_blocking_younger_messages() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(2)
                .processing_interval(ms(300))
                .retry_backoff(secs(4), secs(4)),
        )
        .await;
    let ids = env
        .create_messages(
            &replica,
            &["first", "second reply:500-once", "third", "fourth"],
        )
        .await;
    let db = env.db().await;

    // M1 sent, M2 back to pending with one attempt and a later due time.
    let m2 = wait_for("M2 to be scheduled for retry", TEST_TIMEOUT, || async {
        let row = db
            .query_one(
                "SELECT status, attempts, next_attempt_at, last_error FROM messages WHERE id = $1",
                &[&ids[1]],
            )
            .await
            .unwrap();
        let status: String = row.get(0);
        let attempts: i32 = row.get(1);
        (status == "pending" && attempts == 1).then(|| {
            (
                row.get::<_, DateTime<Utc>>(2),
                row.get::<_, Option<String>>(3),
            )
        })
    })
    .await;
    assert!(
        m2.0 > Utc::now() + chrono::Duration::milliseconds(500),
        "retry is in the future"
    );
    assert!(
        m2.1.unwrap_or_default().contains("500"),
        "last_error says why"
    );
    let m1: String = db
        .query_one("SELECT status FROM messages WHERE id = $1", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(m1, "sent", "M1 succeeded in the same batch");

    // Younger messages go out while M2 waits.
    wait_for(
        "M3 and M4 to be sent while M2 waits",
        TEST_TIMEOUT,
        || async {
            let rows = db
                .query("SELECT id, status FROM messages ORDER BY id", &[])
                .await
                .unwrap();
            let status = |i: usize| rows[i].get::<_, String>(1);
            (status(2) == "sent" && status(3) == "sent").then_some(())
        },
    )
    .await;
    let m2_status: String = db
        .query_one("SELECT status FROM messages WHERE id = $1", &[&ids[1]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        m2_status, "pending",
        "M2 is still waiting for its retry time"
    );

    env.wait_drained(TEST_TIMEOUT).await;
    let row = db
        .query_one(
            "SELECT status, attempts FROM messages WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("sent".into(), 2)
    );
    let requests = env.scripted().requests_for(&env.delivery_key(ids[1]).await);
    assert_eq!(
        requests.len(),
        2,
        "M2 was tried twice under the same Idempotency-Key"
    );
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .len(),
        1
    );
    assert_eq!(
        requests[0].headers.get("authorization").map(String::as_str),
        Some("Bearer mock-token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_of_provider_answers() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(10)
                .processing_interval(ms(300))
                .provider_timeout(secs(1))
                .retry_backoff(secs(60), secs(300)),
        )
        .await;
    let ids = env
        .create_messages(
            &replica,
            &[
                "rejected reply:400",
                "slow reply:sleep-3000",
                "plain 200 reply:200",
                "accepted 202",
                "no id reply:200-noid",
                // Last: a throttle pauses the provider, so nothing after it in the
                // batch would go for 120 s.
                "limited reply:429-after-120",
            ],
        )
        .await;
    let db = env.db().await;
    let row = |id: i64| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT status, attempts, last_error, provider_message_id,
                        extract(epoch FROM next_attempt_at - now())::float8
                 FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
        }
    };
    wait_for("every answer to be recorded", TEST_TIMEOUT, || async {
        let counts = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'sending'),
                        count(*) FILTER (WHERE status = 'sent' OR last_error IS NOT NULL)
                 FROM messages",
                &[],
            )
            .await
            .unwrap();
        (counts.get::<_, i64>(0) == 0 && counts.get::<_, i64>(1) == 6).then_some(())
    })
    .await;

    let rejected = row(ids[0]).await;
    assert_eq!(rejected.get::<_, String>(0), "failed", "a 400 is final");
    assert!(
        rejected
            .get::<_, Option<String>>(2)
            .unwrap()
            .contains("400")
    );

    let slow = row(ids[1]).await;
    assert_eq!(slow.get::<_, String>(0), "pending", "a timeout is retried");
    assert_eq!(slow.get::<_, i32>(1), 1);
    assert!(
        slow.get::<_, Option<String>>(2)
            .unwrap()
            .contains("timeout"),
        "last_error names the timeout"
    );
    let wait: f64 = slow.get(4);
    assert!(
        wait > 20.0,
        "retry after the backoff (base 1m with jitter), due in {wait}s"
    );

    let plain = row(ids[2]).await;
    assert_eq!(plain.get::<_, String>(0), "sent", "200 counts as sent");
    assert_eq!(
        plain.get::<_, Option<String>>(3),
        Some(format!("id-{}", env.delivery_key(ids[2]).await))
    );
    let accepted = row(ids[3]).await;
    assert_eq!(accepted.get::<_, String>(0), "sent", "202 counts as sent");
    assert_eq!(
        accepted.get::<_, Option<String>>(3),
        Some(format!("id-{}", env.delivery_key(ids[3]).await))
    );
    let no_id = row(ids[4]).await;
    assert_eq!(
        no_id.get::<_, String>(0),
        "sent",
        "a 2xx without messageId is still sent"
    );
    assert_eq!(no_id.get::<_, Option<String>>(3), None);
    assert!(
        replica.logs().contains("without a messageId"),
        "and a warning is logged"
    );

    // A 429 (docs/design.md#throttling): back to pending in its place, due now, the
    // attempt not spent; the provider pauses for the Retry-After instead.
    let limited = row(ids[5]).await;
    assert_eq!(limited.get::<_, String>(0), "pending", "a 429 is retried");
    assert_eq!(limited.get::<_, i32>(1), 0, "a throttle spends no attempt");
    assert!(limited.get::<_, Option<String>>(2).unwrap().contains("429"));
    let wait: f64 = limited.get(4);
    assert!(wait <= 0.0, "due at once, its place kept: due in {wait}s");

    // The rejected message is never tried again; the throttled one not within the
    // provider's 120 s pause.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .len(),
        1
    );
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[5]).await)
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_in_sms_api_auth_header_when_set() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .provider_auth_header("x-ins-auth-key")
                .provider_token("tok-123"),
        )
        .await;
    let ids = env.create_messages(&replica, &["custom header"]).await;
    env.wait_drained(TEST_TIMEOUT).await;
    let request = &env.scripted().requests_for(&env.delivery_key(ids[0]).await)[0];
    assert_eq!(
        request.headers.get("x-ins-auth-key").map(String::as_str),
        Some("tok-123")
    );
    assert!(
        !request.headers.contains_key("authorization"),
        "no Bearer header as well"
    );
    assert_eq!(
        request.headers.get("idempotency-key"),
        Some(&env.delivery_key(ids[0]).await)
    );
    assert_eq!(request.to, "+905550000000");
    assert_eq!(request.content, "custom header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_turns_a_retrying_message_into_failed() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .max_attempts(3)
                .processing_interval(ms(100))
                .retry_backoff(ms(100), ms(200)),
        )
        .await;
    let ids = env
        .create_messages(&replica, &["always down reply:500"])
        .await;
    wait_for("the message to fail", TEST_TIMEOUT, || async {
        (env.count("failed").await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .len(),
        3,
        "exactly MAX_ATTEMPTS tries"
    );
    let attempts: i32 = env
        .db()
        .await
        .query_one("SELECT attempts FROM messages WHERE id = $1", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 3);
    let metrics = replica.metrics().await;
    assert!(metrics.contains("dispatcher_messages_failed_total{reason=\"max_attempts\"} 1"));
    assert!(metrics.contains("dispatcher_messages_retried_total 2"));
}

/// Two (and more) claimers in parallel transactions never take the same row: the
/// claim's `FOR UPDATE SKIP LOCKED` holds inside its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_claimers_never_share_a_row() {
    let env = TestEnv::start().await;
    let settings = env.settings();
    migrate(&settings);
    let store = Store::new(&settings.to_config().database).unwrap();
    let total = 600;
    env.insert_messages(total).await;
    store.apply_auto_start(true, "test").await.unwrap();
    store
        .set_overrides(
            &OverrideChange {
                batch_size: None,
                interval: Some(Some(Duration::ZERO)),
                daily_spend_cap: None,
            },
            "test",
        )
        .await
        .unwrap();
    let epoch: Epoch = store.bump_epoch("test").await.unwrap();
    let schedule = Schedule {
        batch_size: 7,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    // Batches stay open here (nobody closes them), so no fence window may hold the
    // next claim back.
    let window = Duration::ZERO;

    let mut claimers = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                match store
                    .claim_batch(
                        epoch,
                        &format!("claimer-{n}"),
                        schedule,
                        window,
                        n,
                        &any_provider(false),
                    )
                    .await
                    .unwrap()
                    .claim
                {
                    Claim::Batch(batch) => {
                        let messages = batch.messages;
                        assert!(messages.len() <= 7);
                        mine.extend(messages.iter().map(|m| m.id));
                    }
                    Claim::Empty => return mine,
                    other => panic!("unexpected claim outcome {other:?}"),
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut claimed = 0;
    for claimer in claimers {
        for id in claimer.await.unwrap() {
            claimed += 1;
            assert!(seen.insert(id), "message {id} was claimed twice");
        }
    }
    assert_eq!(claimed, total);
    assert_eq!(env.count("sending").await, total as i64);

    // A stale epoch is refused outright.
    store.bump_epoch("newer").await.unwrap();
    env.insert_messages(1).await;
    let refused = store
        .claim_batch(epoch, "stale", schedule, window, 0, &any_provider(false))
        .await
        .unwrap();
    assert!(matches!(refused.claim, Claim::Fenced(_)), "{refused:?}");
}

/// The batch of a claim that must have taken one.
fn opened(claim: Claim) -> OpenedBatch {
    match claim {
        Claim::Batch(batch) => batch,
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// The leader claims its next batch while the previous one's last results are being
/// recorded, so batches close out of step with their opening: a close that comes after
/// a newer batch opened must leave the newer one open (a new leader that finds it open
/// waits out the old term, since that batch's sends may still start), and the newest
/// batch's close closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_batch_leaves_a_newer_open_batch_open() {
    let env = TestEnv::start().await;
    let store = started_store(&env).await;
    env.insert_messages(4).await;
    let schedule = Schedule {
        batch_size: 2,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    let epoch = store.bump_epoch("test").await.unwrap();
    let claim = |token: i64| {
        let store = store.clone();
        async move {
            opened(
                store
                    .claim_batch(
                        epoch,
                        "test",
                        schedule,
                        Duration::ZERO,
                        token,
                        &any_provider(false),
                    )
                    .await
                    .unwrap()
                    .claim,
            )
        }
    };
    let batch_open = || async {
        env.db()
            .await
            .query_one("SELECT batch_open FROM dispatcher_leader", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    };

    let first = claim(1).await;
    let second = claim(2).await;
    assert!(second.opened_at > first.opened_at);
    store
        .close_batch(epoch, first.opened_at, &[5_000], "{}")
        .await
        .unwrap();
    assert!(batch_open().await, "the second batch is still being sent");
    let recorded: Vec<i64> = env
        .db()
        .await
        .query_one(
            "SELECT ARRAY(SELECT (extract(epoch FROM clock_timestamp() - r) * 1000000)::bigint
                          FROM unnest(recent_sends) AS r) FROM dispatcher_leader",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded.len(), 1, "the first close still records its sends");
    store
        .close_batch(epoch, second.opened_at, &[], "{}")
        .await
        .unwrap();
    assert!(!batch_open().await, "the newest batch's close closes it");
}

/// A leader that finds the newest batch open waits until the term that opened it can
/// start no more sends (`quiet_at`), since that term's last sends are unknown to it.
/// Its own open batch holds nothing back: its pacer saw every send of it. Before
/// migration 0010 it did, so a new leader at `PROCESSING_INTERVAL` 0 claimed at most a
/// batch per poll for a fence window after its start. Here `quiet_at` is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_another_terms_open_batch_holds_the_next_claim_back() {
    let env = TestEnv::start().await;
    let store = started_store(&env).await;
    env.insert_messages(6).await;
    let schedule = Schedule {
        batch_size: 2,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    let hour = Duration::from_secs(3600);
    let claim = |epoch: Epoch, token: i64| {
        let store = store.clone();
        async move {
            store
                .claim_batch(
                    epoch,
                    "test",
                    schedule,
                    Duration::ZERO,
                    token,
                    &any_provider(false),
                )
                .await
                .unwrap()
                .claim
        }
    };

    let first = store.start_term("first", None, hour).await.unwrap();
    opened(claim(first, 1).await);
    let own = claim(first, 2).await;
    assert!(
        matches!(own, Claim::Batch(_)),
        "our own open batch held the next claim back: {own:?}"
    );

    // The first term's second batch is left open: the next term waits out that term.
    let second = store.start_term("second", None, hour).await.unwrap();
    match claim(second, 3).await {
        Claim::NotDue(wait) => assert!(
            wait > Duration::from_secs(3000),
            "waits for the new term's quiet_at: {wait:?}"
        ),
        other => panic!("another term's open batch must hold the claim back: {other:?}"),
    }
}

/// A flush writes every result submitted before it, whatever the recorder was doing
/// when it came. The recorder here lingers an hour, so only flushes write. Each round
/// is one batch at `SEND_CONCURRENCY` 1: a result, the next send's wait, another
/// result, the flush. The flush was a `Notify` beside the results' queue: when the
/// second result and the flush were both ready, the recorder's `select!` took either
/// at random, and when it took the flush it wrote the first result alone, leaving the
/// second to wait out the linger (so on the old recorder each round failed with
/// probability one half, and the test with 1 - 2^-12).
#[tokio::test(flavor = "current_thread")]
async fn a_flush_writes_every_result_submitted_before_it() {
    let env = TestEnv::start().await;
    let store = started_store(&env).await;
    let rounds = 12;
    env.insert_messages(rounds * 2).await;
    let epoch = store.bump_epoch("test").await.unwrap();
    let schedule = Schedule {
        batch_size: (rounds * 2) as u32,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    let batch = opened(
        store
            .claim_batch(
                epoch,
                "test",
                schedule,
                Duration::ZERO,
                1,
                &any_provider(false),
            )
            .await
            .unwrap()
            .claim,
    );
    // The recorder runs on the dispatcher's single thread: a LocalSet here.
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let recorder = Recorder::with_linger(store.clone(), Duration::from_secs(3600));
            recorder.start();
            for pair in batch.messages.chunks(2) {
                let first = recorder
                    .sent(pair[0].id, epoch, Utc::now(), None, None)
                    .await;
                // The next send's HTTP exchange: the recorder task runs meanwhile.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let second = recorder
                    .sent(pair[1].id, epoch, Utc::now(), None, None)
                    .await;
                recorder.flush();
                for (id, outcome) in [(pair[0].id, first), (pair[1].id, second)] {
                    let recorded = tokio::time::timeout(TEST_TIMEOUT, outcome)
                        .await
                        .unwrap_or_else(|_| panic!("message {id}: not written after the flush"))
                        .unwrap();
                    assert!(matches!(recorded, Recorded::Sent), "{id}: {recorded:?}");
                }
            }
        })
        .await;
    assert_eq!(env.count("sent").await, (rounds * 2) as i64);
}

/// The rescue rule (docs/design.md#rescue): an older epoch's claims once the current epoch
/// is older than the rescue wait (no matter how old the claims are), our own epoch's
/// leftovers once they are that old; `MAX_ATTEMPTS` holds; a claim whose answer was
/// lost is returned by its token, attempt uncounted; a delivery known from the cache is
/// recorded as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_claims_are_rescued_only_when_old_enough() {
    let env = TestEnv::start().await;
    let store = started_store(&env).await;
    let ids = env.insert_messages(3).await;
    let schedule = Schedule {
        batch_size: 3,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    let window = Duration::from_secs(1);
    let policy = |wait_secs: u64, max_attempts: u32| RescuePolicy {
        wait: Duration::from_secs(wait_secs),
        max_attempts,
    };
    let claim = |epoch: Epoch, token: i64| {
        let store = store.clone();
        async move {
            store
                .claim_batch(epoch, "test", schedule, window, token, &any_provider(false))
                .await
                .unwrap()
                .claim
        }
    };
    let attempts = || async {
        env.db()
            .await
            .query("SELECT attempts FROM messages ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };

    let first = store.bump_epoch("first").await.unwrap();
    let batch = opened(claim(first, 1).await);
    assert_eq!(batch.messages.len(), 3);
    store
        .close_batch(first, batch.opened_at, &[], "{}")
        .await
        .unwrap();
    // A claim whose answer was lost: its rows come back by its token, attempt uncounted.
    assert_eq!(
        store.release_claim(first, 2).await.unwrap(),
        0,
        "other token"
    );
    assert_eq!(store.release_claim(first, 1).await.unwrap(), 3);
    assert_eq!(attempts().await, vec![0, 0, 0]);
    let batch = opened(claim(first, 3).await);
    assert_eq!(batch.messages.len(), 3);
    store
        .close_batch(first, batch.opened_at, &[], "{}")
        .await
        .unwrap();

    // Too young to rescue, even our own.
    assert_eq!(
        store
            .rescue(first, policy(3600, 0), &[], &ids)
            .await
            .unwrap()
            .pending,
        0
    );
    // Old enough, but named as a running batch's claim: never, whatever else runs.
    assert!(
        store
            .rescue_candidates(first, policy(0, 0), &[3], 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .rescue(first, policy(0, 0), &[7, 3], &ids)
            .await
            .unwrap(),
        Default::default()
    );
    // Our own leftovers, old enough.
    assert_eq!(
        store
            .rescue(first, policy(0, 0), &[7], &ids)
            .await
            .unwrap()
            .pending,
        3
    );
    let batch = opened(claim(first, 4).await);
    assert_eq!(batch.messages.len(), 3);
    store
        .close_batch(first, batch.opened_at, &[], "{}")
        .await
        .unwrap();

    // A newer leader waits for the rescue wait counted from its own epoch, however
    // old the claims are.
    let second = store.bump_epoch("second").await.unwrap();
    assert!(
        store
            .rescue_candidates(second, policy(3600, 0), &[], 0)
            .await
            .unwrap()
            .is_empty(),
        "the old leader may still be sending"
    );
    assert_eq!(
        store
            .rescue(second, policy(3600, 0), &[], &ids)
            .await
            .unwrap()
            .pending,
        0
    );
    assert_eq!(
        store.rescue(first, policy(0, 0), &[], &ids).await.unwrap(),
        Default::default(),
        "only the current epoch rescues"
    );
    assert!(
        store
            .rescue_candidates(second, policy(0, 0), &[4], 0)
            .await
            .unwrap()
            .is_empty(),
        "a batch of this replica's older term still running keeps its rows"
    );
    let candidates = store
        .rescue_candidates(second, policy(0, 0), &[], 0)
        .await
        .unwrap();
    assert_eq!(candidates.len(), 3);
    // The first was accepted by the provider (the delivery cache says so): recorded,
    // not rescued. The others, with 2 attempts each, fail under MAX_ATTEMPTS 2.
    let known = KnownDelivery {
        id: ids[0],
        claim_epoch: candidates[0].claim_epoch,
        sent_at: Utc::now(),
        provider_message_id: Some("p-1".into()),
        price: Some(message_dispatcher::spend::Micros(7_900)),
    };
    assert_eq!(
        store
            .record_known_deliveries(second, &[known])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.rescue(second, policy(0, 2), &[], &[]).await.unwrap(),
        Default::default(),
        "a row the rescue was not given (not looked up in the delivery cache) stays"
    );
    let rescued = store.rescue(second, policy(0, 2), &[], &ids).await.unwrap();
    assert_eq!((rescued.pending, rescued.failed), (0, 2));
    let db = env.db().await;
    let rows = db
        .query("SELECT status, last_error FROM messages ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "sent");
    assert_eq!(rows[1].get::<_, String>(0), "failed");
    assert!(rows[1].get::<_, String>(1).contains("MAX_ATTEMPTS"));
    // The recorded send keeps the price its sender gave it, and counts in the day's
    // spend (docs/design.md#spend-caps).
    let spend = db
        .query_one(
            "SELECT (SELECT price_micros FROM messages WHERE id = $1),
                    (SELECT sum(amount_micros)::bigint FROM lane_spend)",
            &[&ids[0]],
        )
        .await
        .unwrap();
    assert_eq!(spend.get::<_, Option<i64>>(0), Some(7_900));
    assert_eq!(spend.get::<_, Option<i64>>(1), Some(7_900));
}

/// A replica frozen (SIGSTOP, VM stall) in the middle of a claim transaction holds the
/// fence row; PostgreSQL ends its session after the lock TTL so the next leader's epoch
/// bump, and with it the failover, is not held hostage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_transaction_on_the_fence_row_does_not_block_the_next_leader() {
    let env = TestEnv::start().await;
    let settings = env.settings().lock_ttl(secs(1));
    migrate(&settings);
    let store = Store::new(&settings.to_config().database).unwrap();

    let mut frozen = store.client().await.unwrap();
    let tx = frozen.transaction().await.unwrap();
    tx.execute(
        "SELECT epoch FROM dispatcher_leader WHERE id = 1 FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    // The "frozen" holder now sends nothing more. The next leader's bump waits for
    // the row, then gets it once PostgreSQL ends the idle transaction.
    let started = std::time::Instant::now();
    let bump = tokio::time::timeout(Duration::from_secs(10), store.bump_epoch("next")).await;
    assert!(
        bump.expect("the bump was blocked by the frozen transaction")
            .is_ok()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "the row really was locked ({waited:?})"
    );
    assert!(
        tx.commit().await.is_err(),
        "the frozen transaction was ended by the server"
    );
}

/// The group result write finds each row by its primary key, whatever the statistics
/// say. It once scanned the `sending` range of an index, which keeps an entry for every
/// row claimed since the last vacuum until a scan marks it dead (see `MARK_SENT_GROUP`). Here 20,000 rows have been through `sending` since the statistics
/// were taken, as in a drain, and the prepared statement's generic plan (what a pooled
/// connection runs from its sixth execution on) is checked, then run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_results_are_written_by_primary_key_lookups() {
    let env = TestEnv::start().await;
    migrate(&env.settings());
    let ids = env.insert_messages(20_100).await;
    let db = env.db().await;
    db.batch_execute(
        "ANALYZE messages;
         UPDATE messages SET status = 'sending', claim_epoch = 1, claimed_at = now(), attempts = 1;
         UPDATE messages SET status = 'sent', sent_at = now() WHERE id <= (SELECT min(id) + 19999 FROM messages);
         SET plan_cache_mode = force_generic_plan;",
    )
    .await
    .unwrap();
    let group: Vec<i64> = ids[20_000..].to_vec();
    let epochs = vec![1_i64; group.len()];
    let times = vec![Utc::now(); group.len()];
    let provider_ids: Vec<String> = group.iter().map(|id| format!("p-{id}")).collect();
    let prices = vec![Some(7_900_i64); group.len()];
    let statement = db.prepare(MARK_SENT_GROUP).await.unwrap();
    let explain = db
        .prepare(&format!("EXPLAIN (FORMAT TEXT) {MARK_SENT_GROUP}"))
        .await
        .unwrap();
    let plan: Vec<String> = db
        .query(&explain, &[&group, &epochs, &times, &provider_ids, &prices])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using messages_pkey")
            && !plan.contains("messages_status_id_idx")
            && !plan.contains("messages_sending_claimed_idx"),
        "the group write must look rows up by primary key:\n{plan}"
    );
    let written = db
        .query(
            &statement,
            &[&group, &epochs, &times, &provider_ids, &prices],
        )
        .await
        .unwrap();
    assert_eq!(written.len(), group.len(), "every row of the group written");
    assert_eq!(env.count("sent").await, 20_100);
    // The guard still holds: a row of another epoch, or no longer `sending`, is not ours.
    let again = db
        .query(
            &statement,
            &[&group, &epochs, &times, &provider_ids, &prices],
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "rows already sent are not written again");
}

/// A claim updates its rows through the primary key whatever the table's size. Joined
/// to a CTE of the claimed ids, the claim was planned on small tables as a hash join
/// over a sequential scan of the whole table (all 20,000 rows read for a claim of
/// 500), and took the primary key only from about 100,000 rows on. Both the custom
/// plan and the generic one (what a pooled connection may run from its sixth execution
/// on) are checked on 20,000 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_updates_its_rows_by_primary_key_on_a_small_table() {
    let env = TestEnv::start().await;
    migrate(&env.settings());
    env.insert_messages(20_000).await;
    let db = env.db().await;
    db.batch_execute("ANALYZE messages").await.unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let explain = db
            .prepare(&format!("EXPLAIN (FORMAT TEXT) {CLAIM}"))
            .await
            .unwrap();
        let plan: Vec<String> = db
            .query(
                &explain,
                &[
                    &500_i64,
                    &1_i64,
                    &"test",
                    &1_i64,
                    &"default",
                    &None::<Vec<i64>>,
                    &vec!["default".to_string()],
                    &Some("default"),
                ],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        // The opt-out list may be read whole while it is tiny (here: empty); `messages`
        // never.
        assert!(
            plan.contains("Index Scan using messages_pkey")
                && !plan.contains("Seq Scan on messages"),
            "{mode}: the claim must update its rows by primary key:\n{plan}"
        );
    }
}

/// A claim writes no entry into the listing index `(status, id)`: its `sending`
/// entries served nothing the partial `sending` index does not, and each cost
/// PostgreSQL an index insert per message (migration 0008). The index's entries are
/// counted with pageinspect (ten rows fit on its one leaf page): the ten inserts, and
/// nothing for their claim. Listings of `sending` rows still find them, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_writes_no_entry_into_the_listing_index() {
    let env = TestEnv::start().await;
    let store = started_store(&env).await;
    let ids = env.insert_messages(10).await;
    let db = env.db().await;
    db.batch_execute("CREATE EXTENSION pageinspect")
        .await
        .unwrap();
    let entries = || async {
        let row = db
            .query_one(
                "SELECT count(*) FROM bt_page_items('messages_status_id_idx', 1)",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    assert_eq!(entries().await, 10, "one entry per inserted row");

    let epoch = store.bump_epoch("test").await.unwrap();
    let schedule = Schedule {
        batch_size: 10,
        interval: Duration::ZERO,
        unit: message_dispatcher::config::Unit::Messages,
    };
    let batch = opened(
        store
            .claim_batch(
                epoch,
                "test",
                schedule,
                Duration::ZERO,
                1,
                &any_provider(false),
            )
            .await
            .unwrap()
            .claim,
    );
    assert_eq!(batch.messages.len(), 10);
    assert_eq!(entries().await, 10, "the claim of ten rows added entries");

    let sending = ListFilter {
        status: Some(MessageStatus::Sending),
        ..ListFilter::default()
    };
    let page = store.list_messages(&sending, None, 4, true).await.unwrap();
    assert_eq!(page.total, 10);
    let listed: Vec<i64> = page.messages.iter().map(|m| m.id).collect();
    let mut newest: Vec<i64> = ids.clone();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(listed, newest[..4], "newest first");
    let rest = store
        .list_messages(&sending, page.next_cursor, 10, true)
        .await
        .unwrap();
    let rest: Vec<i64> = rest.messages.iter().map(|m| m.id).collect();
    assert_eq!(rest, newest[4..], "the next page holds the rest");
}

#[test]
fn batch_sizes_groups_by_gaps() {
    assert_eq!(
        batch_sizes(&[0, 10, 20, 2_000_000, 2_000_010, 5_000_000], 700_000),
        vec![3, 2, 1]
    );
}
