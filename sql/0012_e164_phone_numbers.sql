-- Phone numbers are stored in E.164 (`+` and 8 to 15 digits; the API parses them with
-- libphonenumber's rules). The column's rule keeps accepting what it accepted before
-- (rows from older versions may hold national formats) and also takes the short
-- E.164 numbers of small countries (`+6834002`, Niue, is 8 characters).
--
-- The new rule is a superset of the old one, so every stored row obeys it: it is
-- added NOT VALID, without a scan of the table.
ALTER DOMAIN message_phone_number DROP CONSTRAINT messages_phone_number_format;
ALTER DOMAIN message_phone_number ADD CONSTRAINT messages_phone_number_format
    CHECK (char_length(VALUE) BETWEEN 8 AND 20 AND VALUE ~ '^\+?[0-9]+$') NOT VALID;
