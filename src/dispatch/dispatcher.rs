//! The dispatch loop: while this replica leads, claim a batch when the cluster's
//! schedule says so, start its sends beside the previous batch's tail, and rescue
//! abandoned claims (docs/design.md#dispatch).

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::{JoinHandle, LocalSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::handoff;
use super::routing::{ProviderState, RouteSettings, Routing};
use super::{Backend, Live, Pacer, Recorder};
use crate::domain::Epoch;
use crate::leadership::{FenceTiming, Leadership, Term};
use crate::metrics::{FAILED_MAX_ATTEMPTS, Metrics, PAUSED_SPEND_CAP};
use crate::provider::{Provider, ProviderClient};
use crate::retry::RetryPolicy;
use crate::store::StoreError;
use crate::store::{Claim, ClaimScope, OpenedBatch, RescuePolicy, Schedule};

/// How often the leader looks for abandoned claims once its term is old enough.
const RESCUE_EVERY: Duration = Duration::from_secs(1);

/// Settings of the dispatch loop, fixed at start (runtime overrides of batch size and
/// interval live in PostgreSQL and come back with every claim).
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub replica_id: String,
    /// The lane this dispatcher sends (docs/design.md#lanes).
    pub lane: String,
    pub configured: Schedule,
    pub rescue: RescuePolicy,
    pub fence: FenceTiming,
    pub retry: RetryPolicy,
    pub max_attempts: u32,
    pub send_concurrency: usize,
    pub shutdown_timeout: Duration,
    /// How often a leader re-reads the desired state while idle or stopped.
    pub poll: Duration,
    /// While dispatch is paused (the provider refuses our credentials), at most one
    /// probe send per this long (`LOCK_RETRY_INTERVAL`).
    pub probe_every: Duration,
    /// The lane's providers in the order they are tried (docs/design.md#failover).
    pub providers: Vec<RouteSettings>,
    /// The lane's default sender.
    pub from: Option<String>,
    /// The lane's quiet hours (docs/design.md#quiet-hours).
    pub quiet_hours: Option<crate::quiet_hours::QuietHours>,
    /// The lane's configured daily spend cap (an operator's override is read from
    /// PostgreSQL with every claim; docs/design.md#spend-caps).
    pub daily_spend_cap: Option<crate::spend::Micros>,
}

/// This leader's view of a pause of dispatch (docs/design.md, "Provider
/// credentials"). PostgreSQL holds the pause for the whole cluster
/// (`dispatcher_control.paused_reason`); this remembers it between claims, and when
/// the next probe may go. Only the dispatcher's own thread touches it.
#[derive(Debug, Default)]
pub struct PauseState {
    pub(super) paused: Cell<bool>,
    pub(super) next_probe: Cell<Option<Instant>>,
    /// Paused for the lane's daily spend cap, as the last claim said.
    pub(super) spend_capped: Cell<bool>,
}

impl PauseState {
    fn probe_due(&self) -> bool {
        self.next_probe.get().is_none_or(|at| Instant::now() >= at)
    }
}

pub struct Dispatcher<B = Live, P = ProviderClient> {
    /// PostgreSQL and the delivery cache.
    pub backend: B,
    pub provider: Arc<P>,
    pub leadership: Arc<Leadership>,
    pub metrics: Arc<Metrics>,
    pub settings: DispatchSettings,
    /// Poked by the API (new messages, start, config change) to skip the idle wait.
    pub wake: Arc<Notify>,
    pub pacer: Pacer,
    /// Records accepted sends in groups, behind the sends.
    pub recorder: Recorder<B>,
    pub pause: PauseState,
    /// One recipient's sends one at a time, in claim order.
    pub recipients: super::RecipientOrder,
    /// Breakers, throttles and the effective rate of the lane's providers.
    pub routing: Routing,
}

