//! The dispatcher (SPEC §6 steps 4–10): while this replica leads, claim a batch when
//! the cluster's schedule says so, send it, record every result.

pub mod activity;
mod batch;
mod pacer;
mod recorder;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::DeliveryCache;
use crate::domain::Epoch;
use crate::leadership::{FenceTiming, Leadership, Term};
use crate::metrics::{FAILED_MAX_ATTEMPTS, Metrics};
use crate::provider::ProviderClient;
use crate::retry::RetryPolicy;
use crate::store::queue::{Claim, RescuePolicy, Schedule};
use crate::store::{Store, StoreError};
pub use pacer::Pacer;
pub use recorder::Recorder;

/// How often the leader looks for abandoned claims once its term is old enough.
const RESCUE_EVERY: Duration = Duration::from_secs(1);

/// Settings of the dispatch loop, fixed at start (runtime overrides of batch size and
/// interval live in PostgreSQL and come back with every claim).
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub replica_id: String,
    pub configured: Schedule,
    pub rescue: RescuePolicy,
    pub fence: FenceTiming,
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
    /// Records accepted sends in groups, behind the sends.
    pub recorder: Recorder,
}

/// The rest of a batch whose sends are all done: its last results being recorded,
/// its unsent claims released, its close.
type Settling<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// What the dispatch loop remembers between claims.
struct LoopState<'a> {
    /// The previous batch, finishing (its last sends, then its results) while the
    /// next one is claimed and starts; at most one, see `batch::Handoff`.
    settling: Option<Settling<'a>>,
    /// Completes when the sends of the newest batch are all done.
    previous_sends_done: oneshot::Receiver<()>,
    /// The term the fields below belong to.
    epoch: Option<Epoch>,
    /// Since when claims have failed in this term (PostgreSQL unreachable, pool
    /// starved): past `FenceTiming::resign_after` the leader resigns.
    claims_failing_since: Option<Instant>,
    /// When to look for abandoned claims next.
    next_rescue: Instant,
    /// A claim whose outcome is unknown (its COMMIT reply was lost): its epoch and
    /// token, so its rows can be returned before the next claim.
    in_doubt: Option<(Epoch, i64)>,
    db_ok: bool,
}

impl LoopState<'_> {
    /// Waits for the previous batch to settle, if one is settling.
    async fn finish_settling(&mut self) {
        if let Some(settling) = self.settling.take() {
            settling.await;
        }
    }
}

