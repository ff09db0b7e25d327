//! PostgreSQL high availability: a synchronous streaming standby promoted after its
//! primary dies. The replicas name both servers in `DATABASE_URL` with
//! `target_session_attrs=read-write`, reconnect to the new primary, and every message
//! the API acknowledged is sent, once.

use std::time::{Duration, Instant};

use crate::support::cluster::assert_each_once;
use crate::support::postgres::Postgres;
use crate::support::{ReplicaSettings, TestEnv, http, wait_for};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_synchronous_standby_takes_over_and_nothing_acknowledged_is_lost() {
    let mut env = TestEnv::start().await;
    // The primary's commits wait for the standby (the harness turns that off by
    // default); the standby is named after basebackup, so it does not inherit it.
    env.pg = Postgres::start_with(&["synchronous_commit=on"]).await;
    let standby = Postgres::standby_of(&env.pg, "standby1").await;
    let admin = env.pg.admin().await;
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        admin
            .batch_execute(statement)
            .await
            .expect("make the standby synchronous");
    }
    wait_for(
        "the standby to replicate synchronously",
        TEST_TIMEOUT,
        || async {
            let row = env
                .pg
                .admin()
                .await
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication
                 WHERE application_name = 'standby1' AND sync_state = 'sync'",
                    &[],
                )
                .await
                .ok()?;
            row.map(|_| ())
        },
    )
    .await;

    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/dispatcher?target_session_attrs=read-write",
        env.pg.port, standby.port
    );
    let settings = ReplicaSettings::fast()
        .database_url(url)
        .batch_size(5)
        .processing_interval(Duration::from_millis(100));
    let replicas = [
        env.replica("a", &settings).await,
        env.replica("b", &settings).await,
    ];
    let contents: Vec<String> = (0..40).map(|i| format!("before {i}")).collect();
    let contents: Vec<&str> = contents.iter().map(String::as_str).collect();
    let mut ids = env.create_messages(&replicas[0], &contents).await;
    wait_for("some messages to be sent", TEST_TIMEOUT, || async {
        (env.mock().stats().await.unique_keys >= 10).then_some(())
    })
    .await;

    // The primary's machine dies; the standby is promoted.
    env.pg.kill();
    standby.promote().await;
    let promoted = Instant::now();
    let dead = std::mem::replace(&mut env.pg, standby);
    drop(dead);

    // Through the API again, as soon as it takes messages.
    let after: Vec<String> = (0..20).map(|i| format!("after {i}")).collect();
    let created = wait_for("the API to take messages again", TEST_TIMEOUT, || async {
        let body: Vec<serde_json::Value> = after
            .iter()
            .enumerate()
            .map(|(i, c)| serde_json::json!({"phone_number": format!("+9055510{i:05}"), "content": c}))
            .collect();
        let response = http()
            .post(replicas[1].url("/api/messages"))
            .json(&body)
            .send()
            .await
            .ok()?;
        if response.status() != 201 {
            return None;
        }
        let created: Vec<serde_json::Value> = response.json().await.ok()?;
        Some(created.iter().filter_map(|m| m["id"].as_i64()).collect::<Vec<_>>())
    })
    .await;
    ids.extend(created);
    env.wait_drained(TEST_TIMEOUT).await;
    eprintln!(
        "every acknowledged message sent {:.1} s after the promotion",
        promoted.elapsed().as_secs_f64()
    );
    assert_each_once(&env.deliveries().await, &ids);
    assert_eq!(env.count("sent").await, ids.len() as i64);
}
