//! The API's side of `messages`: insert, list, look up, change by hand, and the
//! counts behind stats and metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::{
    Inserted, LaneCounts, ListFilter, Message, MessageStats, NewMessage, Page, QueueStats,
    StatusChange, Store, StoreError, TOTAL_BOUND,
};
use crate::domain::{Category, DeliveryStatus, IdempotencyKey, MessageStatus, Sender};
use crate::encoding::segment;

/// Takes a transaction-level advisory lock per idempotency key of an insert, in one
/// order (the keys' hashes, ascending) before anything is inserted. Two requests with
/// the same keys in different orders otherwise wait on each other's unique index
/// entries and PostgreSQL ends one of them as a deadlock; this way the second waits
/// for the first and then finds its rows. The aggregate consumes the subquery's
/// rows in their sorted order. The two-int form (objsubid 2) never meets the
/// bigint-keyed locks (objsubid 1); a collision of two keys' hashes only makes
/// their requests wait for each other.
const LOCK_KEYS: &str = "
SELECT count(pg_advisory_xact_lock(1835297135, h))
FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest($1::text[]) AS k
      WHERE k IS NOT NULL ORDER BY 1) AS keys";

/// Seconds since the oldest due pending message of each priority was created
/// (scheduled ones count once their `send_at` has come; NULL when there is none): one
/// probe of the claim index per priority. Priorities are served strictly in order, so
/// a stream of urgent messages above the rate starves the lower ones; this shows it.
const OLDEST_PENDING_BY_PRIORITY: &str = "
SELECT p.priority::int2, extract(epoch FROM now() - o.oldest)::float8
FROM generate_series(0, 3) AS p(priority)
LEFT JOIN LATERAL (
    SELECT created_at AS oldest FROM messages
    WHERE status = 'pending' AND priority = p.priority
      AND (send_at IS NULL OR send_at <= now())
    ORDER BY priority DESC, created_at, id LIMIT 1) AS o ON true
ORDER BY p.priority";

/// The oldest due pending message's age, per priority (seconds, never negative).
async fn oldest_pending_by_priority(
    client: &tokio_postgres::Client,
) -> Result<Vec<(i16, Option<f64>)>, StoreError> {
    Ok(client
        .query(OLDEST_PENDING_BY_PRIORITY, &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get::<_, Option<f64>>(1).map(|s| s.max(0.0))))
        .collect())
}

/// The oldest of the per-priority ages.
fn oldest_of(ages: &[(i16, Option<f64>)]) -> Option<f64> {
    ages.iter().filter_map(|(_, age)| *age).reduce(f64::max)
}

const MESSAGE_COLUMNS: &str = concat!(
    "id, phone_number, content, status, attempts, next_attempt_at, \
     created_at, sent_at, provider_message_id, last_error, \
     idempotency_key, send_at, expires_at, priority, \
     delivery_status, delivered_at, delivery_error, lane, sender, provider, category, status_callback_url, ",
    delivery_key!()
);

