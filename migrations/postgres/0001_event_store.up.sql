-- The event log: the single source of truth. Every other table in privcomm
-- is derived from it (read models) or bookkeeping about it (checkpoints).

CREATE TABLE events (
    -- Global position: 1, 2, 3… gap-free and in commit order. Assigned by the
    -- writer while it holds the row lock on event_log_head (see ADR 0001),
    -- never by a sequence, because sequences leave gaps and hand out values
    -- in an order that differs from commit order.
    position        bigint      PRIMARY KEY CHECK (position > 0),
    stream_id       text        NOT NULL,
    -- Number of the event within its stream (1-based). The unique constraint
    -- below is the database's own guard for optimistic concurrency.
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    -- Microseconds since the Unix epoch; an integer so the bytes hashed in
    -- the chain are the bytes stored, with no time-zone or precision drift.
    recorded_at_us  bigint      NOT NULL,
    -- NULL once compaction dropped it; payload_hash stays (ADR 0002).
    payload         bytea,
    payload_hash    bytea       NOT NULL CHECK (length(payload_hash) = 32),
    prev_hash       bytea       NOT NULL CHECK (length(prev_hash) = 32),
    hash            bytea       NOT NULL CHECK (length(hash) = 32),
    UNIQUE (stream_id, stream_version)
);

COMMENT ON TABLE events IS 'Append-only, hash-chained event log (privcomm ADR 0001, 0002).';

-- The tip of the chain. Exactly one row; every append transaction locks it
-- FOR UPDATE first, which serialises writers across all processes and makes
-- commit order equal position order.
CREATE TABLE event_log_head (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position    bigint  NOT NULL,
    hash        bytea   NOT NULL CHECK (length(hash) = 32)
);

INSERT INTO event_log_head (singleton, position, hash)
VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- Named positions of consumers of the log (the outbox publisher; later the
-- projection workers keep theirs beside their read models).
CREATE TABLE checkpoints (
    name            text    PRIMARY KEY,
    position        bigint  NOT NULL CHECK (position >= 0),
    updated_at_us   bigint  NOT NULL
);
