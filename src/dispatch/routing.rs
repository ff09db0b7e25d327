//! Which of its providers a lane sends through, and how fast (docs/design.md#failover,
//! #throttling): a circuit breaker per provider, the pauses a provider's throttling
//! asks for, and the lane's effective rate, lowered by each throttle and recovering
//! with time.
//!
//! This is the leader's memory only: a new leader starts with every breaker closed and
//! the full rate, and learns again from its own sends. What must survive a crash, that
//! a message whose outcome is unknown stays with its provider, is in the message row
//! (`pinned_provider`), not here.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::{BREAKER_WINDOW, BreakerSettings};
use crate::provider::SendOutcome;

/// The lowest share of its configured rate a throttled lane falls to.
pub const MIN_RATE_FACTOR: f64 = 1.0 / 16.0;
/// How fast the effective rate recovers: this share of the configured rate per second
/// without a throttle (from half to full in 10 s).
pub const RATE_RECOVERY_PER_SECOND: f64 = 0.05;
/// The first pause of a throttle that names no time; each throttle in a row doubles it.
const FIRST_THROTTLE_PAUSE: Duration = Duration::from_secs(1);
/// How often a send waiting for a half-open breaker's probe looks again.
const PROBE_POLL: Duration = Duration::from_millis(20);

/// One provider of the lane, as `Routing` is built with it.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub name: String,
    pub breaker: BreakerSettings,
    /// The provider's default sender.
    pub from: Option<String>,
    /// What a segment through it costs (docs/design.md#spend-caps).
    pub prices: Option<crate::spend::Prices>,
}

pub struct Routing {
    state: Mutex<State>,
    /// The longest pause a throttle can impose (`RETRY_BACKOFF_MAX`).
    max_pause: Duration,
}

struct State {
    /// In the order the lane tries them.
    routes: Vec<Route>,
    /// The share of the configured rate the lane sends at, as of `factor_at`.
    factor: f64,
    factor_at: Instant,
}

struct Route {
    name: String,
    settings: BreakerSettings,
    breaker: Breaker,
    /// No send starts before this (the provider throttled us).
    throttled_until: Option<Instant>,
    /// The pause of the next throttle that names no time.
    next_pause: Duration,
    /// Failures in a row, and the last sends' verdicts (true: failed), newest last.
    in_a_row: u32,
    recent: std::collections::VecDeque<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed,
    Open {
        until: Instant,
    },
    /// The cooldown is over: one send, the probe, decides. `probing` while it is out.
    HalfOpen {
        probing: bool,
    },
}

/// Whether a send to a provider may start.
pub enum Admission<'a> {
    /// Go, and report the answer through the ticket.
    Go(Ticket<'a>),
    /// The provider's probe is out: ask again at this time.
    Wait(Instant),
    /// Open or throttled: this batch stops sending; its unsent messages go back to the
    /// queue and the next claim picks another provider.
    Unavailable,
}

/// A send's right to go; its answer is reported with [`Ticket::record`]. Dropped
/// unreported (the send never happened), it gives a probe back.
pub struct Ticket<'a> {
    routing: &'a Routing,
    provider: String,
    probe: bool,
    recorded: bool,
}

/// What the breaker and the throttle learn from one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The provider answered for the message (accepted it, refused it for good, or
    /// refused our credentials).
    Answered,
    /// A retryable failure.
    Failed,
    /// Throttled, for this long if it said.
    Throttled(Option<Duration>),
}

impl Verdict {
    /// A refusal of our credentials is an answer: the provider is up, and the lane's
    /// pause for credentials (docs/design.md#provider-credentials) handles it.
    pub fn of(outcome: &SendOutcome) -> Self {
        match outcome {
            SendOutcome::Accepted { .. }
            | SendOutcome::Rejected { .. }
            | SendOutcome::Unauthorized { .. } => Self::Answered,
            SendOutcome::Transient { .. } => Self::Failed,
            SendOutcome::Throttled { retry_after, .. } => Self::Throttled(*retry_after),
        }
    }
}

