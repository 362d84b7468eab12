"""Dagster resources shared by every pipeline: the shell over core/postgres.py."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from psycopg_pool import ConnectionPool
from pydantic import Field

from migration_assets.core.embedded import target_database_url
from migration_assets.core.postgres import shared_pool


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
