-- The message queue. One row per SMS; the dispatcher moves it
-- pending -> sending -> sent | failed (or back to pending for a retry).
CREATE TABLE messages (
    id                  bigserial PRIMARY KEY,
    phone_number        varchar(20) NOT NULL
        CONSTRAINT messages_phone_number_format
        CHECK (char_length(phone_number) BETWEEN 10 AND 20 AND phone_number ~ '^\+?[0-9]+$'),
    content             text NOT NULL
        CONSTRAINT messages_content_not_empty CHECK (char_length(btrim(content)) > 0),
    status              text NOT NULL DEFAULT 'pending'
        CONSTRAINT messages_status_known CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    -- Kept for clients of the original service, which only knew a boolean.
    sent                boolean GENERATED ALWAYS AS (status = 'sent') STORED,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claim_epoch         bigint,
    claimed_by          text,
    claimed_at          timestamptz,
    provider_message_id text,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz
);

-- Serves the FIFO claim: only pending rows, in claim order.
CREATE INDEX messages_pending_fifo_idx ON messages (created_at, id) WHERE status = 'pending';

-- Serves the rescue of a dead leader's claims.
CREATE INDEX messages_sending_claimed_idx ON messages (claimed_at) WHERE status = 'sending';

-- Serves listings filtered by status, newest first.
CREATE INDEX messages_status_id_idx ON messages (status, id DESC);
