-- Real providers and failover between them (docs/design.md#failover).
--
-- messages.sender: the message's own "from" (E.164 or an alphanumeric sender); NULL
--   takes the lane's or the provider's default.
-- messages.provider: the provider its current or last send went to, written by the
--   claim; once the message is sent, the provider that took it.
-- messages.pinned_provider: set when a send's outcome is unknown (a timeout, a
--   connection cut after the request was written, a claim abandoned by a crashed
--   leader). Such a message may have been taken, so it is retried only through that
--   provider, under the same delivery key, never moved to another.
-- dispatcher_leader.routing: the lane leader's breakers, throttles and effective rate
--   as of its last batch, for GET /api/lanes on any replica.
ALTER TABLE messages
    ADD COLUMN sender text,
    ADD COLUMN provider text,
    ADD COLUMN pinned_provider text;

ALTER TABLE dispatcher_leader ADD COLUMN routing jsonb;

-- delivery_receipts_pending.provider: the provider whose endpoint a kept receipt came
--   through (/api/providers/{name}/receipts), so it applies only to that provider's
--   message; NULL (/api/delivery-receipts) applies to whichever carries the id.
ALTER TABLE delivery_receipts_pending ADD COLUMN provider text;
