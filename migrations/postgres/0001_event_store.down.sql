-- Removes the event log. This destroys every event: back it up first
-- (docs/OPERATING.md once it exists; pg_dump -t events meanwhile).
DROP TABLE checkpoints;
DROP TABLE event_log_head;
DROP TABLE events;
