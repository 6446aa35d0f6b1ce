-- Signed checkpoints (privcomm-projections::checkpoints, ADR 0012): the
-- server's Ed25519 signature over the log's head position and hash, taken
-- every N events or T minutes. Auditors fetch them (`privcomm audit
-- checkpoints`) and keep them: a later log must carry the same hash at each
-- signed position. Not derived from the log, so not a read model: a replay
-- leaves this table alone.
CREATE TABLE signed_checkpoints (
    position        INTEGER  PRIMARY KEY CHECK (position > 0),
    hash            BLOB  NOT NULL CHECK (length(hash) = 32),
    signed_at_us    INTEGER  NOT NULL,
    -- Hex, as auditors handle them.
    public_key      TEXT  NOT NULL,
    signature       TEXT  NOT NULL
);
