//! The seam between the elector and the outside world: the Redis lease, the fence
//! row's term statements, the watch for a dead leader and the fence keeper all go
//! through [`ElectionBackend`]. [`LiveElection`] is the real thing; the elector's unit
//! tests put a scripted lease and fence behind it and drive terms with paused time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::fence::{self, FenceTiming};
use super::takeover::{self, Takeover};
use super::{Leadership, RedisLease, Term};
use crate::domain::{Epoch, LeaseToken};
use crate::store::fence::LeaderSession;
use crate::store::{Store, StoreError};

/// Redis did not answer a lease command, or answered with an error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LeaseError(pub String);

impl From<fred::error::Error> for LeaseError {
    fn from(err: fred::error::Error) -> Self {
        Self(err.details().to_string())
    }
}

/// What the elector needs, one call per thing it does. The lease calls are
/// compare-and-act on the token (docs/design.md, "Leadership"); `start_term` bumps the
/// fence row's epoch, after which the older epoch's claims and results are refused.
pub trait ElectionBackend: Send + Sync + 'static {
    /// A PostgreSQL session holding the leader lock, handed from a takeover to the
    /// fence keeper.
    type Session: Send + 'static;

    /// Whether PostgreSQL answers: a replica that cannot reach it does not campaign.
    fn database_ok(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// `SET NX` with a fresh token; `None` when another replica holds the lease.
    fn try_acquire(&self) -> impl Future<Output = Result<Option<LeaseToken>, LeaseError>> + Send;
    /// Extends the lease while it holds `token`; `false` when it no longer does.
    fn extend(&self, token: &LeaseToken) -> impl Future<Output = Result<bool, LeaseError>> + Send;
    /// Deletes the lease while it holds `token`.
    fn release(&self, token: &LeaseToken) -> impl Future<Output = Result<bool, LeaseError>> + Send;
    /// Tells the followers the lease is free: `message` is the releasing replica's id,
    /// or `handover:<id>` when it stays and hands the lane to its assignee.
    fn announce_release(
        &self,
        message: &str,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// A new term in the fence row.
    fn start_term(
        &self,
        holder: &str,
        lease_token: Option<&str>,
        quiet_after: Duration,
    ) -> impl Future<Output = Result<Epoch, StoreError>> + Send;
    /// The fence row forgets the term's session (a clean end, not a death).
    fn clear_leader_session(
        &self,
        epoch: Epoch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The leader's liveness beat in Redis, `seq` its count in this term; it lives
    /// `lives` (docs/design.md#a-stalled-leader).
    fn beat(
        &self,
        token: &LeaseToken,
        seq: u64,
        lives: Duration,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
    /// Whether anyone holds the lease now (a follower leaving a lane to its assignee).
    fn lease_held(&self) -> impl Future<Output = Result<bool, LeaseError>> + Send;
    /// Resolves once this follower fenced out a stalled leader and took its lease over.
    fn stalled_leader(
        &self,
        fence: FenceTiming,
        replica_id: &str,
    ) -> impl Future<Output = Takeover<()>> + Send;
    /// Resolves once this follower took the lease over from a dead leader.
    fn dead_leader(
        &self,
        fence: FenceTiming,
        retry: Duration,
        replica_id: &str,
    ) -> impl Future<Output = Takeover<Self::Session>> + Send;
    /// Starts the task that confirms `term`'s epoch until the term ends (see
    /// `leadership::fence::keep`); the caller aborts it.
    fn keep_fence(
        &self,
        term: &Term,
        leadership: &Arc<Leadership>,
        timing: FenceTiming,
        session: Option<Self::Session>,
    ) -> JoinHandle<()>;
}

/// The lease in Redis, the fence in PostgreSQL.
pub struct LiveElection {
    pub lease: RedisLease,
    pub store: Store,
}

impl ElectionBackend for LiveElection {
    type Session = LeaderSession;

    async fn database_ok(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn try_acquire(&self) -> Result<Option<LeaseToken>, LeaseError> {
        Ok(self.lease.try_acquire().await?)
    }

    async fn extend(&self, token: &LeaseToken) -> Result<bool, LeaseError> {
        Ok(self.lease.extend(token).await?)
    }

    async fn release(&self, token: &LeaseToken) -> Result<bool, LeaseError> {
        Ok(self.lease.release(token).await?)
    }

    async fn announce_release(&self, message: &str) -> Result<(), LeaseError> {
        Ok(self.lease.announce_release(message).await?)
    }

    async fn start_term(
        &self,
        holder: &str,
        lease_token: Option<&str>,
        quiet_after: Duration,
    ) -> Result<Epoch, StoreError> {
        self.store
            .start_term(holder, lease_token, quiet_after)
            .await
    }

    async fn clear_leader_session(&self, epoch: Epoch) -> Result<(), StoreError> {
        self.store.clear_leader_session(epoch).await
    }

    async fn beat(&self, token: &LeaseToken, seq: u64, lives: Duration) -> Result<(), LeaseError> {
        Ok(self.lease.beat(token, seq, lives).await?)
    }

    async fn lease_held(&self) -> Result<bool, LeaseError> {
        Ok(self.lease.holder_token().await?.is_some())
    }

    async fn stalled_leader(&self, fence: FenceTiming, replica_id: &str) -> Takeover<()> {
        takeover::for_a_stalled_leader(&self.store, &self.lease, fence, replica_id).await
    }

    async fn dead_leader(
        &self,
        fence: FenceTiming,
        retry: Duration,
        replica_id: &str,
    ) -> Takeover<LeaderSession> {
        takeover::for_a_dead_leader(&self.store, &self.lease, fence, retry, replica_id).await
    }

    fn keep_fence(
        &self,
        term: &Term,
        leadership: &Arc<Leadership>,
        timing: FenceTiming,
        session: Option<LeaderSession>,
    ) -> JoinHandle<()> {
        tokio::spawn(fence::keep(
            term.clone(),
            self.store.clone(),
            leadership.clone(),
            timing,
            session,
        ))
    }
}
