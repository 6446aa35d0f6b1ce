-- Read models for embedded mode: the same tables as migrations/postgres/0004_read_models.up.sql
-- (which explains them), in SQLite's types. (privcomm-projections, ADR 0010.) Every table here is derived
-- from the event log by a projection worker, which writes it in the same
-- transaction as its checkpoint (`checkpoints.name = 'projection:<model>'`).
-- Any of them can be emptied and rebuilt from the log; `privcomm replay`
-- does exactly that and compares checksums. Column meanings are documented
-- on the table definitions in projections/src/models.rs.

-- key_directory: registered users, their identity, prekeys left.
CREATE TABLE rm_directory_users (
    user_id              TEXT    PRIMARY KEY,
    phone_hash           TEXT    NOT NULL,
    registration_id      INTEGER  NOT NULL,
    identity_key         BLOB      NOT NULL,
    signed_prekey_id     INTEGER  NOT NULL,
    kyber_last_resort_id INTEGER  NOT NULL,
    -- Counts are folded as deltas; a compacted log may pass through negative
    -- values before the PreKeysCompacted that restates them, so no CHECK.
    one_time_prekeys     INTEGER  NOT NULL,
    kyber_prekeys        INTEGER  NOT NULL,
    identity_position    INTEGER  NOT NULL,
    -- First claim of a one-time prekey (or identity change voiding them)
    -- since the pools were last restated; NULL when none. The prekey
    -- compaction job starts 7 days after it.
    first_use_at_us      INTEGER
);
CREATE INDEX rm_directory_users_first_use ON rm_directory_users (first_use_at_us) WHERE first_use_at_us IS NOT NULL;

-- key_directory: prekey uploads (and PreKeysCompacted restatements) whose
-- payload is still stored (what the prekey compaction job considers).
CREATE TABLE rm_prekey_uploads (
    position        INTEGER  PRIMARY KEY,
    user_id         TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    prekeys         INTEGER  NOT NULL,
    recorded_at_us  INTEGER  NOT NULL
);
CREATE INDEX rm_prekey_uploads_by_user ON rm_prekey_uploads (user_id, recorded_at_us);

-- mailbox: messages whose ciphertext is still in the log. Pending ones
-- (settled IS NULL) in log order per recipient; settled ones until the
-- retention job drops their ciphertext. The ciphertext itself is not copied.
CREATE TABLE rm_mailbox (
    recipient       TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    position        INTEGER  NOT NULL,
    sender          TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    body_bytes      INTEGER  NOT NULL,
    accepted_at_us  INTEGER  NOT NULL,
    settled         TEXT    CHECK (settled IN ('delivered', 'expired')),
    settled_at_us   INTEGER,
    PRIMARY KEY (recipient, message_id)
);
CREATE INDEX rm_mailbox_by_position ON rm_mailbox (position);
CREATE INDEX rm_mailbox_pending ON rm_mailbox (recipient, position) WHERE settled IS NULL;
CREATE INDEX rm_mailbox_pending_by_age ON rm_mailbox (accepted_at_us) WHERE settled IS NULL;
CREATE INDEX rm_mailbox_settled_by_age ON rm_mailbox (settled_at_us) WHERE settled IS NOT NULL;

-- push_tokens: the current token per user (forgotten on identity change).
CREATE TABLE rm_push_tokens (
    user_id     TEXT    PRIMARY KEY,
    platform    TEXT    NOT NULL,
    token       TEXT    NOT NULL,
    position    INTEGER  NOT NULL
);

-- identity_history: every identity key and signed prekey ever published.
CREATE TABLE rm_identity_history (
    user_id              TEXT    NOT NULL,
    position             INTEGER  NOT NULL,
    change               TEXT    NOT NULL,
    registration_id      INTEGER,
    identity_key         BLOB   ,
    signed_prekey_id     INTEGER  NOT NULL,
    signed_prekey        BLOB      NOT NULL,
    kyber_last_resort_id INTEGER,
    recorded_at_us       INTEGER  NOT NULL,
    PRIMARY KEY (user_id, position)
);

-- event_counts: events per type; exact only if each event is applied once.
CREATE TABLE rm_event_counts (
    event_type  TEXT    PRIMARY KEY,
    events      INTEGER  NOT NULL DEFAULT 0
);
