//! Retention's side of `messages`: finished rows removed, and their text blanked, in
//! small steps (docs/design.md#retention).
//!
//! A step reads the next page of one finished status in id order (the `(status, id)`
//! listing index), and removes (or blanks) the rows of the page whose last activity is
//! older than the period. It locks only those rows, which no claim wants (the claim
//! takes `pending` rows), and touches no counter: removed finished rows stay counted
//! (migration 0016). One replica works at a time, under a transaction-level advisory
//! lock; the others skip the step.

use std::time::Duration;

use super::{Store, StoreError};
use crate::domain::MessageStatus;

/// The statuses retention applies to: a message in them never changes again, except
/// for a delivery receipt (`sent`) or a retry by hand (`failed`).
pub const FINISHED: [MessageStatus; 5] = [
    MessageStatus::Sent,
    MessageStatus::Failed,
    MessageStatus::Expired,
    MessageStatus::Cancelled,
    MessageStatus::Blocked,
];

/// Advisory lock key of the retention steps ("msgkeep" in ASCII).
const RETENTION_LOCK: i64 = 0x006d_7367_6b65_6570;

/// What retention does to an old finished row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sweep {
    /// Removes the row (`MESSAGE_RETENTION`).
    Remove,
    /// Sets its `content` to NULL (`CONTENT_RETENTION`).
    BlankContent,
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepStep {
    /// Rows removed or blanked.
    pub changed: u64,
    /// The highest id the step read: the next step of this pass starts after it.
    pub last_id: i64,
    /// The lowest id the step read and left because it was not old enough.
    pub first_kept: Option<i64>,
    /// No row after `last_id` can be old enough yet: the pass is over.
    pub done: bool,
}

/// One page of `$4` rows of status `$1` after id `$2`; a row is old when its last
/// activity (created, scheduled, due, claimed, sent, delivered, expired; a cancel sets
/// it due) is before `now() - $3 seconds`.
/// `status <> 'sending'` lets the planner use the partial listing index whatever `$1`
/// is. The row's status is checked again where it is changed, so a failed message
/// retried by hand meanwhile is left alone.
macro_rules! sweep_page {
    ($change:literal) => {
        concat!(
            "WITH page AS (
    SELECT id, created_at,
           GREATEST(created_at, send_at, next_attempt_at, claimed_at, sent_at, delivered_at,
                    CASE WHEN status = 'expired' THEN expires_at END)
               < now() - make_interval(secs => $3) AS old
    FROM messages
    WHERE status = $1 AND status <> 'sending' AND id > $2
    ORDER BY status, id
    LIMIT $4
), changed AS (",
            $change,
            "
    RETURNING m.id
)
SELECT (SELECT count(*) FROM changed),
       coalesce((SELECT max(id) FROM page), $2),
       (SELECT min(id) FROM page WHERE NOT old),
       (SELECT count(*) FROM page) < $4
           OR coalesce((SELECT bool_or(created_at >= now() - make_interval(secs => $3)) FROM page), false)"
        )
    };
}

// The ids go in as an array rather than a join with `page`, which PostgreSQL can plan as
// a hash join over the whole table (see `store::claims`).
const REMOVE_STEP: &str = sweep_page!(
    "
    DELETE FROM messages AS m
    WHERE m.id = ANY(ARRAY(SELECT id FROM page WHERE old)) AND m.status = $1"
);

const BLANK_STEP: &str = sweep_page!(
    "
    UPDATE messages AS m SET content = NULL
    WHERE m.id = ANY(ARRAY(SELECT id FROM page WHERE old)) AND m.status = $1
      AND m.content IS NOT NULL"
);

impl Store {
    /// One step of a retention pass over `status`: the page of `page` rows after
    /// `after_id`. `None` when another replica holds the retention lock right now.
    pub async fn sweep_step(
        &self,
        sweep: Sweep,
        status: MessageStatus,
        after_id: i64,
        older_than: Duration,
        page: i64,
    ) -> Result<Option<SweepStep>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let sql = match sweep {
            Sweep::Remove => REMOVE_STEP,
            Sweep::BlankContent => BLANK_STEP,
        };
        let statement = tx.prepare_cached(sql).await?;
        let row = tx
            .query_one(
                &statement,
                &[
                    &status.as_str(),
                    &after_id,
                    &older_than.as_secs_f64(),
                    &page,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(Some(SweepStep {
            changed: row.get::<_, i64>(0) as u64,
            last_id: row.get(1),
            first_kept: row.get(2),
            done: row.get(3),
        }))
    }

    /// Age in whole seconds of the oldest transaction or snapshot in this database
    /// (another client's session, or a prepared transaction) that keeps PostgreSQL
    /// from cleaning up dead rows; 0 when none. Autovacuum's own workers are left out:
    /// a long vacuum is not for an operator to end. Another role's sessions are visible only with
    /// `pg_read_all_stats` (docs/operations.md#old-transactions).
    pub async fn oldest_transaction_age(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT coalesce(extract(epoch FROM now() - least(
                     (SELECT min(xact_start) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend'
                        AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)),
                     (SELECT min(prepared) FROM pg_prepared_xacts
                      WHERE database = current_database())))::bigint, 0)",
            )
            .await?;
        Ok(client.query_one(&statement, &[]).await?.get(0))
    }
}
