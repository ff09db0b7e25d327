-- Opt-outs: numbers that replied STOP (or were put on the list through the API) are
-- never sent to again; a message to one becomes `blocked`, a final status, at intake
-- and again at claim (docs/design.md#opt-outs).
--
-- `source` says who put the number on the list: `api` (or what the operator's PUT
-- named) or `inbound:<provider>` for a STOP the provider passed on.
CREATE TABLE opt_outs (
    -- E.164, as intake stores a message's number (the API and the inbound endpoint
    -- parse it the same way).
    phone_number text PRIMARY KEY
        CONSTRAINT opt_outs_phone_number_format CHECK (phone_number ~ '^\+[0-9]{7,15}$'),
    since        timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL
        CONSTRAINT opt_outs_source_format CHECK (source ~ '^[ -~]{1,100}$')
);

-- `blocked` joins the statuses. NOT VALID: every existing row passed the narrower
-- rule, so the table is not scanned under the migration's lock.
ALTER TABLE messages DROP CONSTRAINT messages_status_known;
ALTER TABLE messages ADD CONSTRAINT messages_status_known
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'expired', 'cancelled', 'blocked'))
    NOT VALID;

-- A blocked message is finished: CONTENT_RETENTION may blank its text.
ALTER TABLE messages DROP CONSTRAINT messages_content_kept;
ALTER TABLE messages ADD CONSTRAINT messages_content_kept
    CHECK (content IS NOT NULL
           OR status IN ('sent', 'failed', 'expired', 'cancelled', 'blocked'))
    NOT VALID;
