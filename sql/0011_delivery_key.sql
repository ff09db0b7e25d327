-- Every message gets a delivery key: the Idempotency-Key sent to the provider.
--
-- A bare row id is no such key: a second database, a restored backup or a fresh
-- install sending through the same provider account has rows 1, 2, 3, ... too, and a
-- provider that honours keys drops those messages as repeats while answering 2xx. A
-- random UUID made with the row is unique across every database and install.
--
-- A message must never be re-sent under another key than its earlier attempts used
-- (the provider could not tell the repeat). Replicas of earlier versions send the id:
-- - rows that exist now keep NULL here (the column is added without a default and the
--   default set afterwards, so no existing row is rewritten or given a key) and are
--   sent under their id;
-- - delivery_key_sent is set by every claim of this version: a row with attempts but
--   without it was sent by an earlier version (during a rolling upgrade), under its
--   id, and this version's claim drops its key so it goes on under its id.
-- The key a message is sent under is therefore
--   CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE THEN id::text
--        ELSE coalesce(delivery_key::text, id::text) END.
ALTER TABLE messages
    ADD COLUMN delivery_key uuid,
    ADD COLUMN delivery_key_sent boolean;
ALTER TABLE messages ALTER COLUMN delivery_key SET DEFAULT gen_random_uuid();
