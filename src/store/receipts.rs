//! Delivery receipts: what the provider later says became of an accepted message.
//!
//! A receipt names the provider's id for the message. It can arrive before the send
//! result that records that id (the provider answers, then calls back at once), so a
//! receipt that matches no message yet is kept in `delivery_receipts_pending` and
//! applied once a message carries the id: by the request itself right after it kept
//! it, and by every replica's housekeeping. Either the request's second look sees the
//! recorded id, or the housekeeping sees the kept receipt, whatever the interleaving.
//!
//! Receipts are idempotent, and `delivered` is final: a later `undelivered` or
//! `failed` never replaces it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreError};
use crate::domain::DeliveryStatus;

/// How long a receipt for an unknown id is kept, waiting for its message's result.
pub const PENDING_RECEIPT_RETENTION_HOURS: i32 = 24;

/// One validated receipt.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub provider_message_id: String,
    pub status: DeliveryStatus,
    pub error_code: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// What became of one receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptOutcome {
    /// Written to the message.
    Applied,
    /// The message already has a final `delivered`: nothing changed.
    AlreadyDelivered,
    /// No message carries this id yet: kept, and applied when one does.
    Held,
}

/// Sets the receipt on the message with the provider's id, unless it is already
/// `delivered`. `$5`: the provider whose endpoint it came through: only that
/// provider's message is touched (a receipt through one provider's endpoint, checked
/// by that provider's means, cannot speak for another's message; a message sent
/// before providers were recorded has none and takes it); NULL: any.
const APPLY: &str = "
UPDATE messages
SET delivery_status = $2, delivery_error = $3, delivered_at = coalesce($4, now())
WHERE provider_message_id = $1 AND delivery_status IS DISTINCT FROM 'delivered'
  AND ($5::text IS NULL OR provider IS NULL OR provider = $5)";

const KNOWN: &str = "SELECT EXISTS (SELECT 1 FROM messages WHERE provider_message_id = $1
                                    AND ($2::text IS NULL OR provider IS NULL OR provider = $2))";

/// Keeps a receipt for later; a kept `delivered` is never replaced by a later failure.
const HOLD: &str = "
INSERT INTO delivery_receipts_pending AS p (provider_message_id, status, error_code, delivered_at, provider)
VALUES ($1, $2, $3, coalesce($4, now()), $5)
ON CONFLICT (provider_message_id) DO UPDATE
SET status = excluded.status, error_code = excluded.error_code,
    delivered_at = excluded.delivered_at, received_at = now(), provider = excluded.provider
WHERE p.status <> 'delivered'";

/// Applies kept receipts whose message now carries the id (all of them, or the one
/// `$1` names), and forgets them.
const APPLY_HELD: &str = "
WITH held AS (
    DELETE FROM delivery_receipts_pending AS p
    USING messages AS m
    WHERE m.provider_message_id = p.provider_message_id
      AND ($1::text IS NULL OR p.provider_message_id = $1)
      AND (p.provider IS NULL OR m.provider IS NULL OR m.provider = p.provider)
    RETURNING p.*
)
UPDATE messages AS m
SET delivery_status = held.status, delivery_error = held.error_code,
    delivered_at = held.delivered_at
FROM held
WHERE m.provider_message_id = held.provider_message_id
  AND (held.provider IS NULL OR m.provider IS NULL OR m.provider = held.provider)
  AND m.delivery_status IS DISTINCT FROM 'delivered'";

impl Store {
    /// Records one receipt; see the module comment for the order of things.
    /// `provider`: the provider whose endpoint it came through, if it came through one.
    pub async fn record_receipt(
        &self,
        receipt: &Receipt,
        provider: Option<&str>,
    ) -> Result<ReceiptOutcome, StoreError> {
        let id = receipt.provider_message_id.as_str();
        let status = receipt.status.as_str();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &id,
            &status,
            &receipt.error_code,
            &receipt.delivered_at,
            &provider,
        ];
        // One connection for every step: a second checkout while holding one could
        // wait on a pool that concurrent requests hold the same way.
        let client = self.client().await?;
        let run = async |sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
            client
                .execute(&client.prepare_cached(sql).await?, params)
                .await
        };
        if run(APPLY, &params).await? > 0 {
            return Ok(ReceiptOutcome::Applied);
        }
        if client
            .query_one(&client.prepare_cached(KNOWN).await?, &[&id, &provider])
            .await?
            .get(0)
        {
            return Ok(ReceiptOutcome::AlreadyDelivered);
        }
        run(HOLD, &params).await?;
        // The result may have been recorded between the first look and the hold.
        if run(APPLY_HELD, &[&Some(id)]).await? > 0 {
            return Ok(ReceiptOutcome::Applied);
        }
        Ok(ReceiptOutcome::Held)
    }

    /// Applies kept receipts (all, or the one for `provider_message_id`) whose message
    /// now carries the id; returns how many messages changed.
    pub async fn apply_held_receipts(
        &self,
        provider_message_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.execute_prepared(APPLY_HELD, &[&provider_message_id])
            .await
    }

    /// Forgets kept receipts no message claimed within the retention.
    pub async fn prune_held_receipts(&self) -> Result<u64, StoreError> {
        self.execute_prepared(
            "DELETE FROM delivery_receipts_pending
             WHERE received_at < now() - $1::int * interval '1 hour'",
            &[&PENDING_RECEIPT_RETENTION_HOURS],
        )
        .await
    }
}
