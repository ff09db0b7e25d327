//! The seam between the dispatcher and the outside world: everything it asks of
//! PostgreSQL and of the delivery cache in Redis goes through [`Backend`], every send
//! through [`crate::provider::Provider`]. [`Live`] is the real thing; the unit tests
//! of `dispatch` put an in-memory queue behind the same calls and drive the loop with
//! paused tokio time.
//!
//! The dispatcher runs on a thread of its own on a single-threaded runtime (see
//! `Dispatcher::spawn`), so these futures need not be `Send`.
#![allow(async_fn_in_trait)]

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cache::DeliveryCache;
use crate::domain::Epoch;
use crate::spend::Micros;
use crate::store::{
    ClaimResult, ClaimScope, ClaimedMessage, KnownDelivery, Recorded, RescueCandidate,
    RescuePolicy, Rescued, Schedule, SentResult, Store, StoreError,
};

/// Where accepted sends are recorded (the recorder's half of [`Backend`]).
pub trait ResultStore: Clone + 'static {
    /// Records accepted sends, each guarded by its epoch; the ids still ours.
    async fn mark_sent_group(
        &self,
        results: &[SentResult],
        again: bool,
    ) -> Result<HashSet<i64>, StoreError>;
    async fn mark_sent(
        &self,
        id: i64,
        epoch: Epoch,
        sent_at: DateTime<Utc>,
        provider_message_id: Option<&str>,
        price: Option<Micros>,
        again: bool,
    ) -> Result<Recorded, StoreError>;
}

/// What the dispatcher needs from storage, one call per statement it runs. Every
/// write is guarded by the claim's epoch (docs/design.md, "Fencing"): an
/// implementation must refuse a write whose epoch no longer owns the row.
pub trait Backend: ResultStore {
    /// The claim transaction: the fence, the schedule, then up to a batch of due rows
    /// moved to `sending` under `epoch`, stamped with `token`.
    async fn claim_batch(
        &self,
        epoch: Epoch,
        replica_id: &str,
        configured: Schedule,
        fence_window: Duration,
        token: i64,
        route: &ClaimScope,
    ) -> Result<ClaimResult, StoreError>;
    /// Returns the rows of a claim whose COMMIT reply was lost to `pending`.
    async fn release_claim(&self, epoch: Epoch, token: i64) -> Result<u64, StoreError>;
    /// One page of the `sending` rows the rescue may return, after id `after`.
    async fn rescue_candidates(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        after: i64,
    ) -> Result<Vec<RescueCandidate>, StoreError>;
    /// The candidates the delivery cache knows the provider accepted.
    async fn known_deliveries(&self, candidates: &[RescueCandidate]) -> Vec<KnownDelivery>;
    /// Notes in the delivery cache that the provider accepted `message`.
    fn remember_delivery(
        &self,
        message: &ClaimedMessage,
        provider_message_id: Option<String>,
        sent_at: DateTime<Utc>,
        price: Option<Micros>,
    );
    async fn record_known_deliveries(
        &self,
        epoch: Epoch,
        known: &[KnownDelivery],
    ) -> Result<u64, StoreError>;
    /// Returns the checked candidates to `pending` (or `failed`, out of attempts).
    async fn rescue(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        checked: &[i64],
    ) -> Result<Rescued, StoreError>;
    async fn mark_retry(
        &self,
        id: i64,
        epoch: Epoch,
        max_attempts: u32,
        delay: Duration,
        error: &str,
        unknown: bool,
    ) -> Result<Recorded, StoreError>;
    async fn mark_failed(&self, id: i64, epoch: Epoch, error: &str)
    -> Result<Recorded, StoreError>;
    /// Back to `pending` in its place, attempt not spent (refused credentials, a
    /// throttle).
    async fn mark_held(&self, id: i64, epoch: Epoch, error: &str) -> Result<Recorded, StoreError>;
    async fn mark_expired(&self, id: i64, epoch: Epoch) -> Result<bool, StoreError>;
    /// Sends a claimed, unpinned message through `provider` instead: its row names it.
    async fn assign_provider(
        &self,
        id: i64,
        epoch: Epoch,
        provider: &str,
    ) -> Result<bool, StoreError>;
    async fn release_unsent(&self, ids: &[i64], epoch: Epoch) -> Result<u64, StoreError>;
    /// Marks the batch opened at `opened_at` finished, with the newest sends' ages.
    async fn close_batch(
        &self,
        epoch: Epoch,
        opened_at: DateTime<Utc>,
        recent_send_ages_us: &[i64],
        routing: &str,
    ) -> Result<(), StoreError>;
    async fn pause_dispatch(
        &self,
        epoch: Epoch,
        reason: &str,
        detail: &str,
    ) -> Result<bool, StoreError>;
    async fn lift_pause(&self, reason: &str) -> Result<bool, StoreError>;
}

