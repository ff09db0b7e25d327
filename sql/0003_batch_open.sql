-- Whether the newest batch is still being sent. A leader closes its batch once every
-- result is recorded. A new leader that finds the batch still open took over from a
-- leader that died mid-batch and cannot know when that leader's last send went out,
-- so it waits one full interval after its own acquisition before its first batch.
ALTER TABLE dispatcher_leader ADD COLUMN batch_open boolean NOT NULL DEFAULT false;
