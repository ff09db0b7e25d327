//! The leader's side of `messages`: the claim, the results, the rescue.
//!
//! The claim is one transaction that checks the fence and the cluster schedule before
//! it takes rows; every result is recorded by its own statement guarded by
//! `status = 'sending' AND claim_epoch = <epoch>`, so a row that was rescued and
//! re-claimed under a newer epoch is never touched by the leader that lost it
//! (docs/design.md, "Fencing").

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::fence::{CLOSE_BATCH, LOCK_FENCE, OPEN_BATCH, READ_SCHEDULE};
use super::{
    Claim, ClaimResult, ClaimScope, ClaimedMessage, KnownDelivery, OpenedBatch, Recorded,
    RescueCandidate, RescuePolicy, Rescued, Schedule, SentResult, Store, StoreError,
};
use crate::config::Unit;
use crate::domain::Epoch;
use crate::metrics::PAUSED_SPEND_CAP;
use crate::spend::Micros;

/// Which `sending` rows the rescue may return, for the leader of epoch `$1` (only
/// while it is the current epoch) after the rescue wait `$2` (milliseconds), never the
/// rows of the claims `$3` (tokens of this leader's batches still running: their rows
/// are being sent or recorded, and returned to pending they would be sent again), only
/// the claims of the lane whose row id is `$6` (an older replica's claim, without
/// `claim_lane`, is the default lane's). A macro so that both statements below use the
/// same text.
macro_rules! rescuable {
    () => {
        "
    l.lane = $6::text AND l.epoch = $1::bigint
    AND m.status = 'sending'
    AND coalesce(m.claim_lane, 'default') = l.lane
    AND ((m.claim_epoch < $1::bigint
          AND l.acquired_at <= clock_timestamp() - $2::bigint * interval '1 millisecond')
      OR (m.claim_epoch = $1::bigint
          AND m.claimed_at <= clock_timestamp() - $2::bigint * interval '1 millisecond'))
    AND NOT coalesce(m.claim_token = ANY($3::bigint[]), false)"
    };
}

/// How many rows one page of a rescue checks: see [`RESCUE_CANDIDATES`].
pub const RESCUE_PAGE: i64 = 1000;

/// A pending row the claim may take given the providers usable now: unpinned while
/// new sends have a provider (`$provider` not NULL), or pinned to one of `$usable`.
macro_rules! usable_provider {
    ($provider:literal, $usable:literal) => {
        concat!(
            "(CASE WHEN pinned_provider IS NULL THEN ",
            $provider,
            "::text IS NOT NULL ELSE pinned_provider = ANY(",
            $usable,
            "::text[]) END)"
        )
    };
}

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
/// holds even for a message whose sends never got a result. Whether the abandoned send
/// reached its provider is unknown, so the message is pinned to it.
const RESCUE: &str = concat!(
    "UPDATE messages AS m
SET status = CASE WHEN $4::int > 0 AND m.attempts >= $4::int THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now(),
    pinned_provider = coalesce(m.pinned_provider, m.provider),
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
    last_error = NULL, price_micros = d.price
FROM unnest($2::bigint[], $3::bigint[], $4::timestamptz[], $5::text[], $7::bigint[])
         AS d(id, claim_epoch, sent_at, provider_id, price),
     dispatcher_leader l
WHERE l.lane = $6::text AND l.epoch = $1::bigint
  AND m.id = d.id AND (m.status = 'sending') IS TRUE AND m.claim_epoch = d.claim_epoch";

/// Claimed by a claim whose COMMIT reply was lost: never sent, so back to pending
/// with the attempt uncounted.
const RELEASE_CLAIM: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0), provider = pinned_provider
WHERE status = 'sending' AND claim_epoch = $1 AND claim_token = $2 AND claim_lane = $3";

/// Pending messages past their validity never go out: `expired`, at claim time (and the
/// dispatcher checks again right before each send), in the lane `$1`. Served by the
/// partial expiry index.
const EXPIRE_DUE: &str = "
UPDATE messages
SET status = 'expired',
    last_error = 'expired at ' || (expires_at AT TIME ZONE 'UTC')::text
                 || ' UTC'
                 || ' before it was sent'
WHERE status = 'pending' AND expires_at <= now() AND lane = $1";

