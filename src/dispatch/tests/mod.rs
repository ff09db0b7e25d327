//! The dispatch loop against an in-memory queue and a scripted provider, with paused
//! tokio time: terms, batches, the pacer, hand-overs and the rescue wait run in
//! milliseconds, and every time asserted is exact virtual time, never a lucky moment.
//! The invariants are those of docs/design.md ("Fencing", "The pacer", "Rescue",
//! "Provider credentials"); the process-level tests (tests/api) keep the kills, pauses
//! and real servers.

mod failover;
mod fakes;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::domain::Epoch;
use crate::metrics::Metrics;
use crate::provider::SendOutcome;
use fakes::*;

#[tokio::test(start_paused = true)]
async fn every_message_is_sent_once_most_urgent_first_then_in_order() {
    let queue = FakeQueue::new(0);
    for priority in [0, 0, 2, 1, 0, 2] {
        queue.add(priority);
    }
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(30)),
        settings(2, Duration::ZERO),
    );
    rig.run(until(Duration::from_secs(10), || {
        queue.count(Status::Sent) == 6
    }))
    .await;
    let keys = rig.provider.keys();
    let expected: Vec<String> = [3, 6, 4, 1, 2, 5]
        .iter()
        .map(|id| format!("key-{id}"))
        .collect();
    assert_eq!(
        keys, expected,
        "priority first, then creation order, each once"
    );
}

#[tokio::test(start_paused = true)]
async fn no_more_than_batch_size_sends_start_in_any_interval() {
    let queue = FakeQueue::new(20);
    let interval = Duration::from_secs(1);
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(3, interval),
    );
    rig.run(until(Duration::from_secs(60), || {
        queue.count(Status::Sent) == 20
    }))
    .await;
    let starts = rig.provider.starts();
    assert_eq!(starts.len(), 20);
    assert_eq!(most_starts_in_a_window(&starts, interval), 3);
    // And no slower than the rate: 20 messages at 3 per second take 6 intervals.
    assert!(
        starts[19] - starts[0] <= interval * 7,
        "{:?}",
        starts[19] - starts[0]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_claimed_or_sent_without_a_term() {
    let queue = FakeQueue::new(5);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(5, Duration::ZERO),
    );
    rig.run(tokio::time::sleep(Duration::from_secs(30))).await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.0.borrow().claims, 0);
    assert_eq!(queue.count(Status::Pending), 5);
}

#[tokio::test(start_paused = true)]
async fn no_send_starts_before_the_fence_confirms_the_term() {
    let queue = FakeQueue::new(3);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    let term = rig.begin_term(false);
    let began = Instant::now();
    let confirm_after = Duration::from_secs(5);
    rig.run(async {
        tokio::time::sleep(confirm_after).await;
        assert!(
            rig.provider.sends().is_empty(),
            "a send before the confirmation"
        );
        term.confirm_now(Duration::from_secs(3600));
        until(Duration::from_secs(10), || queue.count(Status::Sent) == 3).await;
    })
    .await;
    assert!(
        rig.provider
            .starts()
            .iter()
            .all(|at| *at >= began + confirm_after)
    );
}