impl Dispatcher {
    /// Runs the dispatcher on a thread of its own, on a single-threaded runtime, until
    /// `shutdown`. The returned receiver completes (with an error: its sender is
    /// dropped) once the dispatcher has stopped, with every result recorded.
    ///
    /// Why a thread of its own: a send is a chain of wake-ups (the request, hyper's
    /// connection task, the answer, the result handed to the recorder, the next send).
    /// On the shared multi-threaded runtime those hop between worker threads, and each
    /// hop is a futex wake and a context switch: at `SEND_CONCURRENCY` 1 that was a
    /// third of the replica's CPU per message and set the delivery rate. On one thread
    /// the chain stays put. The API, the elector, and the PostgreSQL and Redis
    /// connections stay on the main runtime; the provider's connections are opened
    /// here, so they live here.
    pub fn spawn(self, shutdown: CancellationToken) -> std::io::Result<oneshot::Receiver<()>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let span = tracing::Span::current();
        let (stopped, on_stop) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || {
                runtime.block_on(self.run(shutdown).instrument(span));
                drop(stopped);
            })?;
        Ok(on_stop)
    }

    /// Runs until `shutdown`; an in-flight batch gets `SHUTDOWN_TIMEOUT` to finish
    /// and its unsent claims go back to pending before this returns.
    pub async fn run(self, shutdown: CancellationToken) {
        self.recorder.start();
        let mut terms = self.leadership.subscribe();
        let mut state = LoopState {
            settling: None,
            previous_sends_done: oneshot::channel().1,
            epoch: None,
            claims_failing_since: None,
            next_rescue: Instant::now(),
            in_doubt: None,
            db_ok: true,
        };
        while !shutdown.is_cancelled() {
            let Some(term) = self.leadership.current() else {
                state.finish_settling().await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = terms.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(self.settings.poll) => {}
                }
                continue;
            };
            if state.epoch != Some(term.epoch) {
                state.epoch = Some(term.epoch);
                state.claims_failing_since = None;
                // Before the rescue wait, no older epoch's row may be touched; the
                // query would find nothing.
                state.next_rescue = term.began + self.settings.rescue.wait;
            }
            let wait = self.step(&term, &shutdown, &mut state).await;
            if !wait.is_zero() {
                debug_assert!(state.settling.is_none(), "a wait follows no batch");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    () = self.wake.notified() => {}
                    changed = terms.changed() => if changed.is_err() { break },
                }
            }
        }
        state.finish_settling().await;
        tracing::info!("dispatcher stopped");
    }

    /// One claim attempt and, if it yields a batch, the first half of that batch's
    /// sends, while the previous batch (if any) finishes. Returns how long to wait
    /// before the next attempt; zero after a batch, whose second half is then left
    /// in `state` to run beside the next claim (see `batch::Handoff` for why).
    ///
    /// The overlap is safe: the next claim takes only `pending` rows; its sends wait
    /// for the previous batch's (delivery order, `SEND_CONCURRENCY`); every send
    /// still asks the term for a permit and the pacer for a start; and a close that
    /// comes after a newer batch opened leaves that batch open (`CLOSE_BATCH`).
    async fn step<'a>(
        &'a self,
        term: &Term,
        shutdown: &'a CancellationToken,
        state: &mut LoopState<'a>,
    ) -> Duration {
        let mut previous = state.settling.take();
        if Instant::now() >= state.next_rescue {
            // The rescue returns our own epoch's claims once they are as old as the
            // rescue wait. A long batch's rows can be that old while their results
            // are still being recorded: the rescue must not see them (it would put
            // them back to pending, and they would be sent again).
            if let Some(previous) = previous.take() {
                previous.await;
            }
        }
        let settle_previous = async {
            if let Some(previous) = previous {
                previous.await;
            }
        };
        // The wait counts from the claim, not from when the previous batch is done.
        let next_attempt = async {
            let wait = self.claim_and_send(term, shutdown, state).await;
            Instant::now() + wait
        };
        let (next_attempt, ()) = tokio::join!(next_attempt, settle_previous);
        next_attempt.saturating_duration_since(Instant::now())
    }

    /// One claim attempt and, if it yields a batch, its sends; the batch's settling
    /// goes to `state`. Returns how long to wait before the next attempt.
    async fn claim_and_send<'a>(
        &'a self,
        term: &Term,
        shutdown: &'a CancellationToken,
        state: &mut LoopState<'a>,
    ) -> Duration {
        let settings = &self.settings;
        match self.claim_and_rescue(term, state).await {
            Ok(Some(result)) => {
                if !state.db_ok {
                    tracing::info!("PostgreSQL answers again; dispatch resumes");
                    state.db_ok = true;
                }
                state.claims_failing_since = None;
                self.metrics
                    .scheduler_running
                    .set(i64::from(!matches!(result.claim, Claim::Stopped)));
                match result.claim {
                    Claim::Batch(batch) => {
                        let (claim_next, on_claim_next) = oneshot::channel();
                        let (sends_done, on_sends_done) = oneshot::channel();
                        let handoff = batch::Handoff {
                            previous_sends_done: std::mem::replace(
                                &mut state.previous_sends_done,
                                on_sends_done,
                            ),
                            claim_next,
                            sends_done,
                        };
                        let term = term.clone();
                        let schedule = result.schedule;
                        let mut run: Settling<'a> = Box::pin(async move {
                            self.run_batch(&term, schedule, batch, shutdown, handoff)
                                .await;
                        });
                        tokio::select! {
                            biased;
                            () = &mut run => {}
                            // Dropped unsent only when the batch ends before half its
                            // sends start (shutdown, leadership lost): `run` ends soon.
                            _ = on_claim_next => state.settling = Some(run),
                        }
                        // Back to back when the interval is 0; otherwise the next
                        // claim learns how long to wait.
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
            Ok(None) => settings.poll,
            Err(err) => {
                if state.db_ok {
                    tracing::warn!(error = %err, "cannot claim; will retry");
                    state.db_ok = false;
                }
                let since = *state.claims_failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= settings.fence.resign_after {
                    self.leadership.report_database_lost(term, since.elapsed());
                }
                settings.poll
            }
        }
    }

    /// Settles a claim left in doubt, rescues abandoned claims when due, then claims.
    /// `Ok(None)`: the term ended before the claim.
    async fn claim_and_rescue(
        &self,
        term: &Term,
        state: &mut LoopState<'_>,
    ) -> Result<Option<crate::store::queue::ClaimResult>, StoreError> {
        if let Some((epoch, token)) = state.in_doubt {
            let released = self.store.release_claim(epoch, token).await?;
            if released > 0 {
                tracing::warn!(
                    released,
                    "returned the rows of a claim whose answer was lost to pending"
                );
            }
            state.in_doubt = None;
        }
        if Instant::now() >= state.next_rescue {
            self.rescue(term).await?;
            state.next_rescue = Instant::now() + RESCUE_EVERY;
        }
        if !term.is_valid() {
            return Ok(None);
        }
        let token = rand::random::<i64>();
        let claim = self
            .store
            .claim_batch(
                term.epoch,
                &self.settings.replica_id,
                self.settings.configured,
                self.settings.fence.window,
                token,
            )
            .await;
        let result = match claim {
            Ok(result) => result,
            Err(err) => {
                // The COMMIT may have happened with its reply lost.
                state.in_doubt = Some((term.epoch, token));
                return Err(err);
            }
        };
        self.pacer
            .seed(term.epoch, Instant::now(), &result.recent_send_ages_us);
        if result.expired > 0 {
            tracing::info!(
                count = result.expired,
                "pending messages past their expires_at: expired, never sent"
            );
            self.metrics.messages_expired.inc_by(result.expired);
        }
        Ok(Some(result))
    }

    /// Returns abandoned claims (SPEC §6 step 8): an older epoch's rows once the
    /// rescue wait since our epoch began has passed, and our own leftovers that old.
    /// Rows the provider is known (from the delivery cache) to have accepted are
    /// recorded as sent instead of being sent again.
    async fn rescue(&self, term: &Term) -> Result<(), StoreError> {
        let policy = self.settings.rescue;
        let candidates = self.store.rescue_candidates(term.epoch, policy).await?;
        if candidates.is_empty() {
            return Ok(());
        }
        let known = self.cache.known_deliveries(&candidates).await;
        let recorded = self
            .store
            .record_known_deliveries(term.epoch, &known)
            .await?;
        if recorded > 0 {
            tracing::warn!(
                recorded,
                ids = ?known.iter().map(|k| k.id).collect::<Vec<_>>(),
                "recorded as sent: accepted by the provider, result lost by a previous claim (from the delivery cache)"
            );
        }
        let rescued = self.store.rescue(term.epoch, policy).await?;
        if rescued.pending > 0 {
            tracing::warn!(count = rescued.pending, "rescued abandoned claims");
            self.metrics.messages_rescued.inc_by(rescued.pending);
        }
        if rescued.failed > 0 {
            tracing::warn!(
                count = rescued.failed,
                "abandoned claims out of attempts (MAX_ATTEMPTS): failed"
            );
            self.metrics
                .messages_failed
                .with_label_values(&[FAILED_MAX_ATTEMPTS])
                .inc_by(rescued.failed);
        }
        Ok(())
    }
}
