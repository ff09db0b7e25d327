//! The control tables: the desired state and runtime overrides
//! (`dispatcher_control`, a row per lane beside its fence row), the lanes themselves,
//! the replica registry (`dispatcher_replicas`), and the intake rules the SQL function
//! `dispatcher_enqueue` reads (`dispatcher_intake`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::fence::LOCK_FENCE;
use crate::spend::Micros;

use super::{ControlRecord, OverrideChange, Pause, ReplicaRecord, SetBy, Store, StoreError};
use crate::domain::Epoch;

/// Lifts any pause of the lane `$1` (a start or a configuration change through the API).
const LIFT_PAUSE: &str =
    "UPDATE dispatcher_control SET paused_reason = NULL, paused_at = NULL, paused_detail = NULL
                          WHERE lane = $1::text AND paused_reason IS NOT NULL";

/// Adds a lane's fence and control rows unless they exist (a lane first named in a
/// replica's DISPATCH_CONFIG). The advisory lock keeps two replicas starting together
/// from choosing the same id for different lanes.
const ADD_LANE: &str = "
WITH added AS (
    INSERT INTO dispatcher_leader (id, lane)
    SELECT coalesce(max(id), 0) + 1, $1 FROM dispatcher_leader
    ON CONFLICT (lane) DO NOTHING
    RETURNING id, lane
)
INSERT INTO dispatcher_control (id, lane) SELECT id, lane FROM added";

/// Serialises [`ADD_LANE`] across replicas ("mdlanes").
const LANES_LOCK: i64 = 0x006d_646c_616e_6573;

