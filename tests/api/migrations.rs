//! The migration runner: idempotent, safe under concurrency, strict on checksums.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::replica::run_command;
use crate::support::{TestEnv, binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op_and_concurrent_runs_do_not_race() {
    let env = TestEnv::start().await;
    let vars = env.base_env();

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
    let mut replica = env.spawn_replica("r1", &[]);
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
    let (status, output) = run_command(&["seed", "--count", "25"], &env.base_env());
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
    let replica = env.replica("r1", &[]).await;
    let url = replica.url("/health/ready");
    let (status, _) = run_command(&["healthcheck", "--url", &url], &[]);
    assert!(status.success());
    let (status, output) = run_command(
        &["healthcheck", "--url", "http://127.0.0.1:9/health/ready"],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{output}");
}
