-- The listing index on (status, id) no longer holds `sending` rows, and runs in
-- ascending id order.
--
-- Every claim moves a row from `pending` to `sending`, and every result moves it on:
-- a new row version each time, and a new entry in every index whose predicate the
-- new version meets.
-- - The `sending` entries of this index served nothing the partial
--   `messages_sending_claimed_idx` does not (the rescue, the release of a claim); a
--   listing of `sending` rows reads that index and sorts what it finds (at most the
--   rows of the batches in flight). Without them the claim writes one index entry
--   less per message.
-- - In `(status, id DESC)` each new entry went to the left end of its status's range,
--   so pages split in the middle of the index; in ascending order new `sent` rows go
--   to the right end of the index, where PostgreSQL splits pages cheaply. A listing,
--   newest first, scans it backward.
-- Together: 269.6k -> 243.4k PostgreSQL instructions per dispatched message (-10 %),
-- by scripts/bench-pg-cost.sh.
--
-- The new index is built before the old one is dropped, in this migration's
-- transaction: writes to `messages` wait for the build (the README gives its time).
CREATE INDEX messages_status_id_partial_idx ON messages (status, id)
    WHERE status <> 'sending';
DROP INDEX messages_status_id_idx;
ALTER INDEX messages_status_id_partial_idx RENAME TO messages_status_id_idx;
