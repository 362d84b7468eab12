"""The PostgreSQL target: a pooled psycopg 3 connection per process, COPY helpers, schema on first use.
Pure core (no Dagster): the Dagster resource over it is core/resources.py."""

import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.core.schema import apply_migrations

_pools: dict[tuple[str, str | None], ConnectionPool] = {}
# A connection that sat in the pool this long is checked (one round trip) before it is handed out: the
# server may have closed it meanwhile (idle_session_timeout, a failover, a firewall's idle cut), and a
# run would fail on it. One back sooner is handed out as it is: the hot paths pay nothing.
CHECK_AFTER_IDLE_SECONDS = 30.0


def _returned(conn: psycopg.Connection) -> None:
    conn._idle_since = time.monotonic()  # type: ignore[attr-defined]


def _check_if_idle(conn: psycopg.Connection) -> None:
    if time.monotonic() - getattr(conn, "_idle_since", 0.0) >= CHECK_AFTER_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)  # raises on a closed one: the pool opens another
_pools_lock = threading.Lock()


def shared_pool(url: str, max_size: int = 8, schema: str | None = None, migrations: str = "") -> ConnectionPool:
    """One pool per database (and schema) per process; the schema is brought up to date when it is
    first made. With `schema`, connections use it as their search_path and only the migrations whose
    name starts with `migrations` are applied there (a chain network's tables, apart from the others').
    A caller that needs more connections than the pool has (`max_size`) grows it; it never shrinks."""
    with _pools_lock:
        pool = _pools.get((url, schema))
        if pool is None:
            with psycopg.connect(url, autocommit=True) as conn:
                apply_migrations(conn, schema, prefix=migrations)
            options = {} if schema is None else {"options": f"-c search_path={schema}"}
            name = "migration-target" if schema is None else f"migration-target-{schema}"
            pool = ConnectionPool(url, kwargs=options, min_size=1, max_size=max_size, open=True, name=name,
                                  check=_check_if_idle, reset=_returned)
            _pools[(url, schema)] = pool
        elif pool.max_size < max_size:
            pool.resize(pool.min_size, max_size)
        return pool


def close_pools() -> None:
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


# Lone surrogates: what a JSON escape like \ud800 decodes to in Python, which UTF-8 can't encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(value: Any) -> Any:
    """`value` (text, or the lists and dicts of JSON) as PostgreSQL's text and jsonb can hold it: U+0000
    and lone surrogates become U+FFFD. A host may send either anywhere (an error message, a name, a
    JSON answer; a record may hold U+0000), and one of them would fail the statement writing it."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value.replace("\0", "\ufffd"))
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    return value


def is_storable(text: str) -> bool:
    """Whether PostgreSQL's text can hold `text` as it is (no U+0000, no lone surrogate)."""
    return (text.isascii() and "\0" not in text) or storable(text) == text


def copy_text(cur: psycopg.Cursor, table: str, columns: Sequence[str], lines: bytes) -> None:
    """COPY `lines`, rows already in COPY's text format, into `table`."""
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        copy.write(lines)


def copy_rows(cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """COPY rows into `table` (a temp or staging table); return how many were written."""
    count = 0
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count

