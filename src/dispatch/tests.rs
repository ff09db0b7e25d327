//! The dispatch loop against an in-memory queue and a scripted provider, with paused
//! tokio time: terms, batches, the pacer, hand-overs and the rescue wait run in
//! milliseconds, and every time asserted is exact virtual time, never a lucky moment.
//! The invariants are those of docs/design.md ("Fencing", "The pacer", "Rescue",
//! "Provider credentials"); the process-level tests (tests/api) keep the kills, pauses
//! and real servers.

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::leadership::{FenceTiming, Leadership, Term};
use crate::provider::{Provider, SendOutcome};
use crate::store::{
    Claim, ClaimResult, ClaimedMessage, KnownDelivery, OpenedBatch, Recorded, RescueCandidate,
    RescuePolicy, Rescued, Schedule, SentResult, StoreError,
};

const FENCE_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Sending,
    Sent,
    Failed,
    Expired,
}

#[derive(Debug, Clone)]
struct Row {
    id: i64,
    status: Status,
    priority: i16,
    attempts: i32,
    claim_epoch: Option<Epoch>,
    claim_token: Option<i64>,
    claimed_at: Instant,
    due_at: Instant,
    expires_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

/// The queue and the fence row, as PostgreSQL would keep them, with the statements'
/// guards (a result is written only while the row is `sending` under its epoch).
struct QueueState {
    rows: Vec<Row>,
    /// The fence row's epoch, and when it was bumped.
    epoch: Epoch,
    acquired_at: Option<Instant>,
    running: bool,
    paused: Option<String>,
    /// The cluster's rhythm: the last batch's start, and the newest sends' ages as the
    /// last close recorded them (with when).
    last_batch_at: Option<Instant>,
    closed_ages: Option<(Instant, Vec<i64>)>,
    /// The delivery cache: ids the provider accepted.
    delivered: HashSet<i64>,
    /// `claim_batch` answers this error while set.
    claims_fail: bool,
    claims: usize,
    /// When the dispatcher asked for rescue candidates.
    rescue_asks: Vec<Instant>,
}

#[derive(Clone)]
struct FakeQueue(Rc<RefCell<QueueState>>);

impl FakeQueue {
    fn new(count: usize) -> Self {
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

    fn add(&self, priority: i16) -> i64 {
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
        });
        id
    }

    /// A term begins: the fence row's epoch goes up.
    fn bump(&self) -> Epoch {
        let mut q = self.0.borrow_mut();
        q.epoch = Epoch(q.epoch.0 + 1);
        q.acquired_at = Some(Instant::now());
        q.epoch
    }

    fn row(&self, id: i64) -> Row {
        self.0.borrow().rows[id as usize - 1].clone()
    }

    fn count(&self, status: Status) -> usize {
        self.0
            .borrow()
            .rows
            .iter()
            .filter(|r| r.status == status)
            .count()
    }

    fn with_row(&self, id: i64, f: impl FnOnce(&mut Row)) {
        f(&mut self.0.borrow_mut().rows[id as usize - 1]);
    }

    /// The guard of every result write.
    fn guarded(&self, id: i64, epoch: Epoch, f: impl FnOnce(&mut Row)) -> bool {
        let mut q = self.0.borrow_mut();
        let row = &mut q.rows[id as usize - 1];
        if row.status == Status::Sending && row.claim_epoch == Some(epoch) {
            f(row);
            true
        } else {
            false
        }
    }

