-- Signed checkpoints (privcomm-projections::checkpoints, ADR 0012): the
-- server's Ed25519 signature over the log's head position and hash, taken
-- every N events or T minutes. Auditors fetch them (`privcomm audit
-- checkpoints`) and keep them: a later log must carry the same hash at each
-- signed position. Not derived from the log, so not a read model: a replay
-- leaves this table alone.
CREATE TABLE signed_checkpoints (
    position        bigint  PRIMARY KEY CHECK (position > 0),
    hash            bytea  NOT NULL CHECK (length(hash) = 32),
    signed_at_us    bigint  NOT NULL,
    -- Hex, as auditors handle them.
    public_key      text  NOT NULL,
    signature       text  NOT NULL
);
