//! One batch: send the claimed messages (at most `SEND_CONCURRENCY` at a time, in FIFO
//! order), record each result (accepted ones in groups, behind the sends: see
//! `recorder`), and hand back whatever was never sent.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::handoff::{Handoff, StartGate};
use super::routing::{Admission, Ticket, Verdict};
use super::{Backend, Dispatcher};
use crate::leadership::{Permit, Term};
use crate::metrics::{
    BATCH_COMPLETE, BATCH_FAILED, BATCH_INTERRUPTED, BATCH_PARTIAL, FAILED_MAX_ATTEMPTS,
    FAILED_REJECTED, PAUSED_PROVIDER_AUTH,
};
use crate::provider::{Outgoing, Provider, SendOutcome};
use crate::retry::connect_backoff;
use crate::store::StoreError;
use crate::store::{ClaimedMessage, OpenedBatch, Recorded, Schedule};

/// How long, once shutdown has begun and the in-flight sends are over (or abandoned),
/// a batch may spend returning its unsent claims and closing itself.
pub const CLEANUP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// `last_error` when PostgreSQL refused the provider's own text.
const UNSTORABLE_ERROR: &str = "the provider's answer could not be stored; see the replica's log";

/// What every send of a batch shares.
#[derive(Clone, Copy)]
struct Sends<'a> {
    term: &'a Term,
    schedule: Schedule,
    shutdown: &'a CancellationToken,
    /// The leader's send slots, shared with the batches before and after this one.
    slots: &'a Semaphore,
    /// The messages whose sends started: the rest go back to pending at the end.
    begun: &'a Mutex<HashSet<i64>>,
    /// Set when a permit is refused: nothing else in this batch starts.
    halted: &'a AtomicBool,
    gate: &'a StartGate,
    /// The batch is the probe of a pause: its one send goes although dispatch is
    /// paused, and decides whether the pause lifts.
    probe: bool,
}

/// A send's result as `deliver` leaves it: settled, or accepted and being recorded.
enum Delivered {
    Done(Fate),
    Recording {
        id: i64,
        without_id: bool,
        outcome: oneshot::Receiver<Recorded>,
    },
}

/// A send the provider did not accept, as `record` writes it.
#[derive(Debug)]
enum Unsent {
    /// Back to `pending` (or `failed` when out of attempts); `unknown`: pinned to its
    /// provider, as the request may have reached it.
    Retry { error: String, unknown: bool },
    /// Refused for our credentials (dispatch pauses) or throttled: back to `pending`
    /// in its place without spending the attempt.
    Held { error: String },
    /// `failed` at once: retrying would not help.
    Reject { error: String },
}

/// What became of a refused probe's message (see `fall_through`).
enum FallThrough {
    /// Sent through the next provider, with its answer.
    Sent(SendOutcome),
    /// Not sent again: it goes back in its place, attempt not spent.
    Held,
    /// Settled at the start gate (expired).
    Settled(Fate),
}

/// What became of one claimed message in this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Sent,
    Retrying,
    Failed,
    /// Never sent: leadership ended or shutdown began first.
    NotStarted,
    /// Sent, but the row had been rescued by a newer leader meanwhile.
    NotOurs,
    /// Past its `expires_at` before its send could start: never sent.
    Expired,
    /// Refused for our credentials or throttled: waits in `pending`, attempt not
    /// spent.
    Held,
}

