//! Fast failover: a follower notices the leader's death through PostgreSQL, not the
//! Redis lease.
//!
//! A lease cannot tell "dead" from "slow": waiting for it to expire takes the whole
//! TTL. PostgreSQL can tell: when a process dies the kernel closes its
//! sockets and PostgreSQL ends its sessions at once, releasing their session-level
//! advisory locks. The leader's fence session holds the leader lock for its whole term
//! (`leadership::fence`); each follower keeps a session of its own waiting for that
//! lock (a blocking `pg_advisory_lock`, so the wake-up is immediate, where polling
//! with `pg_try_advisory_lock` would cost up to a retry interval and LISTEN would need
//! the dying leader to speak).
//!
//! The follower the lock is granted to:
//!
//! 1. **Proves the leader's session is gone.** It armed only after seeing, on this
//!    same session, the lock held by the session pid the fence row records; the
//!    blocking wait returned on that session, so PostgreSQL stayed up in between (a
//!    restart would have broken our session too, and after one a follower re-arms only
//!    once the leader holds the lock again). It then checks that the recorded pid is
//!    gone from `pg_stat_activity`. A fence row that names another session means the
//!    leader lives on in a new one (or a new term began): it lets go.
//! 2. **Waits out the dead session's permits** ([`FenceTiming::takeover_after`]): the
//!    leader could confirm its epoch only on a session holding the lock, its old one
//!    is gone, and we hold the lock, so after one fence window no send of that term
//!    can start.
//! 3. **Bumps the epoch on this session**, which has held the lock since before the
//!    wait, and only while the fence row still names the epoch and the dead session
//!    it armed on (`store::fence::LeaderSession::take_over_term`). A leader that is
//!    alive and lost only its session (a reset by a proxy, a NAT or an operator's
//!    `pg_terminate_backend`) records its new session first thing, before it asks for
//!    the lock: the takeover then does nothing and lets go, and the leader keeps its
//!    term. Because the bump commits on a session that holds the lock, no session of
//!    the old term held it from the wait's start to the commit, so no permit of the
//!    old term runs past the bump: `quiet_at` is the bump itself, and the rate holds
//!    across the handover.
//! 4. **Replaces the dead term's key** by compare-and-swap on that term's token (or
//!    sets it if it expired meanwhile): never a blind DEL, never a newer term's key.
//!    This session then becomes the new term's fence session. If Redis refuses, the
//!    new epoch is left without a lease: the session lets go of the lock and forgets
//!    itself in the fence row, and whoever holds the key next bumps again.
//!
//! A paused leader (SIGSTOP, GC, a VM stall) keeps its session, so it is replaced at
//! lease expiry as before; the new leader then ends the paused leader's session to
//! take the lock. Fencing is unchanged and remains the safety net.

use std::time::Duration;

use tokio::time::Instant;

use super::{FenceTiming, RedisLease};
use crate::domain::{Epoch, LeaseToken};
use crate::store::fence::{LeaderSession, SessionRole};
use crate::store::{Store, StoreError};

/// A term taken over from a dead leader: its epoch (already bumped), the new lease
/// token, when the lease was set (it is measured from then), and the session that
/// holds the leader lock.
pub struct Takeover<S = LeaderSession> {
    pub epoch: Epoch,
    pub token: LeaseToken,
    pub started: Instant,
    pub session: S,
}

/// Watches for the leader's death until a takeover succeeds. Dropping the future
/// closes the watch session, which also ends its wait inside PostgreSQL.
pub async fn for_a_dead_leader(
    store: &Store,
    lease: &RedisLease,
    fence: FenceTiming,
    retry: Duration,
    replica_id: &str,
) -> Takeover {
    loop {
        match attempt(store, lease, fence, replica_id).await {
            Ok(Some(takeover)) => return takeover,
            Ok(None) => {}
            Err(err) => tracing::debug!(error = err, "leader watch interrupted; watching again"),
        }
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        tokio::time::sleep(retry.mul_f64(jitter)).await;
    }
}