/// What the next claim may take: messages for `provider` (`None` when none is usable)
/// and those pinned to any of `usable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub provider: Option<String>,
    /// `provider` is half-open (no provider is closed): the claim takes one message,
    /// its probe.
    pub probe_only: bool,
    /// A provider preferred to `provider` whose cooldown is over: one message of the
    /// batch goes there as its probe, the rest to `provider`. (Sending the whole batch
    /// there would hold every message but the probe back, and when claims are further
    /// apart than the cooldown, the lane would never send through `provider`.)
    pub probe: Option<String>,
    pub usable: Vec<String>,
    /// When none is usable: when the first becomes so.
    pub next_usable_at: Option<Instant>,
}

/// One provider's state for `/api/lanes` and the metrics.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProviderState {
    pub name: String,
    /// `closed`, `open` or `half_open` (as the API spells it).
    pub state: &'static str,
    pub open_until: Option<DateTime<Utc>>,
    pub throttled_until: Option<DateTime<Utc>>,
    pub failures_in_a_row: u32,
    /// Failed share of the last sends (up to 20).
    pub failure_share: f64,
}

impl Routing {
    pub fn new(routes: &[RouteSettings], max_pause: Duration) -> Self {
        let routes = routes
            .iter()
            .map(|route| Route {
                name: route.name.clone(),
                settings: route.breaker,
                breaker: Breaker::Closed,
                throttled_until: None,
                next_pause: FIRST_THROTTLE_PAUSE,
                in_a_row: 0,
                recent: Default::default(),
            })
            .collect();
        Self {
            state: Mutex::new(State {
                routes,
                factor: 1.0,
                factor_at: Instant::now(),
            }),
            max_pause,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The providers the next claim may send through, in the lane's order: the first
    /// closed one takes the new messages; a half-open one before it gets one of them,
    /// its probe (see [`Choice::probe`]); with none closed, the first half-open one
    /// takes a single message, its probe. Messages pinned to any usable provider may go
    /// too (a half-open one's wait for its probe at the start gate).
    pub fn choose(&self) -> Choice {
        let now = Instant::now();
        let state = self.lock();
        let usable: Vec<&Route> = state
            .routes
            .iter()
            .filter(|route| route.usable_at(now) <= now)
            .collect();
        let next_usable_at = if usable.is_empty() {
            state.routes.iter().map(|route| route.usable_at(now)).min()
        } else {
            None
        };
        // Ready for its probe: cooldown over, no probe out.
        let ready = |route: &&&Route| {
            route.breaker != Breaker::Closed
                && route.breaker != (Breaker::HalfOpen { probing: true })
        };
        let closed = usable
            .iter()
            .position(|route| route.breaker == Breaker::Closed);
        let (provider, probe_only, probe) = match closed {
            Some(at) => (
                Some(usable[at].name.clone()),
                false,
                usable[..at]
                    .iter()
                    .find(ready)
                    .map(|route| route.name.clone()),
            ),
            None => (
                usable.iter().find(ready).map(|route| route.name.clone()),
                true,
                None,
            ),
        };
        Choice {
            provider,
            probe_only,
            probe,
            usable: usable.iter().map(|route| route.name.clone()).collect(),
            next_usable_at,
        }
    }

    /// A new term: every breaker closed, no throttle, the full rate (docs/design.md#failover).
    pub fn reset(&self) {
        let mut state = self.lock();
        for route in &mut state.routes {
            route.breaker = Breaker::Closed;
            route.throttled_until = None;
            route.next_pause = FIRST_THROTTLE_PAUSE;
            route.in_a_row = 0;
            route.recent.clear();
        }
        state.factor = 1.0;
        state.factor_at = Instant::now();
    }

    /// Whether sends to `provider` are held back now (breaker open, or throttled):
    /// asked once more right before a send whose ticket was taken earlier.
    pub fn holds_back(&self, provider: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .routes
            .iter()
            .find(|r| r.name == provider)
            .is_some_and(|route| {
                route.throttled_until.is_some_and(|until| until > now)
                    || matches!(route.breaker, Breaker::Open { until } if until > now)
            })
    }

    /// Whether a send to `provider` may start now (see [`Admission`]).
    pub fn admit(&self, provider: &str) -> Admission<'_> {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(route) = state.routes.iter_mut().find(|r| r.name == provider) else {
            // A provider this lane does not name (a row pinned by another
            // configuration): nothing to guard here.
            return Admission::Go(self.ticket(provider, false));
        };
        if route.throttled_until.is_some_and(|until| until > now) {
            return Admission::Unavailable;
        }
        if let Breaker::Open { until } = route.breaker {
            if until > now {
                return Admission::Unavailable;
            }
            route.breaker = Breaker::HalfOpen { probing: false };
        }
        match route.breaker {
            Breaker::Closed => Admission::Go(self.ticket(provider, false)),
            Breaker::HalfOpen { probing: true } => Admission::Wait(now + PROBE_POLL),
            Breaker::HalfOpen { probing: false } => {
                route.breaker = Breaker::HalfOpen { probing: true };
                tracing::info!(provider, "breaker half-open: this send is the probe");
                Admission::Go(self.ticket(provider, true))
            }
            Breaker::Open { .. } => Admission::Unavailable,
        }
    }

