-- Cluster control state. Each table holds exactly one row (id = 1), except the
-- replica registry.

-- The fence. Redis elects a leader; this row decides whose work counts. A new leader
-- bumps epoch, and every claim locks this row and checks that epoch is still its own.
-- last_batch_at keeps the cluster's rhythm across leader changes.
CREATE TABLE dispatcher_leader (
    id            smallint PRIMARY KEY DEFAULT 1 CONSTRAINT dispatcher_leader_single_row CHECK (id = 1),
    epoch         bigint NOT NULL DEFAULT 0,
    holder        text,
    acquired_at   timestamptz,
    last_batch_at timestamptz
);
INSERT INTO dispatcher_leader (id) VALUES (1);

-- The desired state, set through the API of any replica. running is NULL until the
-- first replica starts and applies AUTO_START; after that the stored value wins.
-- batch_size / processing_interval_ms are runtime overrides (NULL = configured value).
CREATE TABLE dispatcher_control (
    id                     smallint PRIMARY KEY DEFAULT 1 CONSTRAINT dispatcher_control_single_row CHECK (id = 1),
    running                boolean,
    batch_size             integer CONSTRAINT dispatcher_control_batch_size_positive CHECK (batch_size > 0),
    processing_interval_ms bigint CONSTRAINT dispatcher_control_interval_not_negative CHECK (processing_interval_ms >= 0),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    updated_by             text
);
INSERT INTO dispatcher_control (id) VALUES (1);

-- Replicas announce themselves here; a row seen recently is a live replica.
CREATE TABLE dispatcher_replicas (
    replica_id   text PRIMARY KEY,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
