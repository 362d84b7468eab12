-- Per-host request budget shared by every process (atproto/ratelimit.py). Times are unix seconds on the
-- database clock, so processes on different machines agree on window boundaries.
CREATE TABLE atproto_rate_limits (
    host TEXT PRIMARY KEY,                              -- "host:port"
    window_start DOUBLE PRECISION NOT NULL,             -- start of the current fixed window
    used INT NOT NULL DEFAULT 0,                        -- tokens granted in that window
    paused_until DOUBLE PRECISION NOT NULL DEFAULT 0    -- no grants before this (after a 429 / Remaining 0)
);

-- Grant up to p_want tokens for p_host in one short transaction: the row lock is held only while this
-- runs. Returns the tokens granted, how long to sleep when none were (until the window resets or the
-- pause ends), and the start and remaining life of the window the tokens belong to.
CREATE FUNCTION atproto_rate_acquire(p_host TEXT, p_want INT, p_limit INT, p_window DOUBLE PRECISION)
RETURNS TABLE (granted INT, wait_seconds DOUBLE PRECISION, granted_window_start DOUBLE PRECISION,
               granted_window_left DOUBLE PRECISION)
LANGUAGE plpgsql AS $$
DECLARE
    now_t DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
    cur atproto_rate_limits%ROWTYPE;
BEGIN
    SELECT * INTO cur FROM atproto_rate_limits r WHERE r.host = p_host FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO atproto_rate_limits (host, window_start) VALUES (p_host, now_t) ON CONFLICT DO NOTHING;
        SELECT * INTO cur FROM atproto_rate_limits r WHERE r.host = p_host FOR UPDATE;
    END IF;
    IF now_t >= cur.window_start + p_window THEN
        cur.window_start := now_t;
        cur.used := 0;
    END IF;
    IF cur.paused_until > now_t THEN
        granted := 0;
        wait_seconds := cur.paused_until - now_t;
    ELSE
        granted := GREATEST(0, LEAST(p_want, p_limit - cur.used));
        wait_seconds := CASE WHEN granted > 0 THEN 0 ELSE cur.window_start + p_window - now_t END;
    END IF;
    UPDATE atproto_rate_limits r SET window_start = cur.window_start, used = cur.used + granted
    WHERE r.host = p_host;
    granted_window_start := cur.window_start;
    granted_window_left := cur.window_start + p_window - now_t;
    RETURN NEXT;
END
$$;
