//! PostgreSQL fences every send, not only claims and results (docs/design.md#fencing).
//!
//! The Redis lease says who *should* dispatch, but Redis can lose the key (a failover
//! to a lagging replica, a restart without persistence, an eviction) while the holder
//! is cut off from Redis and still sending. Then a second replica acquires, bumps the
//! epoch and, sooner or later, re-claims the first one's rows. Whether the first one
//! has stopped by then must not depend on anything Redis says.
//!
//! # The rule
//!
//! While it leads, a replica's fence keeper reads the fence row every
//! [`FenceTiming::confirm_every`] on a connection of its own. A reading that shows our
//! epoch, for a query *sent* at local time `s`, lets sends start until `s + window`
//! ([`Term::send_permit`]). A reading with a newer epoch ends the term at once.
//!
//! # Why a new leader may re-claim older epochs' rows after [`FenceTiming::rescue_wait`]
//!
//! Let `T` be the moment the new epoch's bump commits (the fence row's `acquired_at`,
//! taken just before the commit). A confirmation of an older epoch read a snapshot
//! taken before `T`, so its query was sent at `s < T`, and it lets sends start only
//! until `s + window < T + window`. A send that started by then has its answer, or has
//! been abandoned, `longest_send` later (`SMS_API_TIMEOUT` plus the client's grace).
//! So from `T + window + longest_send` on, no send of an older epoch can start or be
//! in flight, whatever Redis did: the rescue waits that plus [`RESCUE_MARGIN`]. The
//! argument uses only PostgreSQL's commit order and the old leader's own monotonic
//! clock; the margin covers the rate difference between two clocks over a few
//! seconds, and the few instructions between a permit and the request leaving.
//!
//! What it cannot cover, and the README states as a duplicate window: a process
//! frozen (SIGSTOP, a VM stall) for longer than the margin exactly between its permit
//! and the moment its request leaves. The duplicate then carries the same
//! `Idempotency-Key`.
//!
//! The same confirmation carries the desired state: a stopped cluster gets no new
//! fence, so `stop` only has to wait out one window to know that nothing starts after
//! it answers.
//!
//! A leader whose confirmations fail for [`FenceTiming::resign_after`] resigns (it
//! cannot record results either), so that a replica that can reach PostgreSQL leads.
//!
//! # The leader lock
//!
//! Confirmations run only on the leader's fence session, and that session holds the
//! leader advisory lock (`store::fence::LEADER_LOCK`) for the whole term. A session
//! that lost the lock (it ended: the process died, the connection broke) can confirm
//! nothing more, and a new session must take the lock again first; the current
//! epoch's leader may end a stale holder's session to get it. So once a follower holds
//! the lock, the old leader's permits end within one window of its session's end:
//! what lets `leadership::takeover` replace a crashed leader without waiting for its
//! Redis lease.
//!
//! A leader that is alive keeps its term through a reset of its session: the new
//! session records itself in the fence row before it asks for the lock, and a
//! follower holding the lock takes the term over only while the row still names the
//! dead session. A session that merely falls silent (a stalled path) is kept, not
//! replaced: replacing it would end its hold on the lock when the path came back.
//! docs/design.md, "Leadership", tells the whole argument.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Leadership, Term};
use crate::domain::Epoch;
use crate::store::fence::{LeaderSession, SessionRole};
use crate::store::{Store, StoreError};

/// Added to the rescue wait for clock rates, scheduling and the commit of the bump
/// (see the module documentation).
pub const RESCUE_MARGIN: Duration = Duration::from_secs(2);

/// Timing of the PostgreSQL fence, derived from the lease TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceTiming {
    /// How long one confirmation lets sends start.
    pub window: Duration,
    /// How often the keeper confirms: four times per window, so one slow or lost
    /// reading never lets a healthy leader's fence lapse.
    pub confirm_every: Duration,
    /// A leader whose claims or confirmations have failed this long resigns.
    pub resign_after: Duration,
}

impl FenceTiming {
    /// A third of the TTL, between 100 ms and 500 ms: short enough that a stop answers,
    /// a crashed leader is replaced and a rescue starts within a second or seconds,
    /// long enough that a confirmation (one small read) every quarter of it costs
    /// nothing. Resigning takes two TTLs of failure: a PostgreSQL blip does not move
    /// leadership, a partition does.
    pub fn for_lease(ttl: Duration) -> Self {
        let window = (ttl / 3).clamp(Duration::from_millis(100), Duration::from_millis(500));
        Self {
            window,
            confirm_every: window / 4,
            resign_after: ttl * 2,
        }
    }

    /// How long `stop` waits after its commit before it answers: every confirmation
    /// that still saw the cluster running was sent before the commit, so its window
    /// closes within `window` of it (plus a little for the two clocks). After that no
    /// send starts until `start`.
    pub fn stop_settles_after(&self) -> Duration {
        self.window + Duration::from_millis(50)
    }

