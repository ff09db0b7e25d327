//! The fakes behind the dispatcher's seams: an in-memory queue that keeps the
//! statements' guards, scripted providers, and a rig that runs one replica's
//! dispatcher over them.

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::*;
use crate::domain::Epoch;
use crate::leadership::{FenceTiming, Leadership, Term};
use crate::metrics::Metrics;
use crate::provider::{Outgoing, Provider, SendOutcome};
use crate::store::{
    Claim, ClaimResult, ClaimScope, ClaimedMessage, KnownDelivery, OpenedBatch, Recorded,
    RescueCandidate, RescuePolicy, Rescued, Schedule, SentResult, StoreError,
};

pub(super) const FENCE_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Pending,
    Sending,
    Sent,
    Failed,
    Expired,
}

#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) id: i64,
    pub(super) status: Status,
    pub(super) priority: i16,
    pub(super) attempts: i32,
    pub(super) claim_epoch: Option<Epoch>,
    pub(super) claim_token: Option<i64>,
    pub(super) claimed_at: Instant,
    pub(super) due_at: Instant,
    pub(super) expires_at: Option<DateTime<Utc>>,
    pub(super) last_error: Option<String>,
    /// As the columns of the same names (docs/design.md#failover).
    pub(super) provider: Option<String>,
    pub(super) pinned_provider: Option<String>,
}

/// The queue and the fence row, as PostgreSQL would keep them, with the statements'
/// guards (a result is written only while the row is `sending` under its epoch).
pub(super) struct QueueState {
    pub(super) rows: Vec<Row>,
    /// The fence row's epoch, and when it was bumped.
    pub(super) epoch: Epoch,
    pub(super) acquired_at: Option<Instant>,
    pub(super) running: bool,
    pub(super) paused: Option<String>,
    /// The cluster's rhythm: the last batch's start, and the newest sends' ages as the
    /// last close recorded them (with when).
    pub(super) last_batch_at: Option<Instant>,
    pub(super) closed_ages: Option<(Instant, Vec<i64>)>,
    /// The delivery cache: ids the provider accepted.
    pub(super) delivered: HashSet<i64>,
    /// `claim_batch` answers this error while set.
    pub(super) claims_fail: bool,
    pub(super) claims: usize,
    /// When the dispatcher asked for rescue candidates.
    pub(super) rescue_asks: Vec<Instant>,
}

#[derive(Clone)]
pub(super) struct FakeQueue(pub(super) Rc<RefCell<QueueState>>);

impl FakeQueue {
    pub(super) fn new(count: usize) -> Self {
        let queue = Self(Rc::new(RefCell::new(QueueState {
            rows: Vec::new(),
            epoch: Epoch(1),
            acquired_at: Some(Instant::now()),
            running: true,
            paused: None,
            last_batch_at: None,
            closed_ages: None,
            delivered: HashSet::new(),
            claims_fail: false,
            claims: 0,
            rescue_asks: Vec::new(),
        })));
        for _ in 0..count {
            queue.add(0);
        }
        queue
    }

    pub(super) fn add(&self, priority: i16) -> i64 {
        let mut q = self.0.borrow_mut();
        let id = q.rows.len() as i64 + 1;
        q.rows.push(Row {
            id,
            status: Status::Pending,
            priority,
            attempts: 0,
            claim_epoch: None,
            claim_token: None,
            claimed_at: Instant::now(),
            due_at: Instant::now(),
            expires_at: None,
            last_error: None,
            provider: None,
            pinned_provider: None,
        });
        id
    }

    /// A term begins: the fence row's epoch goes up.
    pub(super) fn bump(&self) -> Epoch {
        let mut q = self.0.borrow_mut();
        q.epoch = Epoch(q.epoch.0 + 1);
        q.acquired_at = Some(Instant::now());
        q.epoch
    }

    pub(super) fn row(&self, id: i64) -> Row {
        self.0.borrow().rows[id as usize - 1].clone()
    }

    pub(super) fn count(&self, status: Status) -> usize {
        self.0
            .borrow()
            .rows
            .iter()
            .filter(|r| r.status == status)
            .count()
    }

    pub(super) fn with_row(&self, id: i64, f: impl FnOnce(&mut Row)) {
        f(&mut self.0.borrow_mut().rows[id as usize - 1]);
    }

    /// The guard of every result write.
    pub(super) fn guarded(&self, id: i64, epoch: Epoch, f: impl FnOnce(&mut Row)) -> bool {
        let mut q = self.0.borrow_mut();
        let row = &mut q.rows[id as usize - 1];
        if row.status == Status::Sending && row.claim_epoch == Some(epoch) {
            f(row);
            true
        } else {
            false
        }
    }

