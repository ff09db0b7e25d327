//! Prometheus metrics (docs/operations.md#metrics-and-logs). One registry per replica, rendered by `/metrics`.
//!
//! Every labelled series that operators alert on is created at start with value 0,
//! so `rate()` and absence alerts work before the first event.

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{DeliveryStatus, MessageStatus};
use crate::version::BUILD;

pub struct Metrics {
    registry: Registry,
    /// Per lane (docs/design.md#lanes).
    pub messages_sent: IntCounterVec,
    pub messages_failed: IntCounterVec,
    pub messages_retried: IntCounter,
    pub messages_rescued: IntCounter,
    pub messages_expired: IntCounter,
    pub messages_cancelled: IntCounter,
    /// Per stage: `intake` or `claim` (docs/design.md#opt-outs).
    pub messages_blocked: IntCounterVec,
    /// Per outcome: `delivered`, `retry`, `failed` (a dead letter).
    pub webhook_deliveries: IntCounterVec,
    /// Per lane and reason (`quiet_hours`).
    pub messages_held: IntCounterVec,
    /// Per consent change: `opt_out` or `opt_in`, and source: `api` or `inbound`.
    pub opt_out_changes: IntCounterVec,
    pub delivery_receipts: IntCounterVec,
    /// Per status or error kind, and provider.
    pub provider_requests: IntCounterVec,
    pub provider_request_duration: Histogram,
    /// Per lane, provider and outcome (docs/design.md#failover).
    pub provider_sends: IntCounterVec,
    /// Per lane and provider: 0 closed, 1 half-open, 2 open; set by the lane's leader.
    pub provider_breaker: IntGaugeVec,
    /// Per lane: the rate the lane sends at after throttles, units per second; set by
    /// the lane's leader.
    pub effective_rate: GaugeVec,
    /// Per lane and outcome.
    pub batches: IntCounterVec,
    pub batch_duration: Histogram,
    pub queue_messages: IntGaugeVec,
    pub oldest_pending_age: Gauge,
    /// The same, per priority: a stream of urgent messages above the rate starves the
    /// lower priorities, and this shows it.
    pub oldest_pending_age_by_priority: GaugeVec,
    /// Per lane.
    pub is_leader: IntGaugeVec,
    pub leader_epoch: IntGaugeVec,
    pub lock_operations: IntCounterVec,
    pub leadership_changes: IntCounter,
    pub fencing_rejections: IntCounter,
    pub scheduler_running: IntGauge,
    /// Per lane.
    pub configured_rate: GaugeVec,
    pub dependency_up: IntGaugeVec,
    /// 1 while this replica's dispatch is paused for the reason (`provider_auth`).
    pub dispatch_paused: IntGaugeVec,
    /// 1 while the lane is paused for the reason, read from PostgreSQL at scrape time.
    pub lane_paused: IntGaugeVec,
    /// What the sends this replica made cost, per lane and provider
    /// (docs/design.md#spend-caps).
    pub spend: CounterVec,
    /// The lane's spend this UTC day and its cap in force, read from PostgreSQL at
    /// scrape time; the cap's series exists only for a lane with one.
    pub lane_spend_today: GaugeVec,
    pub lane_spend_cap: GaugeVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    /// Finished rows retention removed or blanked, by action (docs/design.md#retention).
    pub retention_rows: IntCounterVec,
    /// Age in whole seconds of the oldest transaction that holds back PostgreSQL's
    /// cleanup of the database; 0 when none (docs/operations.md#old-transactions).
    pub oldest_transaction_age: IntGauge,
}

/// What retention did to a finished row (`dispatcher_retention_rows_total`).
pub const RETENTION_REMOVED: &str = "removed";
pub const RETENTION_CONTENT_REMOVED: &str = "content_removed";

/// Why dispatch is paused while the cluster runs.
pub const PAUSED_PROVIDER_AUTH: &str = "provider_auth";
/// The lane reached its daily spend cap (docs/design.md#spend-caps).
pub const PAUSED_SPEND_CAP: &str = "spend_cap";
pub const PAUSE_REASONS: [&str; 2] = [PAUSED_PROVIDER_AUTH, PAUSED_SPEND_CAP];

/// Why a message ended `failed`.
pub const FAILED_REJECTED: &str = "rejected";
pub const FAILED_MAX_ATTEMPTS: &str = "max_attempts";