impl<B: Backend, P: Provider> Dispatcher<B, P> {
    /// Runs one batch to its end: sends (once the previous batch's have started),
    /// results recorded, unsent claims released, batch closed. See [`Handoff`].
    pub(super) async fn run_batch(
        &self,
        term: &Term,
        schedule: Schedule,
        batch: OpenedBatch,
        shutdown: &CancellationToken,
        handoff: Handoff,
    ) {
        let OpenedBatch {
            messages,
            opened_at,
            probe,
            ..
        } = batch;
        let Handoff {
            slots,
            previous,
            claim_next,
            signals,
        } = handoff;
        let mut claim_next = Some(claim_next);
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        let span = tracing::info_span!("batch", epoch = term.epoch.0, size = ids.len(), ids = ?ids);
        async {
            let started = Instant::now();
            tracing::info!("batch claimed");
            // Debug builds only: a panic on demand, for the test that a panic in any
            // task ends the process.
            #[cfg(debug_assertions)]
            if std::env::var_os("MESSAGE_DISPATCHER_TEST_PANIC_IN_BATCH").is_some() {
                panic!("injected by MESSAGE_DISPATCHER_TEST_PANIC_IN_BATCH");
            }
            // Delivery order: no send of this batch starts before every message of the
            // previous one has passed its start gate, and none at all if the previous
            // batch stopped sending. The shared slots keep SEND_CONCURRENCY.
            let previous_started = previous.started.await;
            let previous_stopped = previous_started != Ok(true);
            let halted = AtomicBool::new(previous_stopped);
            if previous_stopped {
                tracing::info!("the previous batch stopped sending; this one sends nothing either");
            }
            // A batch that stopped sending claims no successor: its rows go back to
            // pending first, so the next claim takes them in order. (The sender is
            // dropped unfired when this batch ends.)
            if !previous_stopped {
                if let Some(claim_next) = claim_next.take() {
                    let _ = claim_next.send(());
                }
            }
            let begun: Mutex<HashSet<i64>> = Mutex::default();
            let gate = StartGate::new(messages.len(), signals.started);
            let sends = Sends {
                term,
                schedule,
                shutdown,
                slots: &slots,
                begun: &begun,
                halted: &halted,
                gate: &gate,
                probe,
            };
            let work = async {
                let delivered = futures::stream::iter(messages)
                    .map(|message| self.deliver(&sends, message))
                    // Unordered: a slow answer holds its own slot only. (In order,
                    // answers that came after it would hold theirs until it came.)
                    .buffer_unordered(self.settings.send_concurrency)
                    .collect::<Vec<Delivered>>()
                    .await;
                self.recorder.flush();
                futures::future::join_all(delivered.into_iter().map(|d| self.settle(d))).await
            };
            // On shutdown, in-flight sends get SHUTDOWN_TIMEOUT; after that they are
            // abandoned with their rows still `sending` (outcome unknown), for the
            // rescue to retry under the same Idempotency-Key.
            let grace_expired = async {
                shutdown.cancelled().await;
                tokio::time::sleep(self.settings.shutdown_timeout).await;
            };
            let fates = tokio::select! {
                fates = work => Some(fates),
                () = grace_expired => None,
            };
            let begun = begun.into_inner().unwrap_or_else(|p| p.into_inner());
            let unsent: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !begun.contains(id))
                .collect();
            // An abandoned batch (shutdown grace over) stays open: sends of unknown
            // outcome may still be on the wire. So do the batches after it, as their
            // close would close the abandoned one's. (The wait for the previous
            // batches' answers is bounded by their shutdown grace, as this one's.)
            let answered = fates.is_some() && previous.answered.await.is_ok();
            if answered {
                let _ = signals.answered.send(());
            }
            // Once shutdown has begun, these writes get CLEANUP_GRACE: with PostgreSQL
            // down they would retry past any orchestrator's grace, and what they leave
            // undone the next leader's rescue does (the batch stays open, so it waits
            // out this term).
            let cleanup = async {
                self.release_unsent(term, &unsent).await;
                if answered {
                    self.close_batch(term, schedule, opened_at).await;
                }
            };
            let cleanup_expired = async {
                shutdown.cancelled().await;
                tokio::time::sleep(CLEANUP_GRACE).await;
            };
            tokio::select! {
                () = cleanup => {}
                () = cleanup_expired => tracing::warn!(
                    ids = ?unsent,
                    "shutting down with PostgreSQL unreachable: unsent claims and the batch's close are left to the next leader's rescue"
                ),
            }

            let outcome = match &fates {
                None => BATCH_INTERRUPTED,
                Some(fates) if fates.contains(&Fate::NotStarted) => BATCH_INTERRUPTED,
                Some(fates) if fates.iter().all(|f| *f == Fate::Sent) => BATCH_COMPLETE,
                Some(fates) if fates.contains(&Fate::Sent) => BATCH_PARTIAL,
                Some(_) => BATCH_FAILED,
            };
            self.metrics
                .batches
                .with_label_values(&[&self.settings.lane, outcome])
                .inc();
            self.metrics
                .batch_duration
                .observe(started.elapsed().as_secs_f64());
            let count = |fate| {
                fates
                    .as_ref()
                    .map_or(0, |f| f.iter().filter(|x| **x == fate).count())
            };
            tracing::info!(
                outcome,
                sent = count(Fate::Sent),
                retrying = count(Fate::Retrying),
                failed = count(Fate::Failed),
                not_sent = unsent.len(),
                lost_to_rescue = count(Fate::NotOurs),
                expired = count(Fate::Expired),
                held = count(Fate::Held),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "batch finished"
            );
        }
        .instrument(span)
        .await
    }

    /// Sends one message and records the result. The send waits for a slot, then
    /// passes its start gate (see [`Dispatcher::start_gate`]) or never starts.
    async fn deliver(&self, sends: &Sends<'_>, mut message: ClaimedMessage) -> Delivered {
        let term = sends.term;
        // Asked before the slot, in claim order: the previous send to this number must
        // be answered first (docs/design.md#order). Held through the send.
        let turn = tokio::select! {
            biased;
            () = sends.shutdown.cancelled() => None,
            turn = self.recipients.turn(&message.phone_number) => Some(turn),
        };
        // Shutdown first, always: a slot that is free at the same moment must not win
        // the race (select! picks at random among ready branches).
        let slot = if sends.halted.load(Ordering::Acquire) || turn.is_none() {
            None
        } else {
            tokio::select! {
                biased;
                () = sends.shutdown.cancelled() => None,
                slot = sends.slots.acquire() => slot.ok(),
            }
        };
        // `slot` is held until this function returns: through the send and the
        // result's hand-off to the recorder (or its write, for one not accepted).
        let ticket = if slot.is_some() {
            self.start_gate(sends, &message).await
        } else {
            Err(Fate::NotStarted)
        };
        sends.gate.passed(!matches!(ticket, Err(Fate::NotStarted)));
        let ticket = match ticket {
            Ok(ticket) => ticket,
            Err(fate) => return Delivered::Done(fate),
        };
        sends
            .begun
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message.id);
        let (provider, mut outcome, probe) = self.send_once(ticket, &message).await;
        // A probe the provider refused says it is still down, nothing about the
        // message, which it did not take: the message goes through the next provider
        // at once, so a provider that stays down costs no message its turn.
        let mut held_probe = false;
        if probe && matches!(outcome, SendOutcome::Transient { unknown: false, .. }) {
            match self.fall_through(sends, &mut message, &provider).await {
                FallThrough::Sent(next_outcome) => outcome = next_outcome,
                FallThrough::Held => held_probe = true,
                FallThrough::Settled(fate) => return Delivered::Done(fate),
            }
        }
        drop(turn);
        let sent_at = Utc::now();
        match outcome {
            SendOutcome::Accepted {
                provider_message_id,
            } => {
                if sends.probe {
                    self.lift_pause().await;
                }
                let price = self.price_of(&message, &provider);
                // Before the result is recorded: if it never is, the rescue finds this.
                self.backend.remember_delivery(
                    &message,
                    provider_message_id.clone(),
                    sent_at,
                    price,
                );
                let without_id = provider_message_id.is_none();
                let outcome = self
                    .recorder
                    .sent(message.id, term.epoch, sent_at, provider_message_id, price)
                    .await;
                Delivered::Recording {
                    id: message.id,
                    without_id,
                    outcome,
                }
            }
            // A failed probe with no provider to fall through to: back in its place,
            // its attempt not spent.
            SendOutcome::Transient {
                error,
                unknown: false,
            } if held_probe => {
                let unsent = Unsent::Held { error };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
            SendOutcome::Transient { error, unknown } => {
                let unsent = Unsent::Retry { error, unknown };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
            SendOutcome::Throttled { error, .. } => {
                let unsent = Unsent::Held { error };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
            SendOutcome::Rejected { error } => {
                let unsent = Unsent::Reject { error };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
            SendOutcome::Unauthorized { error } => {
                self.pause_for_credentials(term, &error).await;
                let unsent = Unsent::Held { error };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
        }
    }

    /// One send through the ticket's provider, its answer told to the breaker and
    /// counted: the provider, the answer, and whether it was a probe.
    async fn send_once(
        &self,
        ticket: Ticket<'_>,
        message: &ClaimedMessage,
    ) -> (String, SendOutcome, bool) {
        let provider = ticket.provider().to_string();
        let outgoing = Outgoing {
            delivery_key: &message.delivery_key,
            to: &message.phone_number,
            content: &message.content,
            from: self.sender(message, &provider),
        };
        let outcome = self.provider.send(&provider, &outgoing).await;
        let probe = ticket.is_probe();
        ticket.record(Verdict::of(&outcome));
        self.metrics
            .provider_sends
            .with_label_values(&[&self.settings.lane, &provider, outcome_label(&outcome)])
            .inc();
        (provider, outcome, probe)
    }

    /// What the accepted send of `message` cost: its segments times the price of the
    /// provider that took it (the one it fell through to, if it did; else `tried`).
    /// Counted in `dispatcher_spend_total` here, as the provider bills it, whether or
    /// not the result is recorded.
    fn price_of(&self, message: &ClaimedMessage, tried: &str) -> Option<crate::spend::Micros> {
        let took = message.provider.as_deref().unwrap_or(tried);
        let route = self.settings.providers.iter().find(|r| r.name == took)?;
        // A provider without prices (the default) costs no segmentation per send.
        let prices = route.prices.as_ref()?;
        let segments = crate::encoding::segment(&message.content).segments;
        let price = prices.message(&message.phone_number, segments)?;
        self.metrics
            .spend
            .with_label_values(&[&self.settings.lane, took])
            .inc_by(price.units());
        Some(price)
    }

    /// After a refused probe to `failed`: the message's row names the next usable
    /// provider (so a rescue after a crash pins it there), and it goes through the
    /// start gate again (permit, breaker, pacer: the rate counts this send too).
    async fn fall_through(
        &self,
        sends: &Sends<'_>,
        message: &mut ClaimedMessage,
        failed: &str,
    ) -> FallThrough {
        let Some(next) = self.routing.choose().provider.filter(|p| p != failed) else {
            return FallThrough::Held;
        };
        match self
            .backend
            .assign_provider(message.id, sends.term.epoch, &next)
            .await
        {
            Ok(true) => {}
            _ => return FallThrough::Held,
        }
        message.provider = Some(next);
        match self.start_gate(sends, message).await {
            Ok(ticket) => {
                let (_, outcome, _) = self.send_once(ticket, message).await;
                FallThrough::Sent(outcome)
            }
            Err(Fate::NotStarted) => FallThrough::Held,
            Err(fate) => FallThrough::Settled(fate),
        }
    }

    /// Who the message says it is from: its own sender, else its lane's, else its
    /// provider's.
    fn sender<'m>(&'m self, message: &'m ClaimedMessage, provider: &str) -> Option<&'m str> {
        message
            .sender
            .as_deref()
            .or(self.settings.from.as_deref())
            .or_else(|| {
                self.settings
                    .providers
                    .iter()
                    .find(|route| route.name == provider)
                    .and_then(|route| route.from.as_deref())
            })
    }

    /// Whether a message's send may start now: a ticket for its provider when it does,
    /// else what became of it. A send starts only with a permit of the term (lease and
    /// PostgreSQL fence both fresh, cluster running), when the pacer allows it at the
    /// lane's effective rate, before the message's expiry, and while its provider's
    /// breaker and throttle let it; once a permit or a provider is refused, nothing else
    /// in this batch starts (its unsent messages go back in their places, and the next
    /// claim picks a usable provider).
    async fn start_gate(
        &self,
        sends: &Sends<'_>,
        message: &ClaimedMessage,
    ) -> Result<Ticket<'_>, Fate> {
        let Sends {
            term,
            schedule,
            shutdown,
            halted,
            probe,
            ..
        } = *sends;
        let provider = message
            .provider
            .as_deref()
            .or_else(|| self.settings.providers.first().map(|p| p.name.as_str()))
            .unwrap_or_default();
        let mut ticket: Option<Ticket<'_>> = None;
        loop {
            // Shutdown first, always: a permit that is ready at the same moment must
            // not win the race (select! picks at random among ready branches).
            if halted.load(Ordering::Acquire) || shutdown.is_cancelled() {
                return Err(Fate::NotStarted);
            }
            // Dispatch paused (the provider refused our credentials): only a probe
            // goes; the rest of the batch goes back to pending, in its place.
            if self.pause.paused.get() && !probe {
                if !halted.swap(true, Ordering::AcqRel) {
                    tracing::info!("dispatch paused; no more sends in this batch");
                }
                return Err(Fate::NotStarted);
            }
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(Fate::NotStarted),
                permit = term.send_permit() => permit,
            };
            if permit != Permit::Granted {
                if !halted.swap(true, Ordering::AcqRel) {
                    tracing::info!(?permit, "no more sends in this batch");
                }
                return Err(Fate::NotStarted);
            }
            // The provider before the pacer: a send held back by a breaker or a probe
            // must not take a place in the rate. The ticket is kept across the pacer's
            // waits (a probe stays this send's); dropped unsent, it gives a probe back.
            if ticket.is_none() {
                match self.routing.admit(provider) {
                    Admission::Go(admitted) => ticket = Some(admitted),
                    Admission::Wait(at) => {
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return Err(Fate::NotStarted),
                            () = tokio::time::sleep_until(at) => {}
                        }
                        continue;
                    }
                    Admission::Unavailable => return Err(halt_for(halted, provider)),
                }
            }
            // A message of more units than the throttled window still costs all of them
            // (and fits: it is at most the configured batch size).
            let units = message.units.max(1);
            let window = effective_batch_size(schedule.batch_size, self.routing.rate_factor());
            match self
                .pacer
                .try_start(units, window.max(units), schedule.interval)
            {
                Ok(()) => break,
                // Asks again after the wait: the permit may have lapsed meanwhile.
                Err(free_at) => tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Err(Fate::NotStarted),
                    () = tokio::time::sleep_until(free_at) => {}
                },
            }
        }
        // The last moment to refuse: a message past its validity is never sent, nor
        // one whose provider began holding back while this send waited for the pacer.
        if message.expires_at.is_some_and(|at| Utc::now() >= at) {
            return Err(self.expire(term, message).await);
        }
        if self.routing.holds_back(provider) {
            return Err(halt_for(halted, provider));
        }
        ticket.ok_or(Fate::NotStarted)
    }

    /// Waits for an accepted send's group to be recorded.
    async fn settle(&self, delivered: Delivered) -> Fate {
        let (id, without_id, outcome) = match delivered {
            Delivered::Done(fate) => return fate,
            Delivered::Recording {
                id,
                without_id,
                outcome,
            } => (id, without_id, outcome),
        };
        match outcome.await {
            Ok(Recorded::Sent) => {
                if without_id {
                    tracing::warn!(
                        message_id = id,
                        "provider accepted the message without a messageId"
                    );
                }
                self.metrics
                    .messages_sent
                    .with_label_values(&[&self.settings.lane])
                    .inc();
                Fate::Sent
            }
            Ok(_) => {
                tracing::warn!(
                    message_id = id,
                    "result not recorded: a newer leader rescued this message"
                );
                Fate::NotOurs
            }
            Err(_) => Fate::NotOurs,
        }
    }

    /// Writes the result, retrying while PostgreSQL is unreachable: a result the
    /// provider gave is kept and recorded when the database returns, never re-sent.
    /// A write PostgreSQL refuses for any other reason (a value it will not store)
    /// falls back to a minimal one of constants, so no row is left `sending`.
    async fn record(&self, term: &Term, message: &ClaimedMessage, unsent: Unsent) -> Fate {
        let id = message.id;
        let attempts = u32::try_from(message.attempts).unwrap_or(1);
        let unsent_ref = &unsent;
        let write = |minimal: bool| async move {
            match unsent_ref {
                Unsent::Retry { error, unknown } => {
                    let delay = self.settings.retry.delay(attempts);
                    let error = if minimal { UNSTORABLE_ERROR } else { error };
                    let max = self.settings.max_attempts;
                    self.backend
                        .mark_retry(id, term.epoch, max, delay, error, *unknown)
                        .await
                }
                Unsent::Reject { error } => {
                    let error = if minimal { UNSTORABLE_ERROR } else { error };
                    self.backend.mark_failed(id, term.epoch, error).await
                }
                Unsent::Held { error } => {
                    let error = if minimal { UNSTORABLE_ERROR } else { error };
                    self.backend.mark_held(id, term.epoch, error).await
                }
            }
        };
        let persist = |minimal: bool| {
            (move || write(minimal))
                .retry(connect_backoff())
                .when(StoreError::is_unavailable)
                .notify(move |err, wait| {
                    tracing::warn!(message_id = id, error = %err, retry_in_ms = wait.as_millis() as u64, "result not recorded yet; holding it");
                })
        };
        let mut recorded = persist(false).await;
        if let Err(err) = &recorded {
            tracing::warn!(message_id = id, error = %err, "PostgreSQL refused the result; recording it without the provider's values");
            recorded = persist(true).await;
        }
        match recorded {
            Ok(Recorded::Retrying) if matches!(unsent, Unsent::Held { .. }) => {
                tracing::info!(
                    message_id = id,
                    "refused for our credentials or throttled; back to pending in its place, attempt not spent"
                );
                Fate::Held
            }
            Ok(Recorded::Retrying) => {
                if let Unsent::Retry { error, .. } = &unsent {
                    tracing::info!(
                        message_id = id,
                        attempts = message.attempts,
                        error,
                        "send failed; will retry"
                    );
                }
                self.metrics.messages_retried.inc();
                Fate::Retrying
            }
            Ok(Recorded::Failed) => {
                let reason = match unsent {
                    Unsent::Retry { .. } | Unsent::Held { .. } => FAILED_MAX_ATTEMPTS,
                    Unsent::Reject { .. } => FAILED_REJECTED,
                };
                tracing::warn!(
                    message_id = id,
                    attempts = message.attempts,
                    reason,
                    ?unsent,
                    "message failed"
                );
                self.metrics
                    .messages_failed
                    .with_label_values(&[reason])
                    .inc();
                Fate::Failed
            }
            Ok(Recorded::Sent) => Fate::Sent,
            Ok(Recorded::NotOurs) => {
                tracing::warn!(
                    message_id = id,
                    "result not recorded: a newer leader rescued this message"
                );
                Fate::NotOurs
            }
            Err(err) => {
                tracing::error!(message_id = id, error = %err, ?unsent, "could not record the result");
                Fate::NotOurs
            }
        }
    }

    /// The provider refused our credentials (401/403): pause dispatch for the whole
    /// cluster (in PostgreSQL, so every replica's status and health show it) and
    /// probe again only after `LOCK_RETRY_INTERVAL`. Retrying every message would
    /// spend the backlog's attempts on a configuration mistake.
    async fn pause_for_credentials(&self, term: &Term, error: &str) {
        self.pause.paused.set(true);
        self.pause
            .next_probe
            .set(Some(Instant::now() + self.settings.probe_every));
        self.metrics
            .dispatch_paused
            .with_label_values(&[PAUSED_PROVIDER_AUTH])
            .set(1);
        match self
            .backend
            .pause_dispatch(term.epoch, PAUSED_PROVIDER_AUTH, error)
            .await
        {
            Ok(true) => tracing::error!(
                error,
                probe_every_ms = self.settings.probe_every.as_millis() as u64,
                "the provider refuses our credentials (401/403); dispatch paused, messages wait \
                 without spending attempts; check SMS_API_TOKEN and SMS_API_AUTH_HEADER"
            ),
            Ok(false) => tracing::warn!(error, "the probe was refused too; dispatch stays paused"),
            Err(err) => tracing::warn!(error = %err, "could not record the pause in PostgreSQL"),
        }
    }

    /// A send was accepted while dispatch was paused (the probe): resume.
    async fn lift_pause(&self) {
        self.pause.paused.set(false);
        self.pause.next_probe.set(None);
        self.metrics
            .dispatch_paused
            .with_label_values(&[PAUSED_PROVIDER_AUTH])
            .set(0);
        match self.backend.lift_pause(PAUSED_PROVIDER_AUTH).await {
            Ok(true) => tracing::info!("the provider accepted the probe; dispatch resumes"),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, "could not lift the pause in PostgreSQL; the next claim retries")
            }
        }
    }

    /// Records a claimed message that expired before its send. If that cannot be
    /// written, the row goes back to `pending` with the unsent ones and the next
    /// claim's expiry sweep marks it.
    async fn expire(&self, term: &Term, message: &ClaimedMessage) -> Fate {
        let id = message.id;
        let mark = || self.backend.mark_expired(id, term.epoch);
        let marked = mark
            .retry(connect_backoff().with_max_times(10))
            .when(StoreError::is_unavailable)
            .await;
        match marked {
            Ok(true) => {
                tracing::info!(message_id = id, expires_at = ?message.expires_at, "expired while claimed; not sent");
                self.metrics.messages_expired.inc();
                Fate::Expired
            }
            Ok(false) => Fate::NotOurs,
            Err(err) => {
                tracing::warn!(message_id = id, error = %err, "could not mark the message expired; it goes back to pending and expires at the next claim");
                Fate::NotStarted
            }
        }
    }

    /// Marks the batch finished in the fence row with the start times of the newest
    /// sends, for the next leader's pacer (retrying while PostgreSQL is down, as
    /// results are). A batch left open makes the next leader wait a full interval.
    async fn close_batch(&self, term: &Term, schedule: Schedule, opened_at: DateTime<Utc>) {
        let close = || {
            let ages = self.pacer.recent_ages_us(schedule.batch_size as usize);
            let routing = self.routing_report(schedule);
            let store = self.backend.clone();
            async move {
                store
                    .close_batch(term.epoch, opened_at, &ages, &routing)
                    .await
            }
        };
        let closed = close
            .retry(connect_backoff().with_max_times(10))
            .when(StoreError::is_unavailable)
            .await;
        if let Err(err) = closed {
            tracing::warn!(error = %err, "could not close the batch; the next leader will wait a full interval");
        }
    }

    /// Returns never-sent claims to `pending`, retrying while PostgreSQL is down (the
    /// caller's shutdown grace bounds this). If it never succeeds, the rescue of the
    /// next leader returns them instead.
    async fn release_unsent(&self, term: &Term, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        let release = || self.backend.release_unsent(ids, term.epoch);
        let attempt = release
            .retry(connect_backoff().with_max_times(10))
            .when(StoreError::is_unavailable)
            .await;
        match attempt {
            Ok(n) => tracing::info!(released = n, ids = ?ids, "returned unsent claims to pending"),
            Err(err) => {
                tracing::error!(error = %err, ids = ?ids, "could not return unsent claims; the next leader will rescue them")
            }
        }
    }
}

