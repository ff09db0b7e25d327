-- One `message.undelivered` event per message (docs/design.md#status-webhooks): a
-- receipt that moves a message from `undelivered` to `failed` (both undelivered to the
-- customer) changed the row but not the event type, and migration 0020's trigger wrote
-- a second `message.undelivered` with a new webhook-id, which a receiver could not
-- tell from a new event. The event is now written only when the receipt's event type
-- changes: none to delivered or undelivered, or undelivered to delivered.
CREATE OR REPLACE FUNCTION messages_status_events() RETURNS trigger LANGUAGE plpgsql AS $$
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
        (CASE WHEN n.delivery_status IS NOT NULL
                   -- NULL (no receipt yet) differs from both.
                   AND (n.delivery_status = 'delivered')
                       IS DISTINCT FROM (o.delivery_status = 'delivered')
              THEN CASE n.delivery_status WHEN 'delivered' THEN 'message.delivered'
                                          ELSE 'message.undelivered' END END)
    ) AS e(type)
    WHERE e.type IS NOT NULL
      AND (n.status_callback_url IS NOT NULL
           OR status_webhooks_on())
    ORDER BY n.id;
    RETURN NULL;
END $$;
