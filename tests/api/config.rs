//! Bad configuration: exit status 2 and one line naming the variable, before
//! touching anything.

use crate::support::TestEnv;
use crate::support::replica::run_command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_2_naming_the_variable() {
    let env = TestEnv::start().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PROCESSING_INTERVAL", "abc")], "PROCESSING_INTERVAL"),
        (&[("BATCH_SIZE", "0")], "BATCH_SIZE"),
        (
            &[
                ("DISTRIBUTED_LOCK_TTL", "6s"),
                ("LOCK_RETRY_INTERVAL", "2s"),
            ],
            "DISTRIBUTED_LOCK_TTL",
        ),
        (&[("SERVER_PORT", "http")], "SERVER_PORT"),
        (&[("LOG_FORMAT", "yaml")], "LOG_FORMAT"),
        (
            &[("SMS_API_CA_CERT", "/nonexistent.pem")],
            "SMS_API_CA_CERT",
        ),
    ];
    for (overrides, variable) in cases {
        for command in ["serve", "migrate"] {
            let (status, output) = run_command(&[command], &env.env_with(overrides));
            assert_eq!(
                status.code(),
                Some(2),
                "{command} with {overrides:?}: {output}"
            );
            let lines: Vec<&str> = output.lines().collect();
            assert_eq!(lines.len(), 1, "one line: {output}");
            assert!(lines[0].contains(variable), "names {variable}: {output}");
        }
    }
    // Nothing was touched: the database has no tables.
    let tables: i64 = env
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let env = TestEnv::start().await;
    let url = format!(
        "postgres://postgres:db-pass-4242@127.0.0.1:{}/dispatcher",
        env.pg.port
    );
    let replica = env
        .replica(
            "r1",
            &[
                ("DATABASE_URL", &url),
                ("SMS_API_TOKEN", "provider-secret-4242"),
                ("API_TOKEN", "api-secret-4242"),
            ],
        )
        .await;
    env.create_messages_with_token(&replica, "api-secret-4242")
        .await;
    env.wait_drained(std::time::Duration::from_secs(30)).await;
    let logs = replica.logs();
    assert!(!logs.is_empty());
    for secret in ["db-pass-4242", "provider-secret-4242", "api-secret-4242"] {
        assert!(!logs.contains(secret), "{secret} leaked into the log");
    }
}
