//! A leadership term and its deadlines on the local monotonic clock (docs/design.md,
//! "Leadership"). Time is `tokio::time`, so tests drive terms with paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::Epoch;

/// One leadership term of this replica.
#[derive(Clone, Debug)]
pub struct Term {
    pub epoch: Epoch,
    pub since: DateTime<Utc>,
    /// When the term began on the local clock (after the epoch bump answered).
    pub began: Instant,
    validity: Arc<Validity>,
}

/// The term's deadlines on the monotonic clock, stored as nanoseconds after `origin`
/// so the elector and the fence keeper can move them forward without a lock.
#[derive(Debug)]
struct Validity {
    origin: Instant,
    lease_deadline_nanos: AtomicU64,
    fence_deadline_nanos: AtomicU64,
    revoked: AtomicBool,
    /// Set when a newer epoch took over (as opposed to any other end).
    fenced: AtomicBool,
    /// The cluster's desired state as the last fence confirmation read it.
    stopped: AtomicBool,
    /// Wakes sends waiting for a permit whenever any of the above changes.
    changed: Notify,
}

/// The answer to "may this send start now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Granted,
    /// The cluster was stopped: nothing new starts.
    Stopped,
    /// The term is over (lease deadline passed, fenced, resigned).
    Ended,
}

impl Term {
    /// A term whose lease holds until `lease_deadline`; no send may start until the
    /// fence keeper's first confirmation.
    pub fn new(epoch: Epoch, lease_deadline: Instant) -> Self {
        let origin = Instant::now();
        let term = Self {
            epoch,
            since: Utc::now(),
            began: origin,
            validity: Arc::new(Validity {
                origin,
                lease_deadline_nanos: AtomicU64::new(0),
                fence_deadline_nanos: AtomicU64::new(0),
                revoked: AtomicBool::new(false),
                fenced: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                changed: Notify::new(),
            }),
        };
        term.extend_until(lease_deadline);
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
    /// deadline (lease start + TTL − drift) not reached. Claims need this.
    pub fn is_valid(&self) -> bool {
        !self.is_revoked() && Instant::now() < self.deadline()
    }

    /// True while a send may start: the lease holds, PostgreSQL confirmed the epoch
    /// recently enough (the fence deadline), and the cluster was running then.
    pub fn may_send(&self) -> bool {
        self.is_valid()
            && !self.validity.stopped.load(Ordering::Acquire)
            && Instant::now() < self.fence_deadline()
    }

    /// Waits until a send may start or never will in this term. A fence deadline that
    /// passed (PostgreSQL slow or briefly away) is waited out: the fence keeper either
    /// confirms again or, after `FenceTiming::resign_after`, ends the term.
    pub async fn send_permit(&self) -> Permit {
        loop {
            let changed = self.validity.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if !self.is_valid() {
                return Permit::Ended;
            }
            if self.validity.stopped.load(Ordering::Acquire) {
                return Permit::Stopped;
            }
            if Instant::now() < self.fence_deadline() {
                return Permit::Granted;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(self.deadline()) => {}
            }
        }
    }

    pub fn deadline(&self) -> Instant {
        self.instant(&self.validity.lease_deadline_nanos)
    }

    pub fn fence_deadline(&self) -> Instant {
        self.instant(&self.validity.fence_deadline_nanos)
    }

    fn instant(&self, nanos: &AtomicU64) -> Instant {
        self.validity.origin + Duration::from_nanos(nanos.load(Ordering::Acquire))
    }

    fn store_instant(&self, nanos: &AtomicU64, at: Instant) {
        let value = at
            .saturating_duration_since(self.validity.origin)
            .as_nanos();
        nanos.store(u64::try_from(value).unwrap_or(u64::MAX), Ordering::Release);
    }

    pub(super) fn extend_until(&self, deadline: Instant) {
        self.store_instant(&self.validity.lease_deadline_nanos, deadline);
        self.validity.changed.notify_waiters();
    }

    /// Records a fence confirmation: PostgreSQL said, for a query sent at `sent`,
    /// that our epoch is current and whether the cluster runs. Sends may start until
    /// `sent + window` (only while running).
    pub(super) fn confirm(&self, sent: Instant, window: Duration, running: bool) {
        self.validity.stopped.store(!running, Ordering::Release);
        if running {
            self.store_instant(&self.validity.fence_deadline_nanos, sent + window);
        }
        self.validity.changed.notify_waiters();
    }

    /// Ends the term because a newer epoch took over.
    pub(super) fn mark_fenced(&self) {
        self.validity.fenced.store(true, Ordering::Release);
        self.revoke();
    }

    pub(super) fn revoke(&self) {
        self.validity.revoked.store(true, Ordering::Release);
        self.validity.changed.notify_waiters();
    }

    pub(super) fn is_revoked(&self) -> bool {
        self.validity.revoked.load(Ordering::Acquire)
    }

    /// True when the term ended because a newer epoch took over.
    pub(super) fn was_fenced(&self) -> bool {
        self.validity.fenced.load(Ordering::Acquire)
    }
}

/// What the unit tests of other modules (the dispatcher's) do to a term, which in a
/// replica only the elector and the fence keeper do.
#[cfg(test)]
impl Term {
    /// A fence confirmation now, valid for `window`, the cluster running.
    pub(crate) fn confirm_now(&self, window: Duration) {
        self.confirm(Instant::now(), window, true);
    }

    /// Ends the term as a lost lease would.
    pub(crate) fn end_now(&self) {
        self.revoke();
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

    #[test]
    fn a_send_needs_a_fresh_fence_confirmation_and_a_running_cluster() {
        let term = Term::new(Epoch(1), Instant::now() + Duration::from_secs(60));
        assert!(term.is_valid());
        assert!(!term.may_send(), "no send before the first confirmation");
        term.confirm(Instant::now(), Duration::from_millis(30), true);
        assert!(term.may_send());
        std::thread::sleep(Duration::from_millis(40));
        assert!(term.is_valid(), "the lease still holds");
        assert!(!term.may_send(), "but the confirmation is too old");
        term.confirm(Instant::now(), Duration::from_secs(10), false);
        assert!(!term.may_send(), "stopped");
        term.confirm(Instant::now(), Duration::from_secs(10), true);
        assert!(term.may_send());
        term.revoke();
        assert!(!term.may_send());
    }

    #[tokio::test]
    async fn a_waiting_send_gets_its_permit_with_the_next_confirmation() {
        let term = Term::new(Epoch(1), Instant::now() + Duration::from_secs(60));
        let waiting = tokio::spawn({
            let term = term.clone();
            async move { term.send_permit().await }
        });
        tokio::task::yield_now().await;
        term.confirm(Instant::now(), Duration::from_secs(10), true);
        assert_eq!(waiting.await.unwrap(), Permit::Granted);

        let stopped = Term::new(Epoch(2), Instant::now() + Duration::from_secs(60));
        stopped.confirm(Instant::now(), Duration::from_secs(10), false);
        assert_eq!(stopped.send_permit().await, Permit::Stopped);
        let revoked = Term::new(Epoch(3), Instant::now() + Duration::from_secs(60));
        let waiting = tokio::spawn({
            let term = revoked.clone();
            async move { term.send_permit().await }
        });
        tokio::task::yield_now().await;
        revoked.revoke();
        assert_eq!(waiting.await.unwrap(), Permit::Ended);
    }
}
