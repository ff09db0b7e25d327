//! The rescue of abandoned claims against real servers: every row it returns to
//! `pending` was first looked up in the delivery cache, however many there are.

use std::time::Duration;

use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv, wait_for};

/// More abandoned rows than one rescue page (1,000) and than the 10,000 rows a single
/// lookup once covered: a leader died with 10,300 claims whose sends the provider had
/// all accepted and Redis had recorded. Its successor records every one as sent from
/// the delivery cache; none reaches the provider again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rescued_row_is_first_looked_up_in_the_delivery_cache() {
    const ABANDONED: i64 = 10_300;
    let env = TestEnv::start().await;
    let (status, output) = run_command(&["migrate"], &env.settings().to_env());
    assert!(status.success(), "{output}");
    let db = env.db().await;
    // Claimed under epoch 0 by a leader that is gone, an hour ago.
    db.execute(
        "INSERT INTO messages (phone_number, content, status, claim_epoch, claimed_by,
                               claimed_at, attempts, delivery_key_sent)
         SELECT '+9055500' || lpad(s::text, 5, '0'), 'abandoned ' || s, 'sending', 0,
                'gone', now() - interval '1 hour', 1, true
         FROM generate_series(1, $1::bigint) AS s",
        &[&ABANDONED],
    )
    .await
    .unwrap();
    // The delivery cache entries the dead leader wrote as the provider accepted.
    let entries: Vec<(String, String)> = db
        .query(
            "SELECT 'delivery:' || id,
                    json_build_object('message_id', id, 'provider_message_id', 'p-' || id,
                                      'sent_at', now() - interval '59 minutes',
                                      'cached_at', now() - interval '59 minutes',
                                      'created_at', created_at,
                                      'delivery_key', coalesce(delivery_key::text, id::text))::text
             FROM messages ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for chunk in entries.chunks(500) {
        let mut args = vec!["MSET"];
        for (key, value) in chunk {
            args.push(key);
            args.push(value);
        }
        assert_eq!(env.redis.cli(&args), "OK");
    }
    assert_eq!(env.redis.cli(&["DBSIZE"]), ABANDONED.to_string());

    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    wait_for(
        "the abandoned claims to be settled",
        Duration::from_secs(120),
        || async { (env.count("sending").await == 0).then_some(()) },
    )
    .await;
    let stats = env.mock().stats().await;
    assert_eq!(
        stats.requests, 0,
        "a message the provider had accepted was sent again: {stats:?}"
    );
    assert_eq!(env.count("sent").await, ABANDONED);
    let provider_ids: i64 = db
        .query_one(
            "SELECT count(*) FROM messages WHERE provider_message_id = 'p-' || id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(provider_ids, ABANDONED, "recorded with the provider's ids");
    assert!(replica.logs().contains("recorded as sent"));
}
