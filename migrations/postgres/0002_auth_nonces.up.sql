-- Login-challenge nonces that have been used. A nonce is self-verifying (it
-- carries user and expiry under an HMAC), so this table only has to make it
-- single-use across every api process. Rows are deleted once expired; the
-- table never holds more than about a minute of logins.
CREATE TABLE used_auth_nonces (
    -- SHA-256 of the nonce, not the nonce itself: nothing here can be replayed.
    nonce_hash      bytea   PRIMARY KEY CHECK (length(nonce_hash) = 32),
    expires_at_us   bigint  NOT NULL
);

CREATE INDEX used_auth_nonces_expiry ON used_auth_nonces (expires_at_us);
