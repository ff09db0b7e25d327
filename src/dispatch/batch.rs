//! One batch: send the claimed messages (at most `SEND_CONCURRENCY` at a time, in FIFO
//! order), record each result (accepted ones in groups, behind the sends: see
//! `recorder`), and hand back whatever was never sent.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Dispatcher;
use crate::leadership::{Permit, Term};
use crate::metrics::{
    BATCH_COMPLETE, BATCH_FAILED, BATCH_INTERRUPTED, BATCH_PARTIAL, FAILED_MAX_ATTEMPTS,
    FAILED_REJECTED,
};
use crate::provider::SendOutcome;
use crate::retry::connect_backoff;
use crate::store::StoreError;
use crate::store::queue::{ClaimedMessage, OpenedBatch, Recorded, Schedule};

/// `last_error` when PostgreSQL refused the provider's own text.
const UNSTORABLE_ERROR: &str = "the provider's answer could not be stored; see the replica's log";

/// How a batch overlaps its neighbours. Run one after another, a batch's claim and
/// the statements after its last send (the last group of results, the close) took
/// about a third of a 500-message batch, with the provider and this replica idle. So
/// the leader claims the next batch once half of this batch's sends have started, and
/// that batch starts sending once every send of this one has its answer, while this
/// one records its last results and closes.
pub(super) struct Handoff {
    /// How the previous batch's sends ended: `true` when every one of its messages
    /// was sent (or expired). `false` when it stopped sending (leadership lost,
    /// cluster stopped, shutdown) and an error when it was abandoned at shutdown:
    /// then none of this batch's start either, so that the previous batch's unsent
    /// (older) rows are not overtaken; all go back to pending.
    pub previous_sends: oneshot::Receiver<bool>,
    /// Fired when half of this batch's sends have started: claim the next batch now.
    /// Never fired once the batch has stopped sending.
    pub claim_next: oneshot::Sender<()>,
    /// Fired when every send of this batch has its answer or will never start.
    pub sends_done: oneshot::Sender<bool>,
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
    /// Back to `pending` (or `failed` when out of attempts).
    Retry {
        error: String,
        retry_after: Option<std::time::Duration>,
    },
    /// `failed` at once: retrying would not help.
    Reject { error: String },
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
}