    fn ticket(&self, provider: &str, probe: bool) -> Ticket<'_> {
        Ticket {
            routing: self,
            provider: provider.to_string(),
            probe,
            recorded: false,
        }
    }

    /// The share of its configured rate the lane may send at now.
    pub fn rate_factor(&self) -> f64 {
        self.lock().factor_now(Instant::now())
    }

    pub fn states(&self) -> Vec<ProviderState> {
        let now = Instant::now();
        let wall = |at: Instant| Utc::now() + (at.saturating_duration_since(now));
        self.lock()
            .routes
            .iter()
            .map(|route| {
                let failures = route.recent.iter().filter(|failed| **failed).count();
                ProviderState {
                    name: route.name.clone(),
                    state: match route.breaker {
                        Breaker::Closed => "closed",
                        Breaker::Open { until } if until > now => "open",
                        Breaker::Open { .. } | Breaker::HalfOpen { .. } => "half_open",
                    },
                    open_until: match route.breaker {
                        Breaker::Open { until } if until > now => Some(wall(until)),
                        _ => None,
                    },
                    throttled_until: route.throttled_until.filter(|t| *t > now).map(wall),
                    failures_in_a_row: route.in_a_row,
                    failure_share: if route.recent.is_empty() {
                        0.0
                    } else {
                        failures as f64 / route.recent.len() as f64
                    },
                }
            })
            .collect()
    }

    fn record(&self, provider: &str, probe: bool, verdict: Verdict) {
        let now = Instant::now();
        let mut state = self.lock();
        if let Verdict::Throttled(_) = verdict {
            let factor = state.factor_now(now);
            state.factor = (factor / 2.0).max(MIN_RATE_FACTOR);
            state.factor_at = now;
        }
        let max_pause = self.max_pause;
        let Some(route) = state.routes.iter_mut().find(|r| r.name == provider) else {
            return;
        };
        match verdict {
            Verdict::Answered => {
                route.in_a_row = 0;
                route.next_pause = FIRST_THROTTLE_PAUSE;
                route.remember(false);
                if probe || matches!(route.breaker, Breaker::HalfOpen { .. }) {
                    tracing::info!(provider, "breaker closed: the probe was answered");
                    route.breaker = Breaker::Closed;
                }
            }
            Verdict::Throttled(wait) => {
                let floor = crate::retry::MIN_RETRY_AFTER.min(max_pause);
                let pause = wait.unwrap_or(route.next_pause).clamp(floor, max_pause);
                route.next_pause = (route.next_pause * 2).min(max_pause);
                let until = now + pause;
                route.throttled_until = Some(route.throttled_until.map_or(until, |t| t.max(until)));
                tracing::warn!(
                    provider,
                    pause_ms = pause.as_millis() as u64,
                    "provider throttled us: its sends pause"
                );
                // Alive, only busy: a probe that gets a throttle closes the breaker.
                if probe {
                    route.breaker = Breaker::Closed;
                }
            }
            Verdict::Failed => {
                route.in_a_row += 1;
                route.remember(true);
                let failures = route.recent.iter().filter(|failed| **failed).count();
                let share_over = route.recent.len() == BREAKER_WINDOW
                    && failures as f64 / BREAKER_WINDOW as f64 > route.settings.ratio;
                let trips = probe
                    || matches!(route.breaker, Breaker::HalfOpen { .. })
                    || (route.breaker == Breaker::Closed
                        && (route.in_a_row >= route.settings.failures || share_over));
                if trips {
                    tracing::warn!(
                        provider,
                        failures_in_a_row = route.in_a_row,
                        failures_of_last = failures,
                        cooldown_ms = route.settings.cooldown.as_millis() as u64,
                        "breaker open: the lane sends through its next provider meanwhile"
                    );
                    route.breaker = Breaker::Open {
                        until: now + route.settings.cooldown,
                    };
                    route.in_a_row = 0;
                    route.recent.clear();
                }
            }
        }
    }

    /// A probe whose send never happened: the next send may probe.
    fn give_back(&self, provider: &str) {
        let mut state = self.lock();
        if let Some(route) = state.routes.iter_mut().find(|r| r.name == provider) {
            if route.breaker == (Breaker::HalfOpen { probing: true }) {
                route.breaker = Breaker::HalfOpen { probing: false };
            }
        }
    }
}

