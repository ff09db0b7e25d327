//! `webhook_events`: the status webhooks waiting to be posted, posted, or given up on
//! (docs/design.md#status-webhooks). The triggers of migration 0020 write them in the
//! transaction of each status change; every replica's worker posts them.
//!
//! A worker takes due events by moving their `next_attempt_at` a lease ahead, in one
//! short statement (`FOR UPDATE SKIP LOCKED`), so two workers never take the same event
//! at once; a worker that dies with events taken leaves them due again when the lease
//! ends. Delivery is at-least-once, with the same `webhook-id` on every attempt.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;

use super::claims::millis;
use super::{Store, StoreError};

/// One event as a worker or the API sees it.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookEvent {
    pub id: i64,
    pub webhook_id: String,
    pub message_id: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The message's own endpoint; `None`: `STATUS_WEBHOOK_URL`.
    pub url: Option<String>,
    /// The body, exactly as posted.
    #[serde(skip)]
    pub body: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub window_start: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl WebhookEvent {
    fn from_row(row: &Row) -> Self {
        let body: String = row.get("body");
        Self {
            id: row.get("id"),
            webhook_id: row.get("webhook_id"),
            message_id: row.get("message_id"),
            event_type: row.get("type"),
            url: row.get("url"),
            payload: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            body,
            status: row.get("status"),
            attempts: row.get("attempts"),
            created_at: row.get("created_at"),
            window_start: row.get("window_start"),
            next_attempt_at: row.get("next_attempt_at"),
            last_error: row.get("last_error"),
            delivered_at: row.get("delivered_at"),
        }
    }
}

/// What a replay of one event found.
#[derive(Debug)]
pub enum Replay {
    Replayed(Box<WebhookEvent>),
    NotFound,
    /// Only a dead letter (`failed`) is replayed; this is its status.
    NotFailed(String),
}

const COLUMNS: &str = "id, webhook_id, message_id, type, url, payload::text AS body, status, \
                       attempts, created_at, window_start, next_attempt_at, last_error, delivered_at";

/// Takes up to `$1` due events, oldest due first, for `$2` milliseconds; the events for
/// `STATUS_WEBHOOK_URL` (no endpoint of their own) only when `$3`, this replica has it.
const TAKE_DUE: &str = "
UPDATE webhook_events
SET next_attempt_at = now() + $2::bigint * interval '1 millisecond', attempts = attempts + 1
WHERE id = ANY(ARRAY(
    SELECT id FROM webhook_events
    WHERE status = 'pending' AND next_attempt_at <= now() AND (url IS NOT NULL OR $3)
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED))
RETURNING ";

const DELIVERED: &str = "
UPDATE webhook_events SET status = 'delivered', delivered_at = now(), last_error = NULL
WHERE id = $1 AND status = 'pending'";

/// Due again after `$2` ms, unless the event's retry window (`$4` ms from its start)
/// ends first: then it is a dead letter.
const FAILED_ATTEMPT: &str = "
UPDATE webhook_events
SET last_error = $3,
    status = CASE WHEN now() + $2::bigint * interval '1 millisecond'
                       >= window_start + $4::bigint * interval '1 millisecond'
                  THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now() + $2::bigint * interval '1 millisecond'
WHERE id = $1 AND status = 'pending'
RETURNING status";

const REPLAY: &str = "
UPDATE webhook_events
SET status = 'pending', attempts = 0, window_start = now(), next_attempt_at = now()
WHERE id = $1 AND status = 'failed'
RETURNING ";

const PRUNE_DELIVERED: &str = "
DELETE FROM webhook_events WHERE id = ANY(ARRAY(
    SELECT id FROM webhook_events
    WHERE status = 'delivered' AND delivered_at < now() - $1::bigint * interval '1 millisecond'
    LIMIT 1000))";

