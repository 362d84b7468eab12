"""The PostgreSQL target: a pooled psycopg 3 connection per process, COPY helpers, schema on first use."""

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from psycopg_pool import ConnectionPool
from pydantic import Field

from migration_assets.core.embedded import target_database_url
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


class PostgresResource(dg.ConfigurableResource):
    """The migration target. Leave `database_url` unset to use MIGRATION_DATABASE_URL (or the embedded
    server); if you set it, pass `dg.EnvVar(...)` so the URL and its password stay out of run config."""

    database_url: str | None = Field(default=None, description="defaults to MIGRATION_DATABASE_URL")
    pool_size: int = 8

    def resolved_url(self) -> str:
        return self.database_url or target_database_url()

    def pool(self, size: int = 0) -> ConnectionPool:
        """The process's pool of this database, with at least `size` connections (and pool_size)."""
        return shared_pool(self.resolved_url(), max(size, self.pool_size))

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self.pool().connection() as conn:
            yield conn
