//! The election loops against a scripted lease and fence, with paused tokio time:
//! terms begin, are kept, lost, abandoned and resigned in milliseconds, and every time
//! asserted is exact virtual time. The invariants are those of docs/design.md
//! ("Leadership"): a term lasts only while the lease is certainly ours, a lost
//! extension ends it at once, a leaving leader announces the release, a replica that
//! cannot reach PostgreSQL does not campaign.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::leadership::takeover::Takeover;
use crate::leadership::{ElectionBackend, LeaseError};
use crate::store::StoreError;

const TTL: Duration = Duration::from_secs(15);
const RETRY: Duration = Duration::from_secs(1);

/// The lease key in Redis and the fence row's epoch, as the real ones behave.
#[derive(Default)]
struct World {
    /// The lease: its token and when it expires.
    holder: Option<(String, Instant)>,
    epoch: i64,
    redis_down: bool,
    database_down: bool,
    start_term_fails: bool,
    /// Extensions answer only after two TTLs, with an error, while set (a stalled
    /// path to Redis, up to the client's command timeout).
    extensions_hang: bool,
    acquire_attempts: Vec<Instant>,
    extensions: Vec<Instant>,
    announcements: usize,
}

#[derive(Clone, Default)]
struct FakeElection(Arc<Mutex<World>>);

impl FakeElection {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }

    fn holds(&self, token: &str) -> bool {
        matches!(&self.world().holder, Some((t, until)) if t == token && *until > Instant::now())
    }

    /// Another replica holds the lease for `ttl`.
    fn held_by_another(&self, ttl: Duration) {
        self.world().holder = Some(("another".into(), Instant::now() + ttl));
    }
}

fn redis_down() -> LeaseError {
    LeaseError("Redis is down (test)".into())
}

fn database_down() -> StoreError {
    StoreError::Unavailable("PostgreSQL is down (test)".into())
}

impl ElectionBackend for FakeElection {
    type Session = ();

    async fn database_ok(&self) -> Result<(), StoreError> {
        if self.world().database_down {
            Err(database_down())
        } else {
            Ok(())
        }
    }

    async fn try_acquire(&self) -> Result<Option<LeaseToken>, LeaseError> {
        let mut world = self.world();
        world.acquire_attempts.push(Instant::now());
        if world.redis_down {
            return Err(redis_down());
        }
        if matches!(&world.holder, Some((_, until)) if *until > Instant::now()) {
            return Ok(None);
        }
        let token = LeaseToken::generate();
        world.holder = Some((token.as_str().to_string(), Instant::now() + TTL));
        Ok(Some(token))
    }

