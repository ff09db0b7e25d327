-- Lanes: several rate domains, each with its own leader (docs/design.md#lanes).
--
-- dispatcher_leader and dispatcher_control hold one row per lane, with the same id and
-- the lane's name (the new code finds them by name). The row that exists (id 1)
-- becomes the lane "default", so a replica of the
-- previous release, which reads and writes id 1 only, keeps leading "default" beside
-- new replicas during a rolling upgrade. A replica adds the rows of the lanes its
-- DISPATCH_CONFIG names at start.
ALTER TABLE dispatcher_leader DROP CONSTRAINT dispatcher_leader_single_row;
ALTER TABLE dispatcher_leader ADD COLUMN lane text;
UPDATE dispatcher_leader SET lane = 'default' WHERE id = 1;
ALTER TABLE dispatcher_leader ALTER COLUMN lane SET NOT NULL;
ALTER TABLE dispatcher_leader ADD CONSTRAINT dispatcher_leader_lane_unique UNIQUE (lane);

ALTER TABLE dispatcher_control DROP CONSTRAINT dispatcher_control_single_row;
ALTER TABLE dispatcher_control ADD COLUMN lane text;
UPDATE dispatcher_control SET lane = 'default' WHERE id = 1;
ALTER TABLE dispatcher_control ALTER COLUMN lane SET NOT NULL;
ALTER TABLE dispatcher_control ADD CONSTRAINT dispatcher_control_lane_unique UNIQUE (lane);
ALTER TABLE dispatcher_control
    ADD CONSTRAINT dispatcher_control_lane_row FOREIGN KEY (id) REFERENCES dispatcher_leader (id);

-- messages.lane: the lane a message is sent through, chosen at intake (named, or by
--   route). Rows from before this file, and rows an older replica inserts, go through
--   "default".
-- messages.claim_lane: the lane whose leader claimed the row, so each lane's rescue
--   returns only its own leader's claims (the epochs of two lanes are unrelated). NULL
--   (a claim by an older replica) counts as "default", whose epoch it carries.
ALTER TABLE messages
    ADD COLUMN lane text NOT NULL DEFAULT 'default',
    ADD COLUMN claim_lane text;

-- The claim, per lane: most urgent first, FIFO within a priority.
CREATE INDEX messages_pending_lane_claim_idx ON messages (lane, priority DESC, created_at, id)
    WHERE status = 'pending';
DROP INDEX messages_pending_claim_idx;

-- Replicas that know lanes say so. Lanes other than "default" wait while a replica of
-- an older release is live: its claim takes pending rows of every lane.
ALTER TABLE dispatcher_replicas
    ADD COLUMN lanes boolean NOT NULL DEFAULT false,
    ADD COLUMN leader_eligible boolean NOT NULL DEFAULT true;

-- The counters behind the stats and the queue gauges, per lane as well, so
-- GET /api/lanes reads a few rows instead of counting a lane's queue. Readers that sum
-- over the other columns (an older replica) read the same totals as before.
ALTER TABLE message_counts ADD COLUMN lane text NOT NULL DEFAULT 'default';
ALTER TABLE message_counts DROP CONSTRAINT message_counts_pkey;
ALTER TABLE message_counts ADD PRIMARY KEY (status, delivery, lane);
ALTER TABLE message_sent_seconds ADD COLUMN lane text NOT NULL DEFAULT 'default';
ALTER TABLE message_sent_seconds DROP CONSTRAINT message_sent_seconds_pkey;
ALTER TABLE message_sent_seconds ADD PRIMARY KEY (second, lane);

CREATE OR REPLACE FUNCTION messages_count_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, lane, n)
    SELECT status, coalesce(delivery_status, ''), lane, count(*) FROM new_rows
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (status, delivery, lane) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION messages_count_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, lane, n)
    SELECT status, delivery, lane, sum(d) FROM (
        SELECT status, coalesce(delivery_status, '') AS delivery, lane, 1 AS d FROM new_rows
        UNION ALL
        SELECT status, coalesce(delivery_status, ''), lane, -1 FROM old_rows
    ) AS x
    GROUP BY 1, 2, 3 HAVING sum(d) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (status, delivery, lane) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO message_sent_seconds AS s (second, lane, n)
    SELECT second, lane, sum(d) FROM (
        SELECT date_trunc('second', sent_at) AS second, lane, 1 AS d FROM new_rows WHERE status = 'sent'
        UNION ALL
        SELECT date_trunc('second', sent_at), lane, -1 FROM old_rows WHERE status = 'sent'
    ) AS x
    WHERE second > now() - interval '1 hour'
    GROUP BY 1, 2 HAVING sum(d) <> 0 ORDER BY 1, 2
    ON CONFLICT (second, lane) DO UPDATE SET n = s.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION messages_count_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts AS c (status, delivery, lane, n)
    SELECT status, coalesce(delivery_status, ''), lane, -count(*) FROM old_rows
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (status, delivery, lane) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO message_sent_seconds AS s (second, lane, n)
    SELECT date_trunc('second', sent_at), lane, -count(*) FROM old_rows
    WHERE status = 'sent' AND sent_at > now() - interval '1 hour' GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (second, lane) DO UPDATE SET n = s.n + excluded.n;
    RETURN NULL;
END $$;
