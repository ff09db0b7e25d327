-- The schema as it was before migration 0009: the format rules as table CHECK
-- constraints, which PostgreSQL evaluates on every UPDATE of a row. Applied to a
-- migrated database by scripts/bench/pg_cost.py (its before-0009 variant) and by the upgrade
-- test format_rules_move_to_domains_on_a_populated_table.
ALTER TABLE messages
    ALTER COLUMN phone_number TYPE varchar(20),
    ALTER COLUMN content TYPE text,
    ALTER COLUMN idempotency_key TYPE text,
    ADD CONSTRAINT messages_phone_number_format
        CHECK (char_length(phone_number) BETWEEN 10 AND 20 AND phone_number ~ '^\+?[0-9]+$'),
    ADD CONSTRAINT messages_content_not_empty CHECK (char_length(btrim(content)) > 0),
    ADD CONSTRAINT messages_idempotency_key_format CHECK (idempotency_key ~ '^[!-~]{1,255}$');
DROP DOMAIN message_phone_number;
DROP DOMAIN message_content;
DROP DOMAIN message_idempotency_key;
