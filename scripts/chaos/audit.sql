-- Audit triggers for scripts/chaos/run.sh, installed in the soak's own throw-away database
-- after `migrate`: they record, with the writing transaction's id and PostgreSQL's
-- clock, every status change of a message (claims, results, retries, rescues, releases)
-- and every change of the fence row (epoch bumps, batch starts). The checks read them
-- to group claims into batches, to measure the gaps between batch starts, and to show
-- the claim history of a message that reached the provider twice. Both record the lane
-- (docs/design.md#lanes): the fence rows are one per lane, with epochs of their own, so
-- batches, gaps and terms are checked per lane; a transition records the message's lane
-- and the lane whose leader claimed it (claim_lane).
-- They are not part of the product's schema (sql/), and never installed elsewhere.

CREATE TABLE chaos_audit_transitions (
    seq          bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid         bigint NOT NULL DEFAULT txid_current(),
    message_id   bigint NOT NULL,
    old_status   text,
    new_status   text,
    old_attempts integer,
    new_attempts integer,
    claim_epoch  bigint,
    claimed_by   text,
    claimed_at   timestamptz,
    last_error   text,
    lane         text,
    claim_lane   text
);

CREATE TABLE chaos_audit_leader (
    seq           bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    txid          bigint NOT NULL DEFAULT txid_current(),
    kind          text NOT NULL,          -- 'epoch' (a new term) or 'batch' (a batch start)
    lane          text,                   -- the fence row's lane (epochs are per lane)
    epoch         bigint,
    holder        text,
    last_batch_at timestamptz
);

CREATE FUNCTION chaos_audit_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_audit_transitions
        (message_id, old_status, new_status, old_attempts, new_attempts,
         claim_epoch, claimed_by, claimed_at, last_error, lane, claim_lane)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts,
            NEW.claim_epoch, NEW.claimed_by, NEW.claimed_at, NEW.last_error, NEW.lane, NEW.claim_lane);
    RETURN NULL;
END $$;

CREATE TRIGGER chaos_audit_message AFTER UPDATE ON messages
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION chaos_audit_message();

CREATE FUNCTION chaos_audit_leader() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS DISTINCT FROM OLD.epoch THEN
        INSERT INTO chaos_audit_leader (kind, lane, epoch, holder, last_batch_at)
        VALUES ('epoch', NEW.lane, NEW.epoch, NEW.holder, NEW.last_batch_at);
    END IF;
    IF NEW.last_batch_at IS DISTINCT FROM OLD.last_batch_at THEN
        INSERT INTO chaos_audit_leader (kind, lane, epoch, holder, last_batch_at)
        VALUES ('batch', NEW.lane, NEW.epoch, NEW.holder, NEW.last_batch_at);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER chaos_audit_leader AFTER UPDATE ON dispatcher_leader
    FOR EACH ROW EXECUTE FUNCTION chaos_audit_leader();
