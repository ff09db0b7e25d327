//! The delivery cache (SPEC §6 step 9): `delivery:<id>` in Redis after each successful
//! send. Best effort by design: a Redis failure here never fails or delays a send,
//! and readers treat a missing entry as "not cached".
//!
//! The entry is written the moment the provider accepts, before the result is
//! recorded in PostgreSQL. So when a result never reaches PostgreSQL (the leader was
//! cut off from it, or stopped while holding results), the leader that rescues the row
//! finds the entry and records the message as sent instead of sending it again. The
//! entry carries the row's `created_at`, so an entry left over from another database
//! with the same ids is never mistaken for this row's delivery.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::queue::{KnownDelivery, RescueCandidate};

/// How long a cache read may take before the answer goes out without it.
const READ_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    message_id: i64,
    provider_message_id: Option<String>,
    sent_at: DateTime<Utc>,
    cached_at: DateTime<Utc>,
    /// The row's `created_at` (absent in entries of older versions).
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

#[derive(Clone)]
pub struct DeliveryCache {
    client: Client,
    ttl: Duration,
}

fn key(id: i64) -> String {
    format!("delivery:{id}")
}

impl DeliveryCache {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, ttl }
    }

    /// Records a delivery in the background; the caller never waits for Redis.
    pub fn remember(
        &self,
        message_id: i64,
        created_at: DateTime<Utc>,
        provider_message_id: Option<String>,
        sent_at: DateTime<Utc>,
    ) {
        let client = self.client.clone();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        tokio::spawn(async move {
            let entry = Entry {
                message_id,
                provider_message_id,
                sent_at,
                cached_at: Utc::now(),
                created_at: Some(created_at),
            };
            let Ok(value) = serde_json::to_string(&entry) else {
                return;
            };
            let write = client.set::<(), _, _>(
                key(message_id),
                value,
                Some(Expiration::EX(ttl)),
                None,
                false,
            );
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(message_id, error = %err.details(), "delivery not cached")
                }
                Err(_) => tracing::debug!(message_id, "delivery not cached: Redis too slow"),
            }
        });
    }

    /// `cached_at` for each id that has an entry; empty when Redis is unavailable.
    pub async fn cached_at(&self, ids: &[i64]) -> HashMap<i64, DateTime<Utc>> {
        self.entries(ids)
            .await
            .into_iter()
            .map(|(id, entry)| (id, entry.cached_at))
            .collect()
    }

    /// The deliveries among `candidates` (rows about to be rescued) that the provider
    /// accepted, with what was recorded at the time. Empty when Redis does not answer:
    /// those rows are then rescued and sent again, under the same Idempotency-Key.
    pub async fn known_deliveries(&self, candidates: &[RescueCandidate]) -> Vec<KnownDelivery> {
        let ids: Vec<i64> = candidates.iter().map(|c| c.id).collect();
        let entries = self.entries(&ids).await;
        candidates
            .iter()
            .filter_map(|candidate| {
                let entry = entries.get(&candidate.id)?;
                (entry.created_at == Some(candidate.created_at)).then(|| KnownDelivery {
                    id: candidate.id,
                    claim_epoch: candidate.claim_epoch,
                    sent_at: entry.sent_at,
                    provider_message_id: entry.provider_message_id.clone(),
                })
            })
            .collect()
    }

    async fn entries(&self, ids: &[i64]) -> HashMap<i64, Entry> {
        if ids.is_empty() || !self.client.is_connected() {
            return HashMap::new();
        }
        let keys: Vec<String> = ids.iter().copied().map(key).collect();
        let read = self.client.mget::<Vec<Option<String>>, _>(keys);
        let values = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(values)) => values,
            _ => return HashMap::new(),
        };
        ids.iter()
            .zip(values)
            .filter_map(|(id, value)| Some((*id, serde_json::from_str(&value?).ok()?)))
            .collect()
    }
}