/// Stops the rest of the batch: `provider`'s breaker is open or it throttles us. Its
/// unsent messages go back to the queue in their places; the next claim picks a usable
/// provider.
fn halt_for(halted: &AtomicBool, provider: &str) -> Fate {
    if !halted.swap(true, Ordering::AcqRel) {
        tracing::info!(
            provider,
            "provider unavailable (breaker open or throttled); no more sends in this batch"
        );
    }
    Fate::NotStarted
}

/// The batch size the pacer holds the lane to at `factor` of its rate: at least one
/// unit, so a throttled lane still moves.
fn effective_batch_size(batch_size: u32, factor: f64) -> u32 {
    ((f64::from(batch_size) * factor).floor() as u32).clamp(1, batch_size.max(1))
}

/// The label of `dispatcher_provider_sends_total` for an outcome.
fn outcome_label(outcome: &SendOutcome) -> &'static str {
    match outcome {
        SendOutcome::Accepted { .. } => "accepted",
        SendOutcome::Rejected { .. } => "rejected",
        SendOutcome::Transient { unknown: false, .. } => "retry",
        SendOutcome::Transient { unknown: true, .. } => "unknown",
        SendOutcome::Throttled { .. } => "throttled",
        SendOutcome::Unauthorized { .. } => "unauthorized",
    }
}
