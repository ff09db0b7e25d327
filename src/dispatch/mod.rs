//! The dispatcher (SPEC §6 steps 4–10): while this replica leads, claim a batch when
//! the cluster's schedule says so, send it, record every result.

pub mod activity;
mod batch;
mod pacer;
mod recorder;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinHandle, LocalSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::DeliveryCache;
use crate::domain::Epoch;
use crate::leadership::{FenceTiming, Leadership, Term};
use crate::metrics::{FAILED_MAX_ATTEMPTS, Metrics};
use crate::provider::ProviderClient;
use crate::retry::RetryPolicy;
use crate::store::queue::{Claim, OpenedBatch, RescuePolicy, Schedule};
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

/// What the dispatch loop remembers between claims.
struct LoopState {
    /// The newest batch, a task of its own on this thread: its second half of sends,
    /// then its results and its close, while the next batch is claimed. At most one
    /// is left running: see `batch::Handoff`.
    running: Option<JoinHandle<()>>,
    /// How the newest batch's sends end (see `batch::Handoff`); the next batch waits
    /// for it before its first send.
    newest_sends: oneshot::Receiver<bool>,
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

impl LoopState {
    /// Waits for the running batch to end, if one is running.
    async fn finish_running_batch(&mut self) {
        if let Some(batch) = self.running.take() {
            await_batch(batch).await;
        }
    }
}

/// Waits for a batch's task to end.
async fn await_batch(batch: JoinHandle<()>) {
    if let Err(err) = batch.await {
        tracing::error!(error = %err, "a batch ended abnormally; its claims are left to the rescue");
    }
}

/// A receiver that already says "every send done", for the first batch.
fn no_sends_pending() -> oneshot::Receiver<bool> {
    let (done, pending) = oneshot::channel();
    let _ = done.send(true);
    pending
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
    ///
    /// Batches run as tasks of their own on this thread (`spawn_local`), so a batch
    /// keeps sending and recording whatever the loop is waiting for.
    pub async fn run(self, shutdown: CancellationToken) {
        LocalSet::new()
            .run_until(Rc::new(self).dispatch(shutdown))
            .await;
    }

    async fn dispatch(self: Rc<Self>, shutdown: CancellationToken) {
        self.recorder.start();
        let mut terms = self.leadership.subscribe();
        let mut state = LoopState {
            running: None,
            newest_sends: no_sends_pending(),
            epoch: None,
            claims_failing_since: None,
            next_rescue: Instant::now(),
            in_doubt: None,
            db_ok: true,
        };
        while !shutdown.is_cancelled() {
            let Some(term) = self.leadership.current() else {
                state.finish_running_batch().await;
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
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                    () = self.wake.notified() => {}
                    changed = terms.changed() => if changed.is_err() { break },
                }
            }
        }
        state.finish_running_batch().await;
        tracing::info!("dispatcher stopped");
    }

    /// One claim attempt and, if it yields a batch, the first half of that batch's
    /// sends. Returns how long to wait before the next attempt (counted from the
    /// claim); zero after a batch, whose task is then left running in `state` beside
    /// the next claim (see `batch::Handoff` for why).
    ///
    /// The overlap is safe: the next claim takes only `pending` rows; its sends wait
    /// for the previous batch's (delivery order, `SEND_CONCURRENCY`), and none start if
    /// the previous batch stopped sending; every send still asks the term for a permit
    /// and the pacer for a start; a close that comes after a newer batch opened leaves
    /// that batch open (`CLOSE_BATCH`); and the rescue waits for the running batch.
    async fn step(
        self: &Rc<Self>,
        term: &Term,
        shutdown: &CancellationToken,
        state: &mut LoopState,
    ) -> Duration {
        if shutdown.is_cancelled() {
            return Duration::ZERO;
        }
        let settings = &self.settings;
        let claimed = self.claim_and_rescue(term, state).await;
        let claimed_at = Instant::now();
        let wait = match claimed {
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
                        self.start_batch(term, result.schedule, batch, shutdown, state)
                            .await;
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
        };
        (claimed_at + wait).saturating_duration_since(Instant::now())
    }

    /// Starts a claimed batch as a task of its own and returns once half of its sends
    /// have started (or it has ended) and the batch before it has ended, leaving it
    /// running in `state`.
    async fn start_batch(
        self: &Rc<Self>,
        term: &Term,
        schedule: Schedule,
        batch: OpenedBatch,
        shutdown: &CancellationToken,
        state: &mut LoopState,
    ) {
        let (claim_next, on_claim_next) = oneshot::channel();
        let (sends_done, on_sends_done) = oneshot::channel();
        let previous = state.running.take();
        let newest_sends = std::mem::replace(&mut state.newest_sends, on_sends_done);
        // A batch that had ended before this claim has released its unsent rows, so
        // this one cannot overtake them, however its sends ended.
        let previous_sends = match &previous {
            Some(previous) if !previous.is_finished() => newest_sends,
            _ => no_sends_pending(),
        };
        let handoff = batch::Handoff {
            previous_sends,
            claim_next,
            sends_done,
        };
        let dispatcher = Rc::clone(self);
        let (term, shutdown) = (term.clone(), shutdown.clone());
        let task = tokio::task::spawn_local(
            async move {
                dispatcher
                    .run_batch(&term, schedule, batch, &shutdown, handoff)
                    .await;
            }
            .instrument(tracing::Span::current()),
        );
        // Fired at the batch's middle send; dropped unfired when the batch ends first,
        // so this returns either way (a finished task is left for the next await).
        let _ = on_claim_next.await;
        if let Some(previous) = previous {
            await_batch(previous).await;
        }
        state.running = Some(task);
    }

    /// Settles a claim left in doubt, rescues abandoned claims when due, then claims.
    /// `Ok(None)`: the term ended before the claim.
    async fn claim_and_rescue(
        &self,
        term: &Term,
        state: &mut LoopState,
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
            // The rescue returns our own epoch's claims once they are as old as the
            // rescue wait. A long batch's rows can be that old while they are still
            // being sent or recorded: the rescue must not see them (it would put them
            // back to pending, and they would be sent again), so the running batch
            // ends first.
            state.finish_running_batch().await;
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
