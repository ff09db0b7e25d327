//! Failover between a lane's providers and throttling (docs/design.md#failover,
//! #throttling), against the fakes with paused time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::fakes::*;
use crate::provider::SendOutcome;

fn two_providers(batch_size: u32) -> crate::dispatch::DispatchSettings {
    let mut settings = settings(batch_size, Duration::ZERO);
    settings.providers = vec![route("a"), route("b")];
    settings
}

fn one_at_a_time(
    mut settings: crate::dispatch::DispatchSettings,
) -> crate::dispatch::DispatchSettings {
    settings.send_concurrency = 1;
    settings
}

/// `a` answers every send with a 503, `b` accepts.
fn a_refuses_b_accepts() -> FakeProvider {
    FakeProvider::answering_by_provider(Duration::from_millis(20), |_, _, provider| {
        if provider == "a" {
            failure(false)
        } else {
            accepted()
        }
    })
}

fn failure(unknown: bool) -> SendOutcome {
    SendOutcome::Transient {
        error: if unknown { "timeout" } else { "HTTP 503" }.into(),
        unknown,
    }
}

/// Every provider each key was sent to.
fn providers_by_key(sends: &[(String, Instant, String)]) -> HashMap<String, HashSet<String>> {
    let mut by_key: HashMap<String, HashSet<String>> = HashMap::new();
    for (key, _, provider) in sends {
        by_key
            .entry(key.clone())
            .or_default()
            .insert(provider.clone());
    }
    by_key
}

#[tokio::test(start_paused = true)]
async fn a_failing_provider_opens_its_breaker_and_the_next_one_delivers_everything() {
    let queue = FakeQueue::new(20);
    let rig = Rig::leading(queue.clone(), a_refuses_b_accepts(), two_providers(5));
    rig.run(until(Duration::from_secs(60), || {
        queue.count(Status::Sent) == 20
    }))
    .await;
    let sends = rig.provider.sends();
    let to_a = sends.iter().filter(|(_, _, p)| p == "a").count();
    // Three failures in a row open it; the rest of that batch goes back to the queue
    // and the next claim sends through b. No probe within the 10 s cooldown.
    assert!(to_a <= 3 + 4, "{to_a} sends to the failing provider");
    for id in 1..=20 {
        assert_eq!(queue.row(id).provider.as_deref(), Some("b"), "message {id}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_outcome_is_unknown_is_never_moved_to_another_provider() {
    let queue = FakeQueue::new(12);
    // a times out on its first three sends (unknown: they may have arrived), then
    // answers; b always answers.
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::answering_by_provider(Duration::from_millis(20), |n, _, provider| {
            match provider {
                "a" if n < 3 => failure(true),
                _ => accepted(),
            }
        }),
        two_providers(3),
    );
    rig.run(until(Duration::from_secs(120), || {
        queue.count(Status::Sent) == 12
    }))
    .await;
    let sends = rig.provider.sends();
    let unknown: Vec<&String> = sends.iter().take(3).map(|(key, _, _)| key).collect();
    for (key, providers) in providers_by_key(&sends) {
        assert_eq!(providers.len(), 1, "{key} went to {providers:?}");
        if unknown.contains(&&key) {
            assert!(providers.contains("a"), "{key} must stay with a");
        }
    }
    // The breaker opened on the third timeout: the pinned ones waited for its probe,
    // the others went through b meanwhile.
    assert!(sends.iter().any(|(_, _, p)| p == "b"));
    for id in 1..=3 {
        let row = queue.row(id);
        assert_eq!(row.pinned_provider.as_deref(), Some("a"), "message {id}");
        assert_eq!(row.provider.as_deref(), Some("a"), "message {id}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_throttle_pauses_the_provider_for_its_time_and_the_message_goes_next() {
    let queue = FakeQueue::new(4);
    let rig = Rig::leading(
        queue.clone(),
        FakeProvider::answering(Duration::from_millis(10), |n, _| {
            if n == 1 {
                SendOutcome::Throttled {
                    error: "HTTP 429".into(),
                    retry_after: Some(Duration::from_secs(3)),
                }
            } else {
                accepted()
            }
        }),
        // One send at a time: a send already on the wire when the throttle comes
        // cannot be called back.
        one_at_a_time(settings(1, Duration::ZERO)),
    );
    rig.run(until(Duration::from_secs(30), || {
        queue.count(Status::Sent) == 4
    }))
    .await;
    let sends = rig.provider.sends();
    let keys: Vec<&str> = sends.iter().map(|(key, _, _)| key.as_str()).collect();
    assert_eq!(keys, ["key-1", "key-2", "key-2", "key-3", "key-4"]);
    let paused = sends[2].1 - sends[1].1;
    assert!(
        paused >= Duration::from_secs(3) && paused < Duration::from_secs(4),
        "{paused:?}"
    );
    assert_eq!(
        queue.row(2).attempts,
        1,
        "the throttled send spent no attempt"
    );
}

/// With an interval longer than the cooldown, every claim comes after the cooldown:
/// the first provider is half-open at each one. It gets its probe, one message, and
/// the rest go through the next provider (they would all wait for the probe, batch
/// after batch, and the next provider would never send).
#[tokio::test(start_paused = true)]
async fn a_half_open_provider_gets_only_its_probe_when_claims_are_slower_than_its_cooldown() {
    let queue = FakeQueue::new(12);
    let mut settings = settings(3, Duration::from_secs(20));
    settings.providers = vec![route("a"), route("b")];
    let rig = Rig::leading(queue.clone(), a_refuses_b_accepts(), settings);
    rig.run(until(Duration::from_secs(600), || {
        queue.count(Status::Sent) == 12
    }))
    .await;
    let sends = rig.provider.sends();
    let to_b = sends.iter().filter(|(_, _, p)| p == "b").count();
    let to_a = sends.len() - to_b;
    assert_eq!(to_b, 12, "b delivered every message");
    // Three failures open a; after that, one probe per claim at most.
    let claims_after_open = sends.last().unwrap().1 - sends[0].1;
    let most_probes = claims_after_open.as_secs() / 20 + 1;
    assert!(
        to_a as u64 <= 3 + most_probes,
        "{to_a} sends to a in {claims_after_open:?}"
    );
}
