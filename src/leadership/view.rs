//! This replica's view of leadership: the current term, published to the dispatcher
//! and the API, and the reports that end it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::Term;
use crate::domain::Epoch;
use crate::metrics::Metrics;

/// This replica's view of leadership, shared by the elector, the dispatcher and the
/// HTTP API.
pub struct Leadership {
    term: watch::Sender<Option<Term>>,
    /// Wakes the elector when the term was abandoned (fenced out, or PostgreSQL
    /// unreachable for too long).
    pub(super) abandoned: Notify,
    metrics: Arc<Metrics>,
    /// The lane this is the leadership of.
    lane: String,
}

impl Leadership {
    pub fn new(metrics: Arc<Metrics>, lane: &str) -> Self {
        Self {
            term: watch::Sender::new(None),
            abandoned: Notify::new(),
            metrics,
            lane: lane.to_string(),
        }
    }

    /// The lane this is the leadership of.
    pub fn lane(&self) -> &str {
        &self.lane
    }

    /// The current term if it is still valid.
    pub fn current(&self) -> Option<Term> {
        self.term.borrow().clone().filter(Term::is_valid)
    }

    /// Changes whenever a term begins or ends.
    pub fn subscribe(&self) -> watch::Receiver<Option<Term>> {
        self.term.subscribe()
    }

    /// Called when PostgreSQL showed a newer epoch (a refused claim, a fence
    /// confirmation): the term ends at once and the elector lets the lock go.
    pub fn report_fenced(&self, term: &Term, newer: Epoch) {
        if term.is_revoked() {
            return;
        }
        tracing::warn!(
            epoch = term.epoch.0,
            newer_epoch = newer.0,
            "fenced out by a newer leader; stepping down"
        );
        self.metrics.fencing_rejections.inc();
        term.mark_fenced();
        self.abandoned.notify_one();
    }

    /// Called when PostgreSQL has not answered this leader's claims or fence
    /// confirmations for `FenceTiming::resign_after`: the term ends, and the elector
    /// releases the lock and announces it, so a replica that can reach PostgreSQL
    /// takes over.
    pub fn report_database_lost(&self, term: &Term, failing_for: Duration) {
        if term.is_revoked() {
            return;
        }
        tracing::error!(
            epoch = term.epoch.0,
            failing_for_ms = failing_for.as_millis() as u64,
            "cannot reach PostgreSQL; resigning so that a replica that can takes over"
        );
        term.revoke();
        self.abandoned.notify_one();
    }

    pub(super) fn begin(&self, term: Term) {
        tracing::info!(epoch = term.epoch.0, lane = %self.lane, "became leader");
        self.metrics
            .is_leader
            .with_label_values(&[&self.lane])
            .set(1);
        self.metrics
            .leader_epoch
            .with_label_values(&[&self.lane])
            .set(term.epoch.0);
        self.metrics.leadership_changes.inc();
        self.term.send_replace(Some(term));
    }

    pub(super) fn end(&self, term: &Term, reason: &str) {
        term.revoke();
        tracing::warn!(epoch = term.epoch.0, lane = %self.lane, reason, "leadership ended");
        self.metrics
            .is_leader
            .with_label_values(&[&self.lane])
            .set(0);
        self.metrics.leadership_changes.inc();
        self.term.send_replace(None);
    }
}

#[cfg(test)]
impl Leadership {
    /// Publishes `term` as the elector does when it wins one.
    pub(crate) fn begin_for_test(&self, term: Term) {
        self.begin(term);
    }
}
