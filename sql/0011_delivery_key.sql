-- Every message gets a delivery key: the Idempotency-Key sent to the provider.
--
-- A bare row id is no such key: a second database, a restored backup or a fresh
-- install sending through the same provider account has rows 1, 2, 3, ... too, and a
-- provider that honours keys drops those messages as repeats while answering 2xx. A
-- random UUID made with the row is unique across every database and install.
--
-- Rows that exist at upgrade keep NULL here and keep sending under the key they
-- already used, their id (`coalesce(delivery_key::text, id::text)` everywhere the
-- key is read): a message claimed or in flight during the upgrade is never re-sent
-- under a new key. The column is added without a default and the default set
-- afterwards, so existing rows are not rewritten and keep NULL (a volatile default
-- given with ADD COLUMN would fill every existing row with a fresh UUID).
ALTER TABLE messages ADD COLUMN delivery_key uuid;
ALTER TABLE messages ALTER COLUMN delivery_key SET DEFAULT gen_random_uuid();
