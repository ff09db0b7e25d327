-- Spend per lane and UTC day, and the daily cap that pauses a lane (docs/design.md#spend-caps).
--
-- Amounts are whole millionths of the operator's currency ("micros"), so sums are exact.
--
-- messages.price_micros: what the send that took the message cost (its segments times
--   its provider's price per segment for the number's country), written with the
--   `sent` status. NULL: the provider has no price, or the row was recorded by a
--   replica that does not know prices.
-- lane_spend: the sum of those prices per UTC day (of sent_at), lane and provider,
--   kept by the statement trigger below in the transaction of the send's record, so it
--   can neither miss nor double a send. Retention does not touch it: removing old
--   messages does not lower a day's spend.
-- dispatcher_control.daily_spend_cap_micros: the operator's runtime override of the
--   lane's configured daily_spend_cap (NULL: the configured one), with who set it when.
ALTER TABLE messages ADD COLUMN price_micros bigint;

CREATE TABLE lane_spend (
    day           date   NOT NULL,
    lane          text   NOT NULL,
    provider      text   NOT NULL,
    amount_micros bigint NOT NULL,
    messages      bigint NOT NULL,
    PRIMARY KEY (lane, day, provider)
);

ALTER TABLE dispatcher_control
    ADD COLUMN daily_spend_cap_micros bigint,
    ADD COLUMN daily_spend_cap_set_at timestamptz,
    ADD COLUMN daily_spend_cap_set_by text;

-- The count trigger of migration 0014, plus the spend: a row that becomes `sent` with a
-- price adds it to its day, a row that stops being `sent` (a retry through the API)
-- takes it back, and a row that stays `sent` (a receipt, retention blanking its text)
-- nets to nothing.
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
    INSERT INTO lane_spend AS s (lane, day, provider, amount_micros, messages)
    SELECT lane, day, provider, sum(p), sum(d) FROM (
        SELECT lane, (sent_at AT TIME ZONE 'UTC')::date AS day, coalesce(provider, '') AS provider,
               price_micros AS p, 1 AS d
        FROM new_rows WHERE status = 'sent' AND price_micros IS NOT NULL
        UNION ALL
        SELECT lane, (sent_at AT TIME ZONE 'UTC')::date, coalesce(provider, ''), -price_micros, -1
        FROM old_rows WHERE status = 'sent' AND price_micros IS NOT NULL
    ) AS x
    GROUP BY 1, 2, 3 HAVING sum(d) <> 0 OR sum(p) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (lane, day, provider) DO UPDATE
        SET amount_micros = s.amount_micros + excluded.amount_micros,
            messages = s.messages + excluded.messages;
    RETURN NULL;
END $$;
