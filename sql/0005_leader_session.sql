-- Fast failover (the leader's PostgreSQL session tells followers when it dies).
--
-- lease_token: the Redis lease token of the current term, so a follower that saw the
--   leader's session end can replace exactly that term's key (compare-and-swap),
--   never a newer one.
-- session_pid: the backend pid of the leader's fence session, which holds the leader
--   advisory lock for the whole term; NULL until it does, and again once the leader
--   leaves cleanly.
-- quiet_at: from when no send of an older epoch can start. A normal takeover sets it
--   one fence window after the epoch bump; a takeover after the old leader's session
--   ended, which waits that window out before the bump, sets it to the bump itself.
--   A new leader that finds the last batch open waits an interval after it.
ALTER TABLE dispatcher_leader
    ADD COLUMN lease_token text,
    ADD COLUMN session_pid integer,
    ADD COLUMN quiet_at    timestamptz;