/// What the dispatch loop remembers between claims.
struct LoopState {
    /// The batches still running, oldest first, each a task of its own on this
    /// thread: while the next batch is claimed, the newest is sending, and the one
    /// before it may still be waiting for its last answers, recording its results and
    /// closing. At most two are left running: see `handoff::Handoff`.
    running: VecDeque<RunningBatch>,
    /// What the newest batch tells the next one (see `handoff::Handoff`).
    newest: handoff::Previous,
    /// The `SEND_CONCURRENCY` send slots all batches share.
    slots: Rc<Semaphore>,
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

/// A batch's task, and the token of the claim that took its rows.
struct RunningBatch {
    token: i64,
    task: JoinHandle<()>,
}

impl LoopState {
    /// Waits for the running batches to end, oldest first.
    async fn finish_running_batches(&mut self) {
        self.finish_batches_but(0).await;
    }

    /// Waits for the running batches but the newest `keep` to end, oldest first.
    async fn finish_batches_but(&mut self, keep: usize) {
        while self.running.len() > keep {
            if let Some(batch) = self.running.pop_front() {
                await_batch(batch.task).await;
            }
        }
    }

    /// The claim tokens of the batches still running, once those that ended are let
    /// go (one that ended abnormally leaves its rows to the rescue).
    async fn running_claims(&mut self) -> Vec<i64> {
        let (ended, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition::<Vec<_>, _>(|batch| batch.task.is_finished());
        self.running = running.into();
        for batch in ended {
            await_batch(batch.task).await;
        }
        self.running.iter().map(|batch| batch.token).collect()
    }
}

/// Waits for a batch's task to end.
async fn await_batch(batch: JoinHandle<()>) {
    if let Err(err) = batch.await {
        tracing::error!(error = %err, "a batch ended abnormally; its claims are left to the rescue");
    }
}

impl<B: Backend + Send, P: Provider + Send + Sync> Dispatcher<B, P> {
    /// Runs the dispatcher on a thread of its own, on a single-threaded runtime, until
    /// `shutdown`. The returned receiver completes (with an error: its sender is
    /// dropped) once the dispatcher has stopped, with every result recorded.
    ///
    /// Why a thread of its own: a send is a chain of wake-ups (the request, hyper's
    /// connection task, the answer, the result handed to the recorder, the next send).
    /// On the shared multi-threaded runtime those hop between worker threads, and each
    /// hop is a futex wake and a context switch, which at `SEND_CONCURRENCY` 1 would
    /// set the delivery rate. On one thread the chain stays put. The API, the elector, and the PostgreSQL and Redis
    /// connections stay on the main runtime; the provider's connections are opened
    /// here, so they live here.
    pub fn spawn(self, shutdown: CancellationToken) -> std::io::Result<oneshot::Receiver<()>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let span = tracing::Span::current();
        let (stopped, on_stop) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("dispatch-{}", self.settings.lane))
            .spawn(move || {
                runtime.block_on(self.run(shutdown).instrument(span));
                drop(stopped);
            })?;
        Ok(on_stop)
    }
}

