//! The message queue: creating and listing messages, and the dispatcher's claim /
//! record cycle.
//!
//! The claim is one transaction that checks the fence and the cluster schedule before
//! it takes rows; every result is recorded by its own statement guarded by
//! `status = 'sending' AND claim_epoch = <epoch>`, so a row that was rescued and
//! re-claimed under a newer epoch is never touched by the leader that lost it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;

use super::{Store, StoreError};
use crate::domain::{
    DeliveryStatus, Epoch, IdempotencyKey, MessageContent, MessageStatus, PhoneNumber, Priority,
};
use crate::encoding::{Encoding, segment};

/// A message as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub id: i64,
    pub phone_number: String,
    /// The ISO region of the number (`TR`), from its country code; not stored.
    pub country: Option<String>,
    pub content: String,
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
    /// Computed from the content (GSM 03.38), not stored.
    pub encoding: Encoding,
    pub segments: u32,
    pub delivery_status: Option<DeliveryStatus>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub delivery_error: Option<String>,
}

/// The key a message is sent to the provider with: its `delivery_key`, a UUID made
/// with the row, unique across databases and installs; but the id for a row whose
/// earlier attempts a replica of an earlier version made (it sent the id), and for rows
/// from before migration 0011, which have no key. A message is never re-sent under
/// another key than its earlier attempts used (docs/design.md, "Delivery keys").
macro_rules! delivery_key {
    () => {
        "CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE THEN id::text \
              ELSE coalesce(delivery_key::text, id::text) END AS delivery_key"
    };
    ($table:literal) => {
        concat!(
            "CASE WHEN ",
            $table,
            ".attempts > 0 AND ",
            $table,
            ".delivery_key_sent IS NOT TRUE THEN ",
            $table,
            ".id::text ELSE coalesce(",
            $table,
            ".delivery_key::text, ",
            $table,
            ".id::text) END AS delivery_key"
        )
    };
}

const MESSAGE_COLUMNS: &str = concat!(
    "id, phone_number, content, status, attempts, next_attempt_at, \
     created_at, sent_at, provider_message_id, last_error, \
     idempotency_key, send_at, expires_at, priority, \
     delivery_status, delivered_at, delivery_error, ",
    delivery_key!()
);

impl Message {
    fn from_row(row: &Row) -> Self {
        let status_text: &str = row.get("status");
        let status = MessageStatus::parse(status_text).unwrap_or(MessageStatus::Pending);
        let content: String = row.get("content");
        let segmentation = segment(&content);
        let phone_number: String = row.get("phone_number");
        Self {
            id: row.get("id"),
            country: crate::domain::country_of(&phone_number),
            phone_number,
            content,
            status,
            sent: status == MessageStatus::Sent,
            attempts: row.get("attempts"),
            next_attempt_at: row.get("next_attempt_at"),
            created_at: row.get("created_at"),
            sent_at: row.get("sent_at"),
            message_id: row.get("provider_message_id"),
            last_error: row.get("last_error"),
            idempotency_key: row.get("idempotency_key"),
            delivery_key: row.get("delivery_key"),
            send_at: row.get("send_at"),
            expires_at: row.get("expires_at"),
            priority: row.get("priority"),
            encoding: segmentation.encoding,
            segments: segmentation.segments,
            delivery_status: row
                .get::<_, Option<&str>>("delivery_status")
                .and_then(DeliveryStatus::parse),
            delivered_at: row.get("delivered_at"),
            delivery_error: row.get("delivery_error"),
        }
    }

    /// Whether this stored message is what `new` asks for (an idempotent repeat).
    fn matches(&self, new: &NewMessage) -> bool {
        self.phone_number == new.phone_number.as_str()
            && self.content == new.content.as_str()
            && self.send_at == new.send_at
            && self.expires_at == new.expires_at
            && self.priority == new.priority.get()
    }
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
}

/// One page of a newest-first listing. `next_cursor` is the id to pass as `cursor`
/// for the next (older) page; `None` on the last page.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub messages: Vec<Message>,
    pub total: i64,
    pub next_cursor: Option<i64>,
}

/// Result of asking to change one message's status by hand (retry, cancel).
#[derive(Debug)]
pub enum StatusChange {
    Changed(Box<Message>),
    NotFound,
    /// The message's status does not allow the change.
    Refused(MessageStatus),
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
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub priority: i16,
    /// Checked again right before the HTTP call: an expired message is never sent.
    pub expires_at: Option<DateTime<Utc>>,
}

/// The schedule in force: configured values, possibly overridden at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub batch_size: u32,
    pub interval: Duration,
}

