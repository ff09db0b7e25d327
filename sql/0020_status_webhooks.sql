-- Status webhooks (docs/design.md#status-webhooks): every status change of a message is
-- written, in the transaction that makes it, as an event to post to the customer's
-- endpoint; replicas post them, signed, and retry for 24 hours.
--
-- messages.status_callback_url: the endpoint of this message's events; NULL: the
--   replicas' STATUS_WEBHOOK_URL, when set.
ALTER TABLE messages ADD COLUMN status_callback_url text;

-- Whether the replicas post status webhooks (STATUS_WEBHOOK_URL is set); kept by every
-- replica at start, like the intake rules. Without it, and without a message's own
-- URL, no event is written.
ALTER TABLE dispatcher_intake ADD COLUMN status_webhooks boolean NOT NULL DEFAULT false;

CREATE TABLE webhook_events (
    id              bigserial PRIMARY KEY,
    -- The Standard Webhooks `webhook-id`: the same on every attempt, unique across
    -- databases (a receiver deduplicates by it).
    webhook_id      text NOT NULL UNIQUE,
    message_id      bigint NOT NULL,
    type            text NOT NULL,
    -- The message's own endpoint; NULL: STATUS_WEBHOOK_URL when it is posted.
    url             text,
    -- The body posted, the same bytes on every attempt.
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Retries stop 24 hours after this (a replay starts it again).
    window_start    timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending'
        CONSTRAINT webhook_events_status_known CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- Due then; while a replica posts it, the end of its lease.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX webhook_events_due_idx ON webhook_events (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX webhook_events_failed_idx ON webhook_events (id) WHERE status = 'failed';
CREATE INDEX webhook_events_delivered_idx ON webhook_events (delivered_at) WHERE status = 'delivered';

-- The body of an event of type `event_type` about the message `m`: the Standard
-- Webhooks shape `{"type", "timestamp", "data"}`.
CREATE FUNCTION message_event_payload(event_type text, m messages) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'type', event_type,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', jsonb_build_object(
            'id', m.id,
            'status', m.status,
            'phone_number', m.phone_number,
            'lane', m.lane,
            'provider', m.provider,
            'message_id', m.provider_message_id,
            'idempotency_key', m.idempotency_key,
            'attempts', m.attempts,
            'error', CASE WHEN event_type IN ('message.delivered', 'message.undelivered')
                          THEN m.delivery_error ELSE m.last_error END,
            'delivery_status', m.delivery_status,
            'created_at', m.created_at,
            'sent_at', m.sent_at,
            'delivered_at', m.delivered_at))
$$;

-- Whether events are written for rows without an endpoint of their own.
CREATE FUNCTION status_webhooks_on() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT status_webhooks FROM dispatcher_intake WHERE id = 1), false)
$$;

-- The events of an UPDATE's rows (old and new side by side): a status that ends a
-- message's life, a delivery receipt. Written only while webhooks are on or the row
-- names its own endpoint; the early return keeps the dispatch path's statements (the
-- claim, the results) at one probe of dispatcher_intake when webhooks are off.
CREATE FUNCTION messages_status_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT status_webhooks_on()
       AND NOT EXISTS (SELECT 1 FROM new_rows WHERE status_callback_url IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (webhook_id, message_id, type, url, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), n.id, e.type, n.status_callback_url,
           message_event_payload(e.type, n)
    FROM new_rows AS n
    JOIN old_rows AS o ON o.id = n.id
    CROSS JOIN LATERAL (VALUES
        (CASE WHEN n.status IS DISTINCT FROM o.status
                   AND n.status IN ('sent', 'failed', 'expired', 'cancelled', 'blocked')
              THEN 'message.' || n.status END),
        (CASE WHEN n.delivery_status IS DISTINCT FROM o.delivery_status
                   AND n.delivery_status IS NOT NULL
              THEN CASE n.delivery_status WHEN 'delivered' THEN 'message.delivered'
                                          ELSE 'message.undelivered' END END)
    ) AS e(type)
    WHERE e.type IS NOT NULL
      AND (n.status_callback_url IS NOT NULL
           OR status_webhooks_on())
    ORDER BY n.id;
    RETURN NULL;
END $$;

-- An insert's only event: a message blocked at intake.
CREATE FUNCTION messages_insert_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status = 'blocked') THEN
        RETURN NULL;
    END IF;
    IF NOT status_webhooks_on()
       AND NOT EXISTS (SELECT 1 FROM new_rows WHERE status_callback_url IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (webhook_id, message_id, type, url, payload)
    SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), n.id, 'message.blocked',
           n.status_callback_url,
           message_event_payload('message.blocked', n)
    FROM new_rows AS n
    WHERE n.status = 'blocked'
      AND (n.status_callback_url IS NOT NULL
           OR status_webhooks_on())
    ORDER BY n.id;
    RETURN NULL;
END $$;

CREATE TRIGGER messages_status_events AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messages_status_events();
CREATE TRIGGER messages_insert_events AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messages_insert_events();
