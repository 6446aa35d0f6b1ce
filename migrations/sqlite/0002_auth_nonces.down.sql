-- Forgets used nonces.
DROP TABLE used_auth_nonces;