    /// How long a follower holding the leader lock waits, after the old leader's
    /// session ended, before it replaces the old term: the old leader's last
    /// confirmation ran on that session, so its permits end within a window of it.
    pub fn takeover_after(&self) -> Duration {
        self.window + Duration::from_millis(50)
    }

    /// How long after the epoch bump the new leader waits before it returns an older
    /// epoch's `sending` rows to `pending`. `longest_send` is the longest a send can
    /// last once started (`ProviderClient::longest_exchange`).
    pub fn rescue_wait(&self, longest_send: Duration) -> Duration {
        self.window + longest_send + RESCUE_MARGIN
    }
}

/// Why a fence session could not be established.
enum EstablishError {
    /// A newer epoch exists.
    Fenced(Epoch),
    Failed(String),
}

impl From<StoreError> for EstablishError {
    fn from(err: StoreError) -> Self {
        Self::Failed(err.to_string())
    }
}

/// How long a leader waits for a follower's watch session to let go of the leader lock
/// before it ends that session. A follower that took the lock when the leader's
/// previous session ended decides within [`FenceTiming::takeover_after`] of taking it,
/// and lets go once it sees the leader's new session recorded (see
/// `leadership::takeover`); a frozen one is ended after this.
fn watcher_grace(timing: FenceTiming) -> Duration {
    timing.takeover_after() * 2 + Duration::from_millis(200)
}

/// How long (re)establishing the fence session may take before the attempt counts
/// as failed: a connection, the wait for a watching follower, a few statements.
fn establish_timeout(timing: FenceTiming) -> Duration {
    watcher_grace(timing) + Duration::from_secs(2)
}

