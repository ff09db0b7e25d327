//! The election loops: Redis lease mode and single-replica mode.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use backon::Retryable;
use tokio_util::sync::CancellationToken;

use super::backend::{ElectionBackend, LiveElection};
use super::fence::FenceTiming;
use super::{Leadership, ReleaseSignal, Spread, Term};
use crate::domain::{Epoch, LeaseToken};
use crate::metrics::Metrics;
use crate::retry::connect_backoff;

/// Timing of the Redis lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub retry_interval: Duration,
}

impl LeaseTiming {
    /// Safety margin subtracted from the TTL for the local deadline: clock rate
    /// differences between this host and Redis (as in Redlock: 1 % + 2 ms) plus a
    /// little scheduling slack.
    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2) + self.ttl / 50
    }

    fn extend_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The follower's next attempt: the retry interval ± 20 % jitter.
    fn follower_wait(&self) -> Duration {
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        self.retry_interval.mul_f64(jitter)
    }
}

/// Everything the Redis elector of one lane needs.
pub struct Elector<B = LiveElection> {
    /// The lane's lease in Redis and its fence row in PostgreSQL.
    pub backend: B,
    /// The lane's name.
    pub lane: String,
    pub timing: LeaseTiming,
    pub leadership: Arc<Leadership>,
    pub metrics: Arc<Metrics>,
    pub replica_id: String,
    /// Raised when a leaving leader announces the lane's lock is free.
    pub released: Arc<ReleaseSignal>,
    pub fence: FenceTiming,
    /// Which replica should lead which lane (docs/design.md#spread).
    pub spread: Arc<Spread>,
}

/// What a release tells the followers.
#[derive(Debug, Clone, Copy)]
enum Announce {
    /// Nothing: the lease was not ours to announce.
    No,
    /// This replica lets go and counts as gone: its id, as releases before lanes said.
    Leaving,
    /// This replica stays and hands the lane to its assignee: `handover:<id>`.
    HandingOver,
}

/// Starts the announcement of a replica that stays (see [`Announce::HandingOver`]).
const HANDOVER: &str = "handover:";

enum TermEnd {
    Resigned,
    /// Given to the replica the lane is assigned to (docs/design.md#spread).
    HandedOver,
    /// A replica of a release without lanes is live: its claim and its rescue take
    /// every lane's rows, so lanes other than `default` stop (docs/design.md#upgrading-to-lanes).
    OlderReleaseLive,
    Lost(&'static str),
    /// Fenced out by a newer epoch, or PostgreSQL unreachable for too long.
    Abandoned,
}

/// How a lock was won.
struct Acquired<S> {
    token: LeaseToken,
    /// When the winning attempt started: the lease is measured from then.
    started: Instant,
    /// Set when it was taken over from a dead or stalled leader: the epoch already
    /// bumped, and (from a dead leader) the session holding the leader lock, whose old
    /// term's sends are all over.
    takeover: Option<(Epoch, Option<S>)>,
}

/// Ends a term's fence session: first the fence row forgets it (so followers do not
/// take its end for a death), then the session closes, releasing the leader lock.
async fn close_fence_session<B: ElectionBackend>(
    backend: &B,
    term: &Term,
    keeper: tokio::task::JoinHandle<()>,
) {
    let forget = backend.clear_leader_session(term.epoch);
    if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(1), forget).await {
        tracing::debug!(error = %err, "could not clear the leader session");
    }
    keeper.abort();
}