impl Schedule {
    /// This schedule with the stored overrides applied.
    pub fn overridden_by(self, control: &crate::store::control::ControlRecord) -> Self {
        Self {
            batch_size: control.batch_size.unwrap_or(self.batch_size),
            interval: control.interval.unwrap_or(self.interval),
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
}

/// When a `sending` row may be returned to `pending` (SPEC §6 step 8). The wait comes
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

/// Locks the fence row: claims, epoch bumps and state changes queue up here.
const LOCK_FENCE: &str = "SELECT epoch FROM dispatcher_leader WHERE id = 1 FOR UPDATE";

/// Reads the schedule once the fence is locked. `clock_timestamp()`, not `now()`: the
/// transaction may have waited for the lock while the previous batch committed.
/// `wait_ms` is NULL or ≤ 0 when a batch is due: an interval after the previous
/// batch's start, and, when that batch is still open and another term opened it (its
/// leader died or was deposed mid-batch, so nobody knows when its last send started),
/// an interval after the last moment that leader could start one: `quiet_at`, or this
/// term's start plus the fence window ($3) when the term did not record one. The
/// current term's own open batch needs no such wait: its pacer saw every send of it.
const READ_SCHEDULE: &str = "
SELECT coalesce(c.running, false) AS running,
       c.paused_reason,
       coalesce(c.batch_size, $1::int) AS batch_size,
       s.interval_ms,
       ceil(extract(epoch FROM (
            CASE WHEN l.batch_open AND l.batch_epoch IS DISTINCT FROM l.epoch
                 THEN greatest(l.last_batch_at, coalesce(l.quiet_at, l.acquired_at + $3::bigint * interval '1 millisecond'))
                 ELSE l.last_batch_at
            END + s.interval_ms * interval '1 millisecond' - clock_timestamp())) * 1000)::bigint AS wait_ms,
       ARRAY(SELECT (extract(epoch FROM clock_timestamp() - r) * 1000000)::bigint
             FROM unnest(l.recent_sends) AS r) AS recent_send_ages_us
FROM dispatcher_leader l
CROSS JOIN dispatcher_control c
CROSS JOIN LATERAL (SELECT coalesce(c.processing_interval_ms, $2::bigint) AS interval_ms) s
WHERE l.id = 1 AND c.id = 1";

/// Records the batch start (the cluster's rhythm) and marks the batch open. The start
/// also names the batch: see [`CLOSE_BATCH`].
const OPEN_BATCH: &str = "UPDATE dispatcher_leader SET last_batch_at = clock_timestamp(), batch_open = true, batch_epoch = epoch WHERE id = 1 RETURNING last_batch_at";

/// Records when the newest sends started (only if we still hold the epoch that opened
/// the batch), and marks the batch finished unless a newer one (another `last_batch_at`)
/// has opened since: the leader claims its next batch while the previous one's last
/// results are still being recorded, and an open batch tells a new leader that sends
/// may have started up to the old term's end. `$2` holds the sends' ages in
/// microseconds on this replica's clock just before the statement was sent, so the
/// stored times are at or after the real ones (a new leader waits a little long,
/// never too short).
const CLOSE_BATCH: &str = "
UPDATE dispatcher_leader
SET batch_open = batch_open AND last_batch_at IS DISTINCT FROM $3,
    recent_sends = ARRAY(SELECT clock_timestamp() - age * interval '1 microsecond'
                         FROM unnest($2::bigint[]) AS age)
WHERE id = 1 AND epoch = $1";

/// Which `sending` rows the rescue may return, for the leader of epoch `$1` (only
/// while it is the current epoch) after the rescue wait `$2` (milliseconds), never the
/// rows of the claims `$3` (tokens of this leader's batches still running: their rows
/// are being sent or recorded, and returned to pending they would be sent again). A
/// macro so that both statements below use the same text.
macro_rules! rescuable {
    () => {
        "
    l.id = 1 AND l.epoch = $1::bigint
    AND m.status = 'sending'
    AND ((m.claim_epoch < $1::bigint
          AND l.acquired_at <= clock_timestamp() - $2::bigint * interval '1 millisecond')
      OR (m.claim_epoch = $1::bigint
          AND m.claimed_at <= clock_timestamp() - $2::bigint * interval '1 millisecond'))
    AND NOT coalesce(m.claim_token = ANY($3::bigint[]), false)"
    };
}

/// How many rows one page of a rescue checks: see [`RESCUE_CANDIDATES`].
pub const RESCUE_PAGE: i64 = 1000;

/// One page of the rows a rescue may return, after id `$4`, at most `$5`: each page is
/// checked against the delivery cache and then rescued by its ids ([`RESCUE`]), so no
/// row goes back to `pending` without having been checked.
const RESCUE_CANDIDATES: &str = concat!(
    "SELECT m.id, m.created_at, m.claim_epoch, ",
    delivery_key!("m"),
    " FROM messages AS m, dispatcher_leader AS l WHERE",
    rescuable!(),
    " AND m.id > $4::bigint ORDER BY m.id LIMIT $5"
);

/// Returns the abandoned claims among `$5` (a page of [`RESCUE_CANDIDATES`], already
/// checked against the delivery cache) to `pending`, or to `failed` once they have
/// used up `MAX_ATTEMPTS` ($4 > 0): a claim counts as an attempt, so MAX_ATTEMPTS
/// holds even for a message whose sends never got a result.
const RESCUE: &str = concat!(
    "UPDATE messages AS m
SET status = CASE WHEN $4::int > 0 AND m.attempts >= $4::int THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now(),
    last_error = 'claim by ' || coalesce(m.claimed_by, '?') || ' (epoch ' || m.claim_epoch
                 || ') never completed; '
                 || CASE WHEN $4::int > 0 AND m.attempts >= $4::int
                         THEN 'MAX_ATTEMPTS reached' ELSE 'rescued' END
FROM dispatcher_leader AS l
WHERE",
    rescuable!(),
    " AND m.id = ANY($5::bigint[]) RETURNING m.status"
);

/// Rows the provider accepted but whose result never reached PostgreSQL, learned
/// from the delivery cache: recorded as sent instead of being sent again. Each row is
/// found by its primary key (the guard is written as in [`MARK_SENT_GROUP`]).
const RECORD_KNOWN_DELIVERIES: &str = "
UPDATE messages AS m
SET status = 'sent', sent_at = d.sent_at, provider_message_id = d.provider_id,
    last_error = NULL
FROM unnest($2::bigint[], $3::bigint[], $4::timestamptz[], $5::text[])
         AS d(id, claim_epoch, sent_at, provider_id),
     dispatcher_leader l
WHERE l.id = 1 AND l.epoch = $1::bigint
  AND m.id = d.id AND (m.status = 'sending') IS TRUE AND m.claim_epoch = d.claim_epoch";

/// Claimed by a claim whose COMMIT reply was lost: never sent, so back to pending
/// with the attempt uncounted.
const RELEASE_CLAIM: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0)
WHERE status = 'sending' AND claim_epoch = $1 AND claim_token = $2";

/// Takes a transaction-level advisory lock per idempotency key of an insert, in one
/// order (the keys' hashes, ascending) before anything is inserted. Two requests with
/// the same keys in different orders otherwise wait on each other's unique index
/// entries and PostgreSQL ends one of them as a deadlock; this way the second waits
/// for the first and then finds its rows. The aggregate consumes the subquery's
/// rows in their sorted order. The two-int form (objsubid 2) never meets the
/// bigint-keyed locks (objsubid 1); a collision of two keys' hashes only makes
/// their requests wait for each other.
const LOCK_KEYS: &str = "
SELECT count(pg_advisory_xact_lock(1835297135, h))
FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest($1::text[]) AS k
      WHERE k IS NOT NULL ORDER BY 1) AS keys";

