"""Schema migrations apply once, in order, and concurrently without harm; the embedded server serves."""

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg

from migration_assets.core import embedded, postgres
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
    connected = threading.Barrier(4)

    def apply(_):
        with psycopg.connect(url, autocommit=True) as conn:
            connected.wait(30)  # all four start applying at once
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
    all_held = threading.Barrier(18)  # passed only while 18 connections are out of the pool at once

    def hold(_):
        with shared_pool(target_url).connection(timeout=60) as conn:
            all_held.wait(30)
            return conn.info.backend_pid

    with ThreadPoolExecutor(18) as threads:
        held = list(threads.map(hold, range(18)))
    assert len(set(held)) == 18


def test_a_pooled_connection_the_server_closed_while_idle_is_replaced(target_url, monkeypatch):
    """The server ends an idle session (idle_session_timeout, a failover, a firewall's idle cut): before,
    the pool handed the dead connection out and the run failed on its first statement."""
    monkeypatch.setattr(postgres, "CHECK_AFTER_IDLE_SECONDS", 0.0)
    pool = shared_pool(target_url)
    with pool.connection() as conn:
        pids = {conn.info.backend_pid}
    with psycopg.connect(target_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),))
    for _ in range(len(pids) + 1):
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid not in pids