/// What a send to a provider came to (`dispatcher_provider_sends_total`).
pub const PROVIDER_OUTCOMES: [&str; 6] = [
    "accepted",
    "rejected",
    "retry",
    "unknown",
    "throttled",
    "unauthorized",
];

/// How a batch ended.
pub const BATCH_COMPLETE: &str = "complete";
pub const BATCH_PARTIAL: &str = "partial";
pub const BATCH_FAILED: &str = "failed";
pub const BATCH_INTERRUPTED: &str = "interrupted";

pub const LOCK_OPS: [&str; 3] = ["acquire", "extend", "release"];
pub const LOCK_RESULTS: [&str; 4] = ["ok", "busy", "lost", "error"];

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn float_vec<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> M {
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    /// Builds the registry. Names are constants, so registration cannot fail at run
    /// time; the `expect`s document that, they do not guard input.
    pub fn new() -> Self {
        let r = Registry::new();
        let metrics = Self {
            messages_sent: counter_vec(
                &r,
                "dispatcher_messages_sent_total",
                "Messages the provider accepted, per lane.",
                &["lane"],
            ),
            messages_failed: counter_vec(
                &r,
                "dispatcher_messages_failed_total",
                "Messages marked failed, by reason (rejected by the provider, or out of attempts).",
                &["reason"],
            ),
            messages_retried: counter(
                &r,
                "dispatcher_messages_retried_total",
                "Sends that failed transiently and were scheduled for another attempt.",
            ),
            messages_rescued: counter(
                &r,
                "dispatcher_messages_rescued_total",
                "Claims of a dead or deposed leader returned to pending by this replica.",
            ),
            messages_expired: counter(
                &r,
                "dispatcher_messages_expired_total",
                "Messages this replica found past their expires_at and never sent.",
            ),
            messages_cancelled: counter(
                &r,
                "dispatcher_messages_cancelled_total",
                "Pending messages cancelled through this replica's API.",
            ),
            messages_blocked: counter_vec(
                &r,
                "dispatcher_messages_blocked_total",
                "Messages to numbers on the opt-out list, blocked (never sent) by this \
                 replica, at intake or at claim.",
                &["stage"],
            ),
            webhook_deliveries: counter_vec(
                &r,
                "dispatcher_webhook_deliveries_total",
                "Status webhook posts by this replica, by outcome: delivered, retry (not \
                 accepted, retried later) or failed (given up: a dead letter).",
                &["outcome"],
            ),
            messages_held: counter_vec(
                &r,
                "dispatcher_messages_held_total",
                "Claimed messages put back in the queue by this replica's leader to wait, \
                 by lane and reason (quiet_hours: inside the lane's quiet hours).",
                &["lane", "reason"],
            ),
            opt_out_changes: counter_vec(
                &r,
                "dispatcher_opt_out_changes_total",
                "Numbers put on (opt_out) or taken off (opt_in) the opt-out list through \
                 this replica, by change and source (api, inbound).",
                &["change", "source"],
            ),
            retention_rows: counter_vec(
                &r,
                "dispatcher_retention_rows_total",
                "Finished messages this replica removed (MESSAGE_RETENTION) or whose text it \
                 removed (CONTENT_RETENTION), by action.",
                &["action"],
            ),
            oldest_transaction_age: gauge(
                &r,
                "dispatcher_db_oldest_transaction_age_seconds",
                "Age of the oldest open transaction or snapshot in the dispatcher's database \
                 that holds back cleanup of dead rows; 0 when none.",
            ),
            delivery_receipts: counter_vec(
                &r,
                "dispatcher_delivery_receipts_total",
                "Delivery receipts this replica accepted, by the status they report.",
                &["status"],
            ),
            provider_requests: counter_vec(
                &r,
                "dispatcher_provider_requests_total",
                "Requests to the SMS providers by HTTP status code or error kind, and provider.",
                &["code", "provider"],
            ),
            provider_sends: counter_vec(
                &r,
                "dispatcher_provider_sends_total",
                "Sends by lane, provider and outcome (accepted, rejected, retry, unknown, \
                 throttled, unauthorized).",
                &["lane", "provider", "outcome"],
            ),
            provider_breaker: gauge_vec(
                &r,
                "dispatcher_provider_breaker_state",
                "The lane leader's circuit breaker for each provider: 0 closed, 1 half-open, \
                 2 open (the lane sends through its next provider).",
                &["lane", "provider"],
            ),
            effective_rate: {
                let g = GaugeVec::new(
                    Opts::new(
                        "dispatcher_lane_effective_rate_per_second",
                        "The rate the lane's leader sends at: the configured rate lowered \
                         by provider throttling (halved per throttle, recovering linearly).",
                    ),
                    &["lane"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            provider_request_duration: histogram(
                &r,
                "dispatcher_provider_request_duration_seconds",
                "Time from sending a request to the provider to its answer or error.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            batches: counter_vec(
                &r,
                "dispatcher_batches_total",
                "Batches run by this replica, by lane and outcome.",
                &["lane", "outcome"],
            ),
            batch_duration: histogram(
                &r,
                "dispatcher_batch_duration_seconds",
                "Time from claiming a batch to recording its last result.",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            queue_messages: gauge_vec(
                &r,
                "dispatcher_queue_messages",
                "Messages in the queue by status (read from PostgreSQL at scrape time).",
                &["status"],
            ),
            oldest_pending_age: {
                let g = Gauge::new(
                    "dispatcher_oldest_pending_message_age_seconds",
                    "Age of the oldest pending message (0 when none).",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            oldest_pending_age_by_priority: {
                let g = GaugeVec::new(
                    Opts::new(
                        "dispatcher_oldest_pending_message_age_by_priority_seconds",
                        "Age of the oldest due pending message of each priority (0 when none); \
                         a higher priority above the rate starves the lower ones.",
                    ),
                    &["priority"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            is_leader: gauge_vec(
                &r,
                "dispatcher_is_leader",
                "1 while this replica leads the lane.",
                &["lane"],
            ),
            leader_epoch: gauge_vec(
                &r,
                "dispatcher_leader_epoch",
                "Epoch of this replica's current or last leadership term of the lane.",
                &["lane"],
            ),
            lock_operations: counter_vec(
                &r,
                "dispatcher_lock_operations_total",
                "Redis lock operations by operation and result.",
                &["op", "result"],
            ),
            leadership_changes: counter(
                &r,
                "dispatcher_leadership_changes_total",
                "Times this replica became leader or stopped being leader.",
            ),
            fencing_rejections: counter(
                &r,
                "dispatcher_fencing_rejections_total",
                "Claims PostgreSQL refused because a newer epoch exists.",
            ),
            scheduler_running: gauge(
                &r,
                "dispatcher_scheduler_running",
                "1 when the cluster's desired state is running.",
            ),
            configured_rate: {
                let g = GaugeVec::new(
                    Opts::new(
                        "dispatcher_configured_rate_per_second",
                        "The most units (messages or segments) per second the lane's \
                         schedule in force allows (batch size / interval; +Inf with a zero \
                         interval). The achieved rate is \
                         rate(dispatcher_messages_sent_total[5m]) summed over replicas.",
                    ),
                    &["lane"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            dependency_up: gauge_vec(
                &r,
                "dispatcher_dependency_up",
                "1 when the dependency answered the last health check.",
                &["dependency"],
            ),
            dispatch_paused: gauge_vec(
                &r,
                "dispatcher_dispatch_paused",
                "1 while this replica, leading, pauses dispatch for the reason \
                 (provider_auth: the provider refuses our credentials).",
                &["reason"],
            ),
            lane_paused: gauge_vec(
                &r,
                "dispatcher_lane_paused",
                "1 while the lane is paused for the reason though it runs (provider_auth: \
                 the provider refuses our credentials; spend_cap: the lane reached its daily \
                 spend cap). Read from PostgreSQL by every replica.",
                &["lane", "reason"],
            ),
            spend: float_vec(
                &r,
                CounterVec::new(
                    Opts::new(
                        "dispatcher_spend_total",
                        "What the sends this replica made cost (segments times the provider's \
                         price_per_segment), in the prices' currency.",
                    ),
                    &["lane", "provider"],
                ),
            ),
            lane_spend_today: float_vec(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "dispatcher_lane_spend_today",
                        "The lane's spend this UTC day over every replica, in the prices' currency.",
                    ),
                    &["lane"],
                ),
            ),
            lane_spend_cap: float_vec(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "dispatcher_lane_daily_spend_cap",
                        "The lane's daily spend cap in force (configured or set at run time); \
                         absent for a lane without one.",
                    ),
                    &["lane"],
                ),
            ),
            http_requests: counter_vec(
                &r,
                "dispatcher_http_requests_total",
                "HTTP requests this replica answered, by method, route pattern and status.",
                &["method", "route", "status"],
            ),
            http_request_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "dispatcher_http_request_duration_seconds",
                        "Time to answer an HTTP request, by method and route pattern.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        10.0,
                    ]),
                    &["method", "route"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry: r,
        };
        metrics.register_process_and_build_info();
        metrics.create_known_series();
        metrics
    }

    fn register_process_and_build_info(&self) {
        let build = IntGaugeVec::new(
            Opts::new(
                "dispatcher_build_info",
                "Always 1; labels say which build is running.",
            ),
            &["version", "commit"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[BUILD.version, BUILD.commit])
            .set(1);
        self.registry
            .register(Box::new(build))
            .expect("unique metric");
        let process = prometheus::process_collector::ProcessCollector::for_self();
        self.registry
            .register(Box::new(process))
            .expect("unique metric");
    }

    /// Messages sent so far in this process, over every lane.
    pub fn messages_sent_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.messages_sent
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }

    /// Creates every lane's series at 0, so that an absent lane shows as 0, not as
    /// nothing.
    /// The series of each lane's providers.
    pub fn register_providers<'a>(&self, lane: &str, providers: impl IntoIterator<Item = &'a str>) {
        for provider in providers {
            self.provider_breaker.with_label_values(&[lane, provider]);
            self.spend.with_label_values(&[lane, provider]);
            for outcome in PROVIDER_OUTCOMES {
                self.provider_sends
                    .with_label_values(&[lane, provider, outcome]);
            }
        }
    }

    pub fn register_lanes<'a>(&self, lanes: impl IntoIterator<Item = &'a str>) {
        for lane in lanes {
            self.messages_sent.with_label_values(&[lane]);
            self.is_leader.with_label_values(&[lane]);
            self.lane_spend_today.with_label_values(&[lane]);
            for reason in PAUSE_REASONS {
                self.lane_paused.with_label_values(&[lane, reason]);
            }
            self.leader_epoch.with_label_values(&[lane]);
            for outcome in [
                BATCH_COMPLETE,
                BATCH_PARTIAL,
                BATCH_FAILED,
                BATCH_INTERRUPTED,
            ] {
                self.batches.with_label_values(&[lane, outcome]);
            }
        }
    }

    fn create_known_series(&self) {
        for reason in [FAILED_REJECTED, FAILED_MAX_ATTEMPTS] {
            self.messages_failed.with_label_values(&[reason]);
        }
        for op in LOCK_OPS {
            for result in LOCK_RESULTS {
                self.lock_operations.with_label_values(&[op, result]);
            }
        }
        for reason in PAUSE_REASONS {
            self.dispatch_paused.with_label_values(&[reason]);
        }
        for priority in crate::domain::Priority::ALL {
            self.oldest_pending_age_by_priority
                .with_label_values(&[&priority.to_string()]);
        }
        for dependency in ["database", "redis"] {
            self.dependency_up.with_label_values(&[dependency]);
        }
        for status in MessageStatus::ALL {
            self.queue_messages.with_label_values(&[status.as_str()]);
        }
        for status in DeliveryStatus::ALL {
            self.delivery_receipts.with_label_values(&[status.as_str()]);
        }
    }

    pub fn lock_op(&self, op: &str, result: &str) {
        self.lock_operations.with_label_values(&[op, result]).inc();
    }

    pub fn set_dependency(&self, dependency: &str, up: bool) {
        self.dependency_up
            .with_label_values(&[dependency])
            .set(i64::from(up));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%err, "could not encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lane_has_its_series_from_the_start() {
        let metrics = Metrics::new();
        metrics.register_lanes(["default", "otp"]);
        let text = metrics.render();
        for series in [
            r#"dispatcher_batches_total{lane="otp",outcome="complete"} 0"#,
            r#"dispatcher_messages_sent_total{lane="default"} 0"#,
            r#"dispatcher_is_leader{lane="otp"} 0"#,
            r#"dispatcher_leader_epoch{lane="default"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        metrics.messages_sent.with_label_values(&["otp"]).inc_by(2);
        metrics.messages_sent.with_label_values(&["default"]).inc();
        assert_eq!(metrics.messages_sent_total(), 3);
    }
}
