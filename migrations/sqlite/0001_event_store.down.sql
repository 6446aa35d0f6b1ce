-- Removes the event log (destroys every event; copy the file first).
DROP TABLE checkpoints;
DROP TABLE event_log_head;
DROP TABLE events;
