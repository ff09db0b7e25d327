//! The fence row, `dispatcher_leader`: every statement on it lives here, and the
//! leader sessions that hold and watch the leader lock (docs/design.md, "Fencing").
//!
//! - **Terms**: an acquisition bumps the epoch ([`Store::start_term`]); from then on
//!   every claim and result stamped with an older epoch is refused.
//! - **The claim's statements** ([`LOCK_FENCE`], [`READ_SCHEDULE`], [`OPEN_BATCH`],
//!   [`CLOSE_BATCH`]) run inside the claim transaction of `store::claims`: the fence row
//!   also carries the cluster's rhythm (the last batch's start, the newest sends).
//!
//! - The leader's **fence session** holds the leader advisory lock for the whole term
//!   and is the only session its fence confirmations run on (see `leadership::fence`):
//!   PostgreSQL confirms the epoch only to a session that holds the lock.
//! - A follower's **watch** session waits for that lock. PostgreSQL ends a session the
//!   moment its process dies (the kernel closes the socket), which releases the lock
//!   and wakes the waiter: how a crashed leader is noticed in milliseconds instead of
//!   at the end of its Redis lease (see `leadership::takeover`).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, Statement};

use super::{LeaderRecord, Store, StoreError};
use crate::domain::Epoch;

/// Locks the fence row: claims, epoch bumps and state changes queue up here.
/// `$1`: the lane's row id.
pub(super) const LOCK_FENCE: &str =
    "SELECT epoch FROM dispatcher_leader WHERE lane = $1::text FOR UPDATE";

/// Reads the schedule once the fence is locked. `clock_timestamp()`, not `now()`: the
/// transaction may have waited for the lock while the previous batch committed.
/// `wait_ms` is NULL or ≤ 0 when a batch is due: an interval after the previous
/// batch's start, and, when that batch is still open and another term opened it (its
/// leader died or was deposed mid-batch, so nobody knows when its last send started),
/// an interval after the last moment that leader could start one: `quiet_at`, or this
/// term's start plus the fence window ($3) when the term did not record one. The
/// current term's own open batch needs no such wait: its pacer saw every send of it.
/// `$4`: the lane's row id. `$5`: the lane's configured daily spend cap in micros (NULL:
/// none); `spend_cap` is the one in force and `spent_today` the lane's spend this UTC
/// day, read only when there is a cap, with `in_flight`, the lane's claimed rows not
/// yet recorded (their cost is not in the spend yet; docs/design.md#spend-caps).
pub(super) const READ_SCHEDULE: &str = "
SELECT coalesce(c.running, false) AS running,
       c.paused_reason,
       cap.micros AS spend_cap,
       CASE WHEN cap.micros IS NOT NULL THEN
           (SELECT coalesce(sum(amount_micros), 0)::bigint FROM lane_spend
            WHERE lane = $4::text AND day = (clock_timestamp() AT TIME ZONE 'UTC')::date)
       END AS spent_today,
       CASE WHEN cap.micros IS NOT NULL THEN
           (SELECT coalesce(sum(n), 0)::bigint FROM message_counts
            WHERE lane = $4::text AND status = 'sending')
       END AS in_flight,
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
CROSS JOIN LATERAL (SELECT coalesce(c.daily_spend_cap_micros, $5::bigint) AS micros) cap
WHERE l.lane = $4::text AND c.lane = $4::text";

/// Records the batch start (the cluster's rhythm) and marks the batch open. The start
/// also names the batch: see [`CLOSE_BATCH`].
pub(super) const OPEN_BATCH: &str = "UPDATE dispatcher_leader SET last_batch_at = clock_timestamp(), batch_open = true, batch_epoch = epoch WHERE lane = $1::text RETURNING last_batch_at";

