//! Who may dispatch (SPEC §6 steps 1–4, 10): Redis elects, PostgreSQL enforces.
//!
//! The elector holds a Redis lease and, on every acquisition, bumps the epoch in the
//! fence row. It publishes the resulting [`Term`] here. The dispatcher asks
//! [`Term::is_valid`] before every claim and every send; that check reads only the
//! local monotonic clock, so a leader that was paused past its lease stops by itself
//! the moment it runs again, whatever the elector task is doing.

mod elector;
mod lease;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

pub use elector::{Elector, LeaseTiming, run_redis_elector, run_single_replica};
pub use lease::RedisLease;

use crate::domain::Epoch;
use crate::metrics::Metrics;

/// One leadership term of this replica.
#[derive(Clone, Debug)]
pub struct Term {
    pub epoch: Epoch,
    pub since: DateTime<Utc>,
    validity: Arc<Validity>,
}

/// The term's deadline on the monotonic clock, stored as nanoseconds after `origin`
/// so the elector can move it forward without a lock.
#[derive(Debug)]
struct Validity {
    origin: Instant,
    deadline_nanos: AtomicU64,
    revoked: AtomicBool,
}

impl Term {
    /// A term valid until `deadline` (on the monotonic clock).
    pub fn new(epoch: Epoch, deadline: Instant) -> Self {
        let origin = Instant::now();
        let term = Self {
            epoch,
            since: Utc::now(),
            validity: Arc::new(Validity {
                origin,
                deadline_nanos: AtomicU64::new(0),
                revoked: AtomicBool::new(false),
            }),
        };
        term.extend_until(deadline);
        term
    }

    /// A term with no lease behind it (single-replica mode): valid until revoked.
    pub fn unbounded(epoch: Epoch) -> Self {
        Self::new(
            epoch,
            Instant::now() + Duration::from_secs(100 * 365 * 86_400),
        )
    }

    /// True while the lease is certainly still ours: not revoked and the local
    /// deadline (lease start + TTL − drift) not reached.
    pub fn is_valid(&self) -> bool {
        !self.validity.revoked.load(Ordering::Acquire) && Instant::now() < self.deadline()
    }

    pub fn deadline(&self) -> Instant {
        let nanos = self.validity.deadline_nanos.load(Ordering::Acquire);
        self.validity.origin + Duration::from_nanos(nanos)
    }

    fn extend_until(&self, deadline: Instant) {
        let nanos = deadline
            .saturating_duration_since(self.validity.origin)
            .as_nanos();
        self.validity
            .deadline_nanos
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Release);
    }

    fn revoke(&self) {
        self.validity.revoked.store(true, Ordering::Release);
    }

    fn is_revoked(&self) -> bool {
        self.validity.revoked.load(Ordering::Acquire)
    }
}

/// This replica's view of leadership, shared by the elector, the dispatcher and the
/// HTTP API.
pub struct Leadership {
    term: watch::Sender<Option<Term>>,
    /// Wakes the elector when the dispatcher learns it was fenced out.
    fenced: Notify,
    metrics: Arc<Metrics>,
}

impl Leadership {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            term: watch::Sender::new(None),
            fenced: Notify::new(),
            metrics,
        }
    }

    /// The current term if it is still valid.
    pub fn current(&self) -> Option<Term> {
        self.term.borrow().clone().filter(Term::is_valid)
    }

    /// Changes whenever a term begins or ends.
    pub fn subscribe(&self) -> watch::Receiver<Option<Term>> {
        self.term.subscribe()
    }

    /// Called by the dispatcher when PostgreSQL refused a claim because a newer epoch
    /// exists: the term ends at once and the elector lets the lock go.
    pub fn report_fenced(&self, term: &Term, newer: Epoch) {
        tracing::warn!(
            epoch = term.epoch.0,
            newer_epoch = newer.0,
            "fenced out by a newer leader; stepping down"
        );
        self.metrics.fencing_rejections.inc();
        term.revoke();
        self.fenced.notify_one();
    }

    fn begin(&self, term: Term) {
        tracing::info!(epoch = term.epoch.0, "became leader");
        self.metrics.is_leader.set(1);
        self.metrics.leader_epoch.set(term.epoch.0);
        self.metrics.leadership_changes.inc();
        self.term.send_replace(Some(term));
    }

    fn end(&self, term: &Term, reason: &str) {
        term.revoke();
        tracing::warn!(epoch = term.epoch.0, reason, "leadership ended");
        self.metrics.is_leader.set(0);
        self.metrics.leadership_changes.inc();
        self.term.send_replace(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_expires_at_its_deadline_and_can_be_extended() {
        let term = Term::new(Epoch(1), Instant::now() + Duration::from_millis(30));
        assert!(term.is_valid());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!term.is_valid());
        term.extend_until(Instant::now() + Duration::from_secs(1));
        assert!(term.is_valid());
        term.revoke();
        assert!(!term.is_valid());
    }
}
