//! The rows the store modules share with their callers: plain data, no SQL. The
//! API, the dispatcher and the elector all speak in these types.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::{
    DeliveryStatus, Epoch, IdempotencyKey, MessageContent, MessageStatus, PhoneNumber, Priority,
};
use crate::encoding::Encoding;

/// A message as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub id: i64,
    pub phone_number: String,
    /// The ISO region of the number (`TR`), from its country code; not stored.
    pub country: Option<String>,
    /// `None` once CONTENT_RETENTION has removed the text of a finished message.
    pub content: Option<String>,
    pub status: MessageStatus,
    pub sent: bool,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    /// The provider's id for the message (`provider_message_id` in the table).
    pub message_id: Option<String>,
    pub last_error: Option<String>,
    pub idempotency_key: Option<String>,
    /// The `Idempotency-Key` this message is sent with (see `delivery_key!`).
    pub delivery_key: String,
    pub send_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i16,
    /// The lane it is sent through (docs/design.md#lanes).
    pub lane: String,
    /// The sender it names (`sender` in the table); `None`: its lane's or provider's.
    pub from: Option<String>,
    /// `transactional` or `marketing`; `None` when it names none (held like marketing).
    pub category: Option<String>,
    /// Where this message's status webhooks go; `None`: `STATUS_WEBHOOK_URL`.
    pub status_callback_url: Option<String>,
    /// The provider that took it, or its current or last send went to
    /// (docs/design.md#failover).
    pub provider: Option<String>,
    /// Computed from the content (GSM 03.38), not stored; `None` with the content.
    pub encoding: Option<Encoding>,
    pub segments: Option<u32>,
    pub delivery_status: Option<DeliveryStatus>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub delivery_error: Option<String>,
}

/// A validated message to insert. Times are whole microseconds, as PostgreSQL keeps them.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub phone_number: PhoneNumber,
    pub content: MessageContent,
    pub idempotency_key: Option<IdempotencyKey>,
    pub send_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Priority,
    /// Named by the request or chosen by the routes; a configured lane.
    pub lane: String,
    pub from: Option<crate::domain::Sender>,
    pub category: Option<crate::domain::Category>,
    pub status_callback_url: Option<String>,
}

/// What an insert did, item by item in input order.
#[derive(Debug)]
pub enum Inserted {
    /// Each item's row, and whether this request created it (false: an earlier request
    /// with the same idempotency key did).
    Rows(Vec<(Message, bool)>),
    /// Item `index` reuses an idempotency key whose stored message differs from it;
    /// nothing was inserted.
    KeyConflict { index: usize, existing_id: i64 },
}

/// Filters of a listing; every one optional.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<MessageStatus>,
    pub phone_number: Option<String>,
    /// `created_at` from (inclusive) and until (exclusive).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub lane: Option<String>,
}

/// One lane's queue as the counters see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneCounts {
    pub lane: String,
    pub pending: i64,
    pub sending: i64,
    pub sent_last_minute: i64,
}

/// One page of a newest-first listing. `next_cursor` is the id to pass as `cursor`
/// for the next (older) page; `None` on the last page.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub messages: Vec<Message>,
    /// Rows the filter matches: exact when asked for, otherwise counted up to
    /// [`TOTAL_BOUND`] (docs/design.md#retention).
    pub total: i64,
    /// false: `total` is [`TOTAL_BOUND`] and more rows match.
    pub total_exact: bool,
    pub next_cursor: Option<i64>,
}

/// A page's total is counted up to this many rows unless the exact total is asked for
/// (`?total=exact`): counting stays a few milliseconds whatever the table holds.
pub const TOTAL_BOUND: i64 = 10_000;

/// Result of asking to change one message's status by hand (retry, cancel).
#[derive(Debug)]
pub enum StatusChange {
    Changed(Box<Message>),
    NotFound,
    /// The message's status does not allow the change.
    Refused(MessageStatus),
    /// Its text was removed (CONTENT_RETENTION): it cannot be sent again.
    ContentRemoved,
}

/// `GET /api/messages/stats`: read from the trigger-kept counters and a few index
/// probes, never by counting the table.
#[derive(Debug, Clone, Serialize)]
pub struct MessageStats {
    pub by_status: std::collections::BTreeMap<&'static str, i64>,
    /// Pending with `send_at` in the future.
    pub scheduled: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// The same per priority ("0" to "3"): see [`OLDEST_PENDING_BY_PRIORITY`].
    pub oldest_pending_age_seconds_by_priority: std::collections::BTreeMap<String, Option<f64>>,
    pub sent_last_minute: i64,
    pub sent_last_hour: i64,
    /// delivered / undelivered / failed from receipts, and `awaiting`: sent, no receipt.
    pub delivery: std::collections::BTreeMap<&'static str, i64>,
}

