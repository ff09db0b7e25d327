//! Retention: finished messages are removed after `MESSAGE_RETENTION`, and their text
//! after `CONTENT_RETENTION`, so the table and what it keeps about people stay bounded
//! (docs/design.md#retention).
//!
//! Every replica runs this loop; the store's advisory lock lets one step run at a time
//! in the cluster. A pass walks each finished status in id order, one small step at a time with
//! a pause between steps, and remembers where the rows stopped being old enough, so
//! the next pass starts there instead of reading again what it has already done. Once
//! every [`FULL_PASS_EVERY`] a pass starts from the beginning: a message whose id is
//! old but that finished late (scheduled far ahead, retried by hand) is found then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::domain::MessageStatus;
use crate::metrics::{Metrics, RETENTION_CONTENT_REMOVED, RETENTION_REMOVED};
use crate::store::Store;
use crate::store::retention::{FINISHED, Sweep};

/// Rows one step reads: a step holds the locks of at most this many finished rows, for
/// a few milliseconds.
const STEP_ROWS: i64 = 500;

/// The pause between two steps, so a long backlog (the first pass on a big table) is
/// worked off at a pace the database hardly notices: at most 500 rows per 20 ms.
const STEP_PAUSE: Duration = Duration::from_millis(20);

/// How often a pass starts from the first id instead of where the last one stopped.
const FULL_PASS_EVERY: Duration = Duration::from_secs(6 * 3600);

/// The time between passes: a quarter of the shortest period, between 1 s and a minute.
fn pass_interval(config: RetentionConfig) -> Duration {
    [config.messages, config.content]
        .into_iter()
        .flatten()
        .min()
        .map_or(Duration::from_secs(60), |period| {
            (period / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
        })
}

/// What one pass found to do per sweep, for the log.
#[derive(Debug, Default)]
struct PassTally {
    removed: u64,
    blanked: u64,
}

/// Runs passes until `shutdown`; returns at once when retention keeps everything.
/// `ready` says whether the schema is migrated yet.
pub async fn run(
    store: Store,
    config: RetentionConfig,
    metrics: Arc<Metrics>,
    ready: impl Fn() -> bool,
    shutdown: CancellationToken,
) {
    let sweeps: Vec<(Sweep, Duration)> = [
        (Sweep::Remove, config.messages),
        (Sweep::BlankContent, config.content),
    ]
    .into_iter()
    .filter_map(|(sweep, period)| Some((sweep, period?)))
    .collect();
    if sweeps.is_empty() {
        return;
    }
    let every = pass_interval(config);
    let mut resume: HashMap<(Sweep, MessageStatus), i64> = HashMap::new();
    let mut last_full = Instant::now();
    // The first pass as soon as the schema is ready, then one every `every`.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if !ready() {
            wait = Duration::from_secs(1);
            continue;
        }
        wait = every;
        if last_full.elapsed() >= FULL_PASS_EVERY {
            resume.clear();
            last_full = Instant::now();
        }
        let mut tally = PassTally::default();
        for &(sweep, period) in &sweeps {
            for status in FINISHED {
                let from = resume.get(&(sweep, status)).copied().unwrap_or(0);
                match walk(&store, sweep, status, from, period, &shutdown).await {
                    Ok(Walk { changed, resume_at }) => {
                        resume.insert((sweep, status), resume_at);
                        let (action, total) = match sweep {
                            Sweep::Remove => (RETENTION_REMOVED, &mut tally.removed),
                            Sweep::BlankContent => (RETENTION_CONTENT_REMOVED, &mut tally.blanked),
                        };
                        metrics
                            .retention_rows
                            .with_label_values(&[action])
                            .inc_by(changed);
                        *total += changed;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, status = status.as_str(), "retention step failed; the next pass tries again");
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
        }
        if tally.removed + tally.blanked > 0 {
            tracing::info!(
                removed = tally.removed,
                content_removed = tally.blanked,
                "retention pass: finished messages removed, texts removed"
            );
        }
    }
}

/// Where one status's walk got to.
struct Walk {
    changed: u64,
    /// Where the next pass starts: just before the first row that was not old enough.
    resume_at: i64,
}

/// Steps through `status` from `from` until no later row can be old enough, another
/// replica holds the lock, or the replica stops.
async fn walk(
    store: &Store,
    sweep: Sweep,
    status: MessageStatus,
    from: i64,
    period: Duration,
    shutdown: &CancellationToken,
) -> Result<Walk, crate::store::StoreError> {
    let mut after = from;
    let mut changed = 0;
    let mut resume_at = None;
    loop {
        let Some(step) = store
            .sweep_step(sweep, status, after, period, STEP_ROWS)
            .await?
        else {
            // Another replica is at work: it keeps its own place.
            return Ok(Walk {
                changed,
                resume_at: from,
            });
        };
        changed += step.changed;
        if resume_at.is_none() {
            resume_at = step.first_kept.map(|id| id - 1);
        }
        after = step.last_id;
        if step.done || shutdown.is_cancelled() {
            return Ok(Walk {
                changed,
                resume_at: resume_at.unwrap_or(after),
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(STEP_PAUSE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_come_at_a_quarter_of_the_shortest_period_within_bounds() {
        let days = |n: u64| Some(Duration::from_secs(n * 86_400));
        let every = |messages, content| pass_interval(RetentionConfig { messages, content });
        assert_eq!(every(days(30), None), Duration::from_secs(60));
        assert_eq!(
            every(days(30), Some(Duration::from_secs(120))),
            Duration::from_secs(30)
        );
        assert_eq!(
            every(Some(Duration::from_secs(2)), None),
            Duration::from_secs(1)
        );
        assert_eq!(every(None, None), Duration::from_secs(60));
    }
}