/// Pending messages past their validity never go out: `expired`, at claim time (and the
/// dispatcher checks again right before each send). Served by the partial expiry index.
const EXPIRE_DUE: &str = "
UPDATE messages
SET status = 'expired',
    last_error = 'expired at ' || (expires_at AT TIME ZONE 'UTC')::text
                 || ' UTC'
                 || ' before it was sent'
WHERE status = 'pending' AND expires_at <= now()";

/// Due pending rows, most urgent first and FIFO within a priority, through the partial
/// claim index `(priority DESC, created_at, id) WHERE status = 'pending'`: an index
/// scan that stops after `$1` due rows, never a sort of the queue.
///
/// The claimed ids go to the UPDATE as an array, so each row is updated through its
/// primary key whatever the table's size. Joined to a CTE instead, the planner hashed
/// the whole table on small ones (a sequential scan of all 20,000 rows for every claim
/// of 500) and took the primary key only from about 100,000 rows on. Public so that a
/// test can check the plan.
///
/// A row whose earlier attempts an earlier version made (attempts without
/// `delivery_key_sent`) was sent under its id: the claim drops its key, so it goes on
/// under its id (see `delivery_key!`).
pub const CLAIM: &str = concat!(
    "
UPDATE messages
SET status = 'sending', claim_epoch = $2, claimed_by = $3, claimed_at = now(),
    claim_token = $4, attempts = attempts + 1,
    delivery_key = CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE
                        THEN NULL ELSE delivery_key END,
    delivery_key_sent = true
WHERE id = ANY(ARRAY(
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY priority DESC, created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
RETURNING id, phone_number, content, attempts, created_at, priority, expires_at, ",
    delivery_key!()
);

/// A claimed message found expired right before its send: never sent.
const MARK_EXPIRED: &str = "
UPDATE messages
SET status = 'expired', attempts = greatest(attempts - 1, 0),
    last_error = 'expired at ' || (expires_at AT TIME ZONE 'UTC')::text
                 || ' UTC'
                 || ' while claimed, before it was sent'
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

const MARK_SENT: &str = "
UPDATE messages
SET status = 'sent', sent_at = $3, provider_message_id = $4, last_error = NULL
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// MARK_SENT for many rows in one statement, each guarded as MARK_SENT is; returns the
/// rows that were still ours.
///
/// `(m.status = 'sending') IS TRUE` is the guard written so that it cannot be an index
/// condition: each row is found by its primary key. Written plainly, the planner (which
/// rarely sees `sending` rows in the statistics) scanned the whole `sending` range of
/// an index and hashed it, and that range keeps an entry for every row claimed since
/// the table's last vacuum until a scan marks it dead: 11 ms instead of 2.5 ms for a
/// group of 140 after 28,000 rows had been through `sending` (that was the `(status,
/// id)` index, which has held no `sending` rows since migration 0008; the partial
/// `sending` index has such a range too). Public so that a test can check the plan.
pub const MARK_SENT_GROUP: &str = "
UPDATE messages AS m
SET status = 'sent', sent_at = r.sent_at, provider_message_id = r.provider_id, last_error = NULL
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[])
         AS r(id, epoch, sent_at, provider_id)
WHERE m.id = r.id AND (m.status = 'sending') IS TRUE AND m.claim_epoch = r.epoch
RETURNING m.id";

/// [`MARK_SENT_GROUP`] for a group whose earlier write may have committed with its
/// reply lost (a broken connection): also returns the rows that write recorded,
/// recognised as ours by the epoch and the send time it wrote. The second SELECT reads
/// the statement's snapshot, from before its own UPDATE, so no row is returned twice.
pub const MARK_SENT_GROUP_AGAIN: &str = "
WITH recorded AS (
    UPDATE messages AS m
    SET status = 'sent', sent_at = r.sent_at, provider_message_id = r.provider_id,
        last_error = NULL
    FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[])
             AS r(id, epoch, sent_at, provider_id)
    WHERE m.id = r.id AND (m.status = 'sending') IS TRUE AND m.claim_epoch = r.epoch
    RETURNING m.id
)
SELECT id FROM recorded
UNION ALL
SELECT m.id
FROM messages AS m,
     unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS r(id, epoch, sent_at)
