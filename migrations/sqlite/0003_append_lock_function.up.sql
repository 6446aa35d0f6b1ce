-- The PostgreSQL migration 0003 adds privcomm_lock_head(), which takes the
-- head lock and reads stream versions in one round trip. Embedded mode has
-- one writer connection and takes its lock with BEGIN IMMEDIATE: nothing to
-- add. This file keeps the two backends' migration numbers in step.
SELECT 1;
