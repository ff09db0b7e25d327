//! HTTPS providers with self-signed certificates.

use std::time::Duration;

use message_dispatcher::config::DbSslMode;

use crate::support::tls::{self_signed, terminate_tls};
use crate::support::{ReplicaSettings, TestEnv, ms, secs, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_provider_needs_the_ca_or_the_insecure_flag() {
    let env = TestEnv::with_scripted().await;
    let certificate = self_signed();
    let tls = terminate_tls(&certificate, env.scripted().addr).await;
    let https_url = format!("https://localhost:{}/send", tls.port());
    let base = ReplicaSettings::fast()
        .provider_url(https_url)
        .batch_size(1)
        .processing_interval(ms(100))
        .retry_backoff(secs(3600), secs(3600))
        .lock_enabled(false);
    let db = env.db().await;

    // Neither: the TLS handshake fails, the message waits for a retry, nothing arrives.
    let mut plain = env.replica("plain", &base).await;
    let ids = env.create_messages(&plain, &["over tls"]).await;
    let error: String = wait_for(
        "the TLS failure to be recorded",
        Duration::from_secs(30),
        || async {
            let row = db
                .query_one(
                    "SELECT status, last_error FROM messages WHERE id = $1",
                    &[&ids[0]],
                )
                .await
                .unwrap();
            let status: String = row.get(0);
            (status == "pending")
                .then(|| row.get::<_, Option<String>>(1))
                .flatten()
        },
    )
    .await;
    assert!(
        error.starts_with("tls:") || error.contains("certificate"),
        "{error}"
    );
    assert!(env.scripted().received().is_empty());
    plain.terminate(Duration::from_secs(15)).await;

    // With SMS_API_CA_CERT.
    db.execute(
        "UPDATE messages SET next_attempt_at = now() WHERE id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    let with_ca = base.clone().provider_ca_cert(&certificate.cert);
    let mut trusted = env.replica("trusted", &with_ca).await;
    env.wait_drained(Duration::from_secs(30)).await;
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(ids[0]).await)
            .len(),
        1
    );
    trusted.terminate(Duration::from_secs(15)).await;

    // With SMS_API_INSECURE_SKIP_VERIFY (and a warning at start).
    let insecure = base.provider_insecure_skip_verify(true);
    let replica = env.replica("insecure", &insecure).await;
    let more = env.create_messages(&replica, &["insecure"]).await;
    env.wait_drained(Duration::from_secs(30)).await;
    assert_eq!(
        env.scripted()
            .requests_for(&env.delivery_key(more[0]).await)
            .len(),
        1
    );
    assert!(replica.logs().contains("SMS_API_INSECURE_SKIP_VERIFY=true"));
}

/// PostgreSQL over TLS (rustls): `require` encrypts without checking the certificate,
/// as libpq does; `verify-full` refuses a certificate no system root vouches for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_require_and_verify_full() {
    let mut env = TestEnv::start().await;
    let certificate = self_signed();
    env.pg.enable_ssl(&certificate).await;

    let replica = env
        .replica(
            "encrypted",
            &ReplicaSettings::fast().db_ssl_mode(DbSslMode::Require),
        )
        .await;
    let db = env.db().await;
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'message-dispatcher' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "the replica's connections use TLS");
    let plain: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'message-dispatcher' AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0, "and none goes without");
    drop(replica);

    let strict = env.spawn_replica(
        "strict",
        &ReplicaSettings::fast().db_ssl_mode(DbSslMode::VerifyFull),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        strict.get("/health/ready").await.0,
        503,
        "an untrusted certificate is refused"
    );
    assert!(
        strict.logs().contains("certificate"),
        "and the log says why"
    );
}
