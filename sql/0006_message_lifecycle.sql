-- The message lifecycle: idempotent intake, scheduled and expiring messages,
-- priority, cancel, delivery receipts, and counts that stay cheap on a big table.
--
-- Existing rows keep working: every new column is NULL or has a default, and the
-- generated `sent` column keeps its meaning (status = 'sent').

ALTER TABLE messages DROP CONSTRAINT messages_status_known;
ALTER TABLE messages ADD CONSTRAINT messages_status_known
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'expired', 'cancelled'));

ALTER TABLE messages
    -- Chosen by the client; a repeat with the same key returns the first row.
    ADD COLUMN idempotency_key text
        CONSTRAINT messages_idempotency_key_format
        CHECK (idempotency_key ~ '^[!-~]{1,255}$'),
    -- Not dispatched before this time (next_attempt_at starts at it).
    ADD COLUMN send_at timestamptz,
    -- Never sent at or after this time: the message becomes `expired` instead.
    ADD COLUMN expires_at timestamptz,
    -- SMPP priority_flag: 3 is the most urgent. Due messages go out by priority, then FIFO.
    ADD COLUMN priority smallint NOT NULL DEFAULT 0
        CONSTRAINT messages_priority_range CHECK (priority BETWEEN 0 AND 3),
    -- From the provider's delivery receipts; NULL until one arrives.
    ADD COLUMN delivery_status text
        CONSTRAINT messages_delivery_status_known
        CHECK (delivery_status IN ('delivered', 'undelivered', 'failed')),
    ADD COLUMN delivered_at timestamptz,
    ADD COLUMN delivery_error text;

-- Concurrent repeats of a key (through any replica) create exactly one row.
CREATE UNIQUE INDEX messages_idempotency_key_idx ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The claim: due pending rows, most urgent first, then FIFO. Replaces the FIFO index.
DROP INDEX messages_pending_fifo_idx;
CREATE INDEX messages_pending_claim_idx ON messages (priority DESC, created_at, id)
    WHERE status = 'pending';

-- The expiry sweep at claim time, and the count of scheduled messages.
CREATE INDEX messages_pending_expiry_idx ON messages (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE INDEX messages_pending_scheduled_idx ON messages (send_at)
    WHERE status = 'pending' AND send_at IS NOT NULL;

-- Delivery receipts name the provider's id.
CREATE INDEX messages_provider_message_id_idx ON messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Receipts that arrived before their message's send result was recorded (the provider
-- answers, then calls back at once). Applied as soon as a message carries the id.
CREATE TABLE delivery_receipts_pending (
    provider_message_id text PRIMARY KEY,
    status              text NOT NULL
        CONSTRAINT delivery_receipts_pending_status_known
        CHECK (status IN ('delivered', 'undelivered', 'failed')),
    error_code          text,
    delivered_at        timestamptz,
    received_at         timestamptz NOT NULL DEFAULT now()
);

-- Row counts per (status, delivery status), kept by statement-level triggers, so the
-- stats endpoint and the queue gauges read a handful of rows instead of counting the
-- table. `delivery` is '' for no receipt yet.
CREATE TABLE message_counts (
    status   text NOT NULL,
    delivery text NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (status, delivery)
);
INSERT INTO message_counts (status, delivery, n)
SELECT status, coalesce(delivery_status, ''), count(*) FROM messages GROUP BY 1, 2;

-- Sends per second of sent_at, for "sent in the last minute / hour"; older than an
-- hour is pruned.
CREATE TABLE message_sent_seconds (
    second timestamptz PRIMARY KEY,
    n      bigint NOT NULL
);
INSERT INTO message_sent_seconds (second, n)
SELECT date_trunc('second', sent_at), count(*) FROM messages
WHERE status = 'sent' AND sent_at > now() - interval '1 hour' GROUP BY 1;

-- The triggers below upsert counters in key order, so two statements never lock the
-- same counters in opposite orders (no deadlock between the claim, the results and
-- the API).
CREATE FUNCTION messages_count_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, n)
    SELECT status, coalesce(delivery_status, ''), count(*) FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (status, delivery) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION messages_count_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, n)
    SELECT status, delivery, sum(d) FROM (
        SELECT status, coalesce(delivery_status, '') AS delivery, 1 AS d FROM new_rows
        UNION ALL
        SELECT status, coalesce(delivery_status, ''), -1 FROM old_rows
    ) AS x
    GROUP BY 1, 2 HAVING sum(d) <> 0 ORDER BY 1, 2
    ON CONFLICT (status, delivery) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO message_sent_seconds AS s (second, n)
    SELECT second, sum(d) FROM (
        SELECT date_trunc('second', sent_at) AS second, 1 AS d FROM new_rows WHERE status = 'sent'
        UNION ALL
        SELECT date_trunc('second', sent_at), -1 FROM old_rows WHERE status = 'sent'
    ) AS x
    WHERE second > now() - interval '1 hour'
    GROUP BY 1 HAVING sum(d) <> 0 ORDER BY 1
    ON CONFLICT (second) DO UPDATE SET n = s.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION messages_count_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, n)
    SELECT status, coalesce(delivery_status, ''), -count(*) FROM old_rows GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (status, delivery) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO message_sent_seconds AS s (second, n)
    SELECT date_trunc('second', sent_at), -count(*) FROM old_rows
    WHERE status = 'sent' AND sent_at > now() - interval '1 hour' GROUP BY 1 ORDER BY 1
    ON CONFLICT (second) DO UPDATE SET n = s.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION messages_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM message_counts;
    DELETE FROM message_sent_seconds;
    RETURN NULL;
END $$;

CREATE TRIGGER messages_count_inserts AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION messages_count_inserts();
CREATE TRIGGER messages_count_updates AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messages_count_updates();
CREATE TRIGGER messages_count_deletes AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION messages_count_deletes();
CREATE TRIGGER messages_count_truncate AFTER TRUNCATE ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION messages_count_truncate();
