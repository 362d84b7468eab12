"""One follower per host: a lease on the host's row of `repo_stream_leases` (core/lease.py's rules).

A follower holds its host's lease while it runs, renewed by a heartbeat, and fences every batch's
transaction with it: two followers of one host never both write, and one whose lease was taken over
writes nothing more and stops. The lease also tells the repo_follow sensor that a follow run's worker
is gone: Dagster's default run launcher cannot tell, so such a run would stay STARTED, and its host
unfollowed, until its dagster/max_runtime.

Pure core: no Dagster.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.core.lease import Lease

log = logging.getLogger(__name__)

TABLE = "repo_stream_leases"
_POLL_SECONDS = 1.0


class HostBusy(Exception):
    """Another follower holds the host and keeps renewing its lease."""


def hold(pool: ConnectionPool, host: str, holder: str, ttl_seconds: float, stop: threading.Event) -> Lease | None:
    """Take `host`'s lease for `holder`. While another holds it, wait for it to lapse: at most one ttl,
    which a live holder never lets pass. None: `stop` was set while waiting."""
    lease = Lease(TABLE, "host", ttl_seconds)
    give_up = time.monotonic() + ttl_seconds + _POLL_SECONDS
    waiting = False
    while not stop.is_set():
        with pool.connection() as conn:
            conn.execute(f"INSERT INTO {TABLE} (host) VALUES (%s) ON CONFLICT DO NOTHING", (host,))
            conn.commit()
            params = {"host": host, "holder": holder}
            if lease.claim(conn, "host = %(host)s", params, set_sql="holder = %(holder)s, updated_at = now()"):
                return lease
            other, expires = conn.execute(f"SELECT holder, lease_expires_at FROM {TABLE} WHERE host = %s",
                                          (host,)).fetchone()
        if time.monotonic() >= give_up:
            raise HostBusy(
                f"another follower of {host} ({other}) holds it and renews its lease (now until {expires:%H:%M:%S %Z}): "
                "one follower per host. Stop that one first (Ctrl-C, or terminate its run in the UI); if it is "
                f"gone, its lease lapses within {ttl_seconds:.0f} s and the next follower takes over")
        if not waiting:
            waiting = True
            log.info("%s is held by %s until %s: waiting for that lease to lapse", host, other, expires)
        stop.wait(_POLL_SECONDS)
    return None


def release(pool: ConnectionPool, lease: Lease) -> None:
    with pool.connection() as conn:
        lease.release(conn, set_sql="updated_at = now()")


def why_gone(conn: psycopg.Connection, host: str, run_id: str, started_at: float, start_grace_seconds: float
             ) -> str | None:
    """Why follow run `run_id` of `host`, still running by its record, can no longer be alive; None when
    it may be. Its lease lapsed (it stopped renewing it); or it gave it back long ago and never ended;
    or it never took it within `start_grace_seconds` of starting."""
    row = conn.execute(
        f"""SELECT holder, claim_token IS NOT NULL, lease_expires_at < now(), lease_expires_at,
                   updated_at < now() - make_interval(secs => %s), updated_at
            FROM {TABLE} WHERE host = %s""",
        (start_grace_seconds, host),
    ).fetchone()
    if row and row[0] == run_id:
        _, held, lapsed, expires, released_long_ago, updated = row
        if held and lapsed:
            return f"its lease on the host lapsed at {expires:%Y-%m-%d %H:%M:%S %Z}: its worker stopped renewing it"
        if not held and released_long_ago:
            return f"it gave the host's lease back at {updated:%Y-%m-%d %H:%M:%S %Z} but never ended"
        return None
    if time.time() - started_at > start_grace_seconds:
        return f"it did not take the host's lease within {start_grace_seconds:.0f} s of starting"
    return None