    pub(super) fn rescuable(
        q: &QueueState,
        epoch: Epoch,
        wait: Duration,
        running: &[i64],
    ) -> Vec<i64> {
        let now = Instant::now();
        if q.epoch != epoch {
            return Vec::new();
        }
        q.rows
            .iter()
            .filter(|r| r.status == Status::Sending)
            .filter(|r| match r.claim_epoch {
                Some(e) if e < epoch => q.acquired_at.is_some_and(|at| at + wait <= now),
                Some(e) if e == epoch => r.claimed_at + wait <= now,
                _ => false,
            })
            .filter(|r| !r.claim_token.is_some_and(|t| running.contains(&t)))
            .map(|r| r.id)
            .collect()
    }
}

pub(super) fn unavailable() -> StoreError {
    StoreError::Unavailable("PostgreSQL is down (test)".into())
}

impl ResultStore for FakeQueue {
    async fn mark_sent_group(
        &self,
        results: &[SentResult],
        _again: bool,
    ) -> Result<HashSet<i64>, StoreError> {
        Ok(results
            .iter()
            .filter(|r| {
                self.guarded(r.id, r.epoch, |row| {
                    row.status = Status::Sent;
                })
            })
            .map(|r| r.id)
            .collect())
    }

    async fn mark_sent(
        &self,
        id: i64,
        epoch: Epoch,
        _sent_at: DateTime<Utc>,
        _provider_message_id: Option<&str>,
        _price: Option<crate::spend::Micros>,
        _again: bool,
    ) -> Result<Recorded, StoreError> {
        Ok(
            if self.guarded(id, epoch, |row| row.status = Status::Sent) {
                Recorded::Sent
            } else {
                Recorded::NotOurs
            },
        )
    }
}

impl Backend for FakeQueue {
    async fn claim_batch(
        &self,
        epoch: Epoch,
        _replica_id: &str,
        configured: Schedule,
        _fence_window: Duration,
        token: i64,
        route: &ClaimScope,
    ) -> Result<ClaimResult, StoreError> {
        let mut q = self.0.borrow_mut();
        q.claims += 1;
        if q.claims_fail {
            return Err(unavailable());
        }
        let now = Instant::now();
        let recent_send_ages_us: Vec<i64> = q
            .closed_ages
            .as_ref()
            .map(|(at, ages)| {
                let since = (now - *at).as_micros() as i64;
                ages.iter().map(|age| age + since).collect()
            })
            .unwrap_or_default();
        let result = |claim| ClaimResult {
            claim,
            schedule: configured,
            recent_send_ages_us: recent_send_ages_us.clone(),
            expired: 0,
            blocked: 0,
            held: 0,
        };
        if q.epoch != epoch {
            return Ok(result(Claim::Fenced(q.epoch)));
        }
        if !q.running {
            return Ok(result(Claim::Stopped));
        }
        if let Some(reason) = &q.paused {
            if !route.probe_due {
                return Ok(result(Claim::Paused(reason.clone())));
            }
        }
        if let Some(last) = q.last_batch_at {
            if last + configured.interval > now {
                return Ok(result(Claim::NotDue(last + configured.interval - now)));
            }
        }
        let limit = if q.paused.is_some() || route.probe_only {
            1
        } else {
            configured.batch_size as usize
        };
        let mut due: Vec<&mut Row> = q
            .rows
            .iter_mut()
            .filter(|r| r.status == Status::Pending && r.due_at <= now)
            .filter(|r| match &r.pinned_provider {
                None => route.provider.is_some(),
                Some(pinned) => route.usable.contains(pinned),
            })
            .collect();
        due.sort_by_key(|r| (std::cmp::Reverse(r.priority), r.id));
        let messages: Vec<ClaimedMessage> = due
            .into_iter()
            .take(limit)
            .map(|row| {
                row.status = Status::Sending;
                row.claim_epoch = Some(epoch);
                row.claim_token = Some(token);
                row.claimed_at = now;
                row.attempts += 1;
                row.provider = row.pinned_provider.clone().or(route.provider.clone());
                ClaimedMessage {
                    id: row.id,
                    delivery_key: format!("key-{}", row.id),
                    phone_number: format!("+1415555{:04}", row.id % 10_000),
                    content: format!("message {}", row.id),
                    transactional: false,
                    units: 1,
                    attempts: row.attempts,
                    created_at: Utc::now(),
                    priority: row.priority,
                    expires_at: row.expires_at,
                    sender: None,
                    provider: row.provider.clone(),
                    pinned: row.pinned_provider.clone(),
                }
            })
            .collect();
        if messages.is_empty() {
            return Ok(result(Claim::Empty));
        }
        q.last_batch_at = Some(now);
        let probe = q.paused.is_some();
        Ok(result(Claim::Batch(OpenedBatch {
            messages,
            opened_at: Utc::now(),
            token,
            probe,
        })))
    }

