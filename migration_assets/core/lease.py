"""Leases: the one way a run holds rows of a work table (repos, file ranges, blob migrations).

The rules:
- A lease is a token (a uuid, one per `Lease` object, e.g. one per run) and an expiry
  (`lease_expires_at`, always `now() + ttl` in PostgreSQL's clock, never a worker's clock) on each row
  it holds. The table needs the two columns `claim_token uuid` and `lease_expires_at timestamptz`.
- `claim` takes at most `limit` rows matching the caller's condition whose lease is free (no token)
  or expired, with FOR UPDATE SKIP LOCKED: concurrent claimers never take the same row and never wait
  for each other. Claims commit at once (committed state, not a long transaction).
- While the work goes on a `Heartbeat` thread renews the lease every ttl/3. A row whose lease expired
  (its run died or stalled past the ttl) may be claimed by anyone; `renew` then notices the loss.
- Every write of a result is fenced by the token: either one statement `... WHERE key = %s AND
  claim_token = %s` (`finish`, `release`, or `FENCE` in your own SQL), or `fence(cur, key)` first in
  the transaction that writes the result, which locks the row only if the token is still ours, so
  no one can take the lease over before that transaction ends (`holding` wraps that transaction).
  0 rows means the lease was lost: the caller writes nothing for that row and logs that it lost the
  lease (`Lease` logs it too); the new holder does the work again.
"""

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

log = logging.getLogger(__name__)

# Append to a WHERE clause with the row's key and the lease's token as the last two parameters.
FENCE = "claim_token = %s"
# A row anyone may claim: never leased, given back, or its holder stopped renewing it.
FREE = "(claim_token IS NULL OR lease_expires_at IS NULL OR lease_expires_at < now())"


class LeaseLost(Exception):
    """Another holder took the row over: this holder must write nothing for it."""


