//! Group commit of accepted sends: the results the provider accepted are recorded
//! many rows per statement, behind the sends.
//!
//! A send does not wait for its own result's commit: the claim is already durable
//! (the row is `sending` under our epoch), so the result can follow. The recorder takes
//! whatever accepted results are waiting, up to [`GROUP_MAX`], and writes them in one
//! UPDATE, still guarded row by row by `status = 'sending' AND claim_epoch = <epoch>`.
//! A group is written when it holds [`GROUP_MAX`] results, when the batch flushes it
//! (its sends are done), or [`GROUP_LINGER`] after its first one, whichever comes
//! first; while that statement runs, the next group gathers.
//!
//! Bounds: at most [`MAX_UNRECORDED`] accepted results wait here (the sends wait when
//! it is full), and a result waits at most [`GROUP_LINGER`] plus the statement before its own. While
//! PostgreSQL is unreachable a group is held and retried (no result is lost on an
//! outage; the fence stops new sends within a window meanwhile). A crash loses what
//! waits here: those messages are resent with the same Idempotency-Key, unless their
//! delivery entries (written in Redis the moment the provider accepted) let the rescue
//! record them as sent. A statement PostgreSQL refuses for any other reason falls back
//! to row-by-row writes without the provider's values.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::Retryable;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::ResultStore;
use crate::domain::Epoch;
use crate::retry::connect_backoff;
use crate::store::StoreError;
use crate::store::{Recorded, SentResult};

/// The most rows one statement records.
pub const GROUP_MAX: usize = 256;
/// How long a group gathers after its first result before it is written.
pub const GROUP_LINGER: Duration = Duration::from_millis(20);
/// The most accepted results waiting to be recorded; the sends wait beyond it.
pub const MAX_UNRECORDED: usize = 1024;

struct Entry {
    result: SentResult,
    done: oneshot::Sender<Recorded>,
}

/// What the recorder's queue carries. A flush travels in the same queue as the
/// results, so it always comes after every result submitted before it.
enum Item {
    Sent(Entry),
    Flush,
}

/// The handle the dispatcher submits accepted results to. Dropping it lets the
/// recorder finish what it holds and stop.
pub struct Recorder<B> {
    tx: mpsc::Sender<Item>,
    /// What the writing task needs, until [`Recorder::start`] spawns it.
    idle: Mutex<Option<(B, mpsc::Receiver<Item>, Duration)>>,
}

impl<B: ResultStore> Recorder<B> {
    /// A recorder whose writing task is not running yet: the dispatcher starts it on
    /// its own runtime, next to the sends (see `Dispatcher::spawn`).
    pub fn new(store: B) -> Self {
        Self::with_linger(store, GROUP_LINGER)
    }

    /// [`Recorder::new`] with another linger than [`GROUP_LINGER`] (tests use a very
    /// long one, so that only a flush or a full group writes).
    #[doc(hidden)]
    pub fn with_linger(store: B, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(MAX_UNRECORDED);
        Self {
            tx,
            idle: Mutex::new(Some((store, rx, linger))),
        }
    }

    /// Spawns the writing task on the current runtime (once; later calls do nothing).
    pub fn start(&self) {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((store, rx, linger)) = idle {
            tokio::task::spawn_local(record_groups(store, rx, linger));
        }
    }

    /// Writes the group gathering now instead of at its linger's end: for a batch
    /// whose sends are all done, nothing more is coming. The group written includes
    /// every result submitted before this call. When the queue is full the flush is
    /// dropped: the groups ahead are full and written at once, and the last one waits
    /// at most its linger.
    pub fn flush(&self) {
        let _ = self.tx.try_send(Item::Flush);
    }

    /// Queues an accepted send for recording (waiting while [`MAX_UNRECORDED`] results
    /// are queued) and returns where its outcome will arrive.
    pub async fn sent(
        &self,
        id: i64,
        epoch: Epoch,
        sent_at: DateTime<Utc>,
        provider_message_id: Option<String>,
        price: Option<crate::spend::Micros>,
    ) -> oneshot::Receiver<Recorded> {
        let (done, outcome) = oneshot::channel();
        let entry = Entry {
            result: SentResult {
                id,
                epoch,
                sent_at,
                provider_message_id,
                price,
            },
            done,
        };
        // A closed recorder drops the entry; the caller then sees the outcome channel
        // closed and treats the result as not recorded.
        let _ = self.tx.send(Item::Sent(entry)).await;
        outcome
    }
}

/// Gathers results into groups and writes each: a group ends when it is full, at a
/// flush, or `linger` after its first result. A flush with nothing gathered does
/// nothing (its results were written with an earlier group).
async fn record_groups<B: ResultStore>(store: B, mut rx: mpsc::Receiver<Item>, linger: Duration) {
    let mut group: Vec<Entry> = Vec::with_capacity(GROUP_MAX);
    loop {
        let first = loop {
            match rx.recv().await {
                Some(Item::Sent(entry)) => break entry,
                Some(Item::Flush) => {}
                None => return,
            }
        };
        group.push(first);
        let flush_at = tokio::time::sleep(linger);
        tokio::pin!(flush_at);
        while group.len() < GROUP_MAX {
            let item = tokio::select! {
                item = rx.recv() => item,
                () = &mut flush_at => break,
            };
            match item {
                Some(Item::Sent(entry)) => group.push(entry),
                Some(Item::Flush) | None => break,
            }
        }
        record_group(&store, std::mem::take(&mut group)).await;
    }
}

async fn record_group<B: ResultStore>(store: &B, group: Vec<Entry>) {
    let results: Vec<SentResult> = group.iter().map(|e| e.result.clone()).collect();
    // A failed attempt may have committed with its reply lost: every later one
    // recognises the rows it recorded (same epoch and send time) as ours.
    let tried = AtomicBool::new(false);
    let write = || store.mark_sent_group(&results, tried.swap(true, Ordering::Relaxed));
    let recorded = write
        .retry(connect_backoff())
        .when(StoreError::is_unavailable)
        .notify(|err, wait| {
            tracing::warn!(count = results.len(), error = %err, retry_in_ms = wait.as_millis() as u64, "results not recorded yet; holding them");
        })
        .await;
    let ours: HashSet<i64> = match recorded {
        Ok(ours) => ours,
        Err(err) => {
            tracing::warn!(count = results.len(), error = %err, "PostgreSQL refused a group of results; recording them one by one without the provider's values");
            // The group's own failed attempts may have committed too.
            one_by_one(store, &results, tried.load(Ordering::Relaxed)).await
        }
    };
    for entry in group {
        let outcome = if ours.contains(&entry.result.id) {
            Recorded::Sent
        } else {
            Recorded::NotOurs
        };
        let _ = entry.done.send(outcome);
    }
}

/// The fallback: each row on its own, with only constants besides the id and time.
/// `tried`: an earlier write of these rows may have committed with its reply lost.
async fn one_by_one<B: ResultStore>(
    store: &B,
    results: &[SentResult],
    tried: bool,
) -> HashSet<i64> {
    let mut ours = HashSet::new();
    for result in results {
        let tried = AtomicBool::new(tried);
        let write = || {
            store.mark_sent(
                result.id,
                result.epoch,
                result.sent_at,
                None,
                result.price,
                tried.swap(true, Ordering::Relaxed),
            )
        };
        match write
            .retry(connect_backoff())
            .when(StoreError::is_unavailable)
            .await
        {
            Ok(Recorded::Sent) => {
                ours.insert(result.id);
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(message_id = result.id, error = %err, "could not record the result");
            }
        }
    }
    ours
}