/// Records when the newest sends started (only if we still hold the epoch that opened
/// the batch), and marks the batch finished unless a newer one (another `last_batch_at`)
/// has opened since: the leader claims its next batch while the previous one's last
/// results are still being recorded, and an open batch tells a new leader that sends
/// may have started up to the old term's end. `$2` holds the sends' ages in
/// microseconds on this replica's clock just before the statement was sent, so the
/// stored times are at or after the real ones (a new leader waits a little long,
/// never too short). `$4`: the lane's row id. `$5`: the leader's provider states
/// (`dispatch::routing`), JSON, for `GET /api/lanes`.
pub(super) const CLOSE_BATCH: &str = "
UPDATE dispatcher_leader
SET batch_open = batch_open AND last_batch_at IS DISTINCT FROM $3,
    recent_sends = ARRAY(SELECT clock_timestamp() - age * interval '1 microsecond'
                         FROM unnest($2::bigint[]) AS age),
    routing = $5::text::jsonb
WHERE lane = $4::text AND epoch = $1";

/// A guard for a statement on another table that may only take effect while `$1` is
/// the current epoch of the lane whose row id is the parameter named (e.g. `"$4"`). A
/// macro so that the statement stays one literal.
macro_rules! epoch_is_current {
    ($lane:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM dispatcher_leader WHERE lane = ",
            $lane,
            "::text AND epoch = $1)"
        )
    };
}

/// The session-level advisory lock the leader's fence session of the lane `default`
/// holds ("mdleader"); lane `n` uses the key `n - 1` above it ([`leader_lock`]).
pub const LEADER_LOCK: i64 = 0x6d64_6c65_6164_6572;

/// The leader lock of `lane`. The default lane's is [`LEADER_LOCK`], as before lanes,
/// so a replica of the previous release and a new one contend for the same lock during
/// a rolling upgrade; another lane's is a fixed 64-bit hash of its name (FNV-1a), the
/// same on every replica.
pub fn leader_lock(lane: &str) -> i64 {
    if lane == super::DEFAULT_LANE {
        return LEADER_LOCK;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"mdleader:".iter().chain(lane.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// What one confirmation read from the fence row and the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceReading {
    pub epoch: Epoch,
    pub running: bool,
}

/// The current term as the fence row records it, for a follower's watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermRecord {
    pub epoch: Epoch,
    pub lease_token: Option<String>,
    pub session_pid: Option<i32>,
}

/// A plain read: it never waits for the row lock a claim holds, and its snapshot is
/// taken after the query was sent, so an epoch bump committed before the query was
/// sent is always seen.
const CONFIRM: &str = "
SELECT l.epoch, coalesce(c.running, false)
FROM dispatcher_leader l CROSS JOIN dispatcher_control c
WHERE l.lane = $1::text AND c.lane = $1::text";

/// The backend holding the leader lock, if any (a bigint advisory key is stored as
/// two 32-bit halves, `objsubid` 1), and its `application_name`, which tells a
/// follower's watch from a leader's fence session ([`SessionRole`]).
const LOCK_HOLDER: &str = "
SELECT l.pid, a.application_name FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
  AND l.objid = ($1::bigint & 4294967295)::oid
LIMIT 1";

/// A follower's takeover of a dead leader's term, on the watch session that holds the
/// leader lock: a new epoch, recorded only while the fence row still names the
/// epoch (`$1`) and the dead session (`$2`) the follower armed on. A leader that is
/// alive and re-established its session has recorded its new session meanwhile, and
/// the takeover does nothing. The session records itself as the new term's, and
/// `quiet_at` is the bump itself: see `leadership::takeover`.
const TAKE_OVER_TERM: &str = "
UPDATE dispatcher_leader
SET epoch = epoch + 1, holder = $3, acquired_at = clock_timestamp(), lease_token = $4,
    session_pid = pg_backend_pid(), quiet_at = clock_timestamp()
WHERE lane = $5::text AND epoch = $1 AND session_pid = $2
RETURNING epoch";

/// What a leader session is for, recorded as its `application_name` so that a leader
/// looking for the leader lock can tell who holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRole {
    /// A leader's fence session: holds the lock for the whole term.
    Fence,
    /// A follower's watch: waits for the lock to learn of the leader's death.
    Watch,
}

impl SessionRole {
    pub fn application_name(self) -> &'static str {
        match self {
            Self::Fence => "message-dispatcher fence",
            Self::Watch => "message-dispatcher watch",
        }
    }
}