/// Due pending rows of the lane `$5`, most urgent first and FIFO within a priority,
/// through the partial claim index `(lane, priority DESC, created_at, id) WHERE status =
/// 'pending'`: an index scan that stops after `$1` due rows, never a sort of the queue.
/// `$6`: the ids to claim instead, when the lane counts segments and the rows were
/// chosen by [`SEGMENT_CANDIDATES`] in the same transaction (NULL otherwise).
///
/// Providers (docs/design.md#failover): `$7` the lane's usable providers, `$8` the one
/// new sends go to (NULL: none is usable). A row pinned to a provider is taken only
/// while that provider is usable, and goes to it; the others go to `$8`.
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
///
/// Each claimed row says whether its number is on the opt-out list (`opted_out`, one
/// probe of the list's key per row), so the common claim, with no listed number, needs
/// no second statement ([`BLOCK_OPTED_OUT`] runs only for those that are).
pub const CLAIM: &str = concat!(
    "
WITH claimed AS (
UPDATE messages
SET status = 'sending', claim_epoch = $2, claimed_by = $3, claimed_at = now(),
    claim_token = $4, claim_lane = $5, attempts = attempts + 1,
    provider = coalesce(pinned_provider, $8::text),
    delivery_key = CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE
                        THEN NULL ELSE delivery_key END,
    delivery_key_sent = true
WHERE id = ANY(coalesce($6::bigint[], ARRAY(
    SELECT id FROM messages
    WHERE status = 'pending' AND lane = $5 AND next_attempt_at <= now()
      AND ",
    usable_provider!("$8", "$7"),
    "
    ORDER BY priority DESC, created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)))
RETURNING id, phone_number, content, attempts, created_at, priority, expires_at, sender,
    provider, pinned_provider, category, now() AS claimed_now, ",
    delivery_key!(),
    "
)
SELECT claimed.*,
       EXISTS (SELECT 1 FROM opt_outs AS o WHERE o.phone_number = claimed.phone_number)
           AS opted_out
FROM claimed"
);

/// Claimed rows (`$1`, of the claim with epoch `$2`) whose number has been put on the
/// opt-out list since their intake: `blocked`, attempt uncounted, never sent
/// (docs/design.md#opt-outs). `$3`: the claimed rows' numbers, so the list is read
/// through its primary key for those numbers only, whatever its size; the rows through
/// theirs, as the claim does. A blocked message names no provider: it went to none.
const BLOCK_OPTED_OUT: &str = "
UPDATE messages AS m
SET status = 'blocked', attempts = greatest(m.attempts - 1, 0), next_attempt_at = now(),
    provider = m.pinned_provider,
    last_error = (SELECT 'the recipient opted out (' || o.source || ') on '
                         || to_char(o.since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
                  FROM opt_outs AS o WHERE o.phone_number = m.phone_number)
WHERE m.id = ANY($1::bigint[]) AND (m.status = 'sending') IS TRUE AND m.claim_epoch = $2
  AND m.phone_number IN (SELECT o.phone_number FROM opt_outs AS o
                         WHERE o.phone_number = ANY($3::text[]))
RETURNING m.id";

/// Claimed rows (`$1`, of the claim with epoch `$3`) inside the lane's quiet hours: back
/// to `pending`, attempt uncounted, due when the window opens for them (`$2`, in the
/// order of `$1`), so they wait without holding up the rest of the queue
/// (docs/design.md#quiet-hours). Through the primary key, like the claim.
const HOLD_QUIET: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0), provider = pinned_provider,
    next_attempt_at = ($2::timestamptz[])[array_position($1::bigint[], id)]
WHERE id = ANY($1::bigint[]) AND (status = 'sending') IS TRUE AND claim_epoch = $3";

/// The rows a lane that counts segments would claim, in claim order, locked: at most
/// `$1` of them (each costs at least one segment), of which the claim takes the longest
/// prefix that fits the batch's segments ([`CLAIM`] with the chosen ids). The rest are
/// unlocked when the claim commits.
const SEGMENT_CANDIDATES: &str = concat!(
    "
SELECT id, content FROM messages
WHERE status = 'pending' AND lane = $2 AND next_attempt_at <= now()
  AND ",
    usable_provider!("$4", "$3"),
    "
ORDER BY priority DESC, created_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED"
);