/// PostgreSQL through [`Store`], the delivery cache in Redis.
#[derive(Clone)]
pub struct Live {
    pub store: Store,
    pub cache: DeliveryCache,
}

impl ResultStore for Live {
    async fn mark_sent_group(
        &self,
        results: &[SentResult],
        again: bool,
    ) -> Result<HashSet<i64>, StoreError> {
        self.store.mark_sent_group(results, again).await
    }

    async fn mark_sent(
        &self,
        id: i64,
        epoch: Epoch,
        sent_at: DateTime<Utc>,
        provider_message_id: Option<&str>,
        price: Option<Micros>,
        again: bool,
    ) -> Result<Recorded, StoreError> {
        self.store
            .mark_sent(id, epoch, sent_at, provider_message_id, price, again)
            .await
    }
}

impl ResultStore for Store {
    async fn mark_sent_group(
        &self,
        results: &[SentResult],
        again: bool,
    ) -> Result<HashSet<i64>, StoreError> {
        Store::mark_sent_group(self, results, again).await
    }

    async fn mark_sent(
        &self,
        id: i64,
        epoch: Epoch,
        sent_at: DateTime<Utc>,
        provider_message_id: Option<&str>,
        price: Option<Micros>,
        again: bool,
    ) -> Result<Recorded, StoreError> {
        Store::mark_sent(self, id, epoch, sent_at, provider_message_id, price, again).await
    }
}

impl Backend for Live {
    async fn claim_batch(
        &self,
        epoch: Epoch,
        replica_id: &str,
        configured: Schedule,
        fence_window: Duration,
        token: i64,
        route: &ClaimScope,
    ) -> Result<ClaimResult, StoreError> {
        self.store
            .claim_batch(epoch, replica_id, configured, fence_window, token, route)
            .await
    }

    async fn release_claim(&self, epoch: Epoch, token: i64) -> Result<u64, StoreError> {
        self.store.release_claim(epoch, token).await
    }

    async fn rescue_candidates(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        after: i64,
    ) -> Result<Vec<RescueCandidate>, StoreError> {
        self.store
            .rescue_candidates(epoch, policy, running, after)
            .await
    }

    async fn known_deliveries(&self, candidates: &[RescueCandidate]) -> Vec<KnownDelivery> {
        self.cache.known_deliveries(candidates).await
    }

    fn remember_delivery(
        &self,
        message: &ClaimedMessage,
        provider_message_id: Option<String>,
        sent_at: DateTime<Utc>,
        price: Option<Micros>,
    ) {
        self.cache
            .remember(message, provider_message_id, sent_at, price);
    }

    async fn record_known_deliveries(
        &self,
        epoch: Epoch,
        known: &[KnownDelivery],
    ) -> Result<u64, StoreError> {
        self.store.record_known_deliveries(epoch, known).await
    }

    async fn rescue(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        checked: &[i64],
    ) -> Result<Rescued, StoreError> {
        self.store.rescue(epoch, policy, running, checked).await
    }

    async fn mark_retry(
        &self,
        id: i64,
        epoch: Epoch,
        max_attempts: u32,
        delay: Duration,
        error: &str,
        unknown: bool,
    ) -> Result<Recorded, StoreError> {
        self.store
            .mark_retry(id, epoch, max_attempts, delay, error, unknown)
            .await
    }

    async fn mark_failed(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        self.store.mark_failed(id, epoch, error).await
    }

    async fn mark_held(&self, id: i64, epoch: Epoch, error: &str) -> Result<Recorded, StoreError> {
        self.store.mark_held(id, epoch, error).await
    }

    async fn mark_expired(&self, id: i64, epoch: Epoch) -> Result<bool, StoreError> {
        self.store.mark_expired(id, epoch).await
    }

    async fn assign_provider(
        &self,
        id: i64,
        epoch: Epoch,
        provider: &str,
    ) -> Result<bool, StoreError> {
        self.store.assign_provider(id, epoch, provider).await
    }

    async fn release_unsent(&self, ids: &[i64], epoch: Epoch) -> Result<u64, StoreError> {
        self.store.release_unsent(ids, epoch).await
    }

    async fn close_batch(
        &self,
        epoch: Epoch,
        opened_at: DateTime<Utc>,
        recent_send_ages_us: &[i64],
        routing: &str,
    ) -> Result<(), StoreError> {
        self.store
            .close_batch(epoch, opened_at, recent_send_ages_us, routing)
            .await
    }

    async fn pause_dispatch(
        &self,
        epoch: Epoch,
        reason: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        self.store.pause_dispatch(epoch, reason, detail).await
    }

    async fn lift_pause(&self, reason: &str) -> Result<bool, StoreError> {
        self.store.lift_pause(reason).await
    }
}
