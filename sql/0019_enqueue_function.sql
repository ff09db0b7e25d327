-- dispatcher_enqueue(...): a message enqueued inside the caller's own transaction, so it
-- exists exactly when the caller's data does (docs/operations.md#enqueue-from-sql).
--
-- The rules the replicas apply at intake that depend on their configuration are kept
-- here by every replica at start: the longest text (MESSAGE_MAX_LENGTH) and the
-- lanes (dispatcher_control). The function checks what SQL can check the way the API
-- does; docs/design.md#enqueue-from-sql lists what only the API checks.
CREATE TABLE dispatcher_intake (
    id                 integer PRIMARY KEY DEFAULT 1
        CONSTRAINT dispatcher_intake_single_row CHECK (id = 1),
    message_max_length integer NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    updated_by         text NOT NULL
);

CREATE FUNCTION dispatcher_enqueue(
    phone_number    text,
    content         text,
    idempotency_key text DEFAULT NULL,
    send_at         timestamptz DEFAULT NULL,
    expires_at      timestamptz DEFAULT NULL,
    priority        integer DEFAULT 0,
    lane            text DEFAULT 'default',
    sender          text DEFAULT NULL,
    category        text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
-- With the rights of its owner (the role that migrates): a caller needs only EXECUTE,
-- which its administrator grants (GRANT EXECUTE ON FUNCTION dispatcher_enqueue TO
-- <role>), not rights on the tables; the search path is the migration's, so a caller
-- cannot slip its own objects in.
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
-- In the statements on messages, a bare name is the column (ON CONFLICT's index
-- predicate); the parameters are always written dispatcher_enqueue.<name> there.
#variable_conflict use_column
DECLARE
    max_length integer;
    existing   messages%ROWTYPE;
    new_id     bigint;
    listed     opt_outs%ROWTYPE;
BEGIN
    -- Each refusal names the field, as the API's 422 does, with SQLSTATE 22023
    -- (invalid_parameter_value) and the field in the error's COLUMN.
    IF phone_number IS NULL OR phone_number !~ '^\+[1-9][0-9]{6,14}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'phone_number',
            MESSAGE = format('phone_number: %L is not in E.164 format: + and the country code, 7 to 15 digits, like +905551234567', phone_number);
    END IF;
    IF content IS NULL OR content !~ '[^[:space:]]' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'content',
            MESSAGE = 'content: must not be empty or blank';
    END IF;
    SELECT i.message_max_length INTO max_length FROM dispatcher_intake AS i WHERE i.id = 1;
    IF max_length IS NOT NULL AND char_length(content) > max_length THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'content',
            MESSAGE = format('content: %s characters, more than MESSAGE_MAX_LENGTH (%s)',
                             char_length(content), max_length);
    END IF;
    IF idempotency_key IS NOT NULL AND idempotency_key !~ '^[!-~]{1,255}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'idempotency_key',
            MESSAGE = 'idempotency_key: must be 1 to 255 visible ASCII characters';
    END IF;
    IF send_at IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= send_at THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'expires_at',
            MESSAGE = 'expires_at: must be after send_at';
    END IF;
    IF priority IS NULL OR priority NOT BETWEEN 0 AND 3 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'priority',
            MESSAGE = format('priority: must be an integer from 0 to 3 (got %s)', priority);
    END IF;
    IF lane IS NULL OR NOT EXISTS (SELECT 1 FROM dispatcher_control AS c WHERE c.lane = dispatcher_enqueue.lane) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'lane',
            MESSAGE = format('lane: there is no lane %L; configured: %s', lane,
                             (SELECT string_agg(c.lane, ', ' ORDER BY c.lane) FROM dispatcher_control AS c));
    END IF;
    IF sender IS NOT NULL AND sender !~ '^(\+[0-9]{4,15}|[A-Za-z0-9]([A-Za-z0-9 ]{0,9}[A-Za-z0-9])?)$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'from',
            MESSAGE = format('from: %L must be E.164 (+ and 4 to 15 digits) or 1 to 11 letters, digits and inner spaces', sender);
    END IF;
    IF category IS NOT NULL AND category NOT IN ('transactional', 'marketing') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'category',
            MESSAGE = format('category: must be transactional or marketing (got %L)', category);
    END IF;

    SELECT * INTO listed FROM opt_outs AS o WHERE o.phone_number = dispatcher_enqueue.phone_number;
    INSERT INTO messages AS m (phone_number, content, idempotency_key, send_at, expires_at,
                               priority, lane, sender, category, next_attempt_at, status,
                               last_error)
    VALUES (dispatcher_enqueue.phone_number, dispatcher_enqueue.content,
            dispatcher_enqueue.idempotency_key, dispatcher_enqueue.send_at,
            dispatcher_enqueue.expires_at, dispatcher_enqueue.priority,
            dispatcher_enqueue.lane, dispatcher_enqueue.sender, dispatcher_enqueue.category,
            greatest(now(), coalesce(dispatcher_enqueue.send_at, now())),
            CASE WHEN listed.phone_number IS NULL THEN 'pending' ELSE 'blocked' END,
            CASE WHEN listed.phone_number IS NOT NULL
                 THEN 'the recipient opted out (' || listed.source || ') on '
                      || to_char(listed.since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' END)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING m.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN new_id;
    END IF;

    -- A repeat of a key: the stored message, if it is the same one. A transaction whose
    -- snapshot is older than that row (REPEATABLE READ) cannot see it: it must retry.
    SELECT * INTO existing FROM messages AS m WHERE m.idempotency_key = dispatcher_enqueue.idempotency_key;
    IF existing.id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '40001', COLUMN = 'idempotency_key',
            MESSAGE = format('idempotency_key: %L was just used by a transaction this one''s snapshot cannot see; retry the transaction',
                             dispatcher_enqueue.idempotency_key);
    END IF;
    IF existing.phone_number IS DISTINCT FROM dispatcher_enqueue.phone_number
       OR (existing.content IS NOT NULL AND existing.content IS DISTINCT FROM dispatcher_enqueue.content)
       OR existing.send_at IS DISTINCT FROM dispatcher_enqueue.send_at
       OR existing.expires_at IS DISTINCT FROM dispatcher_enqueue.expires_at
       OR existing.priority IS DISTINCT FROM dispatcher_enqueue.priority
       OR existing.lane IS DISTINCT FROM dispatcher_enqueue.lane
       OR existing.sender IS DISTINCT FROM dispatcher_enqueue.sender
       OR existing.category IS DISTINCT FROM dispatcher_enqueue.category THEN
        RAISE EXCEPTION USING ERRCODE = '23505', COLUMN = 'idempotency_key',
            MESSAGE = format('idempotency_key: %L was used for message %s, with a different payload',
                             dispatcher_enqueue.idempotency_key, existing.id);
    END IF;
    RETURN existing.id;
END $$;

REVOKE EXECUTE ON FUNCTION dispatcher_enqueue(text, text, text, timestamptz, timestamptz, integer, text, text, text) FROM PUBLIC;

COMMENT ON FUNCTION dispatcher_enqueue(text, text, text, timestamptz, timestamptz, integer, text, text, text) IS
    'Enqueues one SMS in the caller''s transaction and returns its id (the stored one on an idempotent repeat). See docs/operations.md#enqueue-from-sql.';
