-- The epoch whose leader opened the newest batch.
--
-- A leader that finds the newest batch open waits until no send of the term that
-- opened it can start any more (quiet_at, or its own start plus the fence window):
-- that term's last sends are unknown to it. Its own open batch, whose every send its
-- pacer has seen, needs no such wait; until now it got one all the same, so a new
-- leader claimed at most one batch per poll for a fence window after its start.
-- NULL (rows from before this file) counts as another term's batch.
ALTER TABLE dispatcher_leader ADD COLUMN batch_epoch bigint;