/// Runs the lease loop until `resign` fires. On resign as leader the lock is released
/// and followers are told, so one of them takes over at once.
pub async fn run_redis_elector<B: ElectionBackend>(elector: Elector<B>, resign: CancellationToken) {
    let mut redis_ok = true;
    loop {
        let Some(acquired) = elector.acquire(&resign, &mut redis_ok).await else {
            return;
        };
        let Acquired {
            token,
            started: attempt_started,
            takeover,
        } = acquired;
        let deadline = attempt_started + elector.timing.ttl - elector.timing.drift();
        let (epoch, session) = match takeover {
            // Bumped already, on the session that holds the leader lock.
            Some((epoch, session)) => (Ok(Ok(epoch)), session),
            // The old leader may start a send until a fence window after this bump.
            None => (
                tokio::time::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    elector.backend.start_term(
                        &elector.replica_id,
                        Some(token.as_str()),
                        elector.fence.window,
                    ),
                )
                .await,
                None,
            ),
        };
        let epoch = match epoch {
            Ok(Ok(epoch)) => epoch,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "won the lock but could not fence in PostgreSQL; letting it go");
                elector.release(&token, Announce::No).await;
                elector.pause(&resign).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    "won the lock but PostgreSQL did not answer within the lease; letting it go"
                );
                elector.release(&token, Announce::No).await;
                elector.pause(&resign).await;
                continue;
            }
        };
        let term = Term::new(epoch, deadline);
        if !term.is_valid() {
            elector.release(&token, Announce::No).await;
            continue;
        }
        elector.leadership.begin(term.clone());
        let keeper = elector
            .backend
            .keep_fence(&term, &elector.leadership, elector.fence, session);
        let end = elector.keep(&token, &term, &resign).await;
        close_fence_session(&elector.backend, &term, keeper).await;
        match end {
            TermEnd::Resigned => {
                elector.leadership.end(&term, "shutting down");
                elector.release(&token, Announce::Leaving).await;
                return;
            }
            TermEnd::OlderReleaseLive => {
                elector.leadership.end(
                    &term,
                    "a replica of a release without lanes is live; this lane waits for it to go",
                );
                elector.release(&token, Announce::HandingOver).await;
            }
            TermEnd::HandedOver => {
                elector.spread.handed_over(&elector.lane, term.epoch.0);
                elector
                    .leadership
                    .end(&term, "handed over to the replica the lane is assigned to");
                elector.release(&token, Announce::HandingOver).await;
            }
            TermEnd::Lost(reason) => {
                elector.leadership.end(&term, reason);
                elector.release(&token, Announce::No).await;
            }
            TermEnd::Abandoned => {
                let reason = if term.was_fenced() {
                    "fenced by a newer epoch"
                } else {
                    "PostgreSQL unreachable"
                };
                elector.leadership.end(&term, reason);
                elector.release(&token, Announce::Leaving).await;
                elector.pause(&resign).await;
            }
        }
    }
}

impl<B: ElectionBackend> Elector<B> {
    /// Follower loop: try `SET NX` every retry interval (with jitter), or at once when
    /// the leader announces its release, or take over the moment the leader's
    /// PostgreSQL session ends (`leadership::takeover`). A replica that cannot reach
    /// PostgreSQL does not campaign: it could neither fence nor send.
    async fn acquire(
        &self,
        resign: &CancellationToken,
        redis_ok: &mut bool,
    ) -> Option<Acquired<B::Session>> {
        let mut database_ok = true;
        let dead_leader =
            self.backend
                .dead_leader(self.fence, self.timing.retry_interval, &self.replica_id);
        let mut dead_leader = std::pin::pin!(dead_leader);
        let stalled_leader = self.backend.stalled_leader(self.fence, &self.replica_id);
        let mut stalled_leader = std::pin::pin!(stalled_leader);
        // A replica that just let this lane go: it counts as gone when deciding whose
        // lane it is now.
        let mut leaving: Option<String> = None;
        // Since when the lease has been seen free while assigned to another replica.
        let mut free_since: Option<Instant> = None;
        loop {
            if resign.is_cancelled() {
                return None;
            }
            match self.backend.database_ok().await {
                Ok(()) if !database_ok => {
                    tracing::info!("PostgreSQL answers again; campaigning for leadership");
                    database_ok = true;
                }
                Ok(()) => {}
                Err(err) => {
                    if database_ok {
                        tracing::warn!(error = %err, "cannot reach PostgreSQL; not campaigning for leadership");
                        database_ok = false;
                    }
                    tokio::select! {
                        () = resign.cancelled() => return None,
                        () = tokio::time::sleep(self.timing.follower_wait()) => {}
                    }
                    continue;
                }
            }
            let mut attempt = self.spread.may_lead(&self.lane);
            if attempt && !self.spread.prefers_me(&self.lane, leaving.as_deref()) {
                attempt = self.lease_left_free(&mut free_since).await;
            }
            leaving = None;
            let started = Instant::now();
            let outcome = if attempt {
                self.backend.try_acquire().await
            } else {
                Ok(None)
            };
            match outcome {
                Ok(Some(token)) => {
                    self.metrics.lock_op("acquire", "ok");
                    if !*redis_ok {
                        tracing::info!("Redis answers again");
                        *redis_ok = true;
                    }
                    return Some(Acquired {
                        token,
                        started,
                        takeover: None,
                    });
                }
                Ok(None) if !attempt => {}
                Ok(None) => {
                    self.metrics.lock_op("acquire", "busy");
                    if !*redis_ok {
                        tracing::info!("Redis answers again");
                        *redis_ok = true;
                    }
                }
                Err(err) => {
                    self.metrics.lock_op("acquire", "error");
                    if *redis_ok {
                        tracing::warn!(error = %err, "cannot reach Redis; no replica can lead until it answers");
                        *redis_ok = false;
                    }
                }
            }
            tokio::select! {
                () = resign.cancelled() => return None,
                () = tokio::time::sleep(self.timing.follower_wait()) => {}
                announcer = self.released.wait() => {
                    // A replica handing a lane over stays: the assignment stands.
                    leaving = announcer.filter(|a| !a.starts_with(HANDOVER));
                }
                takeover = &mut dead_leader => {
                    self.metrics.lock_op("acquire", "ok");
                    tracing::info!("took the lock over from a dead leader");
                    return Some(Acquired {
                        token: takeover.token,
                        started: takeover.started,
                        takeover: Some((takeover.epoch, Some(takeover.session))),
                    });
                }
                takeover = &mut stalled_leader => {
                    self.metrics.lock_op("acquire", "ok");
                    tracing::info!("took the lock over from a stalled leader");
                    return Some(Acquired {
                        token: takeover.token,
                        started: takeover.started,
                        takeover: Some((takeover.epoch, None)),
                    });
                }
            }
        }
    }

