-- Takes the event-log head lock and reads the current versions of the given
-- streams in one round trip (ADR 0001). An append holds the head lock until
-- it commits, and no other node can append meanwhile, so every client round
-- trip under the lock counts against the whole cluster's append rate.
--
-- It has to be a function: in READ COMMITTED a single SELECT reads with the
-- snapshot taken when it started, before it waited for the lock, and could
-- miss versions committed by the previous holder. Here the version query is
-- a statement of its own, run after the lock is held, with a fresh snapshot.
-- Returns one row per stream (version NULL for a new stream), each carrying
-- the head; one row with a NULL stream when `streams` is empty.
CREATE FUNCTION privcomm_lock_head(streams text[])
RETURNS TABLE (head_position bigint, head_hash bytea, stream_id text, stream_version bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    locked_position bigint;
    locked_hash bytea;
BEGIN
    SELECT h.position, h.hash INTO locked_position, locked_hash
    FROM event_log_head h WHERE h.singleton FOR UPDATE;
    RETURN QUERY
        SELECT locked_position, locked_hash, s.id,
               (SELECT max(e.stream_version) FROM events e WHERE e.stream_id = s.id)
        FROM (SELECT 1) AS one
        LEFT JOIN unnest(streams) AS s(id) ON true;
END
$$;
