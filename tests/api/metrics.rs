//! `/metrics` is valid Prometheus text (checked by promtool) and its counters move.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::replica::metric_value;
use crate::support::{ReplicaSettings, TestEnv, ms, wait_for};

fn promtool_check(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_counters_move() {
    let env = TestEnv::start().await;
    let replica = env
        .replica(
            "r1",
            &ReplicaSettings::fast()
                .batch_size(5)
                .processing_interval(ms(200)),
        )
        .await;
    let before = replica.metrics().await;
    promtool_check(&before);
    assert_eq!(
        metric_value(&before, r#"dispatcher_messages_sent_total{lane="default"}"#),
        Some(0.0)
    );
    for name in [
        "dispatcher_messages_failed_total{reason=\"rejected\"}",
        "dispatcher_messages_retried_total",
        "dispatcher_messages_rescued_total",
        "dispatcher_batch_duration_seconds_count",
        "dispatcher_provider_request_duration_seconds_count",
        "dispatcher_oldest_pending_message_age_seconds",
        r#"dispatcher_is_leader{lane="default"}"#,
        r#"dispatcher_leader_epoch{lane="default"}"#,
        "dispatcher_lock_operations_total{op=\"acquire\",result=\"ok\"}",
        "dispatcher_leadership_changes_total",
        "dispatcher_fencing_rejections_total",
        "dispatcher_scheduler_running",
        "dispatcher_dependency_up{dependency=\"database\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(
            metric_value(&before, name).is_some(),
            "{name} missing from /metrics"
        );
    }
    assert!(
        before.contains("dispatcher_build_info{commit="),
        "build_info present"
    );

    env.create_messages(&replica, &["m1", "m2", "m3", "m4", "m5", "m6", "m7"])
        .await;
    env.wait_drained(Duration::from_secs(30)).await;
    // The counters move right after the rows are recorded and the batch closes, so
    // they may trail the drain by a moment.
    let after = wait_for(
        "7 sends and the batches counted",
        Duration::from_secs(10),
        || async {
            let text = replica.metrics().await;
            let sent = metric_value(&text, r#"dispatcher_messages_sent_total{lane="default"}"#);
            let batches = metric_value(
                &text,
                r#"dispatcher_batches_total{lane="default",outcome="complete"}"#,
            );
            (sent == Some(7.0) && batches >= Some(2.0)).then_some(text)
        },
    )
    .await;
    promtool_check(&after);
    // BATCH_SIZE 5 every 200ms.
    assert_eq!(
        metric_value(
            &after,
            r#"dispatcher_configured_rate_per_second{lane="default"}"#
        ),
        Some(25.0)
    );
    assert_eq!(
        metric_value(&after, r#"dispatcher_messages_sent_total{lane="default"}"#),
        Some(7.0)
    );
    assert_eq!(
        metric_value(
            &after,
            "dispatcher_provider_requests_total{code=\"202\",provider=\"default\"}"
        ),
        Some(7.0)
    );
    assert!(
        metric_value(
            &after,
            r#"dispatcher_batches_total{lane="default",outcome="complete"}"#
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        metric_value(&after, "dispatcher_provider_request_duration_seconds_count"),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&after, "dispatcher_queue_messages{status=\"sent\"}"),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&after, "dispatcher_queue_messages{status=\"pending\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&after, r#"dispatcher_is_leader{lane="default"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&after, "dispatcher_dependency_up{dependency=\"redis\"}"),
        Some(1.0)
    );
    assert!(!after.contains("905550"), "no phone numbers in metrics");
}