/// The backend holding the leader lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: i32,
    /// `None` for a session that is not one of ours, or of an older version.
    pub role: Option<SessionRole>,
}

/// A dedicated connection for a leader's fence or a follower's watch.
pub struct LeaderSession {
    client: Client,
    confirm: Statement,
    pid: i32,
    /// The lane, and its leader lock.
    lane: Arc<str>,
    lock_key: i64,
}

impl LeaderSession {
    pub async fn open(store: &Store, role: SessionRole) -> Result<Self, StoreError> {
        let client = store.dedicated_connection().await?;
        client
            .simple_query(&format!(
                "SET application_name = '{}'",
                role.application_name()
            ))
            .await?;
        let confirm = client.prepare(CONFIRM).await?;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        Ok(Self {
            client,
            confirm,
            pid,
            lane: store.lane.clone(),
            lock_key: leader_lock(&store.lane),
        })
    }

    /// This session's backend pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The fence reading the leader's permits come from.
    pub async fn read(&self) -> Result<FenceReading, StoreError> {
        let row = self
            .client
            .query_one(&self.confirm, &[&&*self.lane])
            .await?;
        Ok(FenceReading {
            epoch: Epoch(row.get(0)),
            running: row.get(1),
        })
    }

    pub async fn term_record(&self) -> Result<TermRecord, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT epoch, lease_token, session_pid FROM dispatcher_leader WHERE lane = $1",
                &[&&*self.lane],
            )
            .await?;
        Ok(TermRecord {
            epoch: Epoch(row.get(0)),
            lease_token: row.get(1),
            session_pid: row.get(2),
        })
    }

    /// Takes the leader lock without waiting. `true` when this session holds it now.
    pub async fn try_lock(&self) -> Result<bool, StoreError> {
        Ok(self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&self.lock_key])
            .await?
            .get(0))
    }

    /// Waits, as long as it takes, until this session holds the leader lock.
    pub async fn lock(&self) -> Result<(), StoreError> {
        self.client
            .execute("SELECT pg_advisory_lock($1)", &[&self.lock_key])
            .await?;
        Ok(())
    }

    pub async fn unlock(&self) -> Result<(), StoreError> {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.lock_key])
            .await?;
        Ok(())
    }

    /// The backend holding the leader lock, if any.
    pub async fn lock_holder(&self) -> Result<Option<LockHolder>, StoreError> {
        Ok(self
            .client
            .query_opt(LOCK_HOLDER, &[&self.lock_key])
            .await?
            .map(|row| {
                let name: Option<&str> = row.get(1);
                LockHolder {
                    pid: row.get(0),
                    role: [SessionRole::Fence, SessionRole::Watch]
                        .into_iter()
                        .find(|role| Some(role.application_name()) == name),
                }
            }))
    }

    /// Takes over the term of the dead leader session `dead_pid` of `epoch` (see
    /// [`TAKE_OVER_TERM`]); this session must hold the leader lock. `None`: the fence
    /// row moved on (the leader lives on in a new session, or a newer term began).
    pub async fn take_over_term(
        &self,
        epoch: Epoch,
        dead_pid: i32,
        holder: &str,
        lease_token: &str,
    ) -> Result<Option<Epoch>, StoreError> {
        Ok(self
            .client
            .query_opt(
                TAKE_OVER_TERM,
                &[&epoch.0, &dead_pid, &holder, &lease_token, &&*self.lane],
            )
            .await?
            .map(|row| Epoch(row.get(0))))
    }

    /// True while a backend with this pid exists.
    pub async fn backend_alive(&self, pid: i32) -> Result<bool, StoreError> {
        Ok(self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&pid],
            )
            .await?
            .get(0))
    }

    /// Ends another backend (a stale holder of the leader lock). Only the current
    /// epoch's leader does this.
    pub async fn terminate(&self, pid: i32) -> Result<bool, StoreError> {
        Ok(self
            .client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await?
            .get(0))
    }

    /// Records this session as the leader's (only while `epoch` is current). `false`
    /// when a newer epoch exists.
    pub async fn record_as_leader(&self, epoch: Epoch) -> Result<bool, StoreError> {
        let n = self
            .client
            .execute(
                "UPDATE dispatcher_leader SET session_pid = pg_backend_pid() WHERE lane = $2 AND epoch = $1",
                &[&epoch.0, &&*self.lane],
            )
            .await?;
        Ok(n == 1)
    }
}