/// One arming and wait. `Ok(None)`: nothing to take over (not armed, or the leader
/// lives on, or a newer term began, or Redis refused).
async fn attempt(
    store: &Store,
    lease: &RedisLease,
    fence: FenceTiming,
    replica_id: &str,
) -> Result<Option<Takeover>, String> {
    let session = LeaderSession::open(store, SessionRole::Watch)
        .await
        .map_err(text)?;
    let armed = session.term_record().await.map_err(text)?;
    let Some(leader_pid) = armed.session_pid else {
        return Ok(None);
    };
    if session.lock_holder().await.map_err(text)?.map(|h| h.pid) != Some(leader_pid) {
        return Ok(None);
    }
    session.lock().await.map_err(text)?;
    let record = session.term_record().await.map_err(text)?;
    let still_dead = record.epoch == armed.epoch
        && record.session_pid == Some(leader_pid)
        && !session.backend_alive(leader_pid).await.map_err(text)?;
    let dead_token = match record.lease_token {
        Some(token) if still_dead => token,
        _ => {
            let _ = session.unlock().await;
            return Ok(None);
        }
    };
    tracing::warn!(
        epoch = record.epoch.0,
        "the leader's PostgreSQL session ended; taking over once its permits have run out"
    );
    tokio::time::sleep(fence.takeover_after()).await;
    let token = LeaseToken::generate();
    let epoch = session
        .take_over_term(record.epoch, leader_pid, replica_id, token.as_str())
        .await
        .map_err(text)?;
    let Some(epoch) = epoch else {
        tracing::info!(
            epoch = record.epoch.0,
            "the leader came back in a new PostgreSQL session; it keeps its term"
        );
        let _ = session.unlock().await;
        return Ok(None);
    };
    let started = Instant::now();
    match lease.take_over(&dead_token, &token).await {
        Ok(true) => Ok(Some(Takeover {
            epoch,
            token,
            started,
            session,
        })),
        outcome => {
            match outcome {
                Err(err) => tracing::warn!(
                    epoch = epoch.0,
                    error = %err.details(),
                    "took the epoch over but Redis did not answer; letting it go"
                ),
                _ => tracing::info!(
                    epoch = epoch.0,
                    "took the epoch over but another replica holds the lease now; letting it go"
                ),
            }
            if let Err(err) = store.clear_leader_session(epoch).await {
                tracing::debug!(error = %err, "could not clear the leader session");
            }
            Ok(None)
        }
    }
}

fn text(err: StoreError) -> String {
    err.to_string()
}

/// How often a follower looks at the leader's fence session for signs of life.
fn stall_poll(fence: FenceTiming) -> Duration {
    fence.window / 2
}

/// How often a leader writes its liveness beat in Redis (250 ms with the default
/// lease), as often as a follower looks.
pub fn beat_every(fence: FenceTiming) -> Duration {
    fence.window / 2
}

/// How long the leader's fence session must show no new statement, in this follower's
/// continuous watch, before the leader counts as stalled: two fence windows, eight of
/// the leader's confirmations (1 s with the default lease).
pub fn stall_after(fence: FenceTiming) -> Duration {
    fence.window * 2
}

/// Watches the leader's fence session and its liveness beat in Redis until both stand
/// still for [`stall_after`], then fences the leader out and takes its lease over
/// (docs/design.md#a-stalled-leader). Both, so that a blip on the leader's path to one
/// of them moves nothing: only a leader that stopped running (or lost both paths) is
/// replaced. A stall counts only when seen by this follower's own successive readings:
/// after a pause of PostgreSQL, Redis or this follower, the first reading starts the
/// watch afresh, so a blip that stopped everyone never looks like a stalled leader.
/// The takeover is a compare-and-set on the term, the session and its last statement,
/// so a leader that ran one statement meanwhile keeps its term.
pub async fn for_a_stalled_leader(
    store: &Store,
    lease: &RedisLease,
    fence: FenceTiming,
    replica_id: &str,
) -> Takeover<()> {
    type Reading = (crate::store::fence::StallReading, Option<String>);
    let mut watched: Option<(Reading, Instant)> = None;
    loop {
        tokio::time::sleep(stall_poll(fence)).await;
        let reading = match store.stall_reading().await {
            Ok(Some(reading)) => reading,
            Ok(None) | Err(_) => {
                watched = None;
                continue;
            }
        };
        // A beat of this term only: a newer term's, or none (the key lived out).
        let beat = match lease.last_beat().await {
            Ok(beat) => beat.filter(|beat| beat.starts_with(&reading.lease_token)),
            Err(_) => {
                watched = None;
                continue;
            }
        };
        let reading: Reading = (reading, beat);
        let since = match &watched {
            Some((seen, since)) if *seen == reading => *since,
            _ => {
                watched = Some((reading, Instant::now()));
                continue;
            }
        };
        let (reading, _) = reading;
        if since.elapsed() < stall_after(fence) {
            continue;
        }
        // The watch goes on through a failed attempt: when a claim the stalled leader
        // froze in holds the fence row, the attempt ends that transaction and the next
        // poll tries again at once, rather than watching a whole stall anew.
        let token = LeaseToken::generate();
        let epoch = match store
            .take_over_stalled_term(
                &reading,
                replica_id,
                token.as_str(),
                fence.window,
                stall_after(fence),
            )
            .await
        {
            Ok(Some(epoch)) => epoch,
            Ok(None) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "could not fence out a stalled leader");
                continue;
            }
        };
        let started = Instant::now();
        tracing::warn!(
            epoch = reading.epoch.0,
            new_epoch = epoch.0,
            stalled_ms = since.elapsed().as_millis() as u64,
            "the leader's PostgreSQL session has run nothing; fenced it out"
        );
        match lease.take_over(&reading.lease_token, &token).await {
            Ok(true) => {
                return Takeover {
                    epoch,
                    token,
                    started,
                    session: (),
                };
            }
            outcome => {
                if let Err(err) = outcome {
                    tracing::warn!(
                        epoch = epoch.0,
                        error = %err.details(),
                        "fenced out a stalled leader but Redis did not answer; letting the lane go"
                    );
                }
                if let Err(err) = store.clear_leader_session(epoch).await {
                    tracing::debug!(error = %err, "could not clear the leader session");
                }
            }
        }
    }
}
