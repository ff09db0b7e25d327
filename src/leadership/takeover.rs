//! Fast failover: a follower notices the leader's death through PostgreSQL, not the
//! Redis lease.
//!
//! A lease cannot tell "dead" from "slow", so replacing a crashed leader used to take
//! the whole TTL. PostgreSQL can tell: when a process dies the kernel closes its
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
//!    gone from `pg_stat_activity`. A fence row without a session pid means a new
//!    leader is taking over, or the old one left cleanly: it lets go.
//! 2. **Waits out the dead term's permits** ([`FenceTiming::takeover_after`]): the old
//!    leader could confirm only on its lock-holding session, which is gone, and we
//!    hold the lock, so no new session of it can take it either. After one fence
//!    window no send of that term can start; a leader that is alive but lost its
//!    session has stopped sending before it is deposed.
//! 3. **Replaces the dead term's key** by compare-and-swap on that term's token (a
//!    compare-and-DEL and our `SET` in one Lua step): never a blind DEL, never a newer
//!    term's key. Then the elector bumps the epoch as usual, recording that older
//!    epochs are already quiet, and this session, which holds the lock, becomes the
//!    new term's fence session.
//!
//! A paused leader (SIGSTOP, GC, a VM stall) keeps its session, so it is replaced at
//! lease expiry as before; the new leader then ends the paused leader's session to
//! take the lock. Fencing is unchanged and remains the safety net.

use std::time::{Duration, Instant};

use super::{FenceTiming, RedisLease};
use crate::domain::LeaseToken;
use crate::store::fence::LeaderSession;
use crate::store::{Store, StoreError};

/// A lock taken over from a dead leader: the new token, when the attempt started
/// (the lease is measured from then), and the session that holds the leader lock.
pub struct Takeover {
    pub token: LeaseToken,
    pub started: Instant,
    pub session: LeaderSession,
}

/// Watches for the leader's death until a takeover succeeds. Dropping the future
/// closes the watch session, which also ends its wait inside PostgreSQL.
pub async fn for_a_dead_leader(
    store: &Store,
    lease: &RedisLease,
    fence: FenceTiming,
    retry: Duration,
) -> Takeover {
    loop {
        match attempt(store, lease, fence).await {
            Ok(Some(takeover)) => return takeover,
            Ok(None) => {}
            Err(err) => tracing::debug!(error = err, "leader watch interrupted; watching again"),
        }
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        tokio::time::sleep(retry.mul_f64(jitter)).await;
    }
}

/// One arming and wait. `Ok(None)`: nothing to take over (not armed, or the leader
/// lives on, or its key is gone already).
async fn attempt(
    store: &Store,
    lease: &RedisLease,
    fence: FenceTiming,
) -> Result<Option<Takeover>, String> {
    let session = LeaderSession::open(store).await.map_err(text)?;
    let armed = session.leader_record().await.map_err(text)?;
    let Some(leader_pid) = armed.session_pid else {
        return Ok(None);
    };
    if session.lock_holder().await.map_err(text)? != Some(leader_pid) {
        return Ok(None);
    }
    session.lock().await.map_err(text)?;
    let record = session.leader_record().await.map_err(text)?;
    let dead_token = match (record.session_pid, record.lease_token) {
        (Some(pid), Some(token)) if !session.backend_alive(pid).await.map_err(text)? => token,
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
    let started = Instant::now();
    match lease.take_over(&dead_token).await {
        Ok(Some(token)) => Ok(Some(Takeover {
            token,
            started,
            session,
        })),
        Ok(None) => {
            tracing::info!("the dead leader's key is gone already; campaigning as usual");
            let _ = session.unlock().await;
            Ok(None)
        }
        Err(err) => {
            let _ = session.unlock().await;
            Err(format!("Redis: {}", err.details()))
        }
    }
}

fn text(err: StoreError) -> String {
    err.to_string()
}
