-- Retention: finished messages are removed, and their text blanked, after
-- MESSAGE_RETENTION and CONTENT_RETENTION (docs/design.md#retention).
--
-- The counters behind the stats count what happened, not what is still stored: a
-- finished row that is removed (by retention or by hand) leaves them as they are, so
-- "sent" stays the number of messages ever sent. Removing a row that is still in the
-- queue (pending or sending) takes it out of the queue counts, as before.
CREATE OR REPLACE FUNCTION messages_count_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, lane, n)
    SELECT status, coalesce(delivery_status, ''), lane, -count(*) FROM old_rows
    WHERE status IN ('pending', 'sending')
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (status, delivery, lane) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

-- A finished message's text may be removed (CONTENT_RETENTION): `content` becomes NULL,
-- which the API shows as null. A message in the queue still needs its text. The rule is
-- a NULL test, so the claim and the result write, which evaluate every table CHECK on
-- every UPDATE, pay next to nothing for it. NOT VALID: every existing row has text, so
-- the table is not scanned under the migration's lock.
ALTER TABLE messages ALTER COLUMN content DROP NOT NULL;
ALTER TABLE messages ADD CONSTRAINT messages_content_kept
    CHECK (content IS NOT NULL OR status IN ('sent', 'failed', 'expired', 'cancelled'))
    NOT VALID;
