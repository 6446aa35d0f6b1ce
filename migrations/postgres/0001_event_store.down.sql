-- Removes the event log. This destroys every event: back it up first
-- (docs/OPERATING.md, "Backing up and restoring"). `privcomm migrate down`
-- refuses to run this while the log holds events, unless --allow-data-loss.
DROP TABLE checkpoints;
DROP TABLE event_log_head;
DROP TABLE events;
