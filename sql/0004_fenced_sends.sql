-- Sends are fenced, not only claims and results (SPEC §6 steps 6 and 8).
--
-- recent_sends: when the newest sends started (PostgreSQL's clock, an upper bound),
-- written when a batch closes. A new leader seeds its send pacer from it, so no more
-- than BATCH_SIZE sends start within any PROCESSING_INTERVAL across a handover.
ALTER TABLE dispatcher_leader ADD COLUMN recent_sends timestamptz[] NOT NULL DEFAULT '{}';

-- claim_token: a random number chosen by the claimer for each claim. When the reply
-- to a claim's COMMIT is lost, the claimer does not know whether the rows are now
-- its own; it returns exactly those rows (attempt not counted) by this token before
-- it claims again, instead of leaving them `sending` for the rescue.
ALTER TABLE messages ADD COLUMN claim_token bigint;
