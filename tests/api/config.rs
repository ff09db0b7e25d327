//! Bad configuration: exit status 2 and one line naming the variable, before
//! touching anything.

use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv};

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
        (&[("DEFAULT_REGION", "XX")], "DEFAULT_REGION"),
        (
            &[("API_TOKEN_FILE", "/nonexistent/token")],
            "API_TOKEN_FILE",
        ),
        (
            &[("API_TOKEN", "t"), ("API_TOKEN_FILE", "/etc/hostname")],
            "API_TOKEN_FILE",
        ),
        (
            &[("API_ALLOWED_ORIGINS", "not an origin")],
            "API_ALLOWED_ORIGINS",
        ),
    ];
    for (overrides, variable) in cases {
        // Raw text, as an operator writes it: what is tested is the parser's answer.
        let settings = overrides
            .iter()
            .fold(env.settings(), |settings, (name, value)| {
                settings.env(name, value)
            });
        for command in ["serve", "migrate"] {
            let (status, output) = run_command(&[command], &settings.to_env());
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
            &ReplicaSettings::fast()
                .database_url(url)
                .provider_token("provider-secret-4242")
                .api_token("api-secret-4242"),
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

/// Each demo default still in force is named in a warning at start (no API_TOKEN, the
/// demo database password, the mock provider's token); a replica configured for real
/// says nothing of the kind. Secrets can come from files (`<NAME>_FILE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_defaults_are_named_at_start_and_secrets_can_come_from_files() {
    let env = TestEnv::start().await;
    let demo = env
        .replica(
            "demo",
            &ReplicaSettings::fast().database_url(demo_password_url(&env)),
        )
        .await;
    let logs = demo.logs();
    for warned in [
        "API_TOKEN is not set",
        "demo default \\\"password\\\"",
        "\\\"mock-token\\\"",
    ] {
        assert!(
            logs.lines()
                .any(|l| l.contains("demo default in force") && l.contains(warned)),
            "no warning naming {warned}: {logs}"
        );
    }

    let dir = env.dir.path();
    std::fs::write(dir.join("api-token"), "file-token\n").unwrap();
    std::fs::write(dir.join("sms-token"), "real-provider-token\n").unwrap();
    let real = env
        .replica(
            "real",
            &ReplicaSettings::fast()
                .api_token_file(dir.join("api-token"))
                .provider_token_file(dir.join("sms-token")),
        )
        .await;
    assert!(
        !real.logs().contains("demo default in force"),
        "{}",
        real.logs()
    );
    let without = crate::support::http()
        .get(real.url("/api/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 401);
    let with = crate::support::http()
        .get(real.url("/api/messages"))
        .bearer_auth("file-token")
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200, "the token read from API_TOKEN_FILE");
}

/// The test database's URL with the demo password in it (the test server trusts
/// every local connection, so any password works).
fn demo_password_url(env: &TestEnv) -> String {
    format!(
        "postgres://postgres:password@127.0.0.1:{}/{}",
        env.pg.port,
        crate::support::postgres::DATABASE
    )
}

/// A runtime override stored in PostgreSQL shadows the environment: the status marks
/// it with who set it and when, next to the configured value, and a replica that
/// starts while it is in force says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_that_shadow_the_environment_are_marked_and_logged() {
    let env = TestEnv::start().await;
    let first = env
        .replica("first", &ReplicaSettings::fast().auto_start(false))
        .await;
    let (status, _) = crate::support::http()
        .put(first.url("/api/messaging/config"))
        .json(&serde_json::json!({"batch_size": 7}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 200);
    let (_, answer) = first.get("/api/messaging/status").await;
    let config = &answer["config"];
    assert_eq!(config["batch_size"], 7);
    assert_eq!(config["configured"]["batch_size"], 2);
    assert_eq!(config["overrides"]["batch_size"], 7);
    assert_eq!(config["overrides"]["batch_size_set"]["by"], "api@first");
    assert!(
        config["overrides"]["batch_size_set"]["at"].is_string(),
        "{answer}"
    );
    assert!(config["overrides"]["processing_interval_set"].is_null());

    let second = env
        .replica("second", &ReplicaSettings::fast().auto_start(false))
        .await;
    let logs = second.logs();
    assert!(
        logs.lines().any(|l| l.contains("shadows BATCH_SIZE")
            && l.contains("api@first")
            && l.contains("\"override_value\":7")),
        "{logs}"
    );
    assert!(!logs.contains("shadows PROCESSING_INTERVAL"));
}
