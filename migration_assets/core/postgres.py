"""The PostgreSQL target: a pooled psycopg 3 connection per process, COPY helpers, schema on first use.
Pure core (no Dagster): the Dagster resource over it is core/resources.py."""

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.core.schema import apply_migrations

_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def shared_pool(url: str, max_size: int = 8) -> ConnectionPool:
    """One pool per database per process; the schema is brought up to date when it is first made.
    A caller that needs more connections than the pool has (`max_size`) grows it; it never shrinks."""
    with _pools_lock:
        pool = _pools.get(url)
        if pool is None:
            with psycopg.connect(url, autocommit=True) as conn:
                apply_migrations(conn)
            pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True, name="migration-target")
            _pools[url] = pool
        elif pool.max_size < max_size:
            pool.resize(pool.min_size, max_size)
        return pool


def close_pools() -> None:
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


def copy_rows(cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """COPY rows into `table` (a temp or staging table); return how many were written."""
    count = 0
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count

