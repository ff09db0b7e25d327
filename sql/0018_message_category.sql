-- A message's category (docs/design.md#quiet-hours): `transactional` messages (a login
-- code, an order update) go out in a lane's quiet hours, the others wait for the
-- window to open. NULL (every existing row, and a message that names none) is held
-- like `marketing`.
--
-- A domain, like the other per-message formats (migration 0009): its rule is checked
-- when a value is written, not on every UPDATE of the row by the claim and the result.
CREATE DOMAIN message_category AS text
    CONSTRAINT messages_category_known CHECK (VALUE IN ('transactional', 'marketing'));
ALTER TABLE messages ADD COLUMN category message_category;