/// One claimed message goes to provider `$3` instead of the one its claim chose: the
/// probe of a half-open provider, or the next provider after a refused probe
/// (docs/design.md#failover). Its row names the provider before the send, so a rescue
/// after a crash pins it there. Only an unpinned row of our claim.
const ASSIGN_PROVIDER: &str = "
UPDATE messages SET provider = $3
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2 AND pinned_provider IS NULL";

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
SET status = 'sent', sent_at = $3, provider_message_id = $4, last_error = NULL,
    price_micros = $5
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// MARK_SENT for many rows in one statement, each guarded as MARK_SENT is; returns the
/// rows that were still ours.
///
/// `(m.status = 'sending') IS TRUE` is the guard written so that it cannot be an index
/// condition: each row is found by its primary key. Written plainly, the planner (which
/// rarely sees `sending` rows in the statistics) scans the whole `sending` range of
/// an index and hashes it, and that range keeps an entry for every row claimed since
/// the table's last vacuum until a scan marks it dead, so the statement would slow
/// down with the traffic since the last vacuum. Public so that a
/// test can check the plan.
pub const MARK_SENT_GROUP: &str = "
UPDATE messages AS m
SET status = 'sent', sent_at = r.sent_at, provider_message_id = r.provider_id, last_error = NULL,
    price_micros = r.price
FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[], $5::bigint[])
         AS r(id, epoch, sent_at, provider_id, price)
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
        last_error = NULL, price_micros = r.price
    FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::text[], $5::bigint[])
             AS r(id, epoch, sent_at, provider_id, price)
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

/// `$6`: the outcome is unknown (the request may have reached the provider): the
/// message is pinned to the provider it went to.
const MARK_RETRY: &str = "
UPDATE messages
SET status = CASE WHEN $3::int > 0 AND attempts >= $3::int THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now() + $4::bigint * interval '1 millisecond',
    last_error = $5,
    pinned_provider = CASE WHEN $6::bool THEN coalesce(pinned_provider, provider)
                           ELSE pinned_provider END
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2
RETURNING status";

const MARK_FAILED: &str = "
UPDATE messages
SET status = 'failed', last_error = $3
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// A send the provider refused for our credentials (401/403) or throttled: the message
/// was not at fault, so it goes back to `pending`, due now (its place in the queue
/// kept), without spending the attempt, free to go through another provider.
const MARK_HELD: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0), next_attempt_at = now(),
    last_error = $3, provider = pinned_provider
WHERE id = $1 AND status = 'sending' AND claim_epoch = $2";

/// Claimed but never sent: back to pending, and the attempt that never happened is
/// not counted. Each row is found by its primary key (the guard is written as in
/// [`MARK_SENT_GROUP`]).
const RELEASE_UNSENT: &str = "
UPDATE messages
SET status = 'pending', attempts = greatest(attempts - 1, 0), provider = pinned_provider
WHERE id = ANY($1) AND (status = 'sending') IS TRUE AND claim_epoch = $2";

/// The lane reached its daily spend cap: paused until the day ends or the cap rises.
const PAUSE_FOR_SPEND: &str = "
UPDATE dispatcher_control SET paused_reason = 'spend_cap', paused_at = now(), paused_detail = $2
WHERE lane = $1::text AND paused_reason IS NULL";

const LIFT_SPEND_PAUSE: &str = "
UPDATE dispatcher_control SET paused_reason = NULL, paused_at = NULL, paused_detail = NULL
WHERE lane = $1::text AND paused_reason = 'spend_cap'";

/// A message that needs more segments than its lane may start in one interval: it
/// could never be sent within the rate, so it fails with the reason (`$2`: the batch
/// size in segments) instead of blocking the lane.
const FAIL_TOO_LARGE: &str = "
UPDATE messages
SET status = 'failed',
    last_error = 'needs more SMS segments than the lane sends per interval (' || $2::bigint || ')'
WHERE id = ANY($1::bigint[]) AND status = 'pending'";

/// What one message costs in its lane's unit.
pub fn message_units(unit: Unit, content: &str) -> u32 {
    match unit {
        Unit::Messages => 1,
        Unit::Segments => crate::encoding::segment(content).segments.max(1),
    }
}

