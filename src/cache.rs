//! The delivery cache (docs/design.md#delivery-cache): `delivery:<id>` in Redis after each successful
//! send. Best effort by design: a Redis failure here never fails or delays a send,
//! and readers treat a missing entry as "not cached".
//!
//! The entry is handed to a writer task the moment the provider accepts, and written
//! within [`WRITE_LINGER`] (in one pipeline with the others of that moment), so
//! normally before the result, which lingers longer in its own group, is recorded in
//! PostgreSQL. So when a result never reaches PostgreSQL (the leader was cut off from
//! it, or stopped while holding results), the leader that rescues the row finds the
//! entry and records the message as sent instead of sending it again. The
//! entry carries the row's `created_at` and delivery key, so an entry left over from
//! another database with the same ids is never mistaken for this row's delivery.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::store::{KnownDelivery, RescueCandidate};

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
    /// The row's delivery key (absent in entries of older versions).
    #[serde(default)]
    delivery_key: Option<String>,
    /// What the send cost, in micros (absent in entries of older versions, and for a
    /// provider without prices), so a send the rescue records keeps its price.
    #[serde(default)]
    price_micros: Option<i64>,
}

#[derive(Clone)]
pub struct DeliveryCache {
    client: Client,
    /// Entries on their way to the writer task (see [`write_entries`]).
    writes: mpsc::Sender<Entry>,
}

/// How long the writer gathers entries after the first before it writes them, in one
/// pipeline: one round trip (and one wake-up of the writer) for many sends instead of
/// one each. The crash window it adds is this small against the recorder's own.
const WRITE_LINGER: Duration = Duration::from_millis(5);
/// The most entries one pipeline carries.
const WRITE_GROUP_MAX: usize = 256;
/// Entries waiting for the writer; beyond it an entry is dropped (the cache is best
/// effort: a send never waits for it).
const WRITE_QUEUE: usize = 8192;

fn key(id: i64) -> String {
    format!("delivery:{id}")
}

impl DeliveryCache {
    /// Starts the writer task on the current runtime (the main one), so writes handed
    /// over by the dispatcher's own runtime still finish when that one stops.
    pub fn new(client: Client, ttl: Duration) -> Self {
        let (writes, queued) = mpsc::channel(WRITE_QUEUE);
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        tokio::spawn(write_entries(client.clone(), ttl, queued));
        Self { client, writes }
    }

    /// Records a delivery in the background; the caller never waits for Redis.
    pub fn remember(
        &self,
        message: &crate::store::ClaimedMessage,
        provider_message_id: Option<String>,
        sent_at: DateTime<Utc>,
        price: Option<crate::spend::Micros>,
    ) {
        let message_id = message.id;
        let entry = Entry {
            message_id,
            provider_message_id,
            sent_at,
            cached_at: Utc::now(),
            created_at: Some(message.created_at),
            delivery_key: Some(message.delivery_key.clone()),
            price_micros: price.map(|p| p.0),
        };
        if self.writes.try_send(entry).is_err() {
            tracing::debug!(
                message_id,
                "delivery not cached: the cache writer is behind"
            );
        }
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
                let same_row = entry.created_at == Some(candidate.created_at)
                    && entry
                        .delivery_key
                        .as_ref()
                        .is_none_or(|key| *key == candidate.delivery_key);
                same_row.then(|| KnownDelivery {
                    id: candidate.id,
                    claim_epoch: candidate.claim_epoch,
                    sent_at: entry.sent_at,
                    provider_message_id: entry.provider_message_id.clone(),
                    price: entry.price_micros.map(crate::spend::Micros),
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

/// Writes remembered deliveries, many per pipeline: a group gathers for
/// [`WRITE_LINGER`] after its first entry, then everything waiting is written, up to
/// [`WRITE_GROUP_MAX`] a pipeline, until the queue is empty. Stops when every
/// [`DeliveryCache`] is gone.
async fn write_entries(client: Client, ttl: i64, mut queued: mpsc::Receiver<Entry>) {
    let mut group = Vec::with_capacity(WRITE_GROUP_MAX);
    while let Some(first) = queued.recv().await {
        group.push(first);
        // The linger is slept, not spent listening: entries arriving meanwhile wait
        // in the queue. Listening woke this task (on the main runtime, another thread
        // than the sends) once per entry, a futex wake and a context switch each.
        tokio::time::sleep(WRITE_LINGER).await;
        loop {
            while group.len() < WRITE_GROUP_MAX {
                let Ok(entry) = queued.try_recv() else { break };
                group.push(entry);
            }
            if group.is_empty() {
                break;
            }
            write_group(&client, ttl, &mut group).await;
        }
    }
}

/// Writes `group` (emptying it) in one pipeline, within [`WRITE_TIMEOUT`].
async fn write_group(client: &Client, ttl: i64, group: &mut Vec<Entry>) {
    let pipeline = client.pipeline();
    for entry in group.drain(..) {
        let Ok(value) = serde_json::to_string(&entry) else {
            continue;
        };
        // Queued in memory; nothing goes out before `try_all`.
        let _: Result<(), _> = pipeline
            .set(
                key(entry.message_id),
                value,
                Some(Expiration::EX(ttl)),
                None,
                false,
            )
            .await;
    }
    match tokio::time::timeout(WRITE_TIMEOUT, pipeline.try_all::<Value>()).await {
        Ok(results) => {
            if let Some(Err(err)) = results.into_iter().find(Result::is_err) {
                tracing::debug!(error = %err.details(), "deliveries not cached");
            }
        }
        Err(_) => tracing::debug!("deliveries not cached: Redis too slow"),
    }
}
