//! Answers from the provider that PostgreSQL would refuse if stored as they came, or
//! that would make a message loop: each message ends `sent` or `failed`, accepted ones
//! are sent once, `MAX_ATTEMPTS` holds, and the queue keeps flowing. (Throttles, which
//! pause the provider instead, are in `providers.rs`.)

use std::time::Duration;

use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_provider_answers_end_sent_or_failed_and_never_block_the_queue() {
    let env = TestEnv::with_scripted().await;
    // The failures here are the messages', not the provider's: a breaker that never
    // opens keeps them on their own backoff (docs/design.md#failover).
    let config = env.dir.path().join("dispatch.toml");
    std::fs::write(
        &config,
        format!(
            "[[provider]]\nname = \"scripted\"\nkind = \"http-json\"\nurl = \"{}\"\n\
             token_env = \"SMS_API_TOKEN\"\nbreaker_failures = 1000\nbreaker_ratio = 1.0\n\n\
             [[lane]]\nname = \"default\"\nbatch_size = 10\ninterval = \"200ms\"\n\
             providers = [\"scripted\"]\n",
            env.provider_url
        ),
    )
    .unwrap();
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .env("DISPATCH_CONFIG", &config.display().to_string())
                .env("SMS_API_TOKEN", "scripted-token")
                .max_attempts(3)
                .retry_backoff(secs(1), secs(2)),
        )
        .await;
    let cases = [
        ("nul-id reply:202-nul-id", "sent", 1),
        ("long-id reply:202-long-id", "sent", 1),
        ("nul-body reply:500-nul-body", "failed", 3),
        ("huge-body reply:500-huge-body", "failed", 3),
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
    let redirect: Option<String> = db
        .query_one("SELECT last_error FROM messages WHERE id = $1", &[&ids[4]])
        .await
        .unwrap()
        .get(0);
    assert!(
        redirect.unwrap_or_default().contains("302"),
        "the redirect is named in last_error"
    );
}

/// A 401 or 403 means our credentials are wrong, not the message: it must not fail the
/// backlog. Dispatch pauses (reason `provider_auth` in the status, the
/// health and a metric), each refused message goes back to pending without spending
/// an attempt, at most one probe goes out per LOCK_RETRY_INTERVAL, and dispatch
/// resumes by itself once a probe is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_pause_dispatch_until_a_probe_is_accepted() {
    let env = TestEnv::with_scripted().await;
    env.scripted().refuse_credentials(true);
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(5)
                .processing_interval(ms(100))
                .max_attempts(2)
                .lock_retry_interval(ms(500)),
        )
        .await;
    let ids = env.insert_messages(10).await;
    wait_for("dispatch to pause", Duration::from_secs(30), || async {
        let (_, status) = replica.get("/api/messaging/status").await;
        (status["paused_reason"] == "provider_auth").then_some(status)
    })
    .await;
    wait_for(
        "the health and the metric to say so",
        Duration::from_secs(30),
        || async {
            let (_, health) = replica.get("/health").await;
            let metric = replica
                .metric(r#"dispatcher_dispatch_paused{reason="provider_auth"}"#)
                .await;
            (health["paused_reason"] == "provider_auth"
                && health["status"] == "degraded"
                && metric == Some(1.0))
            .then_some(())
        },
    )
    .await;
    let before = env.scripted().received().len();
    let watched = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probes = env.scripted().received().len() - before;
    let allowed = (watched.elapsed().as_millis() / 500) as usize + 1;
    assert!(
        (1..=allowed).contains(&probes),
        "{probes} requests in {:?} while paused; at most one probe per 500 ms",
        watched.elapsed()
    );
    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending'), max(attempts), \
                    count(*) FILTER (WHERE last_error LIKE 'HTTP 401%') \
             FROM messages",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 10, "every message waits in pending");
    assert_eq!(row.get::<_, i32>(1), 0, "no attempt was spent");
    assert!(row.get::<_, i64>(2) >= 1, "the refusal is named");

    // The credentials are fixed on the provider's side: the next probe is accepted.
    env.scripted().refuse_credentials(false);
    env.wait_drained(Duration::from_secs(60)).await;
    assert_eq!(env.count("sent").await, 10);
    let (_, status) = replica.get("/api/messaging/status").await;
    assert!(status["paused_reason"].is_null(), "{status}");
    let attempts: i32 = db
        .query_one("SELECT max(attempts) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "each sent at its first counted attempt");
    assert!(ids.len() == 10);
    assert!(replica.logs().contains("dispatch resumes"));
}