impl State {
    /// The factor, recovered linearly since it last dropped.
    fn factor_now(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.factor_at).as_secs_f64();
        (self.factor + elapsed * RATE_RECOVERY_PER_SECOND).min(1.0)
    }
}

impl Route {
    /// When a send to this provider may next start: now, the end of its cooldown (then
    /// as a probe) or of its throttle.
    fn usable_at(&self, now: Instant) -> Instant {
        let breaker = match self.breaker {
            Breaker::Open { until } => until,
            Breaker::Closed | Breaker::HalfOpen { .. } => now,
        };
        breaker.max(self.throttled_until.unwrap_or(now))
    }

    fn remember(&mut self, failed: bool) {
        if self.recent.len() == BREAKER_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(failed);
    }
}

impl Ticket<'_> {
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// This send is a half-open breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the send's answer to the breaker and the throttle.
    pub fn record(mut self, verdict: Verdict) {
        self.recorded = true;
        self.routing.record(&self.provider, self.probe, verdict);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.routing.give_back(&self.provider);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(names: &[&str]) -> Routing {
        let routes: Vec<RouteSettings> = names
            .iter()
            .map(|name| RouteSettings {
                name: name.to_string(),
                breaker: BreakerSettings {
                    failures: 3,
                    ratio: 0.5,
                    cooldown: Duration::from_secs(10),
                },
                from: None,
                prices: None,
            })
            .collect();
        Routing::new(&routes, Duration::from_secs(60))
    }

    fn send(routing: &Routing, provider: &str, verdict: Verdict) {
        match routing.admit(provider) {
            Admission::Go(ticket) => ticket.record(verdict),
            _ => panic!("{provider} should admit a send"),
        }
    }

    fn state_of(routing: &Routing, provider: &str) -> &'static str {
        routing
            .states()
            .into_iter()
            .find(|s| s.name == provider)
            .unwrap()
            .state
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_the_breaker_and_the_next_provider_takes_over() {
        let routing = routing(&["a", "b"]);
        assert_eq!(routing.choose().provider.as_deref(), Some("a"));
        send(&routing, "a", Verdict::Failed);
        send(&routing, "a", Verdict::Answered);
        send(&routing, "a", Verdict::Failed);
        send(&routing, "a", Verdict::Failed);
        assert_eq!(
            state_of(&routing, "a"),
            "closed",
            "an answer resets the run"
        );
        send(&routing, "a", Verdict::Failed);
        assert_eq!(state_of(&routing, "a"), "open");
        assert!(matches!(routing.admit("a"), Admission::Unavailable));
        let choice = routing.choose();
        assert_eq!(choice.provider.as_deref(), Some("b"));
        assert_eq!(choice.usable, vec!["b".to_string()]);

        // After the cooldown one probe goes; the others wait for its answer.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(state_of(&routing, "a"), "half_open");
        let choice = routing.choose();
        assert_eq!(
            (choice.provider.as_deref(), choice.probe.as_deref()),
            (Some("b"), Some("a")),
            "b takes the batch, a gets one message of it, its probe"
        );
        assert!(!choice.probe_only);
        let Admission::Go(probe) = routing.admit("a") else {
            panic!("the probe goes")
        };
        assert!(matches!(routing.admit("a"), Admission::Wait(_)));
        let choice = routing.choose();
        assert_eq!(
            (choice.provider.as_deref(), choice.probe.as_deref()),
            (Some("b"), None),
            "while the probe is out, new messages go to the next provider"
        );
        assert_eq!(
            choice.usable,
            ["a", "b"],
            "a's pinned messages may wait for it"
        );
        probe.record(Verdict::Failed);
        assert_eq!(
            state_of(&routing, "a"),
            "open",
            "a failed probe opens it again"
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        send(&routing, "a", Verdict::Answered);
        assert_eq!(state_of(&routing, "a"), "closed");
        assert!(!routing.choose().probe_only);

        // A new term forgets it all.
        for _ in 0..3 {
            send(&routing, "a", Verdict::Failed);
        }
        send(&routing, "b", Verdict::Throttled(None));
        routing.reset();
        assert_eq!(state_of(&routing, "a"), "closed");
        assert!(!routing.holds_back("b"));
        assert_eq!(routing.rate_factor(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_went_is_given_back() {
        let routing = routing(&["a"]);
        for _ in 0..3 {
            send(&routing, "a", Verdict::Failed);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let Admission::Go(probe) = routing.admit("a") else {
            panic!("the probe goes")
        };
        drop(probe);
        assert!(matches!(routing.admit("a"), Admission::Go(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_share_over_the_ratio_opens_the_breaker() {
        let routing = routing(&["a"]);
        // Never three in a row, but 11 of the last 20 failed.
        for i in 0..20 {
            let failed = i % 2 == 0 || i == 19;
            send(
                &routing,
                "a",
                if failed {
                    Verdict::Failed
                } else {
                    Verdict::Answered
                },
            );
            if i < 19 {
                assert_eq!(state_of(&routing, "a"), "closed", "after send {i}");
            }
        }
        assert_eq!(state_of(&routing, "a"), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_its_provider_and_halves_the_rate_which_recovers() {
        let routing = routing(&["a"]);
        send(
            &routing,
            "a",
            Verdict::Throttled(Some(Duration::from_secs(3))),
        );
        assert!(matches!(routing.admit("a"), Admission::Unavailable));
        let choice = routing.choose();
        assert_eq!(choice.provider, None);
        assert_eq!(
            choice.next_usable_at,
            Some(Instant::now() + Duration::from_secs(3))
        );
        assert_eq!(routing.rate_factor(), 0.5);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            (routing.rate_factor() - 0.65).abs() < 1e-9,
            "{}",
            routing.rate_factor()
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(routing.rate_factor(), 1.0);
        for _ in 0..10 {
            if let Admission::Go(ticket) = routing.admit("a") {
                ticket.record(Verdict::Throttled(None));
            }
            tokio::time::advance(Duration::from_secs(120)).await;
        }
        // A Retry-After of 0 still pauses a second; an absurd one is capped.
        tokio::time::advance(Duration::from_secs(120)).await;
        send(&routing, "a", Verdict::Throttled(Some(Duration::ZERO)));
        assert_eq!(
            routing.choose().next_usable_at,
            Some(Instant::now() + Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        send(
            &routing,
            "a",
            Verdict::Throttled(Some(Duration::from_secs(u64::MAX / 4))),
        );
        assert_eq!(
            routing.choose().next_usable_at,
            Some(Instant::now() + Duration::from_secs(60))
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        // Bounded below, and a throttle without a time backs off, bounded too.
        let Admission::Go(ticket) = routing.admit("a") else {
            panic!()
        };
        ticket.record(Verdict::Throttled(None));
        assert!(routing.rate_factor() >= MIN_RATE_FACTOR);
        let until = routing.choose().next_usable_at.unwrap();
        assert!(until - Instant::now() <= Duration::from_secs(60));
        // A throttle is not a failure: the breaker stays closed.
        assert_eq!(state_of(&routing, "a"), "closed");
    }
}