/// A new message's status and error: `blocked` when its number is on the opt-out list
/// (`o`, one probe of its primary key per message, whatever the list's size), else
/// `pending` (docs/design.md#opt-outs).
const INTAKE_STATUS: &str = "
    CASE WHEN o.phone_number IS NULL THEN 'pending' ELSE 'blocked' END,
    CASE WHEN o.phone_number IS NOT NULL
         THEN 'the recipient opted out (' || o.source || ') on '
              || to_char(o.since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' END";

/// A cancel by hand. `next_attempt_at` records when, so retention counts a cancelled
/// message's period from its cancel (docs/design.md#retention).
const CANCEL: &str =
    "status = 'cancelled', last_error = 'cancelled through the API', next_attempt_at = now()";

impl Message {
    fn from_row(row: &Row) -> Self {
        let status_text: &str = row.get("status");
        let status = MessageStatus::parse(status_text).unwrap_or(MessageStatus::Pending);
        let content: Option<String> = row.get("content");
        let segmentation = content.as_deref().map(segment);
        let phone_number: String = row.get("phone_number");
        Self {
            id: row.get("id"),
            country: crate::domain::country_of(&phone_number),
            phone_number,
            content,
            status,
            sent: status == MessageStatus::Sent,
            attempts: row.get("attempts"),
            next_attempt_at: row.get("next_attempt_at"),
            created_at: row.get("created_at"),
            sent_at: row.get("sent_at"),
            message_id: row.get("provider_message_id"),
            last_error: row.get("last_error"),
            idempotency_key: row.get("idempotency_key"),
            delivery_key: row.get("delivery_key"),
            send_at: row.get("send_at"),
            expires_at: row.get("expires_at"),
            priority: row.get("priority"),
            lane: row.get("lane"),
            from: row.get("sender"),
            category: row.get("category"),
            status_callback_url: row.get("status_callback_url"),
            provider: row.get("provider"),
            encoding: segmentation.as_ref().map(|s| s.encoding),
            segments: segmentation.map(|s| s.segments),
            delivery_status: row
                .get::<_, Option<&str>>("delivery_status")
                .and_then(DeliveryStatus::parse),
            delivered_at: row.get("delivered_at"),
            delivery_error: row.get("delivery_error"),
        }
    }

    /// Whether this stored message is what `new` asks for (an idempotent repeat).
    fn matches(&self, new: &NewMessage) -> bool {
        self.phone_number == new.phone_number.as_str()
            // Text removed by CONTENT_RETENTION cannot be compared; the rest still is.
            && self.content.as_deref().is_none_or(|c| c == new.content.as_str())
            && self.send_at == new.send_at
            && self.expires_at == new.expires_at
            && self.priority == new.priority.get()
            && self.lane == new.lane
            && self.from.as_deref() == new.from.as_ref().map(Sender::as_str)
            && self.category.as_deref() == new.category.map(Category::as_str)
            && self.status_callback_url == new.status_callback_url
    }
}

impl Store {
    /// Inserts messages in one transaction and returns each item's row, in input order.
    /// An item whose idempotency key is already stored (by an earlier request, a
    /// concurrent one through another replica, or an earlier item of this one) gets
    /// that row instead of a new one: the unique index decides, so racing repeats
    /// create exactly one row. A key whose stored message differs rolls everything back.
    pub async fn insert_messages(&self, messages: &[NewMessage]) -> Result<Inserted, StoreError> {
        let phones: Vec<&str> = messages.iter().map(|m| m.phone_number.as_str()).collect();
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        let keys: Vec<Option<&str>> = messages
            .iter()
            .map(|m| m.idempotency_key.as_ref().map(IdempotencyKey::as_str))
            .collect();
        let send_at: Vec<Option<DateTime<Utc>>> = messages.iter().map(|m| m.send_at).collect();
        let expires_at: Vec<Option<DateTime<Utc>>> =
            messages.iter().map(|m| m.expires_at).collect();
        let priorities: Vec<i16> = messages.iter().map(|m| m.priority.get()).collect();
        let lanes: Vec<&str> = messages.iter().map(|m| m.lane.as_str()).collect();
        let senders: Vec<Option<&str>> = messages
            .iter()
            .map(|m| m.from.as_ref().map(Sender::as_str))
            .collect();
        let categories: Vec<Option<&str>> = messages
            .iter()
            .map(|m| m.category.map(Category::as_str))
            .collect();
        let callbacks: Vec<Option<&str>> = messages
            .iter()
            .map(|m| m.status_callback_url.as_deref())
            .collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if keys.iter().any(Option::is_some) {
            tx.execute(&tx.prepare_cached(LOCK_KEYS).await?, &[&keys])
                .await?;
        }
        let sql = format!(
            "INSERT INTO messages (phone_number, content, idempotency_key, send_at, expires_at,
                                   priority, lane, sender, category, status_callback_url,
                                   next_attempt_at, status, last_error)
             SELECT p, c, k, s, e, pr, l, f, cat, cb, greatest(now(), coalesce(s, now())),
                    {INTAKE_STATUS}
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                         $5::timestamptz[], $6::int2[], $7::text[], $8::text[], $9::text[],
                         $10::text[])
                  WITH ORDINALITY AS t(p, c, k, s, e, pr, l, f, cat, cb, n)
             LEFT JOIN LATERAL (SELECT phone_number, source, since FROM opt_outs
                                WHERE phone_number = t.p) AS o ON true
             ORDER BY n
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING {MESSAGE_COLUMNS}"
        );
        let mut created: Vec<Message> = tx
            .query(
                &sql,
                &[
                    &phones,
                    &contents,
                    &keys,
                    &send_at,
                    &expires_at,
                    &priorities,
                    &lanes,
                    &senders,
                    &categories,
                    &callbacks,
                ],
            )
            .await?
            .iter()
            .map(Message::from_row)
            .collect();
        created.sort_by_key(|m| m.id);
        // Taken out as items claim them: a key repeated within this request finds its
        // row already taken, so only its first item counts as having created it.
        let mut created_ids: std::collections::HashSet<i64> =
            created.iter().map(|m| m.id).collect();
        let given: Vec<&str> = keys.iter().flatten().copied().collect();
        let by_key: std::collections::HashMap<String, Message> = if given.is_empty() {
            Default::default()
        } else {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = ANY($1::text[])"
            );
            tx.query(&sql, &[&given])
                .await?
                .iter()
                .map(Message::from_row)
                .filter_map(|m| Some((m.idempotency_key.clone()?, m)))
                .collect()
        };
        // Rows created without a key, in id order, are the keyless items in input order.
        let mut keyless = created.into_iter().filter(|m| m.idempotency_key.is_none());
        let mut rows = Vec::with_capacity(messages.len());
        for (index, new) in messages.iter().enumerate() {
            let message = match &new.idempotency_key {
                None => keyless.next(),
                Some(key) => by_key.get(key.as_str()).cloned(),
            };
            let Some(message) = message else {
                return Err(StoreError::Invariant(format!(
                    "message {index} of the request was neither created nor found"
                )));
            };
            if !message.matches(new) {
                return Ok(Inserted::KeyConflict {
                    index,
                    existing_id: message.id,
                });
            }
            let created = created_ids.remove(&message.id);
            rows.push((message, created));
        }
        tx.commit().await?;
        Ok(Inserted::Rows(rows))
    }

    /// Inserts `count` demo messages in chunks; returns how many were inserted.
    pub async fn seed(&self, count: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let mut inserted = 0;
        while inserted < count {
            let chunk = (count - inserted).min(50_000) as i64;
            let n = client
                .execute(
                    "INSERT INTO messages (phone_number, content)
                     SELECT '+90555' || lpad((s % 10000000)::text, 7, '0'),
                            'Demo message ' || s || ' from message-dispatcher'
                     FROM generate_series($1::bigint + 1, $1::bigint + $2::bigint) AS s",
                    &[&(inserted as i64), &chunk],
                )
                .await?;
            inserted += n;
        }
        Ok(inserted)
    }

    /// Newest-first keyset page, filtered; its total counted up to [`TOTAL_BOUND`]
    /// rows unless `exact_total`.
    pub async fn list_messages(
        &self,
        filter: &ListFilter,
        cursor: Option<i64>,
        limit: i64,
        exact_total: bool,
    ) -> Result<Page, StoreError> {
        let client = self.client().await?;
        let status = filter.status.map(MessageStatus::as_str);
        let filters =
            "($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR phone_number = $2)
             AND ($3::timestamptz IS NULL OR created_at >= $3)
             AND ($4::timestamptz IS NULL OR created_at < $4)
             AND ($5::text IS NULL OR lane = $5)";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &status,
            &filter.phone_number,
            &filter.since,
            &filter.until,
            &filter.lane,
        ];
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE {filters} AND ($6::bigint IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7"
        );
        let paging: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&cursor, &(limit + 1)];
        let mut messages: Vec<Message> = client
            .query(&sql, &[&params[..], &paging[..]].concat())
            .await?
            .iter()
            .map(Message::from_row)
            .collect();
        let next_cursor = if messages.len() as i64 > limit {
            messages.truncate(limit as usize);
            messages.last().map(|m| m.id)
        } else {
            None
        };
        let count = if exact_total {
            format!("SELECT count(*) FROM messages WHERE {filters}")
        } else {
            format!(
                "SELECT count(*) FROM (SELECT 1 FROM messages WHERE {filters} LIMIT {}) AS m",
                TOTAL_BOUND + 1
            )
        };
        let counted: i64 = client.query_one(&count, &params).await?.get(0);
        let total_exact = exact_total || counted <= TOTAL_BOUND;
        Ok(Page {
            messages,
            total: if total_exact { counted } else { TOTAL_BOUND },
            total_exact,
            next_cursor,
        })
    }

    pub async fn get_message(&self, id: i64) -> Result<Option<Message>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        Ok(client
            .query_opt(&sql, &[&id])
            .await?
            .as_ref()
            .map(Message::from_row))
    }

    /// Moves a `failed` message back to `pending`, due now, with a fresh attempt count.
    pub async fn retry_failed(&self, id: i64) -> Result<StatusChange, StoreError> {
        self.change_status(
            id,
            "status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL",
            MessageStatus::Failed,
        )
        .await
    }

    /// Moves a `pending` message to `cancelled`. A claim takes rows with
    /// `FOR UPDATE SKIP LOCKED`, so this UPDATE either runs first (the claim skips or
    /// no longer sees the row) or waits for the claim and then finds it `sending`:
    /// a message is claimed or cancelled, never both.
    pub async fn cancel_pending(&self, id: i64) -> Result<StatusChange, StoreError> {
        self.change_status(id, CANCEL, MessageStatus::Pending).await
    }

    /// Moves every `failed` message `filter` selects back to `pending`, as
    /// [`Store::retry_failed`] does one; returns how many.
    pub async fn retry_all(&self, filter: &ListFilter) -> Result<u64, StoreError> {
        self.change_all(
            filter,
            "status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL",
        )
        .await
    }

    /// Cancels every `pending` message `filter` selects; returns how many. A row a
    /// claim holds right now is skipped: it is being sent (see
    /// [`Store::cancel_pending`]).
    pub async fn cancel_all(&self, filter: &ListFilter) -> Result<u64, StoreError> {
        self.change_all(filter, CANCEL).await
    }

    /// Applies `set` to every row `filter` selects (its status included), a thousand
    /// rows per statement, so that no transaction holds many rows (or the claim) for
    /// long.
    async fn change_all(&self, filter: &ListFilter, set: &str) -> Result<u64, StoreError> {
        const STEP: i64 = 1000;
        let status = filter.status.map(MessageStatus::as_str);
        let sql = format!(
            "UPDATE messages SET {set}
             WHERE id = ANY(ARRAY(
                 SELECT id FROM messages
                 WHERE status = $1 AND ($2::text IS NULL OR phone_number = $2)
                   AND ($3::timestamptz IS NULL OR created_at >= $3)
                   AND ($4::timestamptz IS NULL OR created_at < $4)
                   AND ($6::text IS NULL OR lane = $6) AND content IS NOT NULL
                 ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED))
               AND status = $1"
        );
        let client = self.client().await?;
        let statement = client.prepare(&sql).await?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    &statement,
                    &[
                        &status,
                        &filter.phone_number,
                        &filter.since,
                        &filter.until,
                        &STEP,
                        &filter.lane,
                    ],
                )
                .await?;
            total += n;
            if n < STEP as u64 {
                return Ok(total);
            }
        }
    }

    /// Applies `set` to message `id` if its status is `from`.
    async fn change_status(
        &self,
        id: i64,
        set: &str,
        from: MessageStatus,
    ) -> Result<StatusChange, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE messages SET {set} WHERE id = $1 AND status = $2 AND content IS NOT NULL
             RETURNING {MESSAGE_COLUMNS}"
        );
        if let Some(row) = client.query_opt(&sql, &[&id, &from.as_str()]).await? {
            return Ok(StatusChange::Changed(Box::new(Message::from_row(&row))));
        }
        // On the same connection: a second checkout while holding this one could wait
        // for a pool that every concurrent request holds the same way.
        let status = client
            .query_opt(
                "SELECT status, content IS NULL FROM messages WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(match status {
            Some(row) if row.get::<_, &str>(0) == from.as_str() && row.get::<_, bool>(1) => {
                StatusChange::ContentRemoved
            }
            Some(row) => StatusChange::Refused(
                MessageStatus::parse(row.get(0)).unwrap_or(MessageStatus::Pending),
            ),
            None => StatusChange::NotFound,
        })
    }

    /// Queue depth per status (from the counters) and the oldest pending age.
    pub async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let client = self.client().await?;
        let counts = client
            .query(
                "SELECT status, sum(n)::bigint FROM message_counts GROUP BY status",
                &[],
            )
            .await?
            .iter()
            .filter_map(|row| Some((MessageStatus::parse(row.get(0))?, row.get::<_, i64>(1))))
            .collect();
        let ages = oldest_pending_by_priority(&client).await?;
        Ok(QueueStats {
            counts,
            oldest_pending_age: oldest_of(&ages).map(Duration::from_secs_f64),
            oldest_pending_age_by_priority: ages
                .into_iter()
                .map(|(priority, age)| (priority, age.map(Duration::from_secs_f64)))
                .collect(),
        })
    }

    /// `GET /api/messages/stats`: counters and index probes, O(1) in the table size
    /// (the scheduled count reads only the scheduled rows' index entries).
    pub async fn message_stats(&self) -> Result<MessageStats, StoreError> {
        let client = self.client().await?;
        let counts = client
            .query("SELECT status, delivery, n FROM message_counts", &[])
            .await?;
        let mut by_status: std::collections::BTreeMap<&'static str, i64> =
            MessageStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut delivery: std::collections::BTreeMap<&'static str, i64> = DeliveryStatus::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .chain([("awaiting", 0)])
            .collect();
        for row in &counts {
            let (status, receipt, n): (&str, &str, i64) = (row.get(0), row.get(1), row.get(2));
            if let Some(status) = MessageStatus::parse(status) {
                *by_status.entry(status.as_str()).or_default() += n;
            }
            if let Some(receipt) = DeliveryStatus::parse(receipt) {
                *delivery.entry(receipt.as_str()).or_default() += n;
            } else if status == "sent" {
                *delivery.entry("awaiting").or_default() += n;
            }
        }
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM messages WHERE status = 'pending' AND send_at > now()),
                        (SELECT coalesce(sum(n), 0)::bigint FROM message_sent_seconds
                         WHERE second > now() - interval '1 minute'),
                        (SELECT coalesce(sum(n), 0)::bigint FROM message_sent_seconds
                         WHERE second > now() - interval '1 hour')",
                &[],
            )
            .await?;
        let ages = oldest_pending_by_priority(&client).await?;
        Ok(MessageStats {
            by_status,
            scheduled: row.get(0),
            oldest_pending_age_seconds: oldest_of(&ages),
            oldest_pending_age_seconds_by_priority: ages
                .into_iter()
                .map(|(priority, age)| (priority.to_string(), age))
                .collect(),
            sent_last_minute: row.get(1),
            sent_last_hour: row.get(2),
            delivery,
        })
    }

    /// Per lane: pending and sending counts, and sends in the last minute, from the
    /// counters (a few rows whatever the queue's size).
    pub async fn lane_counts(&self) -> Result<Vec<LaneCounts>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT lane,
                        coalesce(sum(n) FILTER (WHERE status = 'pending'), 0)::bigint,
                        coalesce(sum(n) FILTER (WHERE status = 'sending'), 0)::bigint,
                        (SELECT coalesce(sum(s.n), 0)::bigint FROM message_sent_seconds AS s
                         WHERE s.lane = c.lane AND s.second > now() - interval '1 minute')
                 FROM message_counts AS c GROUP BY lane",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| LaneCounts {
                lane: row.get(0),
                pending: row.get(1),
                sending: row.get(2),
                sent_last_minute: row.get(3),
            })
            .collect())
    }

    /// Drops per-second send counts older than an hour (the stats read the last hour).
    pub async fn prune_sent_seconds(&self) -> Result<u64, StoreError> {
        self.execute_prepared(
            "DELETE FROM message_sent_seconds WHERE second < now() - interval '1 hour'",
            &[],
        )
        .await
    }
}
