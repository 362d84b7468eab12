"""Schema migrations apply once, in order, and concurrently without harm; the embedded server serves."""

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg

from migration_assets.core import embedded
from migration_assets.core.postgres import shared_pool
from migration_assets.core.resources import PostgresResource
from migration_assets.core.schema import apply_migrations, available_migrations


def test_migrations_apply_once_and_are_recorded(pg_server_url):
    url = embedded.database_url(pg_server_url, "schema_once")
    with psycopg.connect(url, autocommit=True) as conn:
        first = apply_migrations(conn)
        second = apply_migrations(conn)
        recorded = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    versions = [m.version for m in available_migrations()]
    assert first == versions and second == [] and recorded == versions
    assert {"block_metadata", "canonical_blocks"} <= tables


def test_concurrent_appliers_apply_each_migration_once(pg_server_url):
    url = embedded.database_url(pg_server_url, "schema_concurrent")

    def apply(_):
        with psycopg.connect(url, autocommit=True) as conn:
            return apply_migrations(conn)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(apply, range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(available_migrations())]


def test_partial_unique_indexes_of_the_real_schema(target):
    insert = "INSERT INTO block_metadata (height, tag, hash, timestamp, skipped) VALUES (%s, 1, %s, 0, %s)"
    target.execute(insert, (1, "0xa", False))
    target.execute(insert, (2, None, True))
    target.execute(insert, (3, None, True))  # skipped blocks are distinct by height
    for duplicate in [(9, "0xa", False), (2, None, True)]:
        try:
            target.execute(insert, duplicate)
        except psycopg.errors.UniqueViolation:
            continue
        raise AssertionError(f"{duplicate} was accepted")


def test_dagster_urls_name_the_psycopg2_driver():
    assert embedded.dagster_storage_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert embedded.dagster_storage_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert embedded.dagster_storage_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"


def test_a_caller_needing_more_connections_grows_the_shared_pool(target_url):
    assert shared_pool(target_url, 4).max_size == 4
    assert PostgresResource(database_url=target_url).pool(18).max_size == 18
    assert shared_pool(target_url).max_size == 18  # never shrinks under a caller that needs it
    with ThreadPoolExecutor(18) as threads:  # all 18 held at once: none waits for another
        held = list(threads.map(lambda _: _hold(shared_pool(target_url)), range(18)))
    assert len(set(held)) == 18


def _hold(pool):
    with pool.connection() as conn:
        pid = conn.info.backend_pid
        time.sleep(0.3)
        return pid
