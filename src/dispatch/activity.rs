//! The console chart's data: what this replica's dispatcher did each second (sent,
//! failed, retried), written to PostgreSQL so every replica's page shows the same
//! cluster-wide history, across page loads and leader changes.
//!
//! Nothing is added to the send path: once a second this task reads the Prometheus
//! counters the dispatcher keeps anyway and writes what they gained since the last
//! successful write, in one upsert, and only when they gained something. A follower's
//! counters do not move, so it writes nothing. A write that fails is not lost: the
//! gain stays pending and goes into the next second that can be written.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::{FAILED_MAX_ATTEMPTS, FAILED_REJECTED, Metrics};
use crate::store::Store;
use crate::store::activity::Tally;

/// The chart's resolution.
const EVERY: Duration = Duration::from_secs(1);

/// The counters' totals so far in this process.
fn totals(metrics: &Metrics) -> Tally {
    let failed: u64 = [FAILED_REJECTED, FAILED_MAX_ATTEMPTS]
        .iter()
        .map(|reason| metrics.messages_failed.with_label_values(&[reason]).get())
        .sum();
    Tally {
        sent: metrics.messages_sent_total() as i64,
        failed: failed as i64,
        retried: metrics.messages_retried.get() as i64,
    }
}

fn gained(now: Tally, before: Tally) -> Tally {
    Tally {
        sent: now.sent - before.sent,
        failed: now.failed - before.failed,
        retried: now.retried - before.retried,
    }
}

/// Writes the counters' gains every second until `stop`, then once more so the
/// last second of a stopping leader is kept.
pub async fn record(store: Store, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut written = totals(&metrics);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            () = stop.cancelled() => true,
        };
        let now = totals(&metrics);
        let gain = gained(now, written);
        if !gain.is_empty() {
            match store.add_activity(gain).await {
                Ok(()) => written = now,
                Err(err) => tracing::debug!(error = %err, "activity not recorded yet"),
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gains_are_what_the_counters_added() {
        let metrics = Metrics::new();
        let before = totals(&metrics);
        metrics
            .messages_sent
            .with_label_values(&["default"])
            .inc_by(3);
        metrics
            .messages_failed
            .with_label_values(&[FAILED_REJECTED])
            .inc();
        metrics
            .messages_failed
            .with_label_values(&[FAILED_MAX_ATTEMPTS])
            .inc_by(2);
        metrics.messages_retried.inc();
        let gain = gained(totals(&metrics), before);
        assert_eq!(
            gain,
            Tally {
                sent: 3,
                failed: 3,
                retried: 1
            }
        );
        assert!(gained(totals(&metrics), totals(&metrics)).is_empty());
    }
}