class Lease:
    """One holder's lease on rows of `table` keyed by `key_column` (both trusted identifiers from
    code, never user input). Keeps the set of keys it believes it holds, so `renew` can tell a loss."""

    def __init__(self, table: str, key_column: str, ttl_seconds: float, token: uuid.UUID | None = None) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_seconds}")
        self.table, self.key_column, self.ttl_seconds = table, key_column, float(ttl_seconds)
        self.token = token or uuid.uuid4()
        self._held: set[Any] = set()
        self._lost: set[Any] = set()
        self._lock = threading.Lock()
        # Set by a holder that stops early (an error, an interrupt): long work under the lease checks it
        # and ends, so what it holds is given back now rather than when that work would have finished.
        self.stopping = threading.Event()

    # --- taking and giving back ---------------------------------------------------------------------

    def claim(self, conn: psycopg.Connection, where_sql: str = "TRUE", params: dict | None = None,
              limit: int = 1, *, order_by: str | None = None, set_sql: str = "",
              returning: Sequence[str] = ()) -> list[tuple]:
        """Take up to `limit` rows matching `where_sql` (named %(...)s params) whose lease is free or
        expired, and commit. `set_sql` adds assignments to the claiming UPDATE (e.g. a status).
        Returns one tuple per row, the key then the `returning` columns, sorted by key; `order_by`
        picks which rows a `limit` takes first."""
        order = order_by or self.key_column
        cols = ", ".join([f"t.{self.key_column}", *(f"t.{c}" for c in returning)])
        sql = (
            f"WITH picked AS (SELECT {self.key_column} FROM {self.table} "
            f"  WHERE ({where_sql}) AND {FREE} "
            f"  ORDER BY {order} LIMIT %(_limit)s FOR UPDATE SKIP LOCKED) "
            f"UPDATE {self.table} t SET claim_token = %(_token)s, "
            f"  lease_expires_at = now() + make_interval(secs => %(_ttl)s){', ' + set_sql if set_sql else ''} "
            f"FROM picked WHERE t.{self.key_column} = picked.{self.key_column} RETURNING {cols}"
        )
        rows = conn.execute(sql, {**(params or {}), "_limit": limit, "_token": self.token, "_ttl": self.ttl_seconds}).fetchall()
        conn.commit()
        rows.sort(key=lambda row: row[0])
        with self._lock:
            self._held.update(row[0] for row in rows)
        return rows

    def renew(self, conn: psycopg.Connection) -> int:
        """Push the expiry of every row still held to now() + ttl; returns how many are held. Rows
        taken over by another token since are moved to `lost`."""
        with self._lock:
            keys = list(self._held)
        if not keys:
            return 0
        renewed = conn.execute(
            f"UPDATE {self.table} SET lease_expires_at = now() + make_interval(secs => %s) "
            f"WHERE {self.key_column} = ANY(%s) AND {FENCE} RETURNING {self.key_column}",
            (self.ttl_seconds, keys, self.token),
        ).fetchall()
        conn.commit()
        still = {row[0] for row in renewed}
        with self._lock:
            gone = set(keys) - still
            gone &= self._held  # a key finished meanwhile was not lost
            self._held -= gone
            self._lost |= gone
            return len(self._held)

    def release(self, conn: psycopg.Connection, keys: Iterable[Any] | None = None, set_sql: str = "") -> list[Any]:
        """Give rows back (default: all held) so anyone may claim them at once; `set_sql` adds
        assignments (e.g. back to pending). Commits; returns the keys that were still ours."""
        with self._lock:
            keys = list(self._held if keys is None else keys)
        if not keys:
            return []
        rows = conn.execute(
            f"UPDATE {self.table} SET claim_token = NULL, lease_expires_at = NULL{', ' + set_sql if set_sql else ''} "
            f"WHERE {self.key_column} = ANY(%s) AND {FENCE} RETURNING {self.key_column}",
            (keys, self.token),
        ).fetchall()
        conn.commit()
        self.forget(keys)
        return [row[0] for row in rows]

    # --- fenced writes -------------------------------------------------------------------------------

    def fence(self, cur: psycopg.Cursor, key: Any) -> bool:
        """In the caller's transaction: lock the row if the lease on it is still ours. True: every
        write in this transaction is fenced (nobody can take the row over before it ends). False: the
        lease was lost; write nothing for this row."""
        held = cur.execute(
            f"SELECT 1 FROM {self.table} WHERE {self.key_column} = %s AND {FENCE} FOR UPDATE",
            (key, self.token),
        ).fetchone() is not None
        if not held:
            self._mark_lost(key)
        return held

    @contextmanager
    def holding(self, conn: psycopg.Connection, key: Any, keep: bool = False) -> Iterator[psycopg.Connection]:
        """A transaction on `conn`, fenced for `key`: raises LeaseLost (nothing written) if the lease
        was lost, else every write inside is ours. Afterwards the key is no longer renewed (the
        writes inside should end the lease: clear claim_token), unless `keep` (a partial result)."""
        with conn.transaction():
            with conn.cursor() as cur:
                if not self.fence(cur, key):
                    raise LeaseLost(f"lost the lease on {self.table} {self.key_column}={key}: another run "
                                    "took it over after this one stopped renewing it; that run writes its result")
            yield conn
            if not keep:  # before the commit: a renewal waiting on this row must not count it lost
                self.forget([key])

    def finish(self, cur: psycopg.Cursor, key: Any, set_sql: str, params: Sequence[Any] = ()) -> bool:
        """One fenced statement that writes a row's result (`set_sql` with positional %s `params`) and
        ends the lease on it. False (nothing written): the lease was lost. Does not commit."""
        cur.execute(
            f"UPDATE {self.table} SET {set_sql}, claim_token = NULL, lease_expires_at = NULL "
            f"WHERE {self.key_column} = %s AND {FENCE}",
            (*params, key, self.token),
        )
        if cur.rowcount != 1:
            self._mark_lost(key)
            return False
        self.forget([key])
        return True

    # --- bookkeeping ---------------------------------------------------------------------------------

    @property
    def held(self) -> set[Any]:
        with self._lock:
            return set(self._held)

    @property
    def lost(self) -> set[Any]:
        """Keys another holder took over (found by `renew`, `fence` or `finish`)."""
        with self._lock:
            return set(self._lost)

    def forget(self, keys: Iterable[Any]) -> None:
        """Stop renewing these keys (their result is written, or they were given back)."""
        with self._lock:
            self._held.difference_update(keys)

    def _mark_lost(self, key: Any) -> None:
        with self._lock:
            self._held.discard(key)
            self._lost.add(key)
        log.warning("lost the lease on %s %s=%s (token %s): another run took it over; writing nothing for it",
                    self.table, self.key_column, key, self.token)

    def __repr__(self) -> str:
        return f"Lease({self.table}.{self.key_column}, ttl={self.ttl_seconds:g}s, token={self.token})"


Connect = Callable[[], AbstractContextManager[psycopg.Connection]]


class Heartbeat:
    """Renews `lease` every `interval` seconds (default ttl/3) on a connection of its own while the
    work runs. `lost` is set once any held row was taken over. A failed renewal (a database blip) is
    retried at the next beat: two more beats fit in the ttl."""

    def __init__(self, lease: Lease, connect: Connect, interval: float | None = None) -> None:
        self.lease, self.connect = lease, connect
        self.interval = interval if interval is not None else lease.ttl_seconds / 3
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat-{lease.table}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.connect() as conn:
                    self.lease.renew(conn)
            except Exception as error:  # noqa: BLE001 - retried at the next beat
                log.warning("renewing %r failed (%s); retrying in %.0f s", self.lease, error, self.interval)
            if self.lease.lost:
                self.lost.set()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