/// The longest prefix of `candidates` (id, units; in claim order) whose units fit in
/// `budget`, and the candidates that could never fit in any batch (more units than the
/// whole budget). The prefix stops at the first message that does not fit, so the order
/// holds: a long message is not overtaken by the short ones behind it.
fn fit_segments(candidates: impl Iterator<Item = (i64, u32)>, budget: u32) -> (Vec<i64>, Vec<i64>) {
    let (mut chosen, mut too_large, mut used, mut full) = (Vec::new(), Vec::new(), 0u32, false);
    for (id, units) in candidates {
        if units > budget {
            too_large.push(id);
        } else if !full && used + units <= budget {
            used += units;
            chosen.push(id);
        } else {
            full = true;
        }
    }
    (chosen, too_large)
}

/// How long a claim waits when the rest of the day's budget is reserved for the
/// lane's sends in flight.
const SPEND_SETTLES: Duration = Duration::from_millis(100);

/// The lane's spend this UTC day against its cap, as the claim read them.
struct Spend {
    cap: Option<Micros>,
    spent: Micros,
    /// The lane's rows in `sending`: claimed, their cost not recorded yet.
    in_flight: i64,
}

impl Spend {
    /// What is left of the day's budget (negative once it is overspent); `None`: no cap.
    fn remaining(&self) -> Option<Micros> {
        self.cap.map(|cap| Micros(cap.0 - self.spent.0))
    }

    /// How many messages the claim may take: at most `limit`, and no more than the
    /// rest of the budget buys at the lane's `highest` price of one segment once the
    /// sends in flight are counted at that price too. When that is none: the last
    /// message of the day if nothing is in flight, else `None` (wait for them). So a
    /// lane of one-segment messages passes its cap by less than one message's price
    /// (docs/design.md#spend-caps).
    fn affordable(&self, highest: Option<Micros>, limit: i64) -> Option<i64> {
        let (Some(remaining), Some(price)) = (self.remaining(), highest) else {
            return Some(limit);
        };
        if price.0 <= 0 {
            return Some(limit);
        }
        // Sends in flight may have reserved more than is left (long messages, a
        // lowered cap, a dead leader's claims awaiting rescue): nothing is free then.
        let free = remaining
            .0
            .saturating_sub(self.in_flight.saturating_mul(price.0))
            .max(0);
        match free / price.0 {
            0 if self.in_flight > 0 => None,
            0 => Some(1),
            n => Some(n.min(limit.max(1))),
        }
    }

    /// The pause's detail, for the status and the console.
    fn detail(&self) -> String {
        format!(
            "spent {} today (UTC) of a daily cap of {}",
            self.spent,
            self.cap.unwrap_or_default()
        )
    }
}

