-- One per-message result of the leader, as src/store/ runs it (MARK_SENT, its
-- own statement, autocommit), for pgbench -M prepared -c C. Client i marks the ids
-- first_id + i, first_id + i + C, first_id + i + 2C, ... (k counts its transactions;
-- pgbench keeps variables per client across transactions). scripts/bench/throughput.py
-- checks before every run that the UPDATE still matches MARK_SENT in src/store/.
-- Variables (pgbench -D): k=0, nclients=C, first_id, epoch, sent_at (a timestamptz),
-- provider_id (a uuid string); with -M prepared each becomes a bind parameter, as in the
-- service.
\set id :first_id + :client_id + :nclients * :k
\set k :k + 1
UPDATE messages
SET status = 'sent', sent_at = :sent_at, provider_message_id = :provider_id, last_error = NULL
WHERE id = :id AND status = 'sending' AND claim_epoch = :epoch;