WHERE m.id = r.id AND (m.status = 'sent') IS TRUE AND m.claim_epoch = r.epoch
  AND m.sent_at = r.sent_at";

/// Whether [`MARK_SENT`] already recorded this result (see [`MARK_SENT_GROUP_AGAIN`]).
const SENT_BY_US: &str = "
SELECT 1 FROM messages WHERE id = $1 AND status = 'sent' AND claim_epoch = $2 AND sent_at = $3";

const MARK_RETRY: &str = "
UPDATE messages
SET status = CASE WHEN $3::int > 0 AND attempts >= $3::int THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now() + $4::bigint * interval '1 millisecond',
    last_error = $5
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2
RETURNING status";

const MARK_FAILED: &str = "
UPDATE messages
SET status = 'failed', last_error = $3
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// A send the provider refused for our credentials (401/403): the message was not at
/// fault, so it goes back to `pending`, due now (its place in the queue kept), without
/// spending the attempt.
const MARK_UNAUTHORIZED: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0), next_attempt_at = now(),
    last_error = $3
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// Claimed but never sent: back to pending, and the attempt that never happened is
/// not counted. Each row is found by its primary key (the guard is written as in
/// [`MARK_SENT_GROUP`]).
const RELEASE_UNSENT: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0)
WHERE id = ANY($1) AND (status = 'sending') IS TRUE AND claim_epoch = $2";

/// Seconds since the oldest due pending message of each priority was created
/// (scheduled ones count once their `send_at` has come; NULL when there is none): one
/// probe of the claim index per priority. Priorities are served strictly in order, so
/// a stream of urgent messages above the rate starves the lower ones; this shows it.
const OLDEST_PENDING_BY_PRIORITY: &str = "
SELECT p.priority::int2, extract(epoch FROM now() - o.oldest)::float8
FROM generate_series(0, 3) AS p(priority)
LEFT JOIN LATERAL (
    SELECT created_at AS oldest FROM messages
    WHERE status = 'pending' AND priority = p.priority
      AND (send_at IS NULL OR send_at <= now())
    ORDER BY priority DESC, created_at, id LIMIT 1) AS o ON true
ORDER BY p.priority";

/// The oldest due pending message's age, per priority (seconds, never negative).
async fn oldest_pending_by_priority(
    client: &tokio_postgres::Client,
) -> Result<Vec<(i16, Option<f64>)>, StoreError> {
    Ok(client
        .query(OLDEST_PENDING_BY_PRIORITY, &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get::<_, Option<f64>>(1).map(|s| s.max(0.0))))
        .collect())
}

