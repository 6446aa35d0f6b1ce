-- The event log for embedded mode: the same shape as the PostgreSQL schema
-- (migrations/postgres/0001_event_store.up.sql explains each column), in
-- SQLite's types. One process owns the file; its single writer connection
-- serialises appends, and BEGIN IMMEDIATE keeps a second process from
-- interleaving (ADR 0001).

CREATE TABLE events (
    position        INTEGER PRIMARY KEY CHECK (position > 0),
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    event_id        BLOB    NOT NULL UNIQUE CHECK (length(event_id) = 16),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    recorded_at_us  INTEGER NOT NULL,
    payload         BLOB,
    payload_hash    BLOB    NOT NULL CHECK (length(payload_hash) = 32),
    prev_hash       BLOB    NOT NULL CHECK (length(prev_hash) = 32),
    hash            BLOB    NOT NULL CHECK (length(hash) = 32),
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE event_log_head (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    position    INTEGER NOT NULL,
    hash        BLOB    NOT NULL CHECK (length(hash) = 32)
);

INSERT INTO event_log_head (singleton, position, hash) VALUES (1, 0, zeroblob(32));

CREATE TABLE checkpoints (
    name            TEXT    PRIMARY KEY,
    position        INTEGER NOT NULL CHECK (position >= 0),
    updated_at_us   INTEGER NOT NULL
);
