-- Read models (privcomm-projections, ADR 0010). Every table here is derived
-- from the event log by a projection worker, which writes it in the same
-- transaction as its checkpoint (`checkpoints.name = 'projection:<model>'`).
-- Any of them can be emptied and rebuilt from the log; `privcomm replay`
-- does exactly that and compares checksums. Column meanings are documented
-- on the table definitions in projections/src/models.rs.

-- key_directory: registered users, their identity, prekeys left.
CREATE TABLE rm_directory_users (
    user_id              text    PRIMARY KEY,
    phone_hash           text    NOT NULL,
    registration_id      bigint  NOT NULL,
    identity_key         bytea   NOT NULL,
    signed_prekey_id     bigint  NOT NULL,
    kyber_last_resort_id bigint  NOT NULL,
    -- Counts are folded as deltas; a compacted log may pass through negative
    -- values before the PreKeysCompacted that restates them, so no CHECK.
    one_time_prekeys     bigint  NOT NULL,
    kyber_prekeys        bigint  NOT NULL,
    identity_position    bigint  NOT NULL,
    -- First claim of a one-time prekey (or identity change voiding them)
    -- since the pools were last restated; NULL when none. The prekey
    -- compaction job starts 7 days after it.
    first_use_at_us      bigint
);
CREATE INDEX rm_directory_users_first_use ON rm_directory_users (first_use_at_us) WHERE first_use_at_us IS NOT NULL;

-- key_directory: prekey uploads (and PreKeysCompacted restatements) whose
-- payload is still stored (what the prekey compaction job considers).
CREATE TABLE rm_prekey_uploads (
    position        bigint  PRIMARY KEY,
    user_id         text    NOT NULL,
    kind            text    NOT NULL,
    prekeys         bigint  NOT NULL,
    recorded_at_us  bigint  NOT NULL
);
CREATE INDEX rm_prekey_uploads_by_user ON rm_prekey_uploads (user_id, recorded_at_us);

-- mailbox: messages whose ciphertext is still in the log. Pending ones
-- (settled IS NULL) in log order per recipient; settled ones until the
-- retention job drops their ciphertext. The ciphertext itself is not copied.
CREATE TABLE rm_mailbox (
    recipient       text    NOT NULL,
    message_id      text    NOT NULL,
    position        bigint  NOT NULL,
    sender          text    NOT NULL,
    kind            text    NOT NULL,
    body_bytes      bigint  NOT NULL,
    accepted_at_us  bigint  NOT NULL,
    settled         text    CHECK (settled IN ('delivered', 'expired')),
    settled_at_us   bigint,
    PRIMARY KEY (recipient, message_id)
);
CREATE INDEX rm_mailbox_by_position ON rm_mailbox (position);
CREATE INDEX rm_mailbox_pending ON rm_mailbox (recipient, position) WHERE settled IS NULL;
CREATE INDEX rm_mailbox_pending_by_age ON rm_mailbox (accepted_at_us) WHERE settled IS NULL;
CREATE INDEX rm_mailbox_settled_by_age ON rm_mailbox (settled_at_us) WHERE settled IS NOT NULL;

-- push_tokens: the current token per user (forgotten on identity change).
CREATE TABLE rm_push_tokens (
    user_id     text    PRIMARY KEY,
    platform    text    NOT NULL,
    token       text    NOT NULL,
    position    bigint  NOT NULL
);

-- identity_history: every identity key and signed prekey ever published.
CREATE TABLE rm_identity_history (
    user_id              text    NOT NULL,
    position             bigint  NOT NULL,
    change               text    NOT NULL,
    registration_id      bigint,
    identity_key         bytea,
    signed_prekey_id     bigint  NOT NULL,
    signed_prekey        bytea   NOT NULL,
    kyber_last_resort_id bigint,
    recorded_at_us       bigint  NOT NULL,
    PRIMARY KEY (user_id, position)
);

-- event_counts: events per type; exact only if each event is applied once.
CREATE TABLE rm_event_counts (
    event_type  text    PRIMARY KEY,
    events      bigint  NOT NULL DEFAULT 0
);