/// The oldest of the per-priority ages.
fn oldest_of(ages: &[(i16, Option<f64>)]) -> Option<f64> {
    ages.iter().filter_map(|(_, age)| *age).reduce(f64::max)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Inserts messages in one transaction and returns each item's row, in input order.
    /// An item whose idempotency key is already stored (by an earlier request, a
    /// concurrent one through another replica, or an earlier item of this one) gets
    /// that row instead of a new one: the unique index decides, so racing repeats
    /// create exactly one row. A key whose stored message differs rolls everything back.
    pub async fn insert_messages(&self, messages: &[NewMessage]) -> Result<Inserted, StoreError> {
        let phones: Vec<&str> = messages.iter().map(|m| m.phone_number.as_str()).collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        let keys: Vec<Option<&str>> = messages
            .iter()
            .map(|m| m.idempotency_key.as_ref().map(IdempotencyKey::as_str))
            .collect();
        let send_at: Vec<Option<DateTime<Utc>>> = messages.iter().map(|m| m.send_at).collect();
        let expires_at: Vec<Option<DateTime<Utc>>> =
            messages.iter().map(|m| m.expires_at).collect();
        let priorities: Vec<i16> = messages.iter().map(|m| m.priority.get()).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if keys.iter().any(Option::is_some) {
            tx.execute(&tx.prepare_cached(LOCK_KEYS).await?, &[&keys])
                .await?;
        }
        let sql = format!(
            "INSERT INTO messages (phone_number, content, idempotency_key, send_at, expires_at,
                                   priority, next_attempt_at)
             SELECT p, c, k, s, e, pr, greatest(now(), coalesce(s, now()))
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                         $5::timestamptz[], $6::int2[])
                  WITH ORDINALITY AS t(p, c, k, s, e, pr, n)
             ORDER BY n
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING {MESSAGE_COLUMNS}"
        );
        let mut created: Vec<Message> = tx
            .query(
                &sql,
                &[
                    &phones,
                    &contents,
                    &keys,
                    &send_at,
                    &expires_at,
                    &priorities,
                ],
            )
            .await?
            .iter()
            .map(Message::from_row)
            .collect();
        created.sort_by_key(|m| m.id);
        // Taken out as items claim them: a key repeated within this request finds its
        // row already taken, so only its first item counts as having created it.
        let mut created_ids: std::collections::HashSet<i64> =
            created.iter().map(|m| m.id).collect();
        let given: Vec<&str> = keys.iter().flatten().copied().collect();
        let by_key: std::collections::HashMap<String, Message> = if given.is_empty() {
            Default::default()
        } else {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = ANY($1::text[])"
            );
            tx.query(&sql, &[&given])
                .await?
                .iter()
                .map(Message::from_row)
                .filter_map(|m| Some((m.idempotency_key.clone()?, m)))
                .collect()
        };
        // Rows created without a key, in id order, are the keyless items in input order.
        let mut keyless = created.into_iter().filter(|m| m.idempotency_key.is_none());
        let mut rows = Vec::with_capacity(messages.len());
        for (index, new) in messages.iter().enumerate() {
            let message = match &new.idempotency_key {
                None => keyless.next(),
                Some(key) => by_key.get(key.as_str()).cloned(),
            };
            let Some(message) = message else {
                return Err(StoreError::Invariant(format!(
                    "message {index} of the request was neither created nor found"
                )));
            };
            if !message.matches(new) {
                return Ok(Inserted::KeyConflict {
                    index,
                    existing_id: message.id,
                });
            }
            let created = created_ids.remove(&message.id);
            rows.push((message, created));
        }
        tx.commit().await?;
        Ok(Inserted::Rows(rows))
    }

    /// Inserts `count` demo messages in chunks; returns how many were inserted.
    pub async fn seed(&self, count: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut inserted = 0;
        while inserted < count {
            let chunk = (count - inserted).min(50_000) as i64;
            let n = client
                .execute(
                    "INSERT INTO messages (phone_number, content)
                     SELECT '+90555' || lpad((s % 10000000)::text, 7, '0'),
                            'Demo message ' || s || ' from message-dispatcher'
                     FROM generate_series($1::bigint + 1, $1::bigint + $2::bigint) AS s",
                    &[&(inserted as i64), &chunk],
                )
                .await?;
            inserted += n;
        }
        Ok(inserted)
    }

    /// Newest-first keyset page, filtered.
    pub async fn list_messages(
        &self,
        filter: &ListFilter,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<Page, StoreError> {
        let client = self.client().await?;
        let status = filter.status.map(MessageStatus::as_str);
        let filters =
            "($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR phone_number = $2)
             AND ($3::timestamptz IS NULL OR created_at >= $3)
             AND ($4::timestamptz IS NULL OR created_at < $4)";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&status, &filter.phone_number, &filter.since, &filter.until];
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE {filters} AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6"
        );
        let paging: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&cursor, &(limit + 1)];
        let mut messages: Vec<Message> = client
            .query(&sql, &[&params[..], &paging[..]].concat())
            .await?
            .iter()
            .map(Message::from_row)
            .collect();
        let next_cursor = if messages.len() as i64 > limit {
            messages.truncate(limit as usize);
            messages.last().map(|m| m.id)
        } else {
            None
        };
        let total: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM messages WHERE {filters}"),
                &params,
            )
            .await?
            .get(0);
        Ok(Page {
            messages,
            total,
            next_cursor,
        })
    }

    pub async fn get_message(&self, id: i64) -> Result<Option<Message>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        Ok(client
            .query_opt(&sql, &[&id])
            .await?
            .as_ref()
            .map(Message::from_row))
    }

    /// Moves a `failed` message back to `pending`, due now, with a fresh attempt count.
    pub async fn retry_failed(&self, id: i64) -> Result<StatusChange, StoreError> {
        self.change_status(
            id,
            "status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL",
            MessageStatus::Failed,
        )
        .await
    }

    /// Moves a `pending` message to `cancelled`. A claim takes rows with
    /// `FOR UPDATE SKIP LOCKED`, so this UPDATE either runs first (the claim skips or
    /// no longer sees the row) or waits for the claim and then finds it `sending`:
    /// a message is claimed or cancelled, never both.
    pub async fn cancel_pending(&self, id: i64) -> Result<StatusChange, StoreError> {
        self.change_status(
            id,
            "status = 'cancelled', last_error = 'cancelled through the API'",
            MessageStatus::Pending,
        )
        .await
    }

    /// Moves every `failed` message `filter` selects back to `pending`, as
    /// [`Store::retry_failed`] does one; returns how many.
    pub async fn retry_all(&self, filter: &ListFilter) -> Result<u64, StoreError> {
        self.change_all(
            filter,
            "status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL",
        )
        .await
    }

    /// Cancels every `pending` message `filter` selects; returns how many. A row a
    /// claim holds right now is skipped: it is being sent (see
    /// [`Store::cancel_pending`]).
    pub async fn cancel_all(&self, filter: &ListFilter) -> Result<u64, StoreError> {
        self.change_all(
            filter,
            "status = 'cancelled', last_error = 'cancelled through the API'",
        )
        .await
    }

    /// Applies `set` to every row `filter` selects (its status included), a thousand
    /// rows per statement, so that no transaction holds many rows (or the claim) for
    /// long.
    async fn change_all(&self, filter: &ListFilter, set: &str) -> Result<u64, StoreError> {
        const STEP: i64 = 1000;
        let status = filter.status.map(MessageStatus::as_str);
        let sql = format!(
            "UPDATE messages SET {set}
             WHERE id = ANY(ARRAY(
                 SELECT id FROM messages
                 WHERE status = $1 AND ($2::text IS NULL OR phone_number = $2)
                   AND ($3::timestamptz IS NULL OR created_at >= $3)
                   AND ($4::timestamptz IS NULL OR created_at < $4)
                 ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED))
               AND status = $1"
        );
        let client = self.client().await?;
        let statement = client.prepare(&sql).await?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    &statement,
                    &[
                        &status,
                        &filter.phone_number,
                        &filter.since,
                        &filter.until,
                        &STEP,
                    ],
                )
                .await?;
            total += n;
            if n < STEP as u64 {
                return Ok(total);
            }
        }
    }

    /// Applies `set` to message `id` if its status is `from`.
    async fn change_status(
        &self,
        id: i64,
        set: &str,
        from: MessageStatus,
    ) -> Result<StatusChange, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE messages SET {set} WHERE id = $1 AND status = $2 RETURNING {MESSAGE_COLUMNS}"
        );
        if let Some(row) = client.query_opt(&sql, &[&id, &from.as_str()]).await? {
            return Ok(StatusChange::Changed(Box::new(Message::from_row(&row))));
        }
        // On the same connection: a second checkout while holding this one could wait
        // for a pool that every concurrent request holds the same way.
        let status = client
            .query_opt("SELECT status FROM messages WHERE id = $1", &[&id])
            .await?;
        Ok(match status {
            Some(row) => StatusChange::Refused(
                MessageStatus::parse(row.get(0)).unwrap_or(MessageStatus::Pending),
            ),
            None => StatusChange::NotFound,
        })
    }

    /// Queue depth per status (from the counters) and the oldest pending age.
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let client = self.client().await?;
        let counts = client
            .query(
                "SELECT status, sum(n)::bigint FROM message_counts GROUP BY status",
                &[],
            )
            .await?
            .iter()
            .filter_map(|row| Some((MessageStatus::parse(row.get(0))?, row.get::<_, i64>(1))))
            .collect();
        let ages = oldest_pending_by_priority(&client).await?;
        Ok(QueueStats {
            counts,
            oldest_pending_age: oldest_of(&ages).map(Duration::from_secs_f64),
            oldest_pending_age_by_priority: ages
                .into_iter()
                .map(|(priority, age)| (priority, age.map(Duration::from_secs_f64)))
                .collect(),
        })
    }

    /// `GET /api/messages/stats`: counters and index probes, O(1) in the table size
    /// (the scheduled count reads only the scheduled rows' index entries).
    pub async fn message_stats(&self) -> Result<MessageStats, StoreError> {
        let client = self.client().await?;
        let counts = client
            .query("SELECT status, delivery, n FROM message_counts", &[])
            .await?;
        let mut by_status: std::collections::BTreeMap<&'static str, i64> =
            MessageStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut delivery: std::collections::BTreeMap<&'static str, i64> = DeliveryStatus::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .chain([("awaiting", 0)])
            .collect();
        for row in &counts {
            let (status, receipt, n): (&str, &str, i64) = (row.get(0), row.get(1), row.get(2));
            if let Some(status) = MessageStatus::parse(status) {
                *by_status.entry(status.as_str()).or_default() += n;
            }
            if let Some(receipt) = DeliveryStatus::parse(receipt) {
                *delivery.entry(receipt.as_str()).or_default() += n;
            } else if status == "sent" {
                *delivery.entry("awaiting").or_default() += n;
            }
        }
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM messages WHERE status = 'pending' AND send_at > now()),
                        (SELECT coalesce(sum(n), 0)::bigint FROM message_sent_seconds
                         WHERE second > now() - interval '1 minute'),
                        (SELECT coalesce(sum(n), 0)::bigint FROM message_sent_seconds
                         WHERE second > now() - interval '1 hour')",
                &[],
            )
            .await?;
        let ages = oldest_pending_by_priority(&client).await?;
        Ok(MessageStats {
            by_status,
            scheduled: row.get(0),
            oldest_pending_age_seconds: oldest_of(&ages),
            oldest_pending_age_seconds_by_priority: ages
                .into_iter()
                .map(|(priority, age)| (priority.to_string(), age))
                .collect(),
            sent_last_minute: row.get(1),
            sent_last_hour: row.get(2),
            delivery,
        })
    }

    /// Drops per-second send counts older than an hour (the stats read the last hour).
    pub async fn prune_sent_seconds(&self) -> Result<u64, StoreError> {
        self.execute_prepared(
            "DELETE FROM message_sent_seconds WHERE second < now() - interval '1 hour'",
            &[],
        )
        .await
    }

    /// The claim transaction (SPEC §6 step 5): lock the fence, check the epoch, the
    /// desired state and the cluster schedule, then move up to a batch of due rows to
    /// `sending`, stamped with `token`. Commits before any HTTP call.
    ///
    /// While dispatch is paused (`paused_reason`), nothing is claimed unless
    /// `probe_due`, and then a single message, the probe.
    pub async fn claim_batch(
        &self,
        epoch: Epoch,
        replica_id: &str,
        configured: Schedule,
        fence_window: Duration,
        token: i64,
        probe_due: bool,
    ) -> Result<ClaimResult, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let current = Epoch(
            tx.query_one(&tx.prepare_cached(LOCK_FENCE).await?, &[])
                .await?
                .get(0),
        );
        let fence = tx
            .query_one(
                &tx.prepare_cached(READ_SCHEDULE).await?,
                &[
                    &(configured.batch_size as i32),
                    &millis(configured.interval),
                    &millis(fence_window),
                ],
            )
            .await?;
        let schedule = Schedule {
            batch_size: fence.get::<_, i32>("batch_size").max(1) as u32,
            interval: Duration::from_millis(fence.get::<_, i64>("interval_ms").max(0) as u64),
        };
        let result = |claim, expired| ClaimResult {
            claim,
            schedule,
            recent_send_ages_us: fence.get("recent_send_ages_us"),
            expired,
        };
        if current != epoch {
            return Ok(result(Claim::Fenced(current), 0));
        }
        if !fence.get::<_, bool>("running") {
            return Ok(result(Claim::Stopped, 0));
        }
        let paused: Option<String> = fence.get("paused_reason");
        if let Some(reason) = &paused {
            if !probe_due {
                return Ok(result(Claim::Paused(reason.clone()), 0));
            }
        }
        if let Some(wait_ms) = fence.get::<_, Option<i64>>("wait_ms") {
            if wait_ms > 0 {
                return Ok(result(
                    Claim::NotDue(Duration::from_millis(wait_ms as u64)),
                    0,
                ));
            }
        }
        let expired = tx
            .execute(&tx.prepare_cached(EXPIRE_DUE).await?, &[])
            .await?;

        let mut messages: Vec<ClaimedMessage> = tx
            .query(
                &tx.prepare_cached(CLAIM).await?,
                &[
                    &if paused.is_some() {
                        1
                    } else {
                        i64::from(schedule.batch_size)
                    },
                    &epoch.0,
                    &replica_id,
                    &token,
                ],
            )
            .await?
            .iter()
            .map(|row| ClaimedMessage {
                id: row.get("id"),
                delivery_key: row.get("delivery_key"),
                phone_number: row.get("phone_number"),
                content: row.get("content"),
                attempts: row.get("attempts"),
                created_at: row.get("created_at"),
                priority: row.get("priority"),
                expires_at: row.get("expires_at"),
            })
            .collect();
        // RETURNING has no order; the send order is the claim order.
        messages.sort_by_key(|m| (std::cmp::Reverse(m.priority), m.created_at, m.id));
        let claim = if messages.is_empty() {
            Claim::Empty
        } else {
            let opened_at = tx
                .query_one(&tx.prepare_cached(OPEN_BATCH).await?, &[])
                .await?
                .get(0);
            Claim::Batch(OpenedBatch {
                messages,
                opened_at,
                token,
                probe: paused.is_some(),
            })
        };
        tx.commit().await?;
        Ok(result(claim, expired))
    }

    /// Returns the rows of a claim whose outcome is unknown (its COMMIT reply was lost)
    /// to `pending`, attempt uncounted: the claimer never sent them.
    pub async fn release_claim(&self, epoch: Epoch, token: i64) -> Result<u64, StoreError> {
        self.execute_prepared(RELEASE_CLAIM, &[&epoch.0, &token])
            .await
    }

    /// A page of the rows a rescue by the leader of `epoch` would return now: those
    /// after id `after`, at most [`RESCUE_PAGE`], in id order.
    pub async fn rescue_candidates(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        after: i64,
    ) -> Result<Vec<RescueCandidate>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client.prepare_cached(RESCUE_CANDIDATES).await?,
                &[
                    &epoch.0,
                    &millis(policy.wait),
                    &running,
                    &after,
                    &RESCUE_PAGE,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| RescueCandidate {
                id: row.get(0),
                created_at: row.get(1),
                claim_epoch: Epoch(row.get(2)),
                delivery_key: row.get(3),
            })
            .collect())
    }

    /// Records deliveries the provider accepted but whose results were lost (found in
    /// the delivery cache) as sent. Returns how many rows changed.
    pub async fn record_known_deliveries(
        &self,
        epoch: Epoch,
        deliveries: &[KnownDelivery],
    ) -> Result<u64, StoreError> {
        if deliveries.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
        let epochs: Vec<i64> = deliveries.iter().map(|d| d.claim_epoch.0).collect();
        let sent_at: Vec<DateTime<Utc>> = deliveries.iter().map(|d| d.sent_at).collect();
        let provider_ids: Vec<Option<&str>> = deliveries
            .iter()
            .map(|d| d.provider_message_id.as_deref())
            .collect();
        self.execute_prepared(
            RECORD_KNOWN_DELIVERIES,
            &[&epoch.0, &ids, &epochs, &sent_at, &provider_ids],
        )
        .await
    }

    /// Returns the abandoned claims among `checked` (rescue candidates whose
    /// deliveries were looked up) to `pending`, or `failed` once out of attempts
    /// (docs/design.md, "Rescue"). Only the current epoch's leader rescues, and only
    /// after the wait; never the rows of the claims in `running` (the tokens of its
    /// running batches).
    pub async fn rescue(
        &self,
        epoch: Epoch,
        policy: RescuePolicy,
        running: &[i64],
        checked: &[i64],
    ) -> Result<Rescued, StoreError> {
        let client = self.client().await?;
        let max_attempts = i32::try_from(policy.max_attempts).unwrap_or(i32::MAX);
        let rows = client
            .query(
                &client.prepare_cached(RESCUE).await?,
                &[
                    &epoch.0,
                    &millis(policy.wait),
                    &running,
                    &max_attempts,
                    &checked,
                ],
            )
            .await?;
        let failed = rows
            .iter()
            .filter(|r| r.get::<_, &str>(0) == "failed")
            .count() as u64;
        Ok(Rescued {
            pending: rows.len() as u64 - failed,
            failed,
        })
    }

    /// Records one accepted send. `again`: an earlier attempt at this very write may
    /// have committed with its reply lost; a row it recorded counts as ours.
    pub async fn mark_sent(
        &self,
        id: i64,
        epoch: Epoch,
        sent_at: DateTime<Utc>,
        provider_message_id: Option<&str>,
        again: bool,
    ) -> Result<Recorded, StoreError> {
        let n = self
            .execute_prepared(MARK_SENT, &[&id, &epoch.0, &sent_at, &provider_message_id])
            .await?;
        let ours = n == 1
            || (again
                && self
                    .client()
                    .await?
                    .query_opt(SENT_BY_US, &[&id, &epoch.0, &sent_at])
                    .await?
                    .is_some());
        Ok(if ours {
            Recorded::Sent
        } else {
            Recorded::NotOurs
        })
    }

    /// Records a group of accepted sends in one statement; returns the ids that were
    /// still ours (`sending` under the epoch that claimed them). `again`: an earlier
    /// attempt at this very group may have committed with its reply lost, so the rows
    /// it recorded count as ours too ([`MARK_SENT_GROUP_AGAIN`]).
    pub async fn mark_sent_group(
        &self,
        results: &[SentResult],
        again: bool,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        let ids: Vec<i64> = results.iter().map(|r| r.id).collect();
        let epochs: Vec<i64> = results.iter().map(|r| r.epoch.0).collect();
        let sent_at: Vec<DateTime<Utc>> = results.iter().map(|r| r.sent_at).collect();
        let provider_ids: Vec<Option<&str>> = results
            .iter()
            .map(|r| r.provider_message_id.as_deref())
            .collect();
        let client = self.client().await?;
        let statement = if again {
            MARK_SENT_GROUP_AGAIN
        } else {
            MARK_SENT_GROUP
        };
        let rows = client
            .query(
                &client.prepare_cached(statement).await?,
                &[&ids, &epochs, &sent_at, &provider_ids],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Back to pending after `delay`, or `failed` once `max_attempts` (> 0) is reached.
    pub async fn mark_retry(
        &self,
        id: i64,
        epoch: Epoch,
        max_attempts: u32,
        delay: Duration,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        let client = self.client().await?;
        let max_attempts = i32::try_from(max_attempts).unwrap_or(i32::MAX);
        let row = client
            .query_opt(
                &client.prepare_cached(MARK_RETRY).await?,
                &[&id, &epoch.0, &max_attempts, &millis(delay), &error],
            )
            .await?;
        Ok(match row.as_ref().map(|r| r.get::<_, &str>(0)) {
            None => Recorded::NotOurs,
            Some("failed") => Recorded::Failed,
            Some(_) => Recorded::Retrying,
        })
    }

    /// A send refused for our credentials: back to `pending`, attempt uncounted (see
    /// [`MARK_UNAUTHORIZED`]).
    pub async fn mark_unauthorized(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        self.mark_guarded(MARK_UNAUTHORIZED, id, epoch, error, Recorded::Retrying)
            .await
    }

    /// A claimed message that expired before its send: `expired`, attempt uncounted.
    pub async fn mark_expired(&self, id: i64, epoch: Epoch) -> Result<bool, StoreError> {
        Ok(self
            .execute_prepared(MARK_EXPIRED, &[&id, &epoch.0])
            .await?
            == 1)
    }

    pub async fn mark_failed(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        self.mark_guarded(MARK_FAILED, id, epoch, error, Recorded::Failed)
            .await
    }

    /// Runs a result write `sql` (`$1` id, `$2` epoch, `$3` error) guarded by
    /// `status = 'sending' AND claim_epoch = $2`: `recorded` when the row was still
    /// ours, else [`Recorded::NotOurs`].
    async fn mark_guarded(
        &self,
        sql: &str,
        id: i64,
        epoch: Epoch,
        error: &str,
        recorded: Recorded,
    ) -> Result<Recorded, StoreError> {
        let n = self.execute_prepared(sql, &[&id, &epoch.0, &error]).await?;
        Ok(if n == 1 { recorded } else { Recorded::NotOurs })
    }

    /// Closes the batch this epoch opened at `opened_at` (every send is done and
    /// recorded) unless a newer one is open, and records when the newest sends
    /// started, `recent_send_ages_us` microseconds ago.
    pub async fn close_batch(
        &self,
        epoch: Epoch,
        opened_at: DateTime<Utc>,
        recent_send_ages_us: &[i64],
    ) -> Result<(), StoreError> {
        self.execute_prepared(CLOSE_BATCH, &[&epoch.0, &recent_send_ages_us, &opened_at])
            .await?;
        Ok(())
    }

    /// Returns claimed rows that were never sent to `pending`.
    pub async fn release_unsent(&self, ids: &[i64], epoch: Epoch) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.execute_prepared(RELEASE_UNSENT, &[&ids, &epoch.0])
            .await
    }
}
