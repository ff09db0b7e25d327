//! Storage that lasts: retention removes old finished messages and blanks their text,
//! the counters behind the stats keep counting them, a page's total is bounded, and an
//! old transaction elsewhere in the database shows in the metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use crate::support::replica::run_command;
use crate::support::{Replica, ReplicaSettings, TestEnv, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Inserts `count` rows with `status`, created `created_ago` and last active (claimed,
/// sent, expired) `active_ago` before now; returns their ids.
async fn seed(
    db: &Client,
    status: &str,
    count: i32,
    created_ago: &str,
    active_ago: &str,
) -> Vec<i64> {
    db.query(
        "INSERT INTO messages (phone_number, content, status, created_at, next_attempt_at,
                               claimed_at, sent_at, expires_at)
         SELECT '+9055501' || lpad(s::text, 5, '0'), 'seeded ' || s, $1,
                now() - $3::text::interval, now() - $3::text::interval,
                CASE WHEN $1 IN ('sent', 'failed') THEN now() - $4::text::interval END,
                CASE WHEN $1 = 'sent' THEN now() - $4::text::interval END,
                CASE WHEN $1 = 'expired' THEN now() - $4::text::interval END
         FROM generate_series(1, $2::int) AS s ORDER BY s RETURNING id",
        &[&status, &count, &created_ago, &active_ago],
    )
    .await
    .expect("seed messages")
    .iter()
    .map(|row| row.get(0))
    .collect()
}

async fn present(db: &Client, ids: &[i64]) -> i64 {
    db.query_one("SELECT count(*) FROM messages WHERE id = ANY($1)", &[&ids])
        .await
        .expect("count")
        .get(0)
}

async fn counters(db: &Client) -> BTreeMap<String, i64> {
    db.query(
        "SELECT status || '/' || delivery, sum(n)::bigint FROM message_counts GROUP BY 1",
        &[],
    )
    .await
    .expect("counters")
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

/// A migrated database with no replica running yet.
async fn migrated() -> TestEnv {
    let env = TestEnv::start().await;
    let (status, output) = run_command(&["migrate"], &env.settings().to_env());
    assert!(status.success(), "migrate: {output}");
    env
}

#[tokio::test]
async fn retention_removes_old_finished_messages_in_steps_and_the_stats_keep_counting_them() {
    let env = migrated().await;
    let db = env.db().await;
    // More old `sent` rows than one step reads, and a few of every other finished status.
    let mut old = seed(&db, "sent", 1_100, "3 hours", "2 hours").await;
    for status in ["failed", "expired", "cancelled"] {
        old.extend(seed(&db, status, 3, "3 hours", "2 hours").await);
    }
    // Kept: created long ago but sent 10 minutes ago (scheduled), still in the queue,
    // new, or waiting for hours and cancelled just now.
    let mut kept = seed(&db, "sent", 2, "3 hours", "10 minutes").await;
    kept.extend(seed(&db, "pending", 2, "3 hours", "3 hours").await);
    kept.extend(seed(&db, "failed", 2, "1 minute", "1 minute").await);
    let cancelled = seed(&db, "pending", 1, "3 hours", "3 hours").await[0];
    kept.push(cancelled);
    {
        let keeper = env
            .replica(
                "cancels",
                &ReplicaSettings::fast()
                    .auto_start(false)
                    .env("MESSAGE_RETENTION", "0"),
            )
            .await;
        let (status, body) = keeper
            .post(&format!("/api/messages/{cancelled}/cancel"), None)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let before = counters(&db).await;

    let replica = env
        .replica(
            "retention",
            &ReplicaSettings::fast()
                .auto_start(false)
                .env("MESSAGE_RETENTION", "1h"),
        )
        .await;
    wait_for(
        "old finished messages to be removed",
        TEST_TIMEOUT,
        || async { (present(&db, &old).await == 0).then_some(()) },
    )
    .await;

    assert_eq!(present(&db, &kept).await, kept.len() as i64, "kept rows");
    assert_eq!(
        counters(&db).await,
        before,
        "the counters still count removed rows"
    );
    let (status, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["by_status"]["sent"], 1_102, "{stats}");
    assert_eq!(stats["by_status"]["failed"], 5, "{stats}");
    assert_eq!(stats["by_status"]["cancelled"], 4, "{stats}");
    assert_eq!(
        replica
            .metric(r#"dispatcher_retention_rows_total{action="removed"}"#)
            .await,
        Some(old.len() as f64)
    );
}

#[tokio::test]
async fn content_retention_blanks_old_finished_texts_and_such_a_message_cannot_be_retried() {
    let env = migrated().await;
    let db = env.db().await;
    let old_sent = seed(&db, "sent", 3, "3 hours", "2 hours").await;
    let old_failed = seed(&db, "failed", 1, "3 hours", "2 hours").await[0];
    let young = seed(&db, "sent", 1, "1 minute", "1 minute").await[0];
    let queued = seed(&db, "pending", 1, "3 hours", "3 hours").await[0];

    let replica = env
        .replica(
            "content-retention",
            &ReplicaSettings::fast()
                .auto_start(false)
                .env("MESSAGE_RETENTION", "0")
                .env("CONTENT_RETENTION", "1h"),
        )
        .await;
    for &id in old_sent.iter().chain([&old_failed]) {
        let message = wait_for("the old text to be removed", TEST_TIMEOUT, || async {
            let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
            message["content"].is_null().then_some(message)
        })
        .await;
        assert!(
            message["segments"].is_null() && message["encoding"].is_null(),
            "{message}"
        );
    }
    for id in [young, queued] {
        let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
        assert!(message["content"].is_string(), "kept text: {message}");
    }
    let (status, page) = replica.get("/api/messages?status=sent").await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 4, "the rows stay: {page}");

    let (status, error) = replica
        .post(&format!("/api/messages/{old_failed}/retry"), None)
        .await;
    assert_eq!(status, 409, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("CONTENT_RETENTION")),
        "{error}"
    );
    let (status, answer) = replica
        .post(
            "/api/messages/retry",
            Some(serde_json::json!({"status": "failed"})),
        )
        .await;
    assert_eq!(
        (status, &answer["retried"]),
        (200, &Value::from(0)),
        "{answer}"
    );
    assert_eq!(
        env.count("pending").await,
        1,
        "nothing without text went back to the queue"
    );
    assert_eq!(
        replica
            .metric(r#"dispatcher_retention_rows_total{action="content_removed"}"#)
            .await,
        Some(4.0)
    );
}

#[tokio::test]
async fn a_pages_total_is_bounded_unless_the_exact_total_is_asked_for() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("list", &ReplicaSettings::fast().auto_start(false))
        .await;
    env.insert_messages(10_050).await;

    let page = |query: &'static str| {
        let replica: &Replica = &replica;
        async move { replica.get(&format!("/api/messages?{query}")).await }
    };
    let (status, bounded) = page("limit=5").await;
    assert_eq!(status, 200);
    assert_eq!(
        (&bounded["total"], &bounded["total_exact"]),
        (&Value::from(10_000), &Value::from(false)),
        "{bounded}"
    );
    assert_eq!(bounded["messages"].as_array().map(Vec::len), Some(5));
    let (_, exact) = page("limit=5&total=exact").await;
    assert_eq!(
        (&exact["total"], &exact["total_exact"]),
        (&Value::from(10_050), &Value::from(true)),
        "{exact}"
    );
    let (_, few) = page("status=sent").await;
    assert_eq!(
        (&few["total"], &few["total_exact"]),
        (&Value::from(0), &Value::from(true)),
        "{few}"
    );
    let (status, error) = page("total=all").await;
    assert_eq!(status, 400, "{error}");
}

#[tokio::test]
async fn an_old_transaction_elsewhere_shows_in_the_metrics_until_it_ends() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "old-transaction",
            &ReplicaSettings::fast().auto_start(false),
        )
        .await;
    let series = "dispatcher_db_oldest_transaction_age_seconds";
    let mut report = env.db().await;
    // A report in one snapshot: it holds back cleanup from its first read on (a
    // READ COMMITTED session idle in its transaction would not).
    let transaction = report
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("BEGIN");
    transaction
        .execute("SELECT count(*) FROM messages", &[])
        .await
        .expect("a report's first read");
    wait_for("the open transaction to show", TEST_TIMEOUT, || async {
        (replica.metric(series).await >= Some(3.0)).then_some(())
    })
    .await;
    transaction.commit().await.expect("COMMIT");
    wait_for("the gauge to fall back to 0", TEST_TIMEOUT, || async {
        (replica.metric(series).await == Some(0.0)).then_some(())
    })
    .await;
}
