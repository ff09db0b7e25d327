//! Per-second dispatch activity (sent, failed, retried) for the operator console's
//! chart: written by the leader, at most one upsert per second (see
//! `dispatch::activity`), read by `GET /api/messages/activity`, pruned by every
//! replica's housekeeping.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreError};

/// How long activity is kept; the API reads at most this far back.
pub const KEEP_MINUTES: u32 = 60;

/// What happened in one second, or what a tally gained since it was last written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub sent: i64,
    pub failed: i64,
    pub retried: i64,
}

impl Tally {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One second with activity.
#[derive(Debug, Serialize)]
pub struct ActivitySecond {
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub tally: Tally,
}

/// A window of activity: only the seconds with something in them, oldest first.
#[derive(Debug, Serialize)]
pub struct Activity {
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub seconds: Vec<ActivitySecond>,
}

/// Adds a tally to the current second (PostgreSQL's clock, the one the reads use).
const ADD: &str = "
INSERT INTO message_activity_seconds AS a (second, sent, failed, retried)
VALUES (date_trunc('second', now()), $1, $2, $3)
ON CONFLICT (second) DO UPDATE
SET sent = a.sent + excluded.sent,
    failed = a.failed + excluded.failed,
    retried = a.retried + excluded.retried";

const WINDOW: &str = "
SELECT date_trunc('second', now()) - make_interval(mins => $1) AS from_,
       date_trunc('second', now()) AS until";

const READ: &str = "
SELECT second, sent, failed, retried FROM message_activity_seconds
WHERE second > $1 ORDER BY second";

const PRUNE: &str = "
DELETE FROM message_activity_seconds WHERE second < now() - make_interval(mins => $1)";

impl Store {
    pub async fn add_activity(&self, tally: Tally) -> Result<(), StoreError> {
        self.execute_prepared(ADD, &[&tally.sent, &tally.failed, &tally.retried])
            .await
            .map(drop)
    }

    /// The last `minutes` (at most [`KEEP_MINUTES`]) of activity.
    pub async fn activity(&self, minutes: u32) -> Result<Activity, StoreError> {
        let minutes = minutes.min(KEEP_MINUTES) as i32;
        let client = self.client().await?;
        let window = client.query_one(WINDOW, &[&minutes]).await?;
        let (from, until): (DateTime<Utc>, DateTime<Utc>) = (window.get(0), window.get(1));
        let seconds = client
            .query(READ, &[&from])
            .await?
            .iter()
            .map(|row| ActivitySecond {
                at: row.get(0),
                tally: Tally {
                    sent: row.get(1),
                    failed: row.get(2),
                    retried: row.get(3),
                },
            })
            .collect();
        Ok(Activity {
            from,
            until,
            seconds,
        })
    }

    pub async fn prune_activity(&self) -> Result<u64, StoreError> {
        self.execute_prepared(PRUNE, &[&(KEEP_MINUTES as i32)])
            .await
    }
}
