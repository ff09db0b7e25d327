//! Delivery keys: the `Idempotency-Key` a provider sees is unique across databases and
//! installs, and rows from before migration 0011 keep the key they were sent with.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::postgres::{DATABASE, Postgres};
use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Two databases (a second install, a restored backup) send through one provider
/// account. Both have a message with id 1: the provider must see two keys and take
/// two deliveries, where the bare row id as key made it drop the second as a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_through_one_provider_never_share_a_key() {
    let env = TestEnv::start().await;
    let other = Postgres::start().await;
    let other_url = format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", other.port);
    let first = env.replica("first", &ReplicaSettings::fast()).await;
    let second = env
        .replica(
            "second",
            &ReplicaSettings::fast()
                .database_url(&other_url)
                .lock_key("second-install:lock"),
        )
        .await;
    let ids_first = env
        .create_messages(&first, &["from the first install"])
        .await;
    let ids_second = env
        .create_messages(&second, &["from the second install"])
        .await;
    assert_eq!(ids_first, ids_second, "both databases have the same row id");

    wait_for("both messages to be sent", TEST_TIMEOUT, || async {
        let (_, a) = first.get(&format!("/api/messages/{}", ids_first[0])).await;
        let (_, b) = second
            .get(&format!("/api/messages/{}", ids_second[0]))
            .await;
        (a["status"] == "sent" && b["status"] == "sent").then_some(())
    })
    .await;
    let deliveries = env.mock().deliveries().await;
    let contents: HashSet<&str> = deliveries.iter().map(|d| d.content.as_str()).collect();
    assert_eq!(
        contents,
        HashSet::from(["from the first install", "from the second install"]),
        "the provider took both messages: {deliveries:?}"
    );
    assert!(
        deliveries.iter().all(|d| d.times_seen == 1),
        "{deliveries:?}"
    );
    let (_, shown) = first.get(&format!("/api/messages/{}", ids_first[0])).await;
    let key = shown["delivery_key"].as_str().expect("delivery_key shown");
    assert!(
        uuid_shaped(key),
        "a new message's delivery key is a UUID: {key}"
    );
    assert!(deliveries.iter().any(|d| d.key == key));
}

/// Rows that exist when migration 0011 is applied keep the key they were sent with
/// before (their id), and so does a row an earlier version's replica sent during the
/// rolling upgrade: a message claimed or in flight during the upgrade is re-sent, if at
/// all, under the same key. Rows created afterwards get a UUID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_the_upgrade_keep_their_key() {
    let env = TestEnv::start().await;
    let vars = env.settings().auto_start(false).to_env();
    let (status, output) = run_command(&["migrate"], &vars);
    assert!(status.success(), "{output}");
    let db = env.db().await;
    // The schema as it was before 0011, holding one pending message and one that was
    // claimed by a leader that died (its send may have reached the provider).
    db.batch_execute(
        "ALTER TABLE messages DROP COLUMN delivery_key, DROP COLUMN delivery_key_sent;
         DELETE FROM schema_migrations WHERE version = 11;
         INSERT INTO messages (phone_number, content) VALUES
             ('+905551230001', 'old pending'), ('+905551230002', 'old in flight');
         UPDATE messages SET status = 'sending', claim_epoch = 0, attempts = 1,
                             claimed_at = now() - interval '1 hour', claimed_by = 'gone'
         WHERE content = 'old in flight';",
    )
    .await
    .unwrap();
    let (status, output) = run_command(&["migrate"], &vars);
    assert!(status.success(), "{output}");
    // After the migration, during a rolling upgrade, a replica of the earlier version
    // claimed a new message (it sent it under its id) and died: it goes on under its
    // id, although the row got a UUID when it was made.
    db.batch_execute(
        "INSERT INTO messages (phone_number, content, status, claim_epoch, attempts,
                               claimed_at, claimed_by)
         VALUES ('+905551230003', 'new, first sent by an old replica', 'sending', 0, 1,
                 now() - interval '1 hour', 'old-version');",
    )
    .await
    .unwrap();
    let replica = env
        .replica("r1", &ReplicaSettings::fast().auto_start(false))
        .await;
    let new = env.create_messages(&replica, &["new"]).await[0];
    let (_, listed) = replica.get("/api/messages?limit=10").await;
    let keys: Vec<(String, String)> = listed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["content"].as_str().unwrap().to_string(),
                m["delivery_key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for (content, key) in &keys {
        if content == "new" {
            assert!(uuid_shaped(key), "{content}: {key}");
        } else {
            let id: i64 = key
                .parse()
                .unwrap_or_else(|_| panic!("{content}: {key} is its id"));
            assert!(id > 0 && id < new, "{content}: {key}");
        }
    }
    let (status, _) = replica.post("/api/messaging/start", None).await;
    assert_eq!(status, 200);
    env.wait_drained(TEST_TIMEOUT).await;
    let mut delivered: Vec<String> = env
        .mock()
        .deliveries()
        .await
        .into_iter()
        .map(|d| d.key)
        .collect();
    delivered.sort();
    let mut expected: Vec<String> = keys.into_iter().map(|(_, key)| key).collect();
    expected.sort();
    assert_eq!(delivered, expected, "each sent under the key it shows");
}

/// `8-4-4-4-12` lowercase hex digits.
fn uuid_shaped(key: &str) -> bool {
    let parts: Vec<&str> = key.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        })
}