impl Store {
    /// Starts a new leadership term: the epoch goes up and every claim stamped with an
    /// older one is refused from now on (docs/design.md#fencing). `acquired_at` is taken after
    /// the row lock is held (`clock_timestamp()`, not the transaction's start), just
    /// before the commit: the moment from which PostgreSQL stops confirming the older
    /// epoch, which the rescue wait is counted from. The term's lease token is
    /// recorded, its session pid cleared (the new leader records it once its fence
    /// session holds the leader lock), and `quiet_at` set `quiet_after` after the bump
    /// (see `sql/0005_leader_session.sql`).
    pub async fn start_term(
        &self,
        holder: &str,
        lease_token: Option<&str>,
        quiet_after: Duration,
    ) -> Result<Epoch, StoreError> {
        let client = self.client().await?;
        let quiet_ms = i64::try_from(quiet_after.as_millis()).unwrap_or(i64::MAX);
        let row = client
            .query_one(
                "UPDATE dispatcher_leader
                 SET epoch = epoch + 1, holder = $1, acquired_at = clock_timestamp(),
                     lease_token = $2, session_pid = NULL,
                     quiet_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                 WHERE lane = $4 RETURNING epoch",
                &[&holder, &lease_token, &quiet_ms, &self.lane_name()],
            )
            .await?;
        Ok(Epoch(row.get(0)))
    }

    /// A term with no lease token whose `quiet_at` is left to the claim's fence window
    /// (single-replica mode starts its terms with `start_term`; tests use this).
    pub async fn bump_epoch(&self, holder: &str) -> Result<Epoch, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "UPDATE dispatcher_leader
                 SET epoch = epoch + 1, holder = $1, acquired_at = clock_timestamp(),
                     lease_token = NULL, session_pid = NULL, quiet_at = NULL
                 WHERE lane = $2 RETURNING epoch",
                &[&holder, &self.lane_name()],
            )
            .await?;
        Ok(Epoch(row.get(0)))
    }

    /// Forgets the leader's session pid when the term ends cleanly, so followers that
    /// see the session end do not take it for a death.
    pub async fn clear_leader_session(&self, epoch: Epoch) -> Result<(), StoreError> {
        self.execute_prepared(
            "UPDATE dispatcher_leader SET session_pid = NULL WHERE lane = $2 AND epoch = $1",
            &[&epoch.0, &self.lane_name()],
        )
        .await?;
        Ok(())
    }

    /// The current epoch (tests and the status API).
    pub async fn leader_record(&self) -> Result<LeaderRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT epoch, holder, acquired_at, last_batch_at, routing::text
                 FROM dispatcher_leader WHERE lane = $1",
                &[&self.lane_name()],
            )
            .await?;
        Ok(LeaderRecord {
            epoch: row.get(0),
            holder: row.get(1),
            acquired_at: row.get(2),
            last_batch_at: row.get(3),
            routing: row
                .get::<_, Option<String>>(4)
                .and_then(|text| serde_json::from_str(&text).ok()),
        })
    }
}

/// What a follower reads to tell a stalled leader (docs/design.md#a-stalled-leader): the
/// term, and when the leader's fence session last started a statement. The fence keeper
/// confirms several times a second on that session, so a start time that stops moving
/// means the leader's process stopped running (SIGSTOP, a blocked runtime, a VM pause)
/// or cannot reach PostgreSQL, either way sending nothing. `pg_stat_activity` shows it
/// to sessions of the same role (or with `pg_read_all_stats`); otherwise it is NULL and
/// only the lease's end replaces a stalled leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallReading {
    pub epoch: Epoch,
    pub session_pid: i32,
    pub lease_token: String,
    pub last_statement: chrono::DateTime<chrono::Utc>,
}

