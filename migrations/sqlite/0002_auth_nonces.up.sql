-- Used login-challenge nonces (see migrations/postgres/0002_auth_nonces.up.sql).
CREATE TABLE used_auth_nonces (
    nonce_hash      BLOB    PRIMARY KEY CHECK (length(nonce_hash) = 32),
    expires_at_us   INTEGER NOT NULL
);

CREATE INDEX used_auth_nonces_expiry ON used_auth_nonces (expires_at_us);
