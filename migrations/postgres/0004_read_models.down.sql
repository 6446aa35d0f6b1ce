-- The read models are derived data: dropping them loses nothing the log
-- does not hold. Their checkpoints go too, so a re-applied 0004 rebuilds them.
DROP TABLE rm_event_counts;
DROP TABLE rm_identity_history;
DROP TABLE rm_push_tokens;
DROP TABLE rm_mailbox;
DROP TABLE rm_prekey_uploads;
DROP TABLE rm_directory_users;
DELETE FROM checkpoints WHERE name LIKE 'projection:%';