/// Queue depth per status and the age of the oldest due work, for metrics.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub counts: Vec<(MessageStatus, i64)>,
    pub oldest_pending_age: Option<Duration>,
    pub oldest_pending_age_by_priority: Vec<(i16, Option<Duration>)>,
}

/// A message taken by a claim, ready to send.
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    pub id: i64,
    /// The `Idempotency-Key` of every send of this message.
    pub delivery_key: String,
    pub phone_number: String,
    pub content: String,
    /// What its send costs in the lane's rate: 1, or its SMS segments when the lane
    /// counts segments.
    pub units: u32,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub priority: i16,
    /// Checked again right before the HTTP call: an expired message is never sent.
    pub expires_at: Option<DateTime<Utc>>,
    /// The message's own sender, if it names one.
    pub sender: Option<String>,
    /// Sent in the lane's quiet hours (docs/design.md#quiet-hours).
    pub transactional: bool,
    /// The provider this send goes to, chosen by the claim; `None` only for a row an
    /// older release pinned or none at all (then the lane's first provider).
    pub provider: Option<String>,
    /// The provider it is pinned to, if a send's outcome was unknown.
    pub pinned: Option<String>,
}

/// What a claim may take: while dispatch is paused, nothing unless a probe is due; and
/// only rows the usable providers may send (docs/design.md#failover).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimScope {
    /// While dispatch is paused, whether one probe message may be claimed.
    pub probe_due: bool,
    /// New sends go here; `None`: no provider is usable, only pinned rows may go.
    pub provider: Option<String>,
    /// Rows pinned to one of these may be taken.
    pub usable: Vec<String>,
    /// `provider` is half-open: one message only, its probe.
    pub probe_only: bool,
    /// The lane's quiet hours: claimed messages inside them that are not
    /// transactional go back to the queue until the window opens.
    pub quiet_hours: Option<crate::quiet_hours::QuietHours>,
    /// The lane's configured daily spend cap (PostgreSQL may hold an override).
    pub daily_spend_cap: Option<crate::spend::Micros>,
    /// The highest price of one segment through any of the lane's providers: near
    /// the cap a batch takes no more messages than the rest of the day's budget buys
    /// at that price.
    pub highest_price: Option<crate::spend::Micros>,
}

/// The schedule in force: configured values, possibly overridden at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Units (messages or segments) per interval.
    pub batch_size: u32,
    pub interval: Duration,
    /// What the batch size counts; fixed by the lane's configuration.
    pub unit: crate::config::Unit,
}

impl Schedule {
    /// This schedule with the stored overrides applied.
    pub fn overridden_by(self, control: &ControlRecord) -> Self {
        Self {
            batch_size: control.batch_size.unwrap_or(self.batch_size),
            interval: control.interval.unwrap_or(self.interval),
            unit: self.unit,
        }
    }

    /// The most messages per second it allows: infinite with a zero interval.
    pub fn rate_per_second(self) -> f64 {
        f64::from(self.batch_size) / self.interval.as_secs_f64()
    }
}

/// A claimed batch: its rows, oldest first, its start (`last_batch_at`), which names
/// it when it closes, and the claim's token, which names its rows (`claim_token`).
#[derive(Debug)]
pub struct OpenedBatch {
    pub messages: Vec<ClaimedMessage>,
    pub opened_at: DateTime<Utc>,
    pub token: i64,
    /// Claimed while dispatch is paused: one message, sent as the probe that decides
    /// whether the pause lifts.
    pub probe: bool,
}

/// What one claim attempt found.
#[derive(Debug)]
pub enum Claim {
    /// Rows moved to `sending` under our epoch; the batch is open.
    Batch(OpenedBatch),
    /// The cluster's previous batch was less than an interval ago.
    NotDue(Duration),
    /// The desired state is stopped.
    Stopped,
    /// Dispatch is paused for this reason (`provider_auth`) and no probe is due.
    Paused(String),
    /// Nothing is due.
    Empty,
    /// Another replica holds a newer epoch: we are no longer the leader.
    Fenced(Epoch),
}