    /// For a lane assigned to another replica: whether to compete for it now. Only once
    /// its lease has been seen free for a whole retry interval, which gives its assignee
    /// the first chance; a lease that is held restarts the wait.
    async fn lease_left_free(&self, free_since: &mut Option<Instant>) -> bool {
        match self.backend.lease_held().await {
            Ok(true) => {
                *free_since = None;
                false
            }
            Ok(false) => {
                let since = *free_since.get_or_insert_with(Instant::now);
                since.elapsed() >= self.timing.retry_interval
            }
            // The attempt reports Redis's state.
            Err(_) => true,
        }
    }

    /// Leader loop: extend every TTL/3 while the local deadline holds. A failed or
    /// errored extension ends the term at once (docs/design.md#keep): the key may be gone
    /// and another replica may already hold it.
    async fn keep(&self, token: &LeaseToken, term: &Term, resign: &CancellationToken) -> TermEnd {
        let mut next_extend = Instant::now() + self.timing.extend_every();
        let mut next_spread_check = Instant::now() + self.timing.retry_interval;
        let beat_every = super::takeover::beat_every(self.fence);
        let mut next_beat = Instant::now();
        let mut beats: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = resign.cancelled() => return TermEnd::Resigned,
                () = tokio::time::sleep_until(next_beat) => {
                    beats += 1;
                    // Bounded: a slow Redis must not hold up the extension below.
                    let beat = self.backend.beat(token, beats, beat_every * 8);
                    if let Ok(Err(err)) = tokio::time::timeout(beat_every, beat).await {
                        tracing::debug!(error = %err, "liveness beat not written");
                    }
                    next_beat = Instant::now() + beat_every;
                }
                () = tokio::time::sleep_until(next_spread_check) => {
                    if !self.spread.may_lead(&self.lane) {
                        return TermEnd::OlderReleaseLive;
                    }
                    if self.spread.should_hand_over(&self.lane, term.epoch.0) {
                        return TermEnd::HandedOver;
                    }
                    next_spread_check = Instant::now() + self.timing.retry_interval;
                }
                () = self.leadership.abandoned.notified() => {
                    if term.is_revoked() {
                        return TermEnd::Abandoned;
                    }
                }
                () = tokio::time::sleep_until(term.deadline()) => {
                    self.metrics.lock_op("extend", "lost");
                    return TermEnd::Lost("lease deadline passed without a successful extension");
                }
                () = tokio::time::sleep_until(next_extend) => {
                    if !term.is_valid() {
                        return TermEnd::Lost("lease deadline passed");
                    }
                    let sent = Instant::now();
                    match self.backend.extend(token).await {
                        Ok(true) => {
                            self.metrics.lock_op("extend", "ok");
                            term.extend_until(sent + self.timing.ttl - self.timing.drift());
                            next_extend = sent + self.timing.extend_every();
                        }
                        Ok(false) => {
                            self.metrics.lock_op("extend", "lost");
                            return TermEnd::Lost("lock expired or taken by another replica");
                        }
                        Err(err) => {
                            self.metrics.lock_op("extend", "error");
                            tracing::warn!(error = %err, "could not extend the lease");
                            return TermEnd::Lost("lease extension failed");
                        }
                    }
                }
            }
        }
    }

    /// Compare-and-delete the lock, and tell the followers it is free as `announce`
    /// says.
    async fn release(&self, token: &LeaseToken, announce: Announce) {
        match self.backend.release(token).await {
            Ok(true) => {
                self.metrics.lock_op("release", "ok");
                let message = match announce {
                    Announce::No => None,
                    Announce::Leaving => Some(self.replica_id.clone()),
                    Announce::HandingOver => Some(format!("{HANDOVER}{}", self.replica_id)),
                };
                if let Some(message) = message {
                    if let Err(err) = self.backend.announce_release(&message).await {
                        tracing::warn!(error = %err, "could not announce the release");
                    }
                }
                tracing::info!("released the leader lock");
            }
            Ok(false) => self.metrics.lock_op("release", "lost"),
            Err(err) => {
                self.metrics.lock_op("release", "error");
                tracing::warn!(error = %err, "could not release the lock; it expires by itself");
            }
        }
    }

    /// A short wait before competing again after giving a lock back.
    async fn pause(&self, resign: &CancellationToken) {
        tokio::select! {
            () = resign.cancelled() => {}
            () = tokio::time::sleep(self.timing.follower_wait()) => {}
        }
    }
}

