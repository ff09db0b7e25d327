//! The delivery cache (SPEC §6 step 9): `delivery:<id>` in Redis after each successful
//! send. Best effort by design: a Redis failure here never fails or delays a send,
//! and readers treat a missing entry as "not cached".

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};

/// How long a cache read may take before the answer goes out without it.
const READ_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    message_id: i64,
    provider_message_id: Option<String>,
    sent_at: DateTime<Utc>,
    cached_at: DateTime<Utc>,
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
            .filter_map(|(id, value)| {
                let entry: Entry = serde_json::from_str(&value?).ok()?;
                Some((*id, entry.cached_at))
            })
            .collect()
    }
}
