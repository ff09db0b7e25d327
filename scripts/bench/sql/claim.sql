-- One claim of the leader, as src/store/ runs it, for pgbench -M prepared -c 1:
-- the claim transaction (LOCK_FENCE, READ_SCHEDULE, EXPIRE_DUE, CLAIM, then OPEN_BATCH), and the CLOSE_BATCH statement the leader runs once the batch's results
-- are recorded (its own statement, autocommit). Same SQL text as the service; each $n
-- is a pgbench variable (-D batch, interval_ms, window_ms, epoch, replica, token,
-- ages, opened_at), which -M prepared binds as a parameter, as the service does.
-- scripts/bench/throughput.py checks before every run that these statements still
-- match src/store/.
BEGIN;
SELECT epoch FROM dispatcher_leader WHERE id = 1 FOR UPDATE;
SELECT coalesce(c.running, false) AS running,
       c.paused_reason,
       coalesce(c.batch_size, :batch::int) AS batch_size,
       s.interval_ms,
       ceil(extract(epoch FROM (
            CASE WHEN l.batch_open AND l.batch_epoch IS DISTINCT FROM l.epoch
                 THEN greatest(l.last_batch_at, coalesce(l.quiet_at, l.acquired_at + :window_ms::bigint * interval '1 millisecond'))
                 ELSE l.last_batch_at
            END + s.interval_ms * interval '1 millisecond' - clock_timestamp())) * 1000)::bigint AS wait_ms,
       ARRAY(SELECT (extract(epoch FROM clock_timestamp() - r) * 1000000)::bigint
             FROM unnest(l.recent_sends) AS r) AS recent_send_ages_us
FROM dispatcher_leader l
CROSS JOIN dispatcher_control c
CROSS JOIN LATERAL (SELECT coalesce(c.processing_interval_ms, :interval_ms::bigint) AS interval_ms) s
WHERE l.id = 1 AND c.id = 1;
UPDATE messages
SET status = 'expired',
    last_error = 'expired at ' || (expires_at AT TIME ZONE 'UTC')::text
                 || ' UTC' || ' before it was sent'
WHERE status = 'pending' AND expires_at <= now();
UPDATE messages
SET status = 'sending', claim_epoch = :epoch, claimed_by = :replica, claimed_at = now(),
    claim_token = :token, attempts = attempts + 1,
    delivery_key = CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE
                        THEN NULL ELSE delivery_key END,
    delivery_key_sent = true
WHERE id = ANY(ARRAY(
    SELECT id FROM messages
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY priority DESC, created_at, id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
))
RETURNING id, phone_number, content, attempts, created_at, priority, expires_at, CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE THEN id::text ELSE coalesce(delivery_key::text, id::text) END AS delivery_key;
UPDATE dispatcher_leader SET last_batch_at = clock_timestamp(), batch_open = true, batch_epoch = epoch WHERE id = 1 RETURNING last_batch_at;
COMMIT;
UPDATE dispatcher_leader
SET batch_open = batch_open AND last_batch_at IS DISTINCT FROM :opened_at,
    recent_sends = ARRAY(SELECT clock_timestamp() - age * interval '1 microsecond'
                         FROM unnest(:ages::bigint[]) AS age)
WHERE id = 1 AND epoch = :epoch;
