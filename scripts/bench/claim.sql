-- One claim of the leader, as src/store/queue.rs runs it, for pgbench -M prepared -c 1:
-- the claim transaction (LOCK_FENCE, READ_SCHEDULE, RESCUE, CLAIM, then last_batch_at
-- and batch_open), and the CLOSE_BATCH statement the leader runs once the batch's
-- results are recorded (its own statement, autocommit). Same SQL text as the service;
-- each $n is a pgbench variable (-D batch, interval_ms, epoch, claim_age_ms,
-- term_age_ms, replica), which -M prepared binds as a parameter, as the service does.
-- bench_lib.py checks before every run that these statements still match
-- src/store/queue.rs.
BEGIN;
SELECT epoch FROM dispatcher_leader WHERE id = 1 FOR UPDATE;
SELECT coalesce(c.running, false) AS running,
       coalesce(c.batch_size, :batch::int) AS batch_size,
       s.interval_ms,
       ceil(extract(epoch FROM (
            CASE WHEN l.batch_open
                 THEN greatest(l.last_batch_at, l.acquired_at)
                 ELSE l.last_batch_at
            END + s.interval_ms * interval '1 millisecond' - clock_timestamp())) * 1000)::bigint AS wait_ms
FROM dispatcher_leader l
CROSS JOIN dispatcher_control c
CROSS JOIN LATERAL (SELECT coalesce(c.processing_interval_ms, :interval_ms::bigint) AS interval_ms) s
WHERE l.id = 1 AND c.id = 1;
UPDATE messages AS m
SET status = 'pending',
    next_attempt_at = now(),
    last_error = 'claim by ' || coalesce(m.claimed_by, '?') || ' (epoch ' || m.claim_epoch || ') never completed; rescued'
FROM dispatcher_leader l
WHERE l.id = 1
  AND m.status = 'sending'
  AND m.claim_epoch <= :epoch::bigint
  AND m.claimed_at < now() - :claim_age_ms::bigint * interval '1 millisecond'
  AND (m.claim_epoch = :epoch::bigint OR l.acquired_at < now() - :term_age_ms::bigint * interval '1 millisecond');
WITH due AS (
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY created_at, id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
UPDATE messages AS m
SET status = 'sending', claim_epoch = :epoch, claimed_by = :replica, claimed_at = now(), attempts = m.attempts + 1
FROM due
WHERE m.id = due.id
RETURNING m.id, m.phone_number, m.content, m.attempts, m.created_at;
UPDATE dispatcher_leader SET last_batch_at = clock_timestamp(), batch_open = true WHERE id = 1;
COMMIT;
UPDATE dispatcher_leader SET batch_open = false WHERE id = 1 AND epoch = :epoch;
