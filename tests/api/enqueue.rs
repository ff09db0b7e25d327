//! `dispatcher_enqueue(...)` (docs/operations.md#enqueue-from-sql): a message enqueued in
//! the caller's transaction exists, and is sent, exactly when that transaction commits;
//! the function refuses what intake refuses, naming the field.

use serde_json::Value;
use tokio_postgres::error::SqlState;

use crate::support::{TestEnv, secs, wait_for};

/// The error a call gives: its SQLSTATE and message.
async fn refusal(db: &tokio_postgres::Client, call: &str) -> (SqlState, String) {
    let err = db
        .query_one(call, &[])
        .await
        .expect_err("the call must be refused");
    let db_error = err.as_db_error().expect("an error from PostgreSQL");
    (db_error.code().clone(), db_error.message().to_string())
}

#[tokio::test]
async fn a_message_enqueued_in_a_transaction_exists_and_is_sent_only_once_it_commits() {
    let env = TestEnv::start().await;
    let replica = env.replica("r1", &env.settings()).await;
    let mut db = env.db().await;
    db.batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY, message_id bigint)")
        .await
        .unwrap();

    // Rolled back: neither the order nor its message.
    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO orders (id) VALUES (1)", &[])
        .await
        .unwrap();
    let id: i64 = tx
        .query_one(
            "SELECT dispatcher_enqueue('+905557770001', 'order 1 confirmed')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    let (status, _) = replica.get(&format!("/api/messages/{id}")).await;
    assert_eq!(status, 404, "a rolled-back enqueue leaves no message");

    // Committed: the order and its message, sent by the replica.
    let tx = db.transaction().await.unwrap();
    let id: i64 = tx
        .query_one(
            "SELECT dispatcher_enqueue('+905557770002', 'order 2 confirmed',
                                       idempotency_key => 'order-2', priority => 2,
                                       category => 'transactional')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute("INSERT INTO orders (id, message_id) VALUES (2, $1)", &[&id])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let sent: Value = wait_for("the enqueued message sent", secs(30), || async {
        let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
        (message["status"] == "sent").then_some(message)
    })
    .await;
    assert_eq!(sent["priority"], 2);
    assert_eq!(sent["category"], "transactional");
    assert_eq!(sent["idempotency_key"], "order-2");
    let deliveries = env.mock().deliveries().await;
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].to, "+905557770002");

    // A repeat of the key returns the same message; a different payload is refused.
    let again: i64 = db
        .query_one(
            "SELECT dispatcher_enqueue('+905557770002', 'order 2 confirmed',
                                       idempotency_key => 'order-2', priority => 2,
                                       category => 'transactional')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, id);
    let (code, message) = refusal(
        &db,
        "SELECT dispatcher_enqueue('+905557770002', 'another text', idempotency_key => 'order-2')",
    )
    .await;
    assert_eq!(code, SqlState::UNIQUE_VIOLATION, "{message}");
    assert!(message.contains(&format!("message {id}")), "{message}");
    let (_, stats) = replica.get("/api/messages/stats").await;
    assert_eq!(stats["by_status"]["sent"], 1, "{stats}");

    // A role needs EXECUTE, granted, and no right on the tables.
    db.batch_execute("CREATE ROLE shop; CREATE ROLE stranger; SET ROLE stranger")
        .await
        .unwrap();
    let (code, message) = refusal(&db, "SELECT dispatcher_enqueue('+905557770003', 'hi')").await;
    assert_eq!(code, SqlState::INSUFFICIENT_PRIVILEGE, "{message}");
    db.batch_execute(
        "RESET ROLE;
         GRANT EXECUTE ON FUNCTION dispatcher_enqueue(text, text, text, timestamptz, timestamptz,
                                                      integer, text, text, text) TO shop;
         SET ROLE shop",
    )
    .await
    .unwrap();
    let id: i64 = db
        .query_one("SELECT dispatcher_enqueue('+905557770003', 'hi')", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute("RESET ROLE").await.unwrap();
    wait_for("the granted role's message sent", secs(30), || async {
        let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
        (message["status"] == "sent").then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_function_refuses_what_intake_refuses_naming_the_field() {
    let env = TestEnv::start().await;
    let replica = env
        .replica("r1", &env.settings().env("MESSAGE_MAX_LENGTH", "20"))
        .await;
    let db = env.db().await;
    let long = "x".repeat(21);
    for (call, field) in [
        (
            "SELECT dispatcher_enqueue('05551234567', 'hi')".to_string(),
            "phone_number",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', '   ')".into(),
            "content",
        ),
        (
            format!("SELECT dispatcher_enqueue('+905551234567', '{long}')"),
            "content",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', idempotency_key => 'a b')".into(),
            "idempotency_key",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', send_at => now() + interval '1 hour',
                                       expires_at => now())"
                .into(),
            "expires_at",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', priority => 4)".into(),
            "priority",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', lane => 'nowhere')".into(),
            "lane",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', sender => 'A VERY LONG NAME')".into(),
            "from",
        ),
        (
            "SELECT dispatcher_enqueue('+905551234567', 'hi', category => 'urgent')".into(),
            "category",
        ),
    ] {
        let (code, message) = refusal(&db, &call).await;
        assert_eq!(code, SqlState::INVALID_PARAMETER_VALUE, "{call}: {message}");
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{call}: {message}"
        );
    }
    let (_, stats) = replica.get("/api/messages/stats").await;
    let stored: i64 = stats["by_status"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_i64().unwrap())
        .sum();
    assert_eq!(stored, 0, "nothing refused was stored: {stats}");

    // A listed number: stored blocked, as intake does.
    db.execute(
        "INSERT INTO opt_outs (phone_number, source) VALUES ('+905551234567', 'api')",
        &[],
    )
    .await
    .unwrap();
    let id: i64 = db
        .query_one("SELECT dispatcher_enqueue('+905551234567', 'hi')", &[])
        .await
        .unwrap()
        .get(0);
    let (_, message) = replica.get(&format!("/api/messages/{id}")).await;
    assert_eq!(message["status"], "blocked", "{message}");
}
