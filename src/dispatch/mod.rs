//! The dispatcher (SPEC §6 steps 4–10): while this replica leads, claim a batch when
//! the cluster's schedule says so, send it, record every result.

mod batch;
mod pacer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::DeliveryCache;
use crate::leadership::{Leadership, Term};
use crate::metrics::Metrics;
use crate::provider::ProviderClient;
use crate::retry::RetryPolicy;
use crate::store::Store;
use crate::store::queue::{Claim, RescuePolicy, Schedule};
pub use pacer::Pacer;

/// Settings of the dispatch loop, fixed at start (runtime overrides of batch size and
/// interval live in PostgreSQL and come back with every claim).
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub replica_id: String,
    pub configured: Schedule,
    pub rescue: RescuePolicy,
    pub retry: RetryPolicy,
    pub max_attempts: u32,
    pub send_concurrency: usize,
    pub shutdown_timeout: Duration,
    /// How often a leader re-reads the desired state while idle or stopped.
    pub poll: Duration,
}

pub struct Dispatcher {
    pub store: Store,
    pub provider: Arc<ProviderClient>,
    pub cache: DeliveryCache,
    pub leadership: Arc<Leadership>,
    pub metrics: Arc<Metrics>,
    pub settings: DispatchSettings,
    /// Poked by the API (new messages, start, config change) to skip the idle wait.
    pub wake: Arc<Notify>,
    pub pacer: Pacer,
}

impl Dispatcher {
    /// Runs until `shutdown`; an in-flight batch gets `SHUTDOWN_TIMEOUT` to finish
    /// and its unsent claims go back to pending before this returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut terms = self.leadership.subscribe();
        let mut db_ok = true;
        while !shutdown.is_cancelled() {
            let Some(term) = self.leadership.current() else {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = terms.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(self.settings.poll) => {}
                }
                continue;
            };
            let wait = self.step(&term, &shutdown, &mut db_ok).await;
            if !wait.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    () = self.wake.notified() => {}
                    changed = terms.changed() => if changed.is_err() { break },
                }
            }
        }
        tracing::info!("dispatcher stopped");
    }

    /// One claim attempt and, if it yields a batch, the batch. Returns how long to
    /// wait before the next attempt.
    async fn step(&self, term: &Term, shutdown: &CancellationToken, db_ok: &mut bool) -> Duration {
        let settings = &self.settings;
        let result = self
            .store
            .claim_batch(
                term.epoch,
                &settings.replica_id,
                settings.configured,
                settings.rescue,
            )
            .await;
        let result = match result {
            Ok(result) => {
                if !*db_ok {
                    tracing::info!("PostgreSQL answers again; dispatch resumes");
                    *db_ok = true;
                }
                result
            }
            Err(err) => {
                if *db_ok {
                    tracing::warn!(error = %err, "cannot claim; will retry");
                    *db_ok = false;
                }
                return settings.poll;
            }
        };
        if result.rescued > 0 {
            tracing::warn!(
                count = result.rescued,
                "rescued claims of a previous leader"
            );
            self.metrics.messages_rescued.inc_by(result.rescued);
        }
        self.metrics
            .scheduler_running
            .set(i64::from(!matches!(result.claim, Claim::Stopped)));
        match result.claim {
            Claim::Batch(messages) => {
                self.run_batch(term, result.schedule, messages, shutdown)
                    .await;
                // Back to back when the interval is 0; otherwise the next claim
                // learns how long to wait.
                Duration::ZERO
            }
            Claim::NotDue(wait) => wait.min(settings.poll),
            Claim::Stopped => settings.poll,
            Claim::Empty => settings
                .poll
                .min(result.schedule.interval.max(Duration::from_millis(50))),
            Claim::Fenced(newer) => {
                self.leadership.report_fenced(term, newer);
                Duration::ZERO
            }
        }
    }
}