    async fn extend(&self, token: &LeaseToken) -> Result<bool, LeaseError> {
        let hang = self.world().extensions_hang;
        if hang {
            tokio::time::sleep(TTL * 2).await;
            return Err(LeaseError("timed out (test)".into()));
        }
        let mut world = self.world();
        world.extensions.push(Instant::now());
        if world.redis_down {
            return Err(redis_down());
        }
        match &mut world.holder {
            Some((t, until)) if t == token.as_str() && *until > Instant::now() => {
                *until = Instant::now() + TTL;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, token: &LeaseToken) -> Result<bool, LeaseError> {
        let mut world = self.world();
        if world.redis_down {
            return Err(redis_down());
        }
        if matches!(&world.holder, Some((t, _)) if t == token.as_str()) {
            world.holder = None;
            return Ok(true);
        }
        Ok(false)
    }

    async fn announce_release(&self, _replica_id: &str) -> Result<(), LeaseError> {
        self.world().announcements += 1;
        Ok(())
    }

    async fn start_term(
        &self,
        _holder: &str,
        _lease_token: Option<&str>,
        _quiet_after: Duration,
    ) -> Result<Epoch, StoreError> {
        let mut world = self.world();
        if world.database_down || world.start_term_fails {
            return Err(database_down());
        }
        world.epoch += 1;
        Ok(Epoch(world.epoch))
    }

    async fn clear_leader_session(&self, _epoch: Epoch) -> Result<(), StoreError> {
        Ok(())
    }

    async fn beat(
        &self,
        _token: &LeaseToken,
        _seq: u64,
        _lives: Duration,
    ) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn lease_held(&self) -> Result<bool, LeaseError> {
        let world = self.world();
        if world.redis_down {
            return Err(redis_down());
        }
        Ok(matches!(&world.holder, Some((_, until)) if *until > Instant::now()))
    }

    async fn stalled_leader(&self, _fence: FenceTiming, _replica_id: &str) -> Takeover<()> {
        std::future::pending().await
    }

    async fn dead_leader(
        &self,
        _fence: FenceTiming,
        _retry: Duration,
        _replica_id: &str,
    ) -> Takeover<()> {
        std::future::pending().await
    }

    /// Confirms the term every `confirm_every` while PostgreSQL answers, as the real
    /// fence keeper does on its session.
    fn keep_fence(
        &self,
        term: &Term,
        _leadership: &Arc<Leadership>,
        timing: FenceTiming,
        _session: Option<()>,
    ) -> JoinHandle<()> {
        let (term, world) = (term.clone(), self.clone());
        tokio::spawn(async move {
            loop {
                if !world.world().database_down {
                    term.confirm(Instant::now(), timing.window, true);
                }
                tokio::time::sleep(timing.confirm_every).await;
            }
        })
    }
}

struct Rig {
    backend: FakeElection,
    leadership: Arc<Leadership>,
    released: Arc<ReleaseSignal>,
    resign: CancellationToken,
    lane: &'static str,
    spread: Arc<Spread>,
}

impl Rig {
    fn new() -> Self {
        Self {
            backend: FakeElection::default(),
            leadership: Arc::new(Leadership::new(Arc::new(Metrics::new()), "default")),
            released: Arc::default(),
            resign: CancellationToken::new(),
            lane: "default",
            spread: Arc::new(Spread::new("r1", &["default".into()], RETRY)),
        }
    }

    /// The elector, running until the rig resigns; returns when it has stopped.
    fn start(&self) -> JoinHandle<()> {
        let elector = Elector {
            backend: self.backend.clone(),
            timing: LeaseTiming {
                ttl: TTL,
                retry_interval: RETRY,
            },
            leadership: Arc::clone(&self.leadership),
            metrics: Arc::new(Metrics::new()),
            replica_id: "r1".into(),
            released: Arc::clone(&self.released),
            fence: FenceTiming::for_lease(TTL),
            lane: self.lane.into(),
            spread: Arc::clone(&self.spread),
        };
        tokio::spawn(run_redis_elector(elector, self.resign.clone()))
    }

    async fn term(&self, bound: Duration) -> Term {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(term) = self.leadership.current() {
                return term;
            }
            assert!(Instant::now() < deadline, "no term within {bound:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn no_term(&self, bound: Duration) -> Instant {
        let deadline = Instant::now() + bound;
        while self.leadership.current().is_some() {
            assert!(
                Instant::now() < deadline,
                "the term did not end within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Instant::now()
    }
}

fn timing() -> LeaseTiming {
    LeaseTiming {
        ttl: TTL,
        retry_interval: RETRY,
    }
}

#[tokio::test(start_paused = true)]
async fn a_term_lasts_while_every_extension_succeeds() {
    let rig = Rig::new();
    let elector = rig.start();
    let term = rig.term(Duration::from_secs(1)).await;
    tokio::time::sleep(TTL * 10).await;
    let current = rig.leadership.current().expect("still leading");
    assert_eq!(current.epoch, term.epoch, "one term throughout");
    assert!(current.may_send(), "the fence keeps confirming");
    let extensions = rig.backend.world().extensions.clone();
    assert_eq!(extensions.len(), 30, "every TTL/3");
    for pair in extensions.windows(2) {
        assert_eq!(pair[1] - pair[0], timing().extend_every());
    }
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refused_extension_ends_the_term_at_once_without_announcing() {
    let rig = Rig::new();
    let elector = rig.start();
    let term = rig.term(Duration::from_secs(1)).await;
    // The key expired and another replica took it (a Redis failover, a long pause).
    rig.backend.held_by_another(TTL);
    let taken = Instant::now();
    let ended = rig.no_term(TTL).await;
    assert!(
        ended - taken <= timing().extend_every(),
        "{:?}",
        ended - taken
    );
    assert!(!term.is_valid());
    assert_eq!(
        rig.backend.world().announcements,
        0,
        "the lease is not ours to announce"
    );
    assert!(!rig.backend.holds("r1"));
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_extension_that_never_answers_ends_the_term_at_its_deadline() {
    let rig = Rig::new();
    let elector = rig.start();
    let term = rig.term(Duration::from_secs(1)).await;
    let began = Instant::now();
    rig.backend.world().extensions_hang = true;
    let ended = rig.no_term(TTL * 2).await;
    // The deadline is the lease's start plus the TTL minus the drift allowance:
    // never later, whatever the extension is doing.
    assert!(
        ended <= began + TTL - timing().drift(),
        "{:?}",
        ended - began
    );
    assert!(!term.is_valid());
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn redis_errors_end_the_term_and_no_term_begins_until_redis_answers() {
    let rig = Rig::new();
    let elector = rig.start();
    let first = rig.term(Duration::from_secs(1)).await;
    rig.backend.world().redis_down = true;
    rig.no_term(TTL).await;
    tokio::time::sleep(TTL * 2).await;
    assert!(
        rig.leadership.current().is_none(),
        "a term while Redis is down"
    );
    // Its key expires meanwhile; once Redis answers, a new term with a new epoch.
    rig.backend.world().redis_down = false;
    rig.backend.world().holder = None;
    let second = rig.term(RETRY * 2).await;
    assert!(second.epoch > first.epoch);
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_cannot_reach_postgres_does_not_campaign() {
    let rig = Rig::new();
    rig.backend.world().database_down = true;
    let elector = rig.start();
    tokio::time::sleep(TTL).await;
    assert!(rig.backend.world().acquire_attempts.is_empty());
    assert!(rig.leadership.current().is_none());
    rig.backend.world().database_down = false;
    rig.term(RETRY * 2).await;
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lease_won_without_a_new_epoch_is_given_back() {
    let rig = Rig::new();
    rig.backend.world().start_term_fails = true;
    let elector = rig.start();
    tokio::time::sleep(RETRY * 5).await;
    assert!(rig.leadership.current().is_none());
    assert!(
        rig.backend.world().holder.is_none(),
        "the lease was kept without a term"
    );
    assert!(
        rig.backend.world().acquire_attempts.len() >= 2,
        "it keeps trying"
    );
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn resigning_releases_the_lease_and_tells_the_followers() {
    let rig = Rig::new();
    let elector = rig.start();
    rig.term(Duration::from_secs(1)).await;
    rig.resign.cancel();
    elector.await.unwrap();
    assert!(rig.leadership.current().is_none());
    let world = rig.backend.world();
    assert!(world.holder.is_none());
    assert_eq!(world.announcements, 1);
}

#[tokio::test(start_paused = true)]
async fn a_follower_campaigns_at_once_when_a_release_is_announced() {
    let rig = Rig::new();
    rig.backend.held_by_another(Duration::from_secs(3600));
    let elector = rig.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.backend.world().holder = None;
    let announced = Instant::now();
    rig.released.raise(Some("r2".into()));
    rig.term(RETRY).await;
    assert!(
        Instant::now() - announced < Duration::from_millis(10),
        "waited for a retry"
    );
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_follower_retries_every_retry_interval_with_jitter() {
    let rig = Rig::new();
    rig.backend.held_by_another(Duration::from_secs(3600));
    let elector = rig.start();
    tokio::time::sleep(RETRY * 30).await;
    let attempts = rig.backend.world().acquire_attempts.clone();
    assert!(attempts.len() >= 25, "{}", attempts.len());
    for pair in attempts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= RETRY.mul_f64(0.8) && gap <= RETRY.mul_f64(1.2),
            "{gap:?}"
        );
    }
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_fenced_term_lets_the_lease_go_and_waits_before_campaigning_again() {
    let rig = Rig::new();
    let elector = rig.start();
    let term = rig.term(Duration::from_secs(1)).await;
    rig.leadership.report_fenced(&term, Epoch(term.epoch.0 + 1));
    let fenced = Instant::now();
    rig.no_term(Duration::from_millis(10)).await;
    let next = rig.term(RETRY * 2).await;
    assert!(next.epoch > term.epoch);
    assert!(
        Instant::now() - fenced >= RETRY.mul_f64(0.8),
        "campaigned again at once"
    );
    assert_eq!(
        rig.backend.world().announcements,
        1,
        "the release was announced"
    );
    rig.resign.cancel();
    elector.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn single_replica_mode_leads_until_a_newer_epoch_then_stands_down_for_good() {
    let backend = FakeElection::default();
    let leadership = Arc::new(Leadership::new(Arc::new(Metrics::new()), "default"));
    let resign = CancellationToken::new();
    let run = tokio::spawn(run_single_replica(
        backend.clone(),
        Arc::clone(&leadership),
        "r1".into(),
        FenceTiming::for_lease(TTL),
        resign.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let term = leadership.current().expect("leads at once");
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        leadership.current().is_some_and(|t| t.epoch == term.epoch),
        "unbounded"
    );
    leadership.report_fenced(&term, Epoch(term.epoch.0 + 1));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        leadership.current().is_none(),
        "it must not fight another replica"
    );
    assert_eq!(backend.world().epoch, term.epoch.0, "no new epoch taken");
    resign.cancel();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lane_leader_steps_down_while_a_replica_of_an_older_release_is_live() {
    let mut rig = Rig::new();
    rig.lane = "otp";
    rig.spread = Arc::new(Spread::new("r1", &["default".into(), "otp".into()], RETRY));
    let elector = rig.start();
    let term = rig.term(Duration::from_secs(1)).await;
    // A replica of the previous release joins: its claim and rescue take every lane.
    let older = crate::store::ReplicaRecord {
        replica_id: "old".into(),
        version: "previous".into(),
        started_at: chrono::Utc::now(),
        last_seen_at: chrono::Utc::now(),
        knows_lanes: false,
        leader_eligible: true,
    };
    rig.spread.observe(&[older], true);
    let seen = Instant::now();
    let ended = rig.no_term(RETRY * 3).await;
    assert!(
        ended - seen <= RETRY,
        "stepped down after {:?}",
        ended - seen
    );
    assert!(!term.is_valid());
    assert_eq!(
        rig.backend.world().announcements,
        1,
        "released and announced"
    );
    tokio::time::sleep(RETRY * 10).await;
    assert!(
        rig.leadership.current().is_none(),
        "no new term while the older replica is live"
    );
    rig.resign.cancel();
    elector.await.unwrap();
}