    async fn release_claim(&self, epoch: Epoch, token: i64) -> Result<u64, StoreError> {
        let ids: Vec<i64> = (self.0.borrow().rows.iter())
            .filter(|r| r.claim_token == Some(token))
            .map(|r| r.id)
            .collect();
        self.release_unsent(&ids, epoch).await
    }

    async fn rescue_candidates(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        after: i64,
    ) -> Result<Vec<RescueCandidate>, StoreError> {
        self.0.borrow_mut().rescue_asks.push(Instant::now());
        let q = self.0.borrow();
        Ok(Self::rescuable(&q, epoch, policy.wait, running)
            .into_iter()
            .filter(|id| *id > after)
            .map(|id| RescueCandidate {
                id,
                created_at: Utc::now(),
                claim_epoch: q.rows[id as usize - 1].claim_epoch.unwrap_or(Epoch(0)),
                delivery_key: format!("key-{id}"),
            })
            .collect())
    }

    async fn known_deliveries(&self, candidates: &[RescueCandidate]) -> Vec<KnownDelivery> {
        let q = self.0.borrow();
        candidates
            .iter()
            .filter(|c| q.delivered.contains(&c.id))
            .map(|c| KnownDelivery {
                id: c.id,
                claim_epoch: c.claim_epoch,
                sent_at: Utc::now(),
                provider_message_id: None,
                price: None,
            })
            .collect()
    }

    fn remember_delivery(
        &self,
        message: &ClaimedMessage,
        _provider_message_id: Option<String>,
        _sent_at: DateTime<Utc>,
        _price: Option<crate::spend::Micros>,
    ) {
        self.0.borrow_mut().delivered.insert(message.id);
    }

