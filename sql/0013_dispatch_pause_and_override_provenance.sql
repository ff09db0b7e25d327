-- Dispatch paused while the cluster runs, and who set each runtime override when.
--
-- paused_reason: why the leader sends nothing but a probe now and then, though the
--   desired state is running. 'provider_auth': the provider answered 401 or 403, so
--   our credentials are wrong, not the messages; they wait in pending without
--   spending an attempt. Set by the leader; cleared by the first accepted probe, a
--   configuration change or a start through the API. paused_at / paused_detail: since
--   when, and the provider's answer.
-- batch_size_set_at / _by, interval_set_at / _by: when and by whom each override was
--   set, so the console and the status can say which configured value it shadows.
--   Overrides that exist already get the row's last update.
ALTER TABLE dispatcher_control
    ADD COLUMN paused_reason text,
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN paused_detail text,
    ADD COLUMN batch_size_set_at timestamptz,
    ADD COLUMN batch_size_set_by text,
    ADD COLUMN interval_set_at timestamptz,
    ADD COLUMN interval_set_by text;
UPDATE dispatcher_control
SET batch_size_set_at = CASE WHEN batch_size IS NOT NULL THEN updated_at END,
    batch_size_set_by = CASE WHEN batch_size IS NOT NULL THEN updated_by END,
    interval_set_at = CASE WHEN processing_interval_ms IS NOT NULL THEN updated_at END,
    interval_set_by = CASE WHEN processing_interval_ms IS NOT NULL THEN updated_by END;
