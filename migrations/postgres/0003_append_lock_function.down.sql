-- Appends of a privcomm older than this migration take the lock and read the
-- versions in two statements and do not call the function.
DROP FUNCTION privcomm_lock_head(text[]);
