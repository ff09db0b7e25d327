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

use std::time::Duration;

use tokio_postgres::{Client, Statement};

use super::{LeaderRecord, Store, StoreError};
use crate::domain::Epoch;

/// Locks the fence row: claims, epoch bumps and state changes queue up here.
pub(super) const LOCK_FENCE: &str = "SELECT epoch FROM dispatcher_leader WHERE id = 1 FOR UPDATE";

/// Reads the schedule once the fence is locked. `clock_timestamp()`, not `now()`: the
/// transaction may have waited for the lock while the previous batch committed.
/// `wait_ms` is NULL or ≤ 0 when a batch is due: an interval after the previous
/// batch's start, and, when that batch is still open and another term opened it (its
/// leader died or was deposed mid-batch, so nobody knows when its last send started),
/// an interval after the last moment that leader could start one: `quiet_at`, or this
/// term's start plus the fence window ($3) when the term did not record one. The
/// current term's own open batch needs no such wait: its pacer saw every send of it.
pub(super) const READ_SCHEDULE: &str = "
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
pub(super) const OPEN_BATCH: &str = "UPDATE dispatcher_leader SET last_batch_at = clock_timestamp(), batch_open = true, batch_epoch = epoch WHERE id = 1 RETURNING last_batch_at";

/// Records when the newest sends started (only if we still hold the epoch that opened
/// the batch), and marks the batch finished unless a newer one (another `last_batch_at`)
/// has opened since: the leader claims its next batch while the previous one's last
/// results are still being recorded, and an open batch tells a new leader that sends
/// may have started up to the old term's end. `$2` holds the sends' ages in
/// microseconds on this replica's clock just before the statement was sent, so the
/// stored times are at or after the real ones (a new leader waits a little long,
/// never too short).
pub(super) const CLOSE_BATCH: &str = "
UPDATE dispatcher_leader
SET batch_open = batch_open AND last_batch_at IS DISTINCT FROM $3,
    recent_sends = ARRAY(SELECT clock_timestamp() - age * interval '1 microsecond'
                         FROM unnest($2::bigint[]) AS age)
WHERE id = 1 AND epoch = $1";

/// A guard for a statement on another table that may only take effect while `$1` is
/// the current epoch. A macro so that the statement stays one literal.
macro_rules! epoch_is_current {
    () => {
        "EXISTS (SELECT 1 FROM dispatcher_leader WHERE id = 1 AND epoch = $1)"
    };
}

/// The session-level advisory lock the leader's fence session holds ("mdleader").
pub const LEADER_LOCK: i64 = 0x6d64_6c65_6164_6572;

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
WHERE l.id = 1 AND c.id = 1";

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
WHERE id = 1 AND epoch = $1 AND session_pid = $2
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
        let row = self.client.query_one(&self.confirm, &[]).await?;
        Ok(FenceReading {
            epoch: Epoch(row.get(0)),
            running: row.get(1),
        })
    }

    pub async fn term_record(&self) -> Result<TermRecord, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT epoch, lease_token, session_pid FROM dispatcher_leader WHERE id = 1",
                &[],
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
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await?
            .get(0))
    }

    /// Waits, as long as it takes, until this session holds the leader lock.
    pub async fn lock(&self) -> Result<(), StoreError> {
        self.client
            .execute("SELECT pg_advisory_lock($1)", &[&LEADER_LOCK])
            .await?;
        Ok(())
    }

    pub async fn unlock(&self) -> Result<(), StoreError> {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK])
            .await?;
        Ok(())
    }

    /// The backend holding the leader lock, if any.
    pub async fn lock_holder(&self) -> Result<Option<LockHolder>, StoreError> {
        Ok(self
            .client
            .query_opt(LOCK_HOLDER, &[&LEADER_LOCK])
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
                &[&epoch.0, &dead_pid, &holder, &lease_token],
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
                "UPDATE dispatcher_leader SET session_pid = pg_backend_pid() WHERE id = 1 AND epoch = $1",
                &[&epoch.0],
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
                 WHERE id = 1 RETURNING epoch",
                &[&holder, &lease_token, &quiet_ms],
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
                 WHERE id = 1 RETURNING epoch",
                &[&holder],
            )
            .await?;
        Ok(Epoch(row.get(0)))
    }

    /// Forgets the leader's session pid when the term ends cleanly, so followers that
    /// see the session end do not take it for a death.
    pub async fn clear_leader_session(&self, epoch: Epoch) -> Result<(), StoreError> {
        self.execute_prepared(
            "UPDATE dispatcher_leader SET session_pid = NULL WHERE id = 1 AND epoch = $1",
            &[&epoch.0],
        )
        .await?;
        Ok(())
    }

    /// The current epoch (tests and the status API).
    pub async fn leader_record(&self) -> Result<LeaderRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT epoch, holder, acquired_at, last_batch_at FROM dispatcher_leader WHERE id = 1",
                &[],
            )
            .await?;
        Ok(LeaderRecord {
            epoch: row.get(0),
            holder: row.get(1),
            acquired_at: row.get(2),
            last_batch_at: row.get(3),
        })
    }
}