/// Makes `session` (or a new one) the term's fence session: it is recorded in the
/// fence row and holds the leader lock.
///
/// A new session records itself first, before it asks for the lock: that is the
/// leader's sign of life to a follower that took the lock when the leader's previous
/// session ended (a reset by a proxy, a NAT, an operator), which then lets go instead
/// of taking the term over. The lock's holder is ended if it is a stale fence session
/// (an older term's leader, paused, or this leader's own broken one), or a watch that
/// has not let go within [`watcher_grace`].
async fn establish(
    store: &Store,
    epoch: Epoch,
    session: Option<LeaderSession>,
    timing: FenceTiming,
) -> Result<LeaderSession, EstablishError> {
    let session = match session {
        Some(session) => session,
        None => {
            let session = LeaderSession::open(store, SessionRole::Fence).await?;
            if !session.record_as_leader(epoch).await? {
                return Err(EstablishError::Fenced(session.term_record().await?.epoch));
            }
            let waiting_since = Instant::now();
            while !session.try_lock().await? {
                let record = session.term_record().await?;
                if record.epoch != epoch {
                    return Err(EstablishError::Fenced(record.epoch));
                }
                if let Some(holder) = session.lock_holder().await? {
                    let stale = holder.pid != session.pid()
                        && (holder.role == Some(SessionRole::Fence)
                            || waiting_since.elapsed() >= watcher_grace(timing));
                    if stale {
                        tracing::info!(
                            pid = holder.pid,
                            role = ?holder.role,
                            "ending a stale holder of the leader lock"
                        );
                        session.terminate(holder.pid).await?;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            session
        }
    };
    if !session.record_as_leader(epoch).await? {
        let record = session.term_record().await?;
        return Err(EstablishError::Fenced(record.epoch));
    }
    Ok(session)
}

/// Keeps confirming `term`'s epoch until the term ends (the caller aborts this task)
/// or PostgreSQL shows a newer epoch, or stops answering for `resign_after`.
/// `session`, when given, already holds the leader lock (a takeover after the old
/// leader's session ended).
pub async fn keep(
    term: Term,
    store: Store,
    leadership: Arc<Leadership>,
    timing: FenceTiming,
    session: Option<LeaderSession>,
) {
    let mut given = session;
    let mut session: Option<LeaderSession> = None;
    let mut last_confirmed = term.began;
    let mut failing = false;
    loop {
        if term.is_revoked() {
            return;
        }
        let mut problem: Option<String> = None;
        if session.as_ref().is_none_or(LeaderSession::is_closed) {
            session = None;
            let attempt = establish(&store, term.epoch, given.take(), timing);
            match tokio::time::timeout(establish_timeout(timing), attempt).await {
                Ok(Ok(established)) => session = Some(established),
                Ok(Err(EstablishError::Fenced(newer))) => {
                    leadership.report_fenced(&term, newer);
                    return;
                }
                Ok(Err(EstablishError::Failed(err))) => problem = Some(err),
                Err(_) => {
                    problem = Some(format!(
                        "no fence session within {} ms",
                        establish_timeout(timing).as_millis()
                    ))
                }
            }
        }
        let sent = Instant::now();
        if let Some(current) = &session {
            match tokio::time::timeout(timing.window, current.read()).await {
                Ok(Ok(reading)) if reading.epoch == term.epoch => {
                    if failing {
                        tracing::info!(epoch = term.epoch.0, "PostgreSQL confirms the epoch again");
                        failing = false;
                    }
                    last_confirmed = sent;
                    term.confirm(sent, timing.window, reading.running);
                }
                Ok(Ok(reading)) => {
                    leadership.report_fenced(&term, reading.epoch);
                    return;
                }
                Ok(Err(err)) => {
                    session = None;
                    problem = Some(err.to_string());
                }
                Err(_) => {
                    // A silent connection (a stalled path) is kept: it still holds the
                    // leader lock, and its reads answer once the path does. Dropped, it
                    // would end that hold when the path came back, and a follower would
                    // take the term over (a blip must not move leadership). No permit
                    // is given meanwhile; a path that stays silent is closed by the
                    // kernel (TCP_USER_TIMEOUT) or ends the term (`resign_after`).
                    problem = Some(format!("no answer within {} ms", timing.window.as_millis()));
                }
            }
        }
        if let Some(problem) = problem {
            if !failing {
                tracing::warn!(
                    error = problem,
                    "cannot confirm the epoch; no send starts until PostgreSQL does"
                );
                failing = true;
            }
        }
        let failing_for = last_confirmed.elapsed();
        if failing && failing_for >= timing.resign_after {
            leadership.report_database_lost(&term, failing_for);
            return;
        }
        tokio::time::sleep_until(sent + timing.confirm_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest a send lasts with `SMS_API_TIMEOUT` = `timeout` (the provider
    /// client's own bound, not a number made up here).
    fn longest_send(timeout: Duration) -> Duration {
        crate::provider::ProviderClient::longest_exchange(timeout)
    }

    #[test]
    fn defaults_give_a_half_second_fence_and_an_eight_second_rescue() {
        let timing = FenceTiming::for_lease(Duration::from_secs(15));
        assert_eq!(timing.window, Duration::from_millis(500));
        assert_eq!(timing.confirm_every, Duration::from_millis(125));
        assert_eq!(timing.resign_after, Duration::from_secs(30));
        assert_eq!(
            timing.rescue_wait(longest_send(Duration::from_secs(6))),
            Duration::from_millis(8_600)
        );
    }

    /// The rescue argument of the module documentation, played out on a timeline for
    /// many TTLs and provider timeouts: the old leader's last confirmation query leaves
    /// just before the bump commits, its last send starts at the very end of that
    /// confirmation's window and lasts as long as a send can. The rescue comes later,
    /// by at least the margin, whatever the lease TTL is.
    #[test]
    fn the_rescue_starts_after_the_last_possible_send_of_an_older_epoch_ends() {
        for ttl_ms in [400, 1_000, 2_000, 8_000, 15_000, 20_000, 36_000, 120_000] {
            for timeout_ms in [100, 1_000, 2_000, 6_000, 30_000] {
                let ttl = Duration::from_millis(ttl_ms);
                let timeout = Duration::from_millis(timeout_ms);
                let timing = FenceTiming::for_lease(ttl);
                let bump_commit = Duration::from_secs(1_000);
                let last_confirmation_sent = bump_commit - Duration::from_nanos(1);
                let last_send_start = last_confirmation_sent + timing.window;
                let last_send_end = last_send_start + longest_send(timeout);
                let rescue = bump_commit + timing.rescue_wait(longest_send(timeout));
                assert!(
                    rescue >= last_send_end + RESCUE_MARGIN,
                    "ttl {ttl:?} timeout {timeout:?}: rescue at {rescue:?}, last send ends {last_send_end:?}"
                );
            }
        }
    }

    /// A healthy leader's fence never lapses between confirmations (at least three
    /// more readings fit in a window), and a leader resigns for PostgreSQL only after
    /// its lease could have been renewed several times: a blip does not move
    /// leadership.
    #[test]
    fn confirmations_overlap_and_resigning_takes_longer_than_a_lease() {
        for ttl_ms in [400, 1_000, 2_000, 8_000, 15_000, 60_000] {
            let ttl = Duration::from_millis(ttl_ms);
            let timing = FenceTiming::for_lease(ttl);
            assert!(timing.confirm_every * 4 <= timing.window, "{timing:?}");
            assert!(timing.window <= ttl / 3 || timing.window == Duration::from_millis(100));
            assert!(timing.resign_after > ttl, "{timing:?}");
        }
    }
}