/// Single-replica mode (`DISTRIBUTED_LOCK_ENABLED=false`): no lock; the replica fences
/// itself with a new epoch once PostgreSQL answers and leads until it stops. If
/// PostgreSQL stays away for `resign_after` it stands down and fences itself again once
/// PostgreSQL answers. If a newer epoch appears (a second replica in this mode), it
/// stands down for good rather than fight.
pub async fn run_single_replica<B: ElectionBackend>(
    backend: B,
    leadership: Arc<Leadership>,
    replica_id: String,
    fence: FenceTiming,
    resign: CancellationToken,
) {
    loop {
        let bump = || backend.start_term(&replica_id, None, fence.window);
        let epoch = tokio::select! {
            () = resign.cancelled() => return,
            result = bump.retry(connect_backoff()).notify(|err, wait| {
                tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "cannot fence in PostgreSQL yet");
            }) => match result {
                Ok(epoch) => epoch,
                Err(err) => {
                    tracing::error!(error = %err, "giving up on fencing; this replica will not dispatch");
                    return;
                }
            },
        };
        let term = Term::unbounded(epoch);
        leadership.begin(term.clone());
        let keeper = backend.keep_fence(&term, &leadership, fence, None);
        loop {
            tokio::select! {
                () = resign.cancelled() => {
                    close_fence_session(&backend, &term, keeper).await;
                    leadership.end(&term, "shutting down");
                    return;
                }
                () = leadership.abandoned.notified() => {
                    if term.is_revoked() {
                        break;
                    }
                }
            }
        }
        keeper.abort();
        if term.was_fenced() {
            tracing::error!(
                "another replica took a newer epoch while DISTRIBUTED_LOCK_ENABLED=false; \
                 two replicas in single-replica mode fence each other out. This one stops dispatching."
            );
            leadership.end(&term, "fenced by a newer epoch");
            resign.cancelled().await;
            return;
        }
        leadership.end(&term, "PostgreSQL unreachable");
    }
}

#[cfg(test)]
mod tests;
