-- Forgets used nonces; any nonce still within its 60 s could be used again.
DROP TABLE used_auth_nonces;
