-- What the dispatcher did each second (sent, failed, retried), for the operator
-- console's chart. The leader adds what its own counters gained, with one upsert per
-- second in which something happened (never a statement per message); every
-- replica's housekeeping drops rows older than an hour. Cluster-wide and kept in
-- PostgreSQL, so the chart survives page loads, follower pages and leader changes.
CREATE TABLE message_activity_seconds (
    second  timestamptz PRIMARY KEY,
    sent    bigint NOT NULL DEFAULT 0,
    failed  bigint NOT NULL DEFAULT 0,
    retried bigint NOT NULL DEFAULT 0
);