impl<B: Backend, P: Provider> Dispatcher<B, P> {
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
            running: VecDeque::new(),
            newest: handoff::Previous::ended(),
            // Clamped so that no SEND_CONCURRENCY can make the semaphore panic; no
            // replica comes near its 2^61 permits anyway.
            slots: Rc::new(Semaphore::new(
                self.settings.send_concurrency.min(Semaphore::MAX_PERMITS),
            )),
            epoch: None,
            claims_failing_since: None,
            next_rescue: Instant::now(),
            in_doubt: None,
            db_ok: true,
        };
        while !shutdown.is_cancelled() {
            let Some(term) = self.leadership.current() else {
                state.finish_running_batches().await;
                self.clear_routing_gauges();
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = terms.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(self.settings.poll) => {}
                }
                continue;
            };
            if state.epoch != Some(term.epoch) {
                state.epoch = Some(term.epoch);
                self.routing.reset();
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
        state.finish_running_batches().await;
        tracing::info!("dispatcher stopped");
    }

    /// One claim attempt and, if it yields a batch, the start of that batch's sends.
    /// Returns how long to wait before the next attempt (counted from the claim); zero
    /// after a batch, whose task is then left running in `state` beside the next claim
    /// (see `handoff::Handoff` for why).
    ///
    /// The overlap is safe: the next claim takes only `pending` rows; its sends start
    /// after the previous batch's (delivery order) in the slots both share
    /// (`SEND_CONCURRENCY`), and none start if the previous batch stopped sending;
    /// every send still asks the term for a permit and the pacer for a start; a close
    /// that comes after a newer batch opened leaves that batch open (`CLOSE_BATCH`);
    /// and the rescue never returns rows of a running batch.
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
                if self.pause.spend_capped.get()
                    && matches!(result.claim, Claim::Batch(_) | Claim::Empty)
                {
                    self.pause.spend_capped.set(false);
                    tracing::info!(
                        "the lane's spend is under its daily cap again (a new UTC day or a \
                         higher cap); dispatch resumes"
                    );
                }
                match result.claim {
                    // Not a probe's wait: nothing is sent until the day ends or the cap
                    // rises (a change through the API wakes this loop at once).
                    Claim::Paused(reason) if reason == PAUSED_SPEND_CAP => {
                        if !self.pause.spend_capped.replace(true) {
                            tracing::warn!(
                                "the lane reached its daily spend cap; dispatch paused until \
                                 UTC midnight or a higher cap (PUT /api/lanes/{{lane}}/config \
                                 {{\"daily_spend_cap\": …}})"
                            );
                        }
                        // Stops the previous batch's sends that have not started.
                        self.pause.paused.set(true);
                        settings.poll
                    }
                    Claim::Paused(_) => {
                        self.pause.paused.set(true);
                        let until_probe =
                            self.pause.next_probe.get().map_or(Duration::ZERO, |at| {
                                at.saturating_duration_since(Instant::now())
                            });
                        until_probe.clamp(Duration::from_millis(10), settings.poll)
                    }
                    Claim::Batch(batch) => {
                        self.pause.paused.set(batch.probe);
                        if batch.probe {
                            // The next claim overlaps this batch's send: it must not
                            // take a second probe before this one's answer.
                            self.pause
                                .next_probe
                                .set(Some(Instant::now() + settings.probe_every));
                        }
                        self.start_batch(term, result.schedule, batch, shutdown, state)
                            .await;
                        Duration::ZERO
                    }
                    Claim::NotDue(wait) => wait.min(settings.poll),
                    Claim::Stopped => settings.poll,
                    // Every claimed row was blocked or held: the queue may hold more.
                    Claim::Empty if result.blocked + result.held > 0 => Duration::ZERO,
                    Claim::Empty => {
                        let idle = settings
                            .poll
                            .min(result.schedule.interval.max(Duration::from_millis(50)));
                        // No provider usable: look again when the first one is.
                        match self.routing.choose().next_usable_at {
                            Some(at) => idle.min(at.saturating_duration_since(Instant::now())),
                            None => idle,
                        }
                    }
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

    /// Starts a claimed batch as a task of its own and returns once it starts
    /// sending, leaving it and the batch before it running in `state`; or, when it
    /// sends nothing (the batch before it stopped sending), once every batch has ended.
    async fn start_batch(
        self: &Rc<Self>,
        term: &Term,
        schedule: Schedule,
        batch: OpenedBatch,
        shutdown: &CancellationToken,
        state: &mut LoopState,
    ) {
        let (claim_next, on_claim_next) = oneshot::channel();
        let (signals, newest) = handoff::signals();
        let newest_before = std::mem::replace(&mut state.newest, newest);
        let previous_signals = match state.running.back() {
            Some(previous) if !previous.task.is_finished() => newest_before,
            _ => handoff::Previous::ended(),
        };
        let handoff = handoff::Handoff {
            slots: Rc::clone(&state.slots),
            previous: previous_signals,
            claim_next,
            signals,
        };
        let token = batch.token;
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
        state.running.push_back(RunningBatch { token, task });
        // Fired when the batch starts sending; dropped unfired when it ends first, so
        // this returns either way.
        let claims_next = on_claim_next.await.is_ok();
        // The next claim need not wait for the previous batch's last results: once
        // this batch fired, every message of that one started its send, so it has no
        // unsent rows left for the next claim to overtake. A batch that stopped
        // sending fires nothing: then every batch releases its unsent rows first.
        state
            .finish_batches_but(if claims_next { 2 } else { 0 })
            .await;
    }

    /// Settles a claim left in doubt, rescues abandoned claims when due, then claims.
    /// `Ok(None)`: the term ended before the claim.
    async fn claim_and_rescue(
        &self,
        term: &Term,
        state: &mut LoopState,
    ) -> Result<Option<crate::store::ClaimResult>, StoreError> {
        if let Some((epoch, token)) = state.in_doubt {
            let released = self.backend.release_claim(epoch, token).await?;
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
            // back to pending, and they would be sent again), so it is told the claims
            // of the running batches rather than waiting for them to end (which would
            // stop every send once a second in a long drain). No batch starts while
            // it runs: the claim comes after it.
            let running = state.running_claims().await;
            self.rescue(term, &running).await?;
            state.next_rescue = Instant::now() + RESCUE_EVERY;
        }
        if !term.is_valid() {
            return Ok(None);
        }
        let token = rand::random::<i64>();
        let choice = self.routing.choose();
        let route = ClaimScope {
            probe_due: self.pause.probe_due(),
            provider: choice.provider.clone(),
            usable: choice.usable.clone(),
            probe_only: choice.probe_only,
            quiet_hours: self.settings.quiet_hours,
            daily_spend_cap: self.settings.daily_spend_cap,
            highest_price: self
                .settings
                .providers
                .iter()
                .filter_map(|p| p.prices.as_ref()?.highest())
                .max(),
        };
        let claim = self
            .backend
            .claim_batch(
                term.epoch,
                &self.settings.replica_id,
                self.settings.configured,
                self.settings.fence.window,
                token,
                &route,
            )
            .await;
        let mut result = match claim {
            Ok(result) => result,
            Err(err) => {
                // The COMMIT may have happened with its reply lost.
                state.in_doubt = Some((term.epoch, token));
                return Err(err);
            }
        };
        if let (Some(probe), Claim::Batch(batch)) = (&choice.probe, &mut result.claim) {
            self.assign_probe(term, probe, batch).await;
        }
        self.pacer
            .seed(term.epoch, Instant::now(), &result.recent_send_ages_us);
        self.publish_routing(result.schedule);
        if result.expired > 0 {
            tracing::info!(
                count = result.expired,
                "pending messages past their expires_at: expired, never sent"
            );
            self.metrics.messages_expired.inc_by(result.expired);
        }
        if result.blocked > 0 {
            tracing::info!(
                count = result.blocked,
                "claimed messages to numbers that opted out since their intake: blocked, never sent"
            );
            self.metrics
                .messages_blocked
                .with_label_values(&["claim"])
                .inc_by(result.blocked);
        }
        if result.held > 0 {
            tracing::debug!(
                count = result.held,
                "claimed messages inside the lane's quiet hours: back in the queue until the window opens"
            );
            self.metrics
                .messages_held
                .with_label_values(&[&self.settings.lane, "quiet_hours"])
                .inc_by(result.held);
        }
        Ok(Some(result))
    }

    /// Sends the batch's first unpinned message to the half-open `provider` as its probe
    /// (docs/design.md#failover). Not done (a database error): no probe this time, the
    /// batch goes as claimed.
    async fn assign_probe(&self, term: &Term, provider: &str, batch: &mut OpenedBatch) {
        let Some(message) = batch
            .messages
            .iter_mut()
            .find(|m| m.provider.as_deref() != Some(provider) && m.pinned.is_none())
        else {
            return;
        };
        match self
            .backend
            .assign_provider(message.id, term.epoch, provider)
            .await
        {
            Ok(true) => {
                tracing::info!(
                    message_id = message.id,
                    provider,
                    "this message is the half-open provider's probe"
                );
                message.provider = Some(provider.to_string());
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, provider, "could not assign a probe; none this batch")
            }
        }
    }

    /// Sets the breaker and effective-rate gauges of this lane.
    pub(super) fn publish_routing(&self, schedule: Schedule) {
        self.set_routing_gauges(&self.routing.states(), schedule, self.routing.rate_factor());
    }

    /// The gauges from one reading of the routing: the breakers, and the effective
    /// rate (`schedule` at `factor`), which has no finite value for an unlimited lane.
    fn set_routing_gauges(&self, states: &[ProviderState], schedule: Schedule, factor: f64) {
        let lane = self.settings.lane.as_str();
        for state in states {
            let value = match state.state {
                "closed" => 0,
                "half_open" => 1,
                _ => 2,
            };
            self.metrics
                .provider_breaker
                .with_label_values(&[lane, &state.name])
                .set(value);
        }
        let rate = schedule.rate_per_second() * factor;
        if rate.is_finite() {
            self.metrics
                .effective_rate
                .with_label_values(&[lane])
                .set(rate);
        }
    }

    /// A replica that does not lead the lane reports every breaker closed, so only the
    /// leader's can fire an alert.
    fn clear_routing_gauges(&self) {
        for route in &self.settings.providers {
            self.metrics
                .provider_breaker
                .with_label_values(&[&self.settings.lane, &route.name])
                .set(0);
        }
        let _ = self
            .metrics
            .effective_rate
            .remove_label_values(&[&self.settings.lane]);
    }

    /// The routing state as `GET /api/lanes` shows it, JSON, written with each batch's
    /// close.
    pub(super) fn routing_report(&self, schedule: Schedule) -> String {
        let (states, factor) = (self.routing.states(), self.routing.rate_factor());
        self.set_routing_gauges(&states, schedule, factor);
        let rate = schedule.rate_per_second() * factor;
        serde_json::json!({
            "at": chrono::Utc::now(),
            "rate_factor": factor,
            "effective_rate_per_second": rate.is_finite().then_some(rate),
            "providers": states,
        })
        .to_string()
    }

    /// Returns abandoned claims (docs/design.md, "Rescue"): an older epoch's rows once
    /// the rescue wait since our epoch began has passed, and our own leftovers that
    /// old. Rows the provider is known (from the delivery cache) to have accepted are
    /// recorded as sent instead of being sent again. Page by page: each page is looked
    /// up in the cache and only then rescued, so no row goes back to `pending`
    /// unchecked, however many there are.
    async fn rescue(&self, term: &Term, running: &[i64]) -> Result<(), StoreError> {
        let policy = self.settings.rescue;
        let mut after = 0;
        let mut recorded = 0;
        let mut rescued = crate::store::Rescued::default();
        loop {
            let candidates = self
                .backend
                .rescue_candidates(term.epoch, policy, running, after)
                .await?;
            let Some(last) = candidates.last() else { break };
            after = last.id;
            let known = self.backend.known_deliveries(&candidates).await;
            let n = self
                .backend
                .record_known_deliveries(term.epoch, &known)
                .await?;
            if n > 0 {
                tracing::warn!(
                    recorded = n,
                    ids = ?known.iter().map(|k| k.id).collect::<Vec<_>>(),
                    "recorded as sent: accepted by the provider, result lost by a previous claim (from the delivery cache)"
                );
            }
            recorded += n;
            let checked: Vec<i64> = candidates.iter().map(|c| c.id).collect();
            let page = self
                .backend
                .rescue(term.epoch, policy, running, &checked)
                .await?;
            rescued.pending += page.pending;
            rescued.failed += page.failed;
            if (candidates.len() as i64) < crate::store::claims::RESCUE_PAGE {
                break;
            }
        }
        if recorded > 0 {
            tracing::info!(recorded, "rescue: recorded known deliveries as sent");
        }
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
