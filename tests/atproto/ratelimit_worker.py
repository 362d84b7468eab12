"""Worker process for the rate limiter test (importable under multiprocessing spawn)."""

import os

import psycopg

from migration_assets.atproto.ratelimit import HostRateLimiter


def take_tokens(url: str, host: str, count: int, limit: int, window: float, batch: int) -> None:
    """Acquire `count` tokens and log each grant with the window it counted against."""
    limiter = HostRateLimiter(url, limit=limit, window_seconds=window, batch=batch)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(count):
            window_start = limiter.acquire(host)
            conn.execute("INSERT INTO grant_log (pid, window_start) VALUES (%s, %s)", (os.getpid(), window_start))