impl Dispatcher {
    /// Runs one batch to its end: sends (once the previous batch's are done),
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
        } = batch;
        let Handoff {
            previous_sends,
            claim_next,
            sends_done,
        } = handoff;
        let mut claim_next = Some(claim_next);
        let claim_next_at = messages.len() / 2;
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        let span = tracing::info_span!("batch", epoch = term.epoch.0, size = ids.len(), ids = ?ids);
        async {
            let started = Instant::now();
            tracing::info!("batch claimed");
            // Delivery order and SEND_CONCURRENCY: no send of this batch starts before
            // every send of the previous one has its answer, and none at all if the
            // previous batch stopped sending.
            let previous = previous_sends.await;
            let previous_abandoned = previous.is_err();
            let begun: Mutex<HashSet<i64>> = Mutex::default();
            let previous_stopped = previous != Ok(true);
            let halted = AtomicBool::new(previous_stopped);
            if previous_stopped {
                tracing::info!("the previous batch stopped sending; this one sends nothing either");
            }
            let work = async {
                let delivered = futures::stream::iter(messages.into_iter().enumerate())
                    .map(|(index, message)| {
                        // A batch that stopped sending claims no successor: its rows go
                        // back to pending first, so the next claim takes them in order.
                        if index >= claim_next_at && !halted.load(Ordering::Acquire) {
                            if let Some(claim_next) = claim_next.take() {
                                let _ = claim_next.send(());
                            }
                        }
                        self.deliver(term, schedule, message, shutdown, &begun, &halted)
                    })
                    // Unordered: a slow answer holds its own slot only. (In order,
                    // answers that came after it would hold theirs until it came.)
                    .buffer_unordered(self.settings.send_concurrency)
                    .collect::<Vec<Delivered>>()
                    .await;
                let all_sent = !delivered
                    .iter()
                    .any(|d| matches!(d, Delivered::Done(Fate::NotStarted)));
                let _ = sends_done.send(all_sent);
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
            self.release_unsent(term, &unsent).await;
            // An abandoned batch (shutdown grace over) stays open: sends of unknown
            // outcome may still be on the wire. So does the batch after it (which sent
            // nothing), as its close would close the abandoned one's.
            if fates.is_some() && !previous_abandoned {
                self.close_batch(term, schedule, opened_at).await;
            }

            let outcome = match &fates {
                None => BATCH_INTERRUPTED,
                Some(fates) if fates.contains(&Fate::NotStarted) => BATCH_INTERRUPTED,
                Some(fates) if fates.iter().all(|f| *f == Fate::Sent) => BATCH_COMPLETE,
                Some(fates) if fates.contains(&Fate::Sent) => BATCH_PARTIAL,
                Some(_) => BATCH_FAILED,
            };
            self.metrics.batches.with_label_values(&[outcome]).inc();
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
                elapsed_ms = started.elapsed().as_millis() as u64,
                "batch finished"
            );
        }
        .instrument(span)
        .await
    }

    /// Sends one message and records the result. A send starts only with a permit of
    /// the term (lease and PostgreSQL fence both fresh, cluster running) and when the
    /// pacer allows it; once a permit is refused, nothing else in this batch starts.
    async fn deliver(
        &self,
        term: &Term,
        schedule: Schedule,
        message: ClaimedMessage,
        shutdown: &CancellationToken,
        begun: &Mutex<HashSet<i64>>,
        halted: &AtomicBool,
    ) -> Delivered {
        loop {
            // Shutdown first, always: a permit that is ready at the same moment must
            // not win the race (select! picks at random among ready branches).
            if halted.load(Ordering::Acquire) || shutdown.is_cancelled() {
                return Delivered::Done(Fate::NotStarted);
            }
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Delivered::Done(Fate::NotStarted),
                permit = term.send_permit() => permit,
            };
            if permit != Permit::Granted {
                if !halted.swap(true, Ordering::AcqRel) {
                    tracing::info!(?permit, "no more sends in this batch");
                }
                return Delivered::Done(Fate::NotStarted);
            }
            match self.pacer.try_start(schedule.batch_size, schedule.interval) {
                Ok(()) => break,
                // Asks again after the wait: the permit may have lapsed meanwhile.
                Err(free_at) => tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Delivered::Done(Fate::NotStarted),
                    () = tokio::time::sleep_until(free_at.into()) => {}
                },
            }
        }
        // The last moment to refuse: a message past its validity is never sent.
        if message.expires_at.is_some_and(|at| Utc::now() >= at) {
            return Delivered::Done(self.expire(term, &message).await);
        }
        begun
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message.id);
        let outcome = self
            .provider
            .send(message.id, &message.phone_number, &message.content)
            .await;
        let sent_at = Utc::now();
        match outcome {
            SendOutcome::Accepted {
                provider_message_id,
            } => {
                // Before the result is recorded: if it never is, the rescue finds this.
                self.cache.remember(
                    message.id,
                    message.created_at,
                    provider_message_id.clone(),
                    sent_at,
                );
                let without_id = provider_message_id.is_none();
                let outcome = self
                    .recorder
                    .sent(message.id, term.epoch, sent_at, provider_message_id)
                    .await;
                Delivered::Recording {
                    id: message.id,
                    without_id,
                    outcome,
                }
            }
            SendOutcome::Transient { error, retry_after } => {
                let unsent = Unsent::Retry { error, retry_after };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
            SendOutcome::Rejected { error } => {
                let unsent = Unsent::Reject { error };
                Delivered::Done(self.record(term, &message, unsent).await)
            }
        }
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
                self.metrics.messages_sent.inc();
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
                Unsent::Retry { error, retry_after } => {
                    let delay = self.settings.retry.next_delay(attempts, *retry_after);
                    let error = if minimal { UNSTORABLE_ERROR } else { error };
                    self.store
                        .mark_retry(id, term.epoch, self.settings.max_attempts, delay, error)
                        .await
                }
                Unsent::Reject { error } => {
                    let error = if minimal { UNSTORABLE_ERROR } else { error };
                    self.store.mark_failed(id, term.epoch, error).await
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
                    Unsent::Retry { .. } => FAILED_MAX_ATTEMPTS,
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

    /// Records a claimed message that expired before its send. If that cannot be
    /// written, the row goes back to `pending` with the unsent ones and the next
    /// claim's expiry sweep marks it.
    async fn expire(&self, term: &Term, message: &ClaimedMessage) -> Fate {
        let id = message.id;
        let mark = || self.store.mark_expired(id, term.epoch);
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
            let store = self.store.clone();
            async move { store.close_batch(term.epoch, opened_at, &ages).await }
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
        let release = || self.store.release_unsent(ids, term.epoch);
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