/// A duration as whole milliseconds for a `bigint` parameter, saturating.
pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// The claim transaction (docs/design.md#claim): lock the fence, check the epoch, the
    /// desired state and the cluster schedule, then move up to a batch of due rows to
    /// `sending`, stamped with `token`. Commits before any HTTP call.
    ///
    /// While dispatch is paused (`paused_reason`), nothing is claimed unless
    /// `route.probe_due`, and then a single message, the probe.
    pub async fn claim_batch(
        &self,
        epoch: Epoch,
        replica_id: &str,
        configured: Schedule,
        fence_window: Duration,
        token: i64,
        route: &ClaimScope,
    ) -> Result<ClaimResult, StoreError> {
        let lane_name = self.lane_name();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let current = Epoch(
            tx.query_one(&tx.prepare_cached(LOCK_FENCE).await?, &[&lane_name])
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
                    &lane_name,
                    &route.daily_spend_cap.map(|cap| cap.0),
                ],
            )
            .await?;
        let schedule = Schedule {
            batch_size: fence.get::<_, i32>("batch_size").max(1) as u32,
            interval: Duration::from_millis(fence.get::<_, i64>("interval_ms").max(0) as u64),
            unit: configured.unit,
        };
        let result = |claim, expired, blocked, held| ClaimResult {
            claim,
            schedule,
            recent_send_ages_us: fence.get("recent_send_ages_us"),
            expired,
            blocked,
            held,
        };
        if current != epoch {
            return Ok(result(Claim::Fenced(current), 0, 0, 0));
        }
        if !fence.get::<_, bool>("running") {
            return Ok(result(Claim::Stopped, 0, 0, 0));
        }
        let mut paused: Option<String> = fence.get("paused_reason");
        // A pause for refused credentials claims nothing until its probe is due.
        if let Some(reason) = paused.as_deref().filter(|r| *r != PAUSED_SPEND_CAP) {
            if !route.probe_due {
                return Ok(result(Claim::Paused(reason.to_string()), 0, 0, 0));
            }
        }
        if let Some(wait_ms) = fence.get::<_, Option<i64>>("wait_ms") {
            if wait_ms > 0 {
                return Ok(result(
                    Claim::NotDue(Duration::from_millis(wait_ms as u64)),
                    0,
                    0,
                    0,
                ));
            }
        }
        let spend = Spend {
            cap: fence.get::<_, Option<i64>>("spend_cap").map(Micros),
            spent: Micros(fence.get::<_, Option<i64>>("spent_today").unwrap_or(0)),
            in_flight: fence.get::<_, Option<i64>>("in_flight").unwrap_or(0).max(0),
        };
        if spend.remaining().is_some_and(|left| left.0 <= 0) {
            // Due messages still expire while the lane waits for its day to end.
            let expired = tx
                .execute(&tx.prepare_cached(EXPIRE_DUE).await?, &[&lane_name])
                .await?;
            // A credentials pause stays as it is: its alert and its probe still hold.
            if paused.is_none() {
                tx.execute(
                    &tx.prepare_cached(PAUSE_FOR_SPEND).await?,
                    &[&lane_name, &spend.detail()],
                )
                .await?;
            }
            tx.commit().await?;
            return Ok(result(
                Claim::Paused(PAUSED_SPEND_CAP.into()),
                expired,
                0,
                0,
            ));
        }
        // A new UTC day, or an operator raised the cap.
        if paused.as_deref() == Some(PAUSED_SPEND_CAP) {
            tx.execute(&tx.prepare_cached(LIFT_SPEND_PAUSE).await?, &[&lane_name])
                .await?;
            paused = None;
        }
        let Some(affordable) =
            spend.affordable(route.highest_price, i64::from(schedule.batch_size))
        else {
            // What is left is reserved for the sends in flight: see how they end
            // (keeping a lifted pause).
            tx.commit().await?;
            return Ok(result(Claim::NotDue(SPEND_SETTLES), 0, 0, 0));
        };
        let limit = if paused.is_some() || route.probe_only {
            1
        } else {
            affordable
        };
        let expired = tx
            .execute(&tx.prepare_cached(EXPIRE_DUE).await?, &[&lane_name])
            .await?;

        let (chosen, too_large) = match schedule.unit {
            Unit::Messages => (None, Vec::new()),
            Unit::Segments => {
                let candidates = tx
                    .query(
                        &tx.prepare_cached(SEGMENT_CANDIDATES).await?,
                        &[&limit, &lane_name, &route.usable, &route.provider],
                    )
                    .await?;
                let candidates = candidates.iter().map(|row| {
                    (
                        row.get::<_, i64>(0),
                        message_units(Unit::Segments, row.get(1)),
                    )
                });
                let (chosen, too_large) = fit_segments(candidates, schedule.batch_size);
                (Some(chosen), too_large)
            }
        };
        if !too_large.is_empty() {
            tx.execute(
                &tx.prepare_cached(FAIL_TOO_LARGE).await?,
                &[&too_large, &i64::from(schedule.batch_size)],
            )
            .await?;
        }
        let rows = tx
            .query(
                &tx.prepare_cached(CLAIM).await?,
                &[
                    &limit,
                    &epoch.0,
                    &replica_id,
                    &token,
                    &lane_name,
                    &chosen,
                    &route.usable,
                    &route.provider,
                ],
            )
            .await?;
        let claimed_now: Option<DateTime<Utc>> = rows.first().map(|row| row.get("claimed_now"));
        let opted_out: Vec<(i64, String)> = rows
            .iter()
            .filter(|row| row.get::<_, bool>("opted_out"))
            .map(|row| (row.get("id"), row.get("phone_number")))
            .collect();
        let mut messages: Vec<ClaimedMessage> = rows
            .iter()
            .map(|row| {
                let content: String = row.get("content");
                ClaimedMessage {
                    id: row.get("id"),
                    delivery_key: row.get("delivery_key"),
                    phone_number: row.get("phone_number"),
                    units: message_units(schedule.unit, &content),
                    content,
                    attempts: row.get("attempts"),
                    created_at: row.get("created_at"),
                    priority: row.get("priority"),
                    expires_at: row.get("expires_at"),
                    sender: row.get("sender"),
                    transactional: row.get::<_, Option<&str>>("category") == Some("transactional"),
                    provider: row.get("provider"),
                    pinned: row.get("pinned_provider"),
                }
            })
            .collect();
        let blocked: HashSet<i64> = if opted_out.is_empty() {
            HashSet::new()
        } else {
            let claimed: Vec<i64> = opted_out.iter().map(|(id, _)| *id).collect();
            let numbers: Vec<&str> = opted_out.iter().map(|(_, n)| n.as_str()).collect();
            tx.query(
                &tx.prepare_cached(BLOCK_OPTED_OUT).await?,
                &[&claimed, &epoch.0, &numbers],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
        };
        messages.retain(|m| !blocked.contains(&m.id));
        let held = match (route.quiet_hours, claimed_now) {
            (Some(quiet), Some(now)) => {
                // The database's time, the one that decides when a held row is due again.
                let mut reopening: HashMap<Option<String>, Option<DateTime<Utc>>> = HashMap::new();
                let (ids, until): (Vec<i64>, Vec<DateTime<Utc>>) = messages
                    .iter()
                    .filter(|m| !m.transactional)
                    .filter_map(|m| {
                        let country = crate::domain::country_of(&m.phone_number);
                        let at = *reopening.entry(country).or_insert_with_key(|country| {
                            quiet.reopens_at(country.as_deref(), now)
                        });
                        Some((m.id, at?))
                    })
                    .unzip();
                if !ids.is_empty() {
                    tx.execute(
                        &tx.prepare_cached(HOLD_QUIET).await?,
                        &[&ids, &until, &epoch.0],
                    )
                    .await?;
                    let held: HashSet<i64> = ids.iter().copied().collect();
                    messages.retain(|m| !held.contains(&m.id));
                }
                ids.len() as u64
            }
            _ => 0,
        };
        // RETURNING has no order; the send order is the claim order.
        messages.sort_by_key(|m| (std::cmp::Reverse(m.priority), m.created_at, m.id));
        let claim = if messages.is_empty() {
            Claim::Empty
        } else {
            let opened_at = tx
                .query_one(&tx.prepare_cached(OPEN_BATCH).await?, &[&lane_name])
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
        Ok(result(claim, expired, blocked.len() as u64, held))
    }

    /// Returns the rows of a claim whose outcome is unknown (its COMMIT reply was lost)
    /// to `pending`, attempt uncounted: the claimer never sent them.
    pub async fn release_claim(&self, epoch: Epoch, token: i64) -> Result<u64, StoreError> {
        self.execute_prepared(RELEASE_CLAIM, &[&epoch.0, &token, &self.lane_name()])
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
                    &self.lane_name(),
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
        let prices: Vec<Option<i64>> = deliveries.iter().map(|d| d.price.map(|p| p.0)).collect();
        self.execute_prepared(
            RECORD_KNOWN_DELIVERIES,
            &[
                &epoch.0,
                &ids,
                &epochs,
                &sent_at,
                &provider_ids,
                &self.lane_name(),
                &prices,
            ],
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
                    &self.lane_name(),
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
        price: Option<Micros>,
        again: bool,
    ) -> Result<Recorded, StoreError> {
        let price = price.map(|p| p.0);
        let n = self
            .execute_prepared(
                MARK_SENT,
                &[&id, &epoch.0, &sent_at, &provider_message_id, &price],
            )
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
        let prices: Vec<Option<i64>> = results.iter().map(|r| r.price.map(|p| p.0)).collect();
        let client = self.client().await?;
        let statement = if again {
            MARK_SENT_GROUP_AGAIN
        } else {
            MARK_SENT_GROUP
        };
        let rows = client
            .query(
                &client.prepare_cached(statement).await?,
                &[&ids, &epochs, &sent_at, &provider_ids, &prices],
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
        unknown: bool,
    ) -> Result<Recorded, StoreError> {
        let client = self.client().await?;
        let max_attempts = i32::try_from(max_attempts).unwrap_or(i32::MAX);
        let row = client
            .query_opt(
                &client.prepare_cached(MARK_RETRY).await?,
                &[
                    &id,
                    &epoch.0,
                    &max_attempts,
                    &millis(delay),
                    &error,
                    &unknown,
                ],
            )
            .await?;
        Ok(match row.as_ref().map(|r| r.get::<_, &str>(0)) {
            None => Recorded::NotOurs,
            Some("failed") => Recorded::Failed,
            Some(_) => Recorded::Retrying,
        })
    }

    /// A send refused for our credentials or throttled: back to `pending`, attempt
    /// uncounted (see [`MARK_HELD`]).
    pub async fn mark_held(
        &self,
        id: i64,
        epoch: Epoch,
        error: &str,
    ) -> Result<Recorded, StoreError> {
        self.mark_guarded(MARK_HELD, id, epoch, error, Recorded::Retrying)
            .await
    }

    /// Sends a claimed message through `provider` (see [`ASSIGN_PROVIDER`]); false when
    /// the row is no longer ours or is pinned.
    pub async fn assign_provider(
        &self,
        id: i64,
        epoch: Epoch,
        provider: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .execute_prepared(ASSIGN_PROVIDER, &[&id, &epoch.0, &provider])
            .await?
            == 1)
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
        routing: &str,
    ) -> Result<(), StoreError> {
        self.execute_prepared(
            CLOSE_BATCH,
            &[
                &epoch.0,
                &recent_send_ages_us,
                &opened_at,
                &self.lane_name(),
                &routing,
            ],
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_the_cap_a_claim_takes_what_the_rest_buys_at_the_highest_price() {
        let spend = |cap: i64, spent: i64, in_flight: i64| Spend {
            cap: Some(Micros(cap)),
            spent: Micros(spent),
            in_flight,
        };
        let highest = Some(Micros(50));
        // Far from the cap: the batch size.
        assert_eq!(spend(10_000, 0, 0).affordable(highest, 10), Some(10));
        // 120 left buys two at 50.
        assert_eq!(spend(1_000, 880, 0).affordable(highest, 10), Some(2));
        // Two in flight reserve 100 of the 120: nothing more until they end.
        assert_eq!(spend(1_000, 880, 2).affordable(highest, 10), None);
        // Long messages in flight took more than was reserved: no negative limit.
        assert_eq!(spend(1_000, 900, 10).affordable(highest, 10), None);
        assert_eq!(spend(1_000, 999, 1_000_000).affordable(highest, 10), None);
        // Less than one left and nothing in flight: the day's last message.
        assert_eq!(spend(1_000, 990, 0).affordable(highest, 10), Some(1));
        // No cap, or no prices: the batch size.
        let no_cap = Spend {
            cap: None,
            spent: Micros(0),
            in_flight: 3,
        };
        assert_eq!(no_cap.affordable(highest, 10), Some(10));
        assert_eq!(spend(1_000, 990, 0).affordable(None, 10), Some(10));
    }

    #[test]
    fn a_batch_of_segments_takes_the_longest_prefix_that_fits() {
        let (chosen, too_large) = fit_segments([(1, 3), (2, 3), (3, 1), (4, 1)].into_iter(), 7);
        assert_eq!(chosen, vec![1, 2, 3], "3 + 3 + 1 = 7 fits");
        assert!(too_large.is_empty());
        let (chosen, _) = fit_segments([(1, 3), (2, 5), (3, 1)].into_iter(), 7);
        assert_eq!(
            chosen,
            vec![1],
            "the 5 does not fit, and the 1 behind it waits"
        );
        let (chosen, too_large) = fit_segments([(1, 9), (2, 2)].into_iter(), 7);
        assert_eq!((chosen, too_large), (vec![2], vec![1]), "9 never fits 7");
        assert_eq!(message_units(Unit::Segments, &"a".repeat(161)), 2);
        assert_eq!(message_units(Unit::Messages, &"a".repeat(161)), 1);
    }
}
