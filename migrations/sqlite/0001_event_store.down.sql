-- Removes the event log (destroys every event; copy the file first).
-- `privcomm migrate down` refuses to run this while the log holds events,
-- unless --allow-data-loss.
DROP TABLE checkpoints;
DROP TABLE event_log_head;
DROP TABLE events;