    async fn record_known_deliveries(
        &self,
        _epoch: Epoch,
        known: &[KnownDelivery],
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        for k in known {
            if self.guarded(k.id, k.claim_epoch, |row| row.status = Status::Sent) {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn rescue(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        checked: &[i64],
    ) -> Result<Rescued, StoreError> {
        let mut q = self.0.borrow_mut();
        let ids = Self::rescuable(&q, epoch, policy.wait, running);
        let mut rescued = Rescued::default();
        for id in ids.into_iter().filter(|id| checked.contains(id)) {
            let row = &mut q.rows[id as usize - 1];
            if policy.max_attempts > 0 && row.attempts >= policy.max_attempts as i32 {
                row.status = Status::Failed;
                rescued.failed += 1;
            } else {
                row.status = Status::Pending;
                row.due_at = Instant::now();
                rescued.pending += 1;
            }
            if row.pinned_provider.is_none() {
                row.pinned_provider = row.provider.clone();
            }
        }
        Ok(rescued)
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
        let mut failed = false;
        let ours = self.guarded(id, epoch, |row| {
            row.last_error = Some(error.to_string());
            if unknown && row.pinned_provider.is_none() {
                row.pinned_provider = row.provider.clone();
            }
            if max_attempts > 0 && row.attempts >= max_attempts as i32 {
                row.status = Status::Failed;
                failed = true;
            } else {
                row.status = Status::Pending;
                row.due_at = Instant::now() + delay;
            }
        });
        Ok(match (ours, failed) {
            (false, _) => Recorded::NotOurs,
            (true, true) => Recorded::Failed,
            (true, false) => Recorded::Retrying,
        })
    }

    async fn mark_failed(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        let ours = self.guarded(id, epoch, |row| {
            row.status = Status::Failed;
            row.last_error = Some(error.to_string());
        });
        Ok(if ours {
            Recorded::Failed
        } else {
            Recorded::NotOurs
        })
    }

    async fn mark_held(&self, id: i64, epoch: Epoch, error: &str) -> Result<Recorded, StoreError> {
        let ours = self.guarded(id, epoch, |row| {
            row.status = Status::Pending;
            row.attempts -= 1;
            row.due_at = Instant::now();
            row.last_error = Some(error.to_string());
            row.provider = row.pinned_provider.clone();
        });
        Ok(if ours {
            Recorded::Retrying
        } else {
            Recorded::NotOurs
        })
    }

    async fn assign_provider(
        &self,
        id: i64,
        epoch: Epoch,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let mut assigned = false;
        self.guarded(id, epoch, |row| {
            if row.pinned_provider.is_none() {
                row.provider = Some(provider.to_string());
                assigned = true;
            }
        });
        Ok(assigned)
    }

    async fn mark_expired(&self, id: i64, epoch: Epoch) -> Result<bool, StoreError> {
        Ok(self.guarded(id, epoch, |row| {
            row.status = Status::Expired;
            row.attempts -= 1;
        }))
    }

    async fn release_unsent(&self, ids: &[i64], epoch: Epoch) -> Result<u64, StoreError> {
        let mut n = 0;
        for id in ids {
            if self.guarded(*id, epoch, |row| {
                row.status = Status::Pending;
                row.attempts -= 1;
                row.provider = row.pinned_provider.clone();
            }) {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn close_batch(
        &self,
        epoch: Epoch,
        _opened_at: DateTime<Utc>,
        recent_send_ages_us: &[i64],
        _routing: &str,
    ) -> Result<(), StoreError> {
        let mut q = self.0.borrow_mut();
        if q.epoch == epoch {
            q.closed_ages = Some((Instant::now(), recent_send_ages_us.to_vec()));
        }
        Ok(())
    }

    async fn pause_dispatch(
        &self,
        epoch: Epoch,
        reason: &str,
        _detail: &str,
    ) -> Result<bool, StoreError> {
        let mut q = self.0.borrow_mut();
        if q.epoch != epoch || q.paused.as_deref() == Some(reason) {
            return Ok(false);
        }
        q.paused = Some(reason.to_string());
        Ok(true)
    }

    async fn lift_pause(&self, reason: &str) -> Result<bool, StoreError> {
        let mut q = self.0.borrow_mut();
        if q.paused.as_deref() != Some(reason) {
            return Ok(false);
        }
        q.paused = None;
        Ok(true)
    }
}

/// How a [`FakeProvider`] answers the n-th send (of a key, to a provider).
pub(super) type Answer = Box<dyn Fn(usize, &str, &str) -> SendOutcome + Send + Sync>;

/// A provider that answers after `latency` with what `answer` says for the n-th send
/// (counting from 0), and notes when every send started.
pub(super) struct FakeProvider {
    pub(super) latency: Duration,
    pub(super) answer: Answer,
    /// Key, start and provider of every send.
    pub(super) sends: Mutex<Vec<(String, Instant, String)>>,
}

impl FakeProvider {
    pub(super) fn accepting(latency: Duration) -> Self {
        Self::answering(latency, |_, _| accepted())
    }

    pub(super) fn answering(
        latency: Duration,
        answer: impl Fn(usize, &str) -> SendOutcome + Send + Sync + 'static,
    ) -> Self {
        Self::answering_by_provider(latency, move |n, key, _| answer(n, key))
    }

    /// `answer` is told the provider too.
    pub(super) fn answering_by_provider(
        latency: Duration,
        answer: impl Fn(usize, &str, &str) -> SendOutcome + Send + Sync + 'static,
    ) -> Self {
        Self {
            latency,
            answer: Box::new(answer),
            sends: Mutex::default(),
        }
    }

    pub(super) fn sends(&self) -> Vec<(String, Instant, String)> {
        self.sends.lock().unwrap().clone()
    }

    pub(super) fn starts(&self) -> Vec<Instant> {
        self.sends().into_iter().map(|(_, at, _)| at).collect()
    }

    pub(super) fn keys(&self) -> Vec<String> {
        self.sends().into_iter().map(|(key, _, _)| key).collect()
    }
}

pub(super) fn accepted() -> SendOutcome {
    SendOutcome::Accepted {
        provider_message_id: Some("provider-id".into()),
    }
}

impl Provider for FakeProvider {
    async fn send(&self, provider: &str, message: &Outgoing<'_>) -> SendOutcome {
        let key = message.delivery_key;
        let n = {
            let mut sends = self.sends.lock().unwrap();
            sends.push((key.to_string(), Instant::now(), provider.to_string()));
            sends.len() - 1
        };
        tokio::time::sleep(self.latency).await;
        (self.answer)(n, key, provider)
    }
}

pub(super) fn settings(batch_size: u32, interval: Duration) -> DispatchSettings {
    DispatchSettings {
        replica_id: "r1".into(),
        lane: "default".into(),
        configured: Schedule {
            batch_size,
            interval,
            unit: crate::config::Unit::Messages,
        },
        rescue: RescuePolicy {
            wait: Duration::from_secs(3),
            max_attempts: 5,
        },
        fence: FenceTiming {
            window: FENCE_WINDOW,
            confirm_every: FENCE_WINDOW / 4,
            resign_after: Duration::from_secs(2),
        },
        retry: crate::retry::RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
        },
        max_attempts: 5,
        send_concurrency: 4,
        shutdown_timeout: Duration::from_secs(3),
        poll: Duration::from_millis(200),
        probe_every: Duration::from_secs(5),
        providers: vec![route("main")],
        from: None,
        quiet_hours: None,
        daily_spend_cap: None,
    }
}

/// A provider of the lane with breaker settings tests can reason about: 3 failures in
/// a row open it for 10 s.
pub(super) fn route(name: &str) -> RouteSettings {
    RouteSettings {
        name: name.into(),
        breaker: crate::config::BreakerSettings {
            failures: 3,
            ratio: 0.5,
            cooldown: Duration::from_secs(10),
        },
        from: None,
        prices: None,
    }
}

/// One replica's dispatcher over the fakes, and the leadership it reads.
pub(super) struct Rig {
    pub(super) queue: FakeQueue,
    pub(super) provider: Arc<FakeProvider>,
    pub(super) leadership: Arc<Leadership>,
    pub(super) settings: DispatchSettings,
}

impl Rig {
    pub(super) fn new(
        queue: FakeQueue,
        provider: FakeProvider,
        settings: DispatchSettings,
    ) -> Self {
        Self {
            queue,
            provider: Arc::new(provider),
            leadership: Arc::new(Leadership::new(Arc::new(Metrics::new()), "default")),
            settings,
        }
    }

    pub(super) fn dispatcher(&self) -> Dispatcher<FakeQueue, FakeProvider> {
        Dispatcher {
            backend: self.queue.clone(),
            provider: Arc::clone(&self.provider),
            leadership: Arc::clone(&self.leadership),
            metrics: Arc::new(Metrics::new()),
            settings: self.settings.clone(),
            wake: Arc::default(),
            pacer: Pacer::default(),
            recorder: Recorder::new(self.queue.clone()),
            pause: PauseState::default(),
            recipients: Default::default(),
            routing: Routing::new(&self.settings.providers, self.settings.retry.max),
        }
    }

    /// A rig whose replica leads from the start, its term confirmed.
    pub(super) fn leading(
        queue: FakeQueue,
        provider: FakeProvider,
        settings: DispatchSettings,
    ) -> Self {
        let rig = Self::new(queue, provider, settings);
        rig.begin_term(true);
        rig
    }

    /// A term of the fence row's current epoch with a long lease, confirmed for as
    /// long as it lasts unless `confirmed` is false.
    pub(super) fn begin_term(&self, confirmed: bool) -> Term {
        let epoch = self.queue.0.borrow().epoch;
        let term = Term::new(epoch, Instant::now() + Duration::from_secs(3600));
        if confirmed {
            term.confirm_now(Duration::from_secs(3600));
        }
        self.leadership.begin_for_test(term.clone());
        term
    }

    /// Runs the dispatcher while `script` runs, then shuts it down; returns what the
    /// script returned and when the dispatcher had stopped.
    pub(super) async fn run<T>(&self, script: impl Future<Output = T>) -> (T, Instant) {
        let shutdown = CancellationToken::new();
        let dispatcher = self.dispatcher();
        let driven = async {
            let out = script.await;
            shutdown.cancel();
            out
        };
        let stopped = async {
            dispatcher.run(shutdown.clone()).await;
            Instant::now()
        };
        tokio::join!(driven, stopped)
    }
}

/// Waits (in virtual time) until `done` holds; panics after `bound`.
pub(super) async fn until(bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "not done within {bound:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The most sends that started in any window of `interval`.
pub(super) fn most_starts_in_a_window(starts: &[Instant], interval: Duration) -> usize {
    let mut sorted = starts.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|at| **at < sorted[i] + interval)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Counts sends in flight, with latencies that differ per message.
pub(super) struct CountingProvider {
    pub(super) inner: Arc<FakeProvider>,
    pub(super) in_flight: Arc<Mutex<(usize, usize)>>,
}

impl Provider for CountingProvider {
    async fn send(&self, provider: &str, message: &Outgoing<'_>) -> SendOutcome {
        let delivery_key = message.delivery_key;
        {
            let mut counts = self.in_flight.lock().unwrap();
            counts.0 += 1;
            counts.1 = counts.1.max(counts.0);
        }
        let id: u64 = delivery_key.trim_start_matches("key-").parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(10 + (id * 37) % 90)).await;
        let outcome = self.inner.send(provider, message).await;
        self.in_flight.lock().unwrap().0 -= 1;
        outcome
    }
}