const READ_STALL: &str = "
SELECT l.epoch, l.session_pid, l.lease_token, a.query_start
FROM dispatcher_leader AS l
JOIN pg_stat_activity AS a ON a.pid = l.session_pid
WHERE l.lane = $1::text AND l.lease_token IS NOT NULL AND a.query_start IS NOT NULL";

/// A follower's takeover of a stalled leader's term: a new epoch, only while the fence
/// row still names the term (`$1`) and session (`$2`) the follower watched, and that
/// session has started no statement since (`$3`). `quiet_at` is a fence window after the
/// bump ($6 ms): a permit the stalled leader was given before the bump runs out by then.
const TAKE_OVER_STALLED_TERM: &str = "
UPDATE dispatcher_leader AS l
SET epoch = epoch + 1, holder = $4, acquired_at = clock_timestamp(), lease_token = $5,
    session_pid = NULL, quiet_at = clock_timestamp() + $6::bigint * interval '1 millisecond'
WHERE l.lane = $7::text AND l.epoch = $1 AND l.session_pid = $2
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                  WHERE a.pid = $2 AND a.query_start IS DISTINCT FROM $3)
RETURNING epoch";

/// Ends the sessions that hold the fence row locked in a transaction that has stood
/// idle for a while (a stalled leader frozen in the middle of a claim), so that the
/// takeover's update does not wait for PostgreSQL's idle timeout. Only sessions of this
/// application, only while they hold a lock on the fence table.
const END_STALLED_TRANSACTIONS: &str = "
SELECT pg_terminate_backend(a.pid)
FROM pg_stat_activity AS a
WHERE a.application_name = 'message-dispatcher'
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND a.state_change < clock_timestamp() - $1::bigint * interval '1 millisecond'
  AND EXISTS (SELECT 1 FROM pg_locks AS k
              WHERE k.pid = a.pid AND k.relation = 'dispatcher_leader'::regclass AND k.granted)";

impl Store {
    /// The lane's term and its fence session's last statement, when it has both.
    pub async fn stall_reading(&self) -> Result<Option<StallReading>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(READ_STALL).await?;
        Ok(client
            .query_opt(&statement, &[&self.lane_name()])
            .await?
            .map(|row| StallReading {
                epoch: Epoch(row.get(0)),
                session_pid: row.get(1),
                lease_token: row.get(2),
                last_statement: row.get(3),
            }))
    }

    /// Takes over the term `watched` showed (see [`TAKE_OVER_STALLED_TERM`]). `None`: the
    /// leader moved on (it ran a statement, recorded a new session, or a newer term
    /// began). Waits at most `lock_wait` for the fence row; a stalled claim holding it
    /// longer than `stalled_for` is ended, and the next poll tries again.
    pub async fn take_over_stalled_term(
        &self,
        watched: &StallReading,
        holder: &str,
        lease_token: &str,
        quiet_after: Duration,
        stalled_for: Duration,
    ) -> Result<Option<Epoch>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL lock_timeout = '300ms'").await?;
        let quiet_ms = i64::try_from(quiet_after.as_millis()).unwrap_or(i64::MAX);
        let bumped = tx
            .query_opt(
                TAKE_OVER_STALLED_TERM,
                &[
                    &watched.epoch.0,
                    &watched.session_pid,
                    &watched.last_statement,
                    &holder,
                    &lease_token,
                    &quiet_ms,
                    &self.lane_name(),
                ],
            )
            .await;
        match bumped {
            Ok(row) => {
                tx.commit().await?;
                Ok(row.map(|row| Epoch(row.get(0))))
            }
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                drop(tx);
                let stalled_ms = i64::try_from(stalled_for.as_millis()).unwrap_or(i64::MAX);
                let ended = client
                    .query(END_STALLED_TRANSACTIONS, &[&stalled_ms])
                    .await?;
                tracing::warn!(
                    ended = ended.len(),
                    "the fence row is held by a stalled transaction; ended it"
                );
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    }
}