/// Dead letters of messages that are gone (retention removed them, docs/design.md#retention):
/// nothing is left to replay them for. A dead letter stays as long as its message does.
const PRUNE_ORPHANED_DEAD_LETTERS: &str = "
DELETE FROM webhook_events WHERE id = ANY(ARRAY(
    SELECT e.id FROM webhook_events AS e
    WHERE e.status = 'failed' AND NOT EXISTS (SELECT 1 FROM messages AS m WHERE m.id = e.message_id)
    LIMIT 1000))";

impl Store {
    /// Takes up to `limit` due events for `lease`; each attempt is counted now.
    /// `default_url`: this replica has `STATUS_WEBHOOK_URL`, so it takes the events
    /// that go there too.
    pub async fn take_due_webhooks(
        &self,
        limit: i64,
        lease: Duration,
        default_url: bool,
    ) -> Result<Vec<WebhookEvent>, StoreError> {
        let client = self.client().await?;
        let sql = format!("{TAKE_DUE}{COLUMNS}");
        let rows = client
            .query(
                &client.prepare_cached(&sql).await?,
                &[&limit, &millis(lease), &default_url],
            )
            .await?;
        let mut events: Vec<WebhookEvent> = rows.iter().map(WebhookEvent::from_row).collect();
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    pub async fn webhook_delivered(&self, id: i64) -> Result<(), StoreError> {
        self.execute_prepared(DELIVERED, &[&id]).await?;
        Ok(())
    }

    /// Records a failed attempt; returns true when the event is now a dead letter.
    pub async fn webhook_attempt_failed(
        &self,
        id: i64,
        retry_in: Duration,
        error: &str,
        retry_for: Duration,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let error: String = error.chars().take(500).collect();
        let row = client
            .query_opt(
                &client.prepare_cached(FAILED_ATTEMPT).await?,
                &[&id, &millis(retry_in), &error, &millis(retry_for)],
            )
            .await?;
        Ok(row.is_some_and(|row| row.get::<_, &str>(0) == "failed"))
    }

    /// Dead letters, newest first, a page of `limit` before the id `cursor`.
    pub async fn failed_webhooks(
        &self,
        cursor: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<WebhookEvent>, Option<i64>), StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM webhook_events
             WHERE status = 'failed' AND ($1::bigint IS NULL OR id < $1)
             ORDER BY id DESC LIMIT $2"
        );
        let rows = client
            .query(
                &client.prepare_cached(&sql).await?,
                &[&cursor, &(limit + 1)],
            )
            .await?;
        let mut events: Vec<WebhookEvent> = rows.iter().map(WebhookEvent::from_row).collect();
        let next = if events.len() as i64 > limit {
            events.truncate(limit as usize);
            events.last().map(|e| e.id)
        } else {
            None
        };
        Ok((events, next))
    }

    /// Makes a dead letter due again now, with a fresh retry window.
    pub async fn replay_webhook(&self, id: i64) -> Result<Replay, StoreError> {
        let client = self.client().await?;
        let sql = format!("{REPLAY}{COLUMNS}");
        if let Some(row) = client
            .query_opt(&client.prepare_cached(&sql).await?, &[&id])
            .await?
        {
            return Ok(Replay::Replayed(Box::new(WebhookEvent::from_row(&row))));
        }
        let status = client
            .query_opt("SELECT status FROM webhook_events WHERE id = $1", &[&id])
            .await?;
        Ok(match status {
            Some(row) => Replay::NotFailed(row.get(0)),
            None => Replay::NotFound,
        })
    }

    /// Forgets up to 1,000 events delivered longer ago than `age`; returns how many.
    pub async fn prune_delivered_webhooks(&self, age: Duration) -> Result<u64, StoreError> {
        self.execute_prepared(PRUNE_DELIVERED, &[&millis(age)])
            .await
    }

    /// Forgets up to 1,000 dead letters whose message no longer exists.
    pub async fn prune_orphaned_dead_letters(&self) -> Result<u64, StoreError> {
        self.execute_prepared(PRUNE_ORPHANED_DEAD_LETTERS, &[])
            .await
    }
}
