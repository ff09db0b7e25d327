//! The migration runner: idempotent, safe under concurrency, strict on checksums.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::replica::run_command;
use crate::support::{ReplicaSettings, TestEnv, binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op_and_concurrent_runs_do_not_race() {
    let env = TestEnv::start().await;
    let vars = env.settings().to_env();

    // Three processes at once on an empty database.
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(binary())
                .arg("migrate")
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut applied_total = 0;
    for child in children {
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let applied: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("migrations: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("summary line");
        applied_total += applied;
    }
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert_eq!(
        applied_total, files,
        "each file applied exactly once across the three runs"
    );

    let (status, output) = run_command(&["migrate"], &vars);
    assert!(status.success());
    assert!(
        output.contains(&format!("migrations: 0 applied, {files} already applied")),
        "{output}"
    );
    let db = env.db().await;
    let rows = db
        .query(
            "SELECT version, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), files);
    let checksum: String = rows[0].get(1);
    assert_eq!(checksum.len(), 64, "sha256 hex");

    // A changed file is refused.
    db.execute(
        "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
        &[],
    )
    .await
    .unwrap();
    let (status, output) = run_command(&["migrate"], &vars);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("0001_messages.sql") && output.contains("checksum"),
        "{output}"
    );

    // `serve` refuses it too, at once and with the configuration exit status: retrying
    // cannot fix an edited migration file.
    let mut replica = env.spawn_replica("r1", &ReplicaSettings::fast());
    let status = replica.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{}", replica.logs());
    assert!(
        replica.logs().contains("0001_messages.sql"),
        "{}",
        replica.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_inserts_demo_messages() {
    let env = TestEnv::start().await;
    let (status, output) = run_command(&["seed", "--count", "25"], &env.settings().to_env());
    assert!(status.success(), "{output}");
    assert!(output.contains("seeded 25 messages"));
    assert_eq!(env.count("pending").await, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_healthcheck_commands() {
    let env = TestEnv::start().await;
    let (status, output) = run_command(&["--version"], &[]);
    assert!(status.success());
    assert!(
        output.starts_with("message-dispatcher 0.") && output.contains("commit"),
        "{output}"
    );
    let replica = env.replica("r1", &ReplicaSettings::fast()).await;
    let url = replica.url("/health/ready");
    let (status, _) = run_command(&["healthcheck", "--url", &url], &[]);
    assert!(status.success());
    let (status, output) = run_command(
        &["healthcheck", "--url", "http://127.0.0.1:9/health/ready"],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{output}");
}

/// The first column of every row `sql` returns, as text.
async fn texts(db: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The table CHECK constraints on `messages`, by name.
async fn table_checks(db: &tokio_postgres::Client) -> Vec<String> {
    texts(
        db,
        "SELECT conname::text FROM pg_constraint
         WHERE conrelid = 'messages'::regclass AND contype = 'c' ORDER BY 1",
    )
    .await
}

/// Migration 0009: the format rules of phone_number, content and idempotency_key are
/// domain constraints, which PostgreSQL evaluates only when a value is written to the
/// column; a table CHECK is evaluated on every UPDATE of the row, so the claim and the
/// result write paid for them on every message. Every write of a value still obeys them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_rules_hold_on_every_write_without_being_table_checks() {
    let env = TestEnv::start().await;
    let (status, output) = run_command(&["migrate"], &env.settings().to_env());
    assert!(status.success(), "{output}");
    let db = env.db().await;
    assert_eq!(
        table_checks(&db).await,
        [
            // A NULL test (migration 0016): next to free on every update.
            "messages_content_kept",
            "messages_delivery_status_known",
            "messages_priority_range",
            "messages_status_known"
        ],
        "only the checks on columns that dispatch writes anyway, and the cheap test that \
         a queued message has text, are table checks"
    );

    let row = db
        .query_one(
            "INSERT INTO messages (phone_number, content, idempotency_key)
             VALUES ('+905551234567', 'hello', 'order-1') RETURNING id",
            &[],
        )
        .await
        .unwrap();
    let id: i64 = row.get(0);
    let key_255 = "k".repeat(255);
    let key_256 = "k".repeat(256);
    let good = [
        ("phone_number", "5551234567"),
        ("phone_number", "+6834002"),
        ("phone_number", "+1234567890123456789"),
        ("content", " x "),
        ("idempotency_key", "~!"),
        ("idempotency_key", key_255.as_str()),
    ];
    let bad = [
        ("phone_number", "5551234", "messages_phone_number_format"),
        (
            "phone_number",
            "+90555abc4567",
            "messages_phone_number_format",
        ),
        (
            "phone_number",
            "5551234567+",
            "messages_phone_number_format",
        ),
        ("content", "   ", "messages_content_not_empty"),
        ("idempotency_key", "", "messages_idempotency_key_format"),
        (
            "idempotency_key",
            "has space",
            "messages_idempotency_key_format",
        ),
        ("idempotency_key", "é", "messages_idempotency_key_format"),
        (
            "idempotency_key",
            key_256.as_str(),
            "messages_idempotency_key_format",
        ),
    ];
    for (column, value) in good {
        db.execute(
            &format!("UPDATE messages SET {column} = $1::text WHERE id = $2"),
            &[&value, &id],
        )
        .await
        .unwrap_or_else(|e| panic!("{column} = {value:?} refused: {e}"));
    }
    for (column, value, rule) in bad {
        let values = [
            ("phone_number", "'+905551234567'"),
            ("content", "'hello'"),
            ("idempotency_key", "NULL"),
        ]
        .map(|(c, v)| if c == column { "$1::text" } else { v });
        let insert = format!(
            "INSERT INTO messages (phone_number, content, idempotency_key) VALUES ({})",
            values.join(", ")
        );
        let update = format!("UPDATE messages SET {column} = $1::text WHERE id = $2");
        let refused = [
            db.execute(&insert, &[&value]).await.unwrap_err(),
            db.execute(&update, &[&value, &id]).await.unwrap_err(),
        ];
        for err in refused {
            let err = err.as_db_error().expect("a database error");
            assert_eq!(
                err.code(),
                &tokio_postgres::error::SqlState::CHECK_VIOLATION,
                "{column} = {value:?}: {err}"
            );
            assert_eq!(err.constraint(), Some(rule), "{column} = {value:?}: {err}");
        }
    }
    // Updates that write none of the three columns do not touch the rules.
    db.execute(
        "UPDATE messages SET status = 'sending', attempts = attempts + 1 WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let rows = db
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 1, "no refused insert left a row");
}

/// Migration 0009 on a database that already holds messages: the columns change type
/// without losing a row or a value, and the rules are checked against the stored rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_rules_move_to_domains_on_a_populated_table() {
    let env = TestEnv::start().await;
    let vars = env.settings().to_env();
    let (status, output) = run_command(&["migrate"], &vars);
    assert!(status.success(), "{output}");
    let db = env.db().await;
    // The schema as it was before 0009, with messages in it.
    db.batch_execute(include_str!("../../scripts/bench/sql/before-0009.sql"))
        .await
        .unwrap();
    db.batch_execute(
        "DELETE FROM schema_migrations WHERE version = 9;
          INSERT INTO messages (phone_number, content, idempotency_key)
          SELECT '+90555' || lpad(g::text, 7, '0'), 'message ' || g,
                 CASE WHEN g % 2 = 0 THEN 'order-' || g END
          FROM generate_series(1, 1000) AS g;",
    )
    .await
    .unwrap();
    let fingerprint = "SELECT md5(string_agg(id || phone_number || content
                                           || coalesce(idempotency_key, '-'), ',' ORDER BY id))
                       FROM messages";
    let before: String = db.query_one(fingerprint, &[]).await.unwrap().get(0);

    let (status, output) = run_command(&["migrate"], &vars);
    assert!(status.success(), "{output}");
    assert!(output.contains("migrations: 1 applied"), "{output}");
    let after: String = db.query_one(fingerprint, &[]).await.unwrap().get(0);
    assert_eq!(before, after, "every row and value kept");
    assert_eq!(table_checks(&db).await.len(), 4);
    let types = texts(
        &db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
         WHERE attrelid = 'messages'::regclass
           AND attname IN ('phone_number', 'content', 'idempotency_key')
         ORDER BY attname",
    )
    .await;
    assert_eq!(
        types,
        [
            "message_content",
            "message_idempotency_key",
            "message_phone_number"
        ]
    );
    // The key index still decides repeats.
    let repeat = db
        .execute(
            "INSERT INTO messages (phone_number, content, idempotency_key)
             VALUES ('+905551234567', 'again', 'order-2')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        repeat.as_db_error().unwrap().code(),
        &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
    );
}
