"""Versioned schema migrations, applied automatically and idempotently.

Migrations are the numbered `migrations/NNNN_name.sql` files, applied in order, each in its own
transaction with its version recorded in `schema_migrations`. An advisory lock serialises concurrent
appliers (many run workers start at once). A runner this small beats pulling in alembic/SQLAlchemy
models for plain SQL files.
"""

from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

_LOCK_KEY = 0x6D6967726174  # "migrat": any constant shared by every process of this project


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("migration_assets.core").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


def apply_migrations(conn: psycopg.Connection, schema: str | None = None, prefix: str = "") -> list[int]:
    """Bring the schema up to date; return the versions applied now (empty when already current).
    With `schema`: in that schema (made if missing, with its own schema_migrations), only the
    migrations whose name starts with `prefix`: a chain network's tables apart from the others'."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        if schema is not None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INT PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done or not migration.name.startswith(prefix):
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied_now.append(migration.version)
    return applied_now