    fn rescuable(q: &QueueState, epoch: Epoch, wait: Duration, running: &[i64]) -> Vec<i64> {
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

fn unavailable() -> StoreError {
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
        probe_due: bool,
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
        };
        if q.epoch != epoch {
            return Ok(result(Claim::Fenced(q.epoch)));
        }
        if !q.running {
            return Ok(result(Claim::Stopped));
        }
        if let Some(reason) = &q.paused {
            if !probe_due {
                return Ok(result(Claim::Paused(reason.clone())));
            }
        }
        if let Some(last) = q.last_batch_at {
            if last + configured.interval > now {
                return Ok(result(Claim::NotDue(last + configured.interval - now)));
            }
        }
        let limit = if q.paused.is_some() {
            1
        } else {
            configured.batch_size as usize
        };
        let mut due: Vec<&mut Row> = q
            .rows
            .iter_mut()
            .filter(|r| r.status == Status::Pending && r.due_at <= now)
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
                ClaimedMessage {
                    id: row.id,
                    delivery_key: format!("key-{}", row.id),
                    phone_number: "+14155550100".into(),
                    content: format!("message {}", row.id),
                    attempts: row.attempts,
                    created_at: Utc::now(),
                    priority: row.priority,
                    expires_at: row.expires_at,
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
        let mut q = self.0.borrow_mut();
        let mut n = 0;
        for row in q.rows.iter_mut().filter(|r| {
            r.status == Status::Sending
                && r.claim_epoch == Some(epoch)
                && r.claim_token == Some(token)
        }) {
            row.status = Status::Pending;
            row.attempts -= 1;
            n += 1;
        }
        Ok(n)
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
            })
            .collect()
    }

    fn remember_delivery(
        &self,
        message: &ClaimedMessage,
        _provider_message_id: Option<String>,
        _sent_at: DateTime<Utc>,
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
    ) -> Result<Recorded, StoreError> {
        let mut failed = false;
        let ours = self.guarded(id, epoch, |row| {
            row.last_error = Some(error.to_string());
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

    async fn mark_unauthorized(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        let ours = self.guarded(id, epoch, |row| {
            row.status = Status::Pending;
            row.attempts -= 1;
            row.last_error = Some(error.to_string());
        });
        Ok(if ours {
            Recorded::Retrying
        } else {
            Recorded::NotOurs
        })
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

/// How a [`FakeProvider`] answers the n-th send of a key.
type Answer = Box<dyn Fn(usize, &str) -> SendOutcome + Send + Sync>;

/// A provider that answers after `latency` with what `answer` says for the n-th send
/// (counting from 0), and notes when every send started.
struct FakeProvider {
    latency: Duration,
    answer: Answer,
    sends: Mutex<Vec<(String, Instant)>>,
}

impl FakeProvider {
    fn accepting(latency: Duration) -> Self {
        Self::answering(latency, |_, _| accepted())
    }

    fn answering(
        latency: Duration,
        answer: impl Fn(usize, &str) -> SendOutcome + Send + Sync + 'static,
    ) -> Self {
        Self {
            latency,
            answer: Box::new(answer),
            sends: Mutex::default(),
        }
    }

    fn sends(&self) -> Vec<(String, Instant)> {
        self.sends.lock().unwrap().clone()
    }

    fn starts(&self) -> Vec<Instant> {
        self.sends().into_iter().map(|(_, at)| at).collect()
    }

    fn keys(&self) -> Vec<String> {
        self.sends().into_iter().map(|(key, _)| key).collect()
    }
}

fn accepted() -> SendOutcome {
    SendOutcome::Accepted {
        provider_message_id: Some("provider-id".into()),
    }
}

impl Provider for FakeProvider {
    async fn send(&self, delivery_key: &str, _to: &str, _content: &str) -> SendOutcome {
        let n = {
            let mut sends = self.sends.lock().unwrap();
            sends.push((delivery_key.to_string(), Instant::now()));
            sends.len() - 1
        };
        tokio::time::sleep(self.latency).await;
        (self.answer)(n, delivery_key)
    }
}

fn settings(batch_size: u32, interval: Duration) -> DispatchSettings {
    DispatchSettings {
        replica_id: "r1".into(),
        configured: Schedule {
            batch_size,
            interval,
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
    }
}

/// One replica's dispatcher over the fakes, and the leadership it reads.
struct Rig {
    queue: FakeQueue,
    provider: Arc<FakeProvider>,
    leadership: Arc<Leadership>,
    settings: DispatchSettings,
}

impl Rig {
    fn new(queue: FakeQueue, provider: FakeProvider, settings: DispatchSettings) -> Self {
        Self {
            queue,
            provider: Arc::new(provider),
            leadership: Arc::new(Leadership::new(Arc::new(Metrics::new()))),
            settings,
        }
    }

    fn dispatcher(&self) -> Dispatcher<FakeQueue, FakeProvider> {
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
        }
    }

    /// A term of the fence row's current epoch with a long lease, confirmed for as
    /// long as it lasts unless `confirmed` is false.
    fn begin_term(&self, confirmed: bool) -> Term {
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
    async fn run<T>(&self, script: impl Future<Output = T>) -> (T, Instant) {
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
async fn until(bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "not done within {bound:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The most sends that started in any window of `interval`.
fn most_starts_in_a_window(starts: &[Instant], interval: Duration) -> usize {
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

#[tokio::test(start_paused = true)]
async fn every_message_is_sent_once_most_urgent_first_then_in_order() {
    let queue = FakeQueue::new(0);
    for priority in [0, 0, 2, 1, 0, 2] {
        queue.add(priority);
    }
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(30)),
        settings(2, Duration::ZERO),
    );
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(10), || {
        queue.count(Status::Sent) == 6
    }))
    .await;
    let keys = rig.provider.keys();
    let expected: Vec<String> = [3, 6, 4, 1, 2, 5]
        .iter()
        .map(|id| format!("key-{id}"))
        .collect();
    assert_eq!(
        keys, expected,
        "priority first, then creation order, each once"
    );
}

#[tokio::test(start_paused = true)]
async fn no_more_than_batch_size_sends_start_in_any_interval() {
    let queue = FakeQueue::new(20);
    let interval = Duration::from_secs(1);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(3, interval),
    );
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(60), || {
        queue.count(Status::Sent) == 20
    }))
    .await;
    let starts = rig.provider.starts();
    assert_eq!(starts.len(), 20);
    assert_eq!(most_starts_in_a_window(&starts, interval), 3);
    // And no slower than the rate: 20 messages at 3 per second take 6 intervals.
    assert!(
        starts[19] - starts[0] <= interval * 7,
        "{:?}",
        starts[19] - starts[0]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_claimed_or_sent_without_a_term() {
    let queue = FakeQueue::new(5);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(5, Duration::ZERO),
    );
    rig.run(tokio::time::sleep(Duration::from_secs(30))).await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.0.borrow().claims, 0);
    assert_eq!(queue.count(Status::Pending), 5);
}

#[tokio::test(start_paused = true)]
async fn no_send_starts_before_the_fence_confirms_the_term() {
    let queue = FakeQueue::new(3);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    let term = rig.begin_term(false);
    let began = Instant::now();
    let confirm_after = Duration::from_secs(5);
    rig.run(async {
        tokio::time::sleep(confirm_after).await;
        assert!(
            rig.provider.sends().is_empty(),
            "a send before the confirmation"
        );
        term.confirm_now(Duration::from_secs(3600));
        until(Duration::from_secs(10), || queue.count(Status::Sent) == 3).await;
    })
    .await;
    assert!(
        rig.provider
            .starts()
            .iter()
            .all(|at| *at >= began + confirm_after)
    );
}

#[tokio::test(start_paused = true)]
async fn a_term_that_ends_mid_batch_starts_nothing_more_and_returns_the_rest() {
    let queue = FakeQueue::new(10);
    let mut settings = settings(10, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(100)),
        settings,
    );
    let term = rig.begin_term(true);
    rig.run(async {
        until(Duration::from_secs(10), || rig.provider.sends().len() == 3).await;
        term.end_now();
        until(Duration::from_secs(10), || {
            queue.count(Status::Sending) == 0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    assert_eq!(
        rig.provider.sends().len(),
        3,
        "no send after the term ended"
    );
    assert_eq!(queue.count(Status::Sent), 3);
    assert_eq!(queue.count(Status::Pending), 7);
    for id in 4..=10 {
        assert_eq!(
            queue.row(id).attempts,
            0,
            "{id}: a claim never sent spends nothing"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_rate_holds_across_a_handover() {
    let queue = FakeQueue::new(12);
    let interval = Duration::from_secs(10);
    let first = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(4, interval),
    );
    let term = first.begin_term(true);
    first
        .run(until(Duration::from_secs(5), || {
            queue.count(Status::Sent) == 4
        }))
        .await;
    term.end_now();
    // The next leader takes over at once, with the cluster's rhythm from the fence row
    // but a pacer of its own: neither may let a fifth send into the same interval.
    queue.bump();
    let second = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_millis(10)),
        settings(4, interval),
    );
    // Without the fence row's rhythm the pacer alone must hold the line.
    queue.0.borrow_mut().last_batch_at = None;
    second.begin_term(true);
    second
        .run(until(Duration::from_secs(60), || {
            queue.count(Status::Sent) == 12
        }))
        .await;
    let mut starts = first.provider.starts();
    starts.extend(second.provider.starts());
    assert_eq!(starts.len(), 12);
    assert_eq!(most_starts_in_a_window(&starts, interval), 4);
}

#[tokio::test(start_paused = true)]
async fn a_retryable_answer_returns_the_message_after_its_backoff() {
    let queue = FakeQueue::new(1);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::answering(Duration::ZERO, |n, _| {
            if n == 0 {
                SendOutcome::Transient {
                    error: "503".into(),
                    retry_after: Some(Duration::from_secs(4)),
                }
            } else {
                accepted()
            }
        }),
        settings(1, Duration::ZERO),
    );
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(30), || {
        queue.count(Status::Sent) == 1
    }))
    .await;
    let starts = rig.provider.starts();
    assert_eq!(starts.len(), 2);
    assert!(
        starts[1] - starts[0] >= Duration::from_secs(4),
        "{:?}",
        starts[1] - starts[0]
    );
    assert_eq!(queue.row(1).attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_message_fails_at_once_and_the_rest_go_on() {
    let queue = FakeQueue::new(3);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::answering(Duration::ZERO, |_, key| {
            if key == "key-2" {
                SendOutcome::Rejected {
                    error: "400 invalid number".into(),
                }
            } else {
                accepted()
            }
        }),
        settings(3, Duration::ZERO),
    );
    rig.begin_term(true);
    rig.run(async {
        until(Duration::from_secs(10), || queue.count(Status::Sent) == 2).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    assert_eq!(queue.row(2).status, Status::Failed);
    assert_eq!(
        rig.provider.sends().len(),
        3,
        "a rejected message is not retried"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_credentials_pause_and_probe_once_per_interval_without_spending_attempts() {
    let queue = FakeQueue::new(4);
    let refusals = 3;
    // One send at a time, so that no send is in flight when the first refusal comes.
    let mut settings = settings(4, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::answering(Duration::from_millis(10), move |n, _| {
            if n < refusals {
                SendOutcome::Unauthorized {
                    error: "401".into(),
                }
            } else {
                accepted()
            }
        }),
        settings,
    );
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(120), || {
        queue.count(Status::Sent) == 4
    }))
    .await;
    let starts = rig.provider.starts();
    // The first refusal pauses; then one probe per probe interval until one is taken.
    for pair in starts[..=refusals].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(5),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    assert_eq!(
        queue.0.borrow().paused,
        None,
        "the accepted probe lifts the pause"
    );
    let attempts: i32 = (1..=4).map(|id| queue.row(id).attempts).sum();
    assert_eq!(attempts, 4, "refusals spend no attempt");
}

#[tokio::test(start_paused = true)]
async fn an_older_terms_claims_are_rescued_only_after_the_rescue_wait() {
    let queue = FakeQueue::new(2);
    // A dead leader of epoch 1 claimed both; the cache knows it delivered the second.
    for id in [1, 2] {
        queue.with_row(id, |row| {
            row.status = Status::Sending;
            row.claim_epoch = Some(Epoch(1));
            row.claim_token = Some(7);
            row.attempts = 1;
        });
    }
    queue.0.borrow_mut().delivered.insert(2);
    queue.bump();
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(2, Duration::ZERO),
    );
    let began = Instant::now();
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(30), || {
        queue.count(Status::Sent) == 2
    }))
    .await;
    let sends = rig.provider.sends();
    assert_eq!(
        sends.len(),
        1,
        "the delivered one is recorded, not sent again"
    );
    assert_eq!(sends[0].0, "key-1");
    let wait = rig.settings.rescue.wait;
    assert!(sends[0].1 >= began + wait, "rescued too early");
    let asks = queue.0.borrow().rescue_asks.clone();
    assert!(!asks.is_empty());
    assert!(
        asks.iter().all(|at| *at >= began + wait),
        "asked before the rescue wait"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_past_its_expiry_is_never_sent() {
    let queue = FakeQueue::new(2);
    queue.with_row(1, |row| {
        row.expires_at = Some(Utc::now() - chrono::TimeDelta::seconds(1))
    });
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(2, Duration::ZERO),
    );
    rig.begin_term(true);
    rig.run(until(Duration::from_secs(10), || {
        queue.count(Status::Sent) == 1
    }))
    .await;
    assert_eq!(queue.row(1).status, Status::Expired);
    assert_eq!(rig.provider.keys(), vec!["key-2".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn claims_failing_past_resign_after_end_the_term() {
    let queue = FakeQueue::new(1);
    queue.0.borrow_mut().claims_fail = true;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(1, Duration::ZERO),
    );
    let term = rig.begin_term(true);
    let began = Instant::now();
    let resign_after = rig.settings.fence.resign_after;
    rig.run(until(Duration::from_secs(30), || !term.is_valid()))
        .await;
    // The resignation comes at the first failed claim past resign_after, one poll
    // later at most.
    let ended = Instant::now();
    assert!(
        ended >= began + resign_after,
        "resigned early: {:?}",
        ended - began
    );
    assert!(
        ended <= began + resign_after + rig.settings.poll * 2,
        "resigned late: {:?}",
        ended - began
    );
    assert!(rig.leadership.current().is_none());
    assert!(rig.provider.sends().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_newer_epoch_in_the_fence_row_ends_the_term_before_any_send() {
    let queue = FakeQueue::new(3);
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    let term = rig.begin_term(true);
    queue.bump();
    rig.run(until(Duration::from_secs(10), || !term.is_valid()))
        .await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.count(Status::Pending), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_cluster_claims_and_sends_nothing() {
    let queue = FakeQueue::new(3);
    queue.0.borrow_mut().running = false;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings(3, Duration::ZERO),
    );
    rig.begin_term(true);
    rig.run(tokio::time::sleep(Duration::from_secs(30))).await;
    assert!(rig.provider.sends().is_empty());
    assert_eq!(queue.count(Status::Pending), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_out_in_flight_sends_for_the_shutdown_timeout_only() {
    let queue = FakeQueue::new(2);
    let mut settings = settings(2, Duration::ZERO);
    settings.send_concurrency = 1;
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::from_secs(3600)),
        settings,
    );
    rig.begin_term(true);
    let (asked, stopped) = rig
        .run(async {
            until(Duration::from_secs(10), || rig.provider.sends().len() == 1).await;
            Instant::now()
        })
        .await;
    let took = stopped - asked;
    let bound = rig.settings.shutdown_timeout + batch::CLEANUP_GRACE;
    assert!(took >= rig.settings.shutdown_timeout, "{took:?}");
    assert!(took <= bound, "{took:?} > {bound:?}");
    // The abandoned send's outcome is unknown: its row stays `sending` for the
    // rescue (same key); the one never sent went back to pending.
    assert_eq!(queue.row(1).status, Status::Sending);
    assert_eq!(queue.row(2).status, Status::Pending);
    assert_eq!(queue.row(2).attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn sends_overlap_batches_but_never_exceed_send_concurrency() {
    let queue = FakeQueue::new(40);
    let mut settings = settings(8, Duration::ZERO);
    settings.send_concurrency = 3;
    let in_flight = Arc::new(Mutex::new((0usize, 0usize)));
    let rig = Rig::new(
        queue.clone(),
        FakeProvider::accepting(Duration::ZERO),
        settings,
    );
    // Latency varies per message so that batches' tails overlap the next batch.
    let counting = CountingProvider {
        inner: Arc::clone(&rig.provider),
        in_flight: Arc::clone(&in_flight),
    };
    let dispatcher = Dispatcher {
        backend: queue.clone(),
        provider: Arc::new(counting),
        leadership: Arc::clone(&rig.leadership),
        metrics: Arc::new(Metrics::new()),
        settings: rig.settings.clone(),
        wake: Arc::default(),
        pacer: Pacer::default(),
        recorder: Recorder::new(queue.clone()),
        pause: PauseState::default(),
    };
    rig.begin_term(true);
    let shutdown = CancellationToken::new();
    tokio::join!(dispatcher.run(shutdown.clone()), async {
        until(Duration::from_secs(60), || queue.count(Status::Sent) == 40).await;
        shutdown.cancel();
    });
    let (_, most) = *in_flight.lock().unwrap();
    assert_eq!(most, 3, "the slots are shared across batches and all used");
}

/// Counts sends in flight, with latencies that differ per message.
struct CountingProvider {
    inner: Arc<FakeProvider>,
    in_flight: Arc<Mutex<(usize, usize)>>,
}

impl Provider for CountingProvider {
    async fn send(&self, delivery_key: &str, to: &str, content: &str) -> SendOutcome {
        {
            let mut counts = self.in_flight.lock().unwrap();
            counts.0 += 1;
            counts.1 = counts.1.max(counts.0);
        }
        let id: u64 = delivery_key.trim_start_matches("key-").parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(10 + (id * 37) % 90)).await;
        let outcome = self.inner.send(delivery_key, to, content).await;
        self.in_flight.lock().unwrap().0 -= 1;
        outcome
    }
}
