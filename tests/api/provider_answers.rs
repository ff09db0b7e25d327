//! Answers from the provider that PostgreSQL would refuse if stored as they came, or
//! that would make a message loop: each message ends `sent` or `failed`, accepted ones
//! are sent once, `MAX_ATTEMPTS` holds, and the queue keeps flowing.

use std::time::Duration;

use crate::support::{TestEnv, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provider_answers_end_sent_or_failed_and_never_block_the_queue() {
    let env = TestEnv::with_scripted().await;
    let replica = env
        .replica(
            "r1",
            &[
                ("BATCH_SIZE", "10"),
                ("PROCESSING_INTERVAL", "200ms"),
                ("MAX_ATTEMPTS", "3"),
                ("RETRY_BACKOFF_BASE", "1s"),
                ("RETRY_BACKOFF_MAX", "2s"),
            ],
        )
        .await;
    let cases = [
        ("nul-id reply:202-nul-id", "sent", 1),
        ("long-id reply:202-long-id", "sent", 1),
        ("nul-body reply:500-nul-body", "failed", 3),
        ("huge-body reply:500-huge-body", "failed", 3),
        ("retry-after-huge reply:503-retry-after-huge", "failed", 3),
        ("retry-after-zero reply:429-after-0", "failed", 3),
        ("redirect reply:302", "failed", 3),
        ("plain after", "sent", 1),
    ];
    let contents: Vec<&str> = cases.iter().map(|(c, _, _)| *c).collect();
    let ids = env.create_messages(&replica, &contents).await;

    // Final state, generously bounded: every row terminal (the retries take about
    // 1 s + 2 s each).
    wait_for("every message to end", Duration::from_secs(60), || async {
        let open = env.open_count().await;
        (open == 0).then_some(())
    })
    .await;
    // Still terminal a little later: nothing is re-claimed behind our back.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let db = env.db().await;
    let keys = env.delivery_keys(&ids).await;
    for (((content, status, requests), id), key) in cases.iter().zip(&ids).zip(&keys) {
        let row = db
            .query_one(
                "SELECT status, attempts, provider_message_id, last_error FROM messages WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        let (got, attempts): (String, i32) = (row.get(0), row.get(1));
        let provider_id: Option<String> = row.get(2);
        let last_error: Option<String> = row.get(3);
        assert_eq!(&got, status, "{content}: {last_error:?}");
        assert_eq!(
            env.scripted().requests_for(key).len(),
            *requests,
            "{content}: requests"
        );
        assert!(attempts <= 3, "{content}: MAX_ATTEMPTS holds ({attempts})");
        if let Some(provider_id) = provider_id {
            assert!(!provider_id.contains('\0'));
            assert!(provider_id.len() <= 255, "{content}: bounded provider id");
        }
        if let Some(error) = last_error {
            assert!(!error.contains('\0'));
            assert!(error.chars().count() <= 1000, "{content}: bounded error");
        }
    }
    let times = |index: usize| -> Vec<std::time::Instant> {
        env.scripted()
            .requests_for(&keys[index])
            .iter()
            .map(|r| r.at)
            .collect()
    };
    // Retry-After: 0 does not hot-loop; a huge Retry-After is capped at
    // RETRY_BACKOFF_MAX (the test would time out otherwise).
    for pair in times(5).windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(900),
            "Retry-After: 0 is retried after at least a second"
        );
    }
    let redirect: Option<String> = db
        .query_one("SELECT last_error FROM messages WHERE id = $1", &[&ids[6]])
        .await
        .unwrap()
        .get(0);
    assert!(
        redirect.unwrap_or_default().contains("302"),
        "the redirect is named in last_error"
    );
}