/// The outcome of a claim, with what the fence row said about the schedule.
#[derive(Debug)]
pub struct ClaimResult {
    pub claim: Claim,
    pub schedule: Schedule,
    /// How long ago (microseconds, PostgreSQL's clock) the cluster's newest sends
    /// started, as the last closed batch recorded them; negative when in the future.
    /// A new leader seeds its pacer from these.
    pub recent_send_ages_us: Vec<i64>,
    /// Pending messages found past their `expires_at` and marked `expired`.
    pub expired: u64,
    /// Claimed messages whose number is on the opt-out list, marked `blocked` and
    /// left out of the batch.
    pub blocked: u64,
    /// Claimed messages inside the lane's quiet hours, put back to wait for the window
    /// to open and left out of the batch.
    pub held: u64,
}

/// When a `sending` row may be returned to `pending` (docs/design.md#rescue). The wait comes
/// from `leadership::fence::FenceTiming::rescue_wait`, which explains it.
#[derive(Debug, Clone, Copy)]
pub struct RescuePolicy {
    /// An older epoch's rows: this long after the current epoch was taken. Our own
    /// epoch's leftovers (a claim whose reply was lost, a result that could not be
    /// written): this long after they were claimed.
    pub wait: Duration,
    /// A rescued row that has used up `MAX_ATTEMPTS` (> 0) becomes `failed`.
    pub max_attempts: u32,
}

/// A row the rescue may return, with what is needed to look up its delivery.
#[derive(Debug, Clone)]
pub struct RescueCandidate {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub claim_epoch: Epoch,
    pub delivery_key: String,
}

/// A delivery that is known (from the delivery cache) to have been accepted by the
/// provider although its result never reached PostgreSQL.
#[derive(Debug, Clone)]
pub struct KnownDelivery {
    pub id: i64,
    pub claim_epoch: Epoch,
    pub sent_at: DateTime<Utc>,
    pub provider_message_id: Option<String>,
    /// What the send cost, as the sender priced it.
    pub price: Option<crate::spend::Micros>,
}

/// What one rescue pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rescued {
    /// Returned to `pending`.
    pub pending: u64,
    /// Out of attempts: `failed`.
    pub failed: u64,
}

/// A send the provider accepted, to record.
#[derive(Debug, Clone)]
pub struct SentResult {
    pub id: i64,
    pub epoch: Epoch,
    pub sent_at: DateTime<Utc>,
    pub provider_message_id: Option<String>,
    /// What the send cost, if its provider has prices (docs/design.md#spend-caps).
    pub price: Option<crate::spend::Micros>,
}

/// How a send ended, as recorded in the row.
#[derive(Debug, Clone)]
pub enum Recorded {
    Sent,
    /// Back to `pending`, due again at `next_attempt_at`.
    Retrying,
    /// Gave up: rejected by the provider, or out of attempts.
    Failed,
    /// The row was no longer ours (rescued and re-claimed by a newer leader).
    NotOurs,
}

/// The fence row as the status API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderRecord {
    pub epoch: i64,
    pub holder: Option<String>,
    pub acquired_at: Option<DateTime<Utc>>,
    pub last_batch_at: Option<DateTime<Utc>>,
    /// The leader's breakers, throttles and effective rate as of its last batch.
    pub routing: Option<serde_json::Value>,
}

/// The cluster's desired state and runtime overrides.
#[derive(Debug, Clone)]
pub struct ControlRecord {
    pub running: bool,
    pub batch_size: Option<u32>,
    pub interval: Option<Duration>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: Option<String>,
    /// Who set each override, and when.
    pub batch_size_set: Option<SetBy>,
    pub interval_set: Option<SetBy>,
    /// The operator's daily spend cap, over the configured one.
    pub daily_spend_cap: Option<crate::spend::Micros>,
    pub daily_spend_cap_set: Option<SetBy>,
    /// Why dispatch is paused though the cluster runs, if it is.
    pub paused: Option<Pause>,
}

/// Who changed a value, and when.
#[derive(Debug, Clone, Serialize)]
pub struct SetBy {
    pub by: Option<String>,
    pub at: DateTime<Utc>,
}

/// Dispatch paused by the leader while the cluster runs (sql/0013).
#[derive(Debug, Clone, Serialize)]
pub struct Pause {
    /// `provider_auth`: the provider refuses our credentials.
    pub reason: String,
    pub since: DateTime<Utc>,
    /// The provider's answer.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRecord {
    pub replica_id: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// A replica of a release without lanes says false: lanes other than `default`
    /// wait while one is live (docs/design.md#lanes).
    pub knows_lanes: bool,
    pub leader_eligible: bool,
}

/// A change to the runtime overrides. `Some(None)` clears an override.
#[derive(Debug, Clone, Default)]
pub struct OverrideChange {
    pub batch_size: Option<Option<u32>>,
    pub interval: Option<Option<Duration>>,
    pub daily_spend_cap: Option<Option<crate::spend::Micros>>,
}