impl Store {
    /// Adds the fence and control rows of the lanes met for the first time.
    pub async fn ensure_lanes(&self, names: &[&str]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LANES_LOCK])
            .await?;
        for name in names {
            tx.execute(ADD_LANE, &[name]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stores the intake rules of this replica's configuration for `dispatcher_enqueue`
    /// (docs/design.md#enqueue-from-sql); the replica that started last wins, as the
    /// replicas of one cluster share their configuration.
    /// `status_webhooks`: whether this replica posts status webhooks (its
    /// `STATUS_WEBHOOK_URL` is set), which tells the triggers to write every message's
    /// events (docs/design.md#status-webhooks).
    pub async fn publish_intake_rules(
        &self,
        message_max_length: usize,
        status_webhooks: bool,
        replica_id: &str,
    ) -> Result<(), StoreError> {
        let max_length = i32::try_from(message_max_length).unwrap_or(i32::MAX);
        self.client()
            .await?
            .execute(
                "INSERT INTO dispatcher_intake (id, message_max_length, status_webhooks, updated_by)
                 VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE
                 SET message_max_length = excluded.message_max_length,
                     status_webhooks = excluded.status_webhooks,
                     updated_at = now(), updated_by = excluded.updated_by
                 WHERE (dispatcher_intake.message_max_length, dispatcher_intake.status_webhooks)
                       IS DISTINCT FROM (excluded.message_max_length, excluded.status_webhooks)",
                &[&max_length, &status_webhooks, &replica_id],
            )
            .await?;
        Ok(())
    }

    /// Applies `AUTO_START` to every lane whose desired state no replica has set yet.
    pub async fn apply_auto_start(
        &self,
        auto_start: bool,
        replica_id: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE dispatcher_control SET running = $1, updated_at = now(), updated_by = $2
                 WHERE running IS NULL",
                &[&auto_start, &replica_id],
            )
            .await?;
        if n > 0 {
            tracing::info!(
                running = auto_start,
                lanes = n,
                "first start of the cluster or of new lanes: applied AUTO_START"
            );
        }
        Ok(())
    }

    /// Sets the desired state of every lane (`/api/messaging/start|stop`). Returns
    /// whether any changed. A start also lifts the pauses (an operator who fixed the
    /// credentials says go).
    pub async fn set_running(&self, running: bool, by: &str) -> Result<bool, StoreError> {
        self.set_running_of(None, running, by).await
    }

    /// Sets the desired state of this handle's lane only (`/api/lanes/{name}/start|stop`).
    pub async fn set_lane_running(&self, running: bool, by: &str) -> Result<bool, StoreError> {
        self.set_running_of(Some(self.lane_name()), running, by)
            .await
    }

    /// The fence rows are locked first, in id order, as a claim locks its own: once the
    /// change commits, no claim and no fence confirmation of those lanes can read the
    /// old state (docs/design.md#control).
    async fn set_running_of(
        &self,
        lane: Option<&str>,
        running: bool,
        by: &str,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT epoch FROM dispatcher_leader WHERE $1::text IS NULL OR lane = $1 ORDER BY id FOR UPDATE",
            &[&lane],
        )
        .await?;
        let n = tx
            .execute(
                "UPDATE dispatcher_control SET running = $1, updated_at = now(), updated_by = $2
                 WHERE ($3::text IS NULL OR lane = $3) AND running IS DISTINCT FROM $1",
                &[&running, &by, &lane],
            )
            .await?;
        if running {
            tx.execute(
                "UPDATE dispatcher_control SET paused_reason = NULL, paused_at = NULL, paused_detail = NULL
                 WHERE ($1::text IS NULL OR lane = $1) AND paused_reason IS NOT NULL",
                &[&lane],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Pauses dispatch for `reason` (the leader of `epoch`, which must still be the
    /// current one), unless it is paused for that reason already. Returns whether it
    /// was not paused before.
    pub async fn pause_dispatch(
        &self,
        epoch: Epoch,
        reason: &str,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .execute_prepared(
                concat!(
                    "UPDATE dispatcher_control SET paused_reason = $2, paused_at = now(), paused_detail = $3
                     WHERE lane = $4::text AND paused_reason IS DISTINCT FROM $2 AND ",
                    epoch_is_current!("$4")
                ),
                &[&epoch.0, &reason, &detail, &self.lane_name()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Lifts a pause for `reason` (an accepted probe). Returns whether there was one.
    pub async fn lift_pause(&self, reason: &str) -> Result<bool, StoreError> {
        let n = self
            .execute_prepared(
                "UPDATE dispatcher_control SET paused_reason = NULL, paused_at = NULL, paused_detail = NULL
                 WHERE lane = $2 AND paused_reason = $1",
                &[&reason, &self.lane_name()],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn set_overrides(
        &self,
        change: &OverrideChange,
        by: &str,
    ) -> Result<ControlRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let lane = self.lane_name();
        tx.execute(LOCK_FENCE, &[&lane]).await?;
        if let Some(batch_size) = change.batch_size {
            let value = batch_size.map(|b| b as i32);
            tx.execute(
                "UPDATE dispatcher_control SET batch_size = $1::int, updated_at = now(), updated_by = $2::text,
                        batch_size_set_at = CASE WHEN $1::int IS NULL THEN NULL ELSE now() END,
                        batch_size_set_by = CASE WHEN $1::int IS NULL THEN NULL ELSE $2::text END
                 WHERE lane = $3",
                &[&value, &by, &lane],
            )
            .await?;
        }
        if let Some(interval) = change.interval {
            let value = interval.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            tx.execute(
                "UPDATE dispatcher_control SET processing_interval_ms = $1::bigint, updated_at = now(), updated_by = $2::text,
                        interval_set_at = CASE WHEN $1::bigint IS NULL THEN NULL ELSE now() END,
                        interval_set_by = CASE WHEN $1::bigint IS NULL THEN NULL ELSE $2::text END
                 WHERE lane = $3",
                &[&value, &by, &lane],
            )
            .await?;
        }
        if let Some(cap) = change.daily_spend_cap {
            let value = cap.map(|c| c.0);
            tx.execute(
                "UPDATE dispatcher_control SET daily_spend_cap_micros = $1::bigint, updated_at = now(), updated_by = $2::text,
                        daily_spend_cap_set_at = CASE WHEN $1::bigint IS NULL THEN NULL ELSE now() END,
                        daily_spend_cap_set_by = CASE WHEN $1::bigint IS NULL THEN NULL ELSE $2::text END
                 WHERE lane = $3",
                &[&value, &by, &lane],
            )
            .await?;
        }
        // A configuration change lifts a pause: the leader tries again at once (and
        // pauses again at its claim if the lane is still over its spend cap).
        tx.execute(LIFT_PAUSE, &[&lane]).await?;
        tx.commit().await?;
        // Back to the pool first: a nested checkout can wait on a pool that concurrent
        // requests hold the same way.
        drop(client);
        self.control_record().await
    }

    pub async fn control_record(&self) -> Result<ControlRecord, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT coalesce(running, false), batch_size, processing_interval_ms, updated_at, updated_by,
                        batch_size_set_at, batch_size_set_by, interval_set_at, interval_set_by,
                        paused_reason, paused_at, paused_detail,
                        daily_spend_cap_micros, daily_spend_cap_set_at, daily_spend_cap_set_by
                 FROM dispatcher_control WHERE lane = $1",
                &[&self.lane_name()],
            )
            .await?;
        let set_by = |at: usize, by: usize| {
            row.get::<_, Option<DateTime<Utc>>>(at).map(|at| SetBy {
                by: row.get(by),
                at,
            })
        };
        Ok(ControlRecord {
            running: row.get(0),
            batch_size: row.get::<_, Option<i32>>(1).map(|b| b.max(1) as u32),
            interval: row
                .get::<_, Option<i64>>(2)
                .map(|ms| Duration::from_millis(ms.max(0) as u64)),
            updated_at: row.get(3),
            updated_by: row.get(4),
            batch_size_set: set_by(5, 6),
            interval_set: set_by(7, 8),
            daily_spend_cap: row.get::<_, Option<i64>>(12).map(Micros),
            daily_spend_cap_set: set_by(13, 14),
            paused: row.get::<_, Option<String>>(9).map(|reason| Pause {
                reason,
                since: row
                    .get::<_, Option<DateTime<Utc>>>(10)
                    .unwrap_or_else(Utc::now),
                detail: row.get(11),
            }),
        })
    }

    /// Registers this replica or refreshes its heartbeat. `leader_eligible`: whether it
    /// campaigns (the lanes are spread over the replicas that do).
    pub async fn heartbeat(
        &self,
        replica_id: &str,
        version: &str,
        leader_eligible: bool,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO dispatcher_replicas (replica_id, version, lanes, leader_eligible)
                 VALUES ($1, $2, true, $3)
                 ON CONFLICT (replica_id) DO UPDATE SET last_seen_at = now(), version = EXCLUDED.version,
                     lanes = true, leader_eligible = EXCLUDED.leader_eligible",
                &[&replica_id, &version, &leader_eligible],
            )
            .await?;
        Ok(())
    }

    /// Removes this replica from the registry (clean shutdown), and forgets replicas
    /// that have been silent for a day.
    pub async fn deregister(&self, replica_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM dispatcher_replicas WHERE replica_id = $1 OR last_seen_at < now() - interval '1 day'",
                &[&replica_id],
            )
            .await?;
        Ok(())
    }

    /// Replicas whose heartbeat is younger than `within`.
    pub async fn live_replicas(&self, within: Duration) -> Result<Vec<ReplicaRecord>, StoreError> {
        let client = self.client().await?;
        let ms = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        Ok(client
            .query(
                "SELECT replica_id, version, started_at, last_seen_at, lanes, leader_eligible FROM dispatcher_replicas
                 WHERE last_seen_at > now() - $1::bigint * interval '1 millisecond' ORDER BY replica_id",
                &[&ms],
            )
            .await?
            .iter()
            .map(|row| ReplicaRecord {
                replica_id: row.get(0),
                version: row.get(1),
                started_at: row.get(2),
                last_seen_at: row.get(3),
                knows_lanes: row.get(4),
                leader_eligible: row.get(5),
            })
            .collect())
    }
}