#[tokio::test(start_paused = true)]
async fn a_term_that_ends_mid_batch_starts_nothing_more_and_returns_the_rest() {
    let queue = FakeQueue::new(10);
    let mut settings = settings(10, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(100)),
        settings,
    );
    let term = rig.begin_term(true);
    rig.run(async {
        until(Duration::from_secs(10), || rig.provider.sends().len() == 3).await;
        term.end_now();
        until(Duration::from_secs(10), || {
            queue.count(Status::Sending) == 0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    assert_eq!(
        rig.provider.sends().len(),
        3,
        "no send after the term ended"
    );
    assert_eq!(queue.count(Status::Sent), 3);
    assert_eq!(queue.count(Status::Pending), 7);
    for id in 4..=10 {
        assert_eq!(
            queue.row(id).attempts,
            0,
            "{id}: a claim never sent spends nothing"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_rate_holds_across_a_handover() {
    let queue = FakeQueue::new(12);
    let interval = Duration::from_secs(10);
    let first = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(4, interval),
    );
    let term = first.begin_term(true);
    first
        .run(until(Duration::from_secs(5), || {
            queue.count(Status::Sent) == 4
        }))
        .await;
    term.end_now();
    // The next leader takes over at once, with the cluster's rhythm from the fence row
    // but a pacer of its own: neither may let a fifth send into the same interval.
    queue.bump();
    let second = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(4, interval),
    );
    // Without the fence row's rhythm the pacer alone must hold the line.
    queue.0.borrow_mut().last_batch_at = None;
    second.begin_term(true);
    second
        .run(until(Duration::from_secs(60), || {
            queue.count(Status::Sent) == 12
        }))
        .await;
    let mut starts = first.provider.starts();
    starts.extend(second.provider.starts());
    assert_eq!(starts.len(), 12);
    assert_eq!(most_starts_in_a_window(&starts, interval), 4);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_answer_returns_the_message_after_its_backoff() {
    let queue = FakeQueue::new(1);
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::answering(Duration::ZERO, |n, _| {
            if n == 0 {
                SendOutcome::Transient {
                    error: "503".into(),
                    unknown: false,
                }
            } else {
                accepted()
            }
        }),
        settings(1, Duration::ZERO),
    );
    rig.run(until(Duration::from_secs(30), || {
        queue.count(Status::Sent) == 1
    }))
    .await;
    let starts = rig.provider.starts();
    assert_eq!(starts.len(), 2);
    // RETRY_BACKOFF_BASE 1 s, with jitter: between half of it and all of it.
    assert!(
        starts[1] - starts[0] >= Duration::from_millis(500),
        "{:?}",
        starts[1] - starts[0]
    );
    assert_eq!(queue.row(1).attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_message_fails_at_once_and_the_rest_go_on() {
    let queue = FakeQueue::new(3);
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::answering(Duration::ZERO, |_, key| {
            if key == "key-2" {
                SendOutcome::Rejected {
                    error: "400 invalid number".into(),
                }
            } else {
                accepted()
            }
        }),
        settings(3, Duration::ZERO),
    );
    rig.run(async {
        until(Duration::from_secs(10), || queue.count(Status::Sent) == 2).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    assert_eq!(queue.row(2).status, Status::Failed);
    assert_eq!(
        rig.provider.sends().len(),
        3,
        "a rejected message is not retried"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_credentials_pause_and_probe_once_per_interval_without_spending_attempts() {
    let queue = FakeQueue::new(4);
    let refusals = 3;
    // One send at a time, so that no send is in flight when the first refusal comes.
    let mut settings = settings(4, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::answering(Duration::from_millis(10), move |n, _| {
            if n < refusals {
                SendOutcome::Unauthorized {
                    error: "401".into(),
                }
            } else {
                accepted()
            }
        }),
        settings,
    );
    rig.run(until(Duration::from_secs(120), || {
        queue.count(Status::Sent) == 4
    }))
    .await;
    let starts = rig.provider.starts();
    // The first refusal pauses; then one probe per probe interval until one is taken.
    for pair in starts[..=refusals].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(5),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    assert_eq!(
        queue.0.borrow().paused,
        None,
        "the accepted probe lifts the pause"
    );
    let attempts: i32 = (1..=4).map(|id| queue.row(id).attempts).sum();
    assert_eq!(attempts, 4, "refusals spend no attempt");
}

#[tokio::test(start_paused = true)]
async fn an_older_terms_claims_are_rescued_only_after_the_rescue_wait() {
    let queue = FakeQueue::new(2);
    // A dead leader of epoch 1 claimed both; the cache knows it delivered the second.
    for id in [1, 2] {
        queue.with_row(id, |row| {
            row.status = Status::Sending;
            row.claim_epoch = Some(Epoch(1));
            row.claim_token = Some(7);
            row.attempts = 1;
        });
    }
    queue.0.borrow_mut().delivered.insert(2);
    queue.bump();
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(2, Duration::ZERO),
    );
    let began = Instant::now();
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(30), || {
        queue.count(Status::Sent) == 2
    }))
    .await;
    let sends = rig.provider.sends();
    assert_eq!(
        sends.len(),
        1,
        "the delivered one is recorded, not sent again"
    );
    assert_eq!(sends[0].0, "key-1");
    let wait = rig.settings.rescue.wait;
    assert!(sends[0].1 >= began + wait, "rescued too early");
    let asks = queue.0.borrow().rescue_asks.clone();
    assert!(!asks.is_empty());
    assert!(
        asks.iter().all(|at| *at >= began + wait),
        "asked before the rescue wait"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_past_its_expiry_is_never_sent() {
    let queue = FakeQueue::new(2);
    queue.with_row(1, |row| {
        row.expires_at = Some(Utc::now() - chrono::TimeDelta::seconds(1))
    });
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(2, Duration::ZERO),
    );
    rig.run(until(Duration::from_secs(10), || {
        queue.count(Status::Sent) == 1
    }))
    .await;
    assert_eq!(queue.row(1).status, Status::Expired);
    assert_eq!(rig.provider.keys(), vec!["key-2".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn claims_failing_past_resign_after_end_the_term() {
    let queue = FakeQueue::new(1);
    queue.0.borrow_mut().claims_fail = true;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(1, Duration::ZERO),
    );
    let term = rig.begin_term(true);
    let began = Instant::now();
    let resign_after = rig.settings.fence.resign_after;
    rig.run(until(Duration::from_secs(30), || !term.is_valid()))
        .await;
    // The resignation comes at the first failed claim past resign_after, one poll
    // later at most.
    let ended = Instant::now();
    assert!(
        ended >= began + resign_after,
        "resigned early: {:?}",
        ended - began
    );
    assert!(
        ended <= began + resign_after + rig.settings.poll * 2,
        "resigned late: {:?}",
        ended - began
    );
    assert!(rig.leadership.current().is_none());
    assert!(rig.provider.sends().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_newer_epoch_in_the_fence_row_ends_the_term_before_any_send() {
    let queue = FakeQueue::new(3);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    let term = rig.begin_term(true);
    queue.bump();
    rig.run(until(Duration::from_secs(10), || !term.is_valid()))
        .await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.count(Status::Pending), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_cluster_claims_and_sends_nothing() {
    let queue = FakeQueue::new(3);
    queue.0.borrow_mut().running = false;
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    rig.run(tokio::time::sleep(Duration::from_secs(30))).await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.count(Status::Pending), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_out_in_flight_sends_for_the_shutdown_timeout_only() {
    let queue = FakeQueue::new(2);
    let mut settings = settings(2, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::accepting(Duration::from_secs(3600)),
        settings,
    );
    let (asked, stopped) = rig
        .run(async {
            until(Duration::from_secs(10), || rig.provider.sends().len() == 1).await;
            Instant::now()
        })
        .await;
    let took = stopped - asked;
    let bound = rig.settings.shutdown_timeout + batch::CLEANUP_GRACE;
    assert!(took >= rig.settings.shutdown_timeout, "{took:?}");
    assert!(took <= bound, "{took:?} > {bound:?}");
    // The abandoned send's outcome is unknown: its row stays `sending` for the
    // rescue (same key); the one never sent went back to pending.
    assert_eq!(queue.row(1).status, Status::Sending);
    assert_eq!(queue.row(2).status, Status::Pending);
    assert_eq!(queue.row(2).attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn sends_overlap_batches_but_never_exceed_send_concurrency() {
    let queue = FakeQueue::new(40);
    let mut settings = settings(8, Duration::ZERO);
    settings.send_concurrency = 3;
    let in_flight = Arc::new(Mutex::new((0usize, 0usize)));
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings,
    );
    // Latency varies per message so that batches' tails overlap the next batch.
    let counting = CountingProvider {
        inner: Arc::clone(&rig.provider),
        in_flight: Arc::clone(&in_flight),
    };
    let dispatcher = Dispatcher {
        backend: queue.clone(),
        provider: Arc::new(counting),
        leadership: Arc::clone(&rig.leadership),
        metrics: Arc::new(Metrics::new()),
        settings: rig.settings.clone(),
        wake: Arc::default(),
        pacer: Pacer::default(),
        recorder: Recorder::new(queue.clone()),
        pause: PauseState::default(),
        recipients: Default::default(),
        routing: Routing::new(&rig.settings.providers, rig.settings.retry.max),
    };
    rig.begin_term(true);
    let shutdown = CancellationToken::new();
    tokio::join!(dispatcher.run(shutdown.clone()), async {
        until(Duration::from_secs(60), || queue.count(Status::Sent) == 40).await;
        shutdown.cancel();
    });
    let (_, most) = *in_flight.lock().unwrap();
    assert_eq!(most, 3, "the slots are shared across batches and all used");
}
