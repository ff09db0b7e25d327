//! Several replicas against one environment, and the checks every cluster test makes
//! on what the provider received.

use std::time::{Duration, Instant};

use super::provider::Delivery;
use super::{Replica, ReplicaSettings, TestEnv, wait_for};

pub struct Cluster {
    pub replicas: Vec<Replica>,
}

impl Cluster {
    /// Starts `n` replicas (`r1`, `r2`, …) with the same settings and waits for all.
    pub async fn start(env: &TestEnv, n: usize, settings: &ReplicaSettings) -> Self {
        let replicas: Vec<Replica> = (1..=n)
            .map(|i| env.spawn_replica(&format!("r{i}"), settings))
            .collect();
        for replica in &replicas {
            replica.wait_ready().await;
        }
        Self { replicas }
    }

    /// Indexes of the replicas that say they lead right now (paused ones are skipped
    /// by the caller's choice of `among`).
    pub async fn leaders_among(&self, among: &[usize]) -> Vec<usize> {
        let mut leaders = Vec::new();
        for &i in among {
            if self.replicas[i].is_leader().await {
                leaders.push(i);
            }
        }
        leaders
    }

    pub fn all(&self) -> Vec<usize> {
        (0..self.replicas.len()).collect()
    }

    /// Waits until exactly one of `among` leads; returns it and how long that took.
    pub async fn wait_single_leader(
        &self,
        among: &[usize],
        timeout: Duration,
    ) -> (usize, Duration) {
        let started = Instant::now();
        let leader = wait_for("exactly one leader", timeout, || async {
            let leaders = self.leaders_among(among).await;
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await;
        (leader, started.elapsed())
    }
}

/// The provider saw each of `ids` exactly once (as a key, and each key once).
pub fn assert_each_once(deliveries: &[Delivery], ids: &[i64]) {
    let mut keys: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    keys.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(keys, expected, "every message delivered, none extra");
    let repeated: Vec<&Delivery> = deliveries.iter().filter(|d| d.times_seen != 1).collect();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
}

/// First deliveries in id order (FIFO across leaders).
pub fn assert_fifo(deliveries: &[Delivery]) {
    let mut by_time = deliveries.to_vec();
    by_time.sort_by_key(|d| d.first_seen_us);
    let keys: Vec<i64> = by_time.iter().map(|d| d.id).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "first deliveries follow creation order");
}

/// No window of `interval − slack` holds more than `batch_size` first deliveries.
/// The slack absorbs the claim-to-send delay of a batch's messages; it is far smaller
/// than an interval, so a leader that fired an extra batch would still be caught.
pub fn assert_rate(
    deliveries: &[Delivery],
    batch_size: usize,
    interval: Duration,
    slack: Duration,
) {
    let mut times: Vec<i64> = deliveries.iter().map(|d| d.first_seen_us).collect();
    times.sort();
    let window = (interval.saturating_sub(slack)).as_micros() as i64;
    for (i, pair) in times.windows(batch_size + 1).enumerate() {
        let span = pair[batch_size] - pair[0];
        assert!(
            span >= window,
            "{} deliveries within {span}us starting at delivery {i}; at most {batch_size} per {interval:?}",
            batch_size + 1
        );
    }
}
