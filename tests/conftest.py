"""Real components for the tests: an embedded PostgreSQL, a dynalite DynamoDB-API server on loopback,
and a Dagster instance on PostgreSQL storage. Each test gets a fresh target database and table."""

import shutil
import uuid
from collections.abc import Iterator

import boto3
import dagster as dg
import psycopg
import pytest

from migration_assets.core import embedded
from migration_assets.core.instance import INSTANCE_CONFIG
from migration_assets.core.postgres import close_pools, shared_pool
from migration_assets.devstack.sample_chain import create_block_table
from migration_assets.devstack.servers import local_aws_environment, start_dynalite

TEMPLATE_DB = "migration_template"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIGRATION_DATA_DIR", str(data))
        mp.delenv("MIGRATION_DATABASE_URL", raising=False)
        url = embedded.embedded_server_url()
    # Build a template with the schema applied once; every test clones it (fast CREATE DATABASE).
    template_url = embedded.database_url(url, TEMPLATE_DB)
    shared_pool(template_url)
    close_pools()
    yield url
    close_pools()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIGRATION_DATA_DIR", str(data))
        embedded.stop_embedded_server()


def fresh_database(server_url: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    return embedded.database_url(server_url, name)


@pytest.fixture
def target_url(pg_server_url, monkeypatch) -> Iterator[str]:
    """A fresh target database with the schema, exported as MIGRATION_DATABASE_URL."""
    url = fresh_database(pg_server_url)
    monkeypatch.setenv("MIGRATION_DATABASE_URL", url)
    yield url
    close_pools()


@pytest.fixture
def target(target_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def dynalite(tmp_path_factory) -> Iterator[str]:
    server = start_dynalite(log_path=tmp_path_factory.mktemp("logs") / "dynalite.log")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in local_aws_environment(server.url).items():
            mp.setenv(name, value)
        yield server.url
    server.stop()


@pytest.fixture
def dynamodb(dynalite):
    return boto3.client("dynamodb")


@pytest.fixture
def block_table(dynamodb, monkeypatch) -> str:
    """A new, empty block table, exported as CHAIN_BLOCK_TABLE."""
    name = f"blocks_{uuid.uuid4().hex[:10]}"
    create_block_table(dynamodb, name)
    monkeypatch.setenv("CHAIN_BLOCK_TABLE", name)
    return name


def _test_instance(pg_server_url: str, **overrides) -> Iterator[dg.DagsterInstance]:
    dagster_url = embedded.dagster_storage_url(embedded.database_url(pg_server_url, "dagster_test"))
    storage = {"storage": {"postgres": {"postgres_url": dagster_url}}}
    with dg.instance_for_test(overrides=storage | overrides) as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def instance(pg_server_url) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on PostgreSQL storage, as the project's dagster.yaml configures it."""
    yield from _test_instance(pg_server_url)


@pytest.fixture(scope="session")
def instance_in_threads(pg_server_url) -> Iterator[dg.DagsterInstance]:
    """The same storage, without capturing compute logs, for runs a test ends in a thread of its own
    (tests/ending.py): the capture's `tail` process, stopped at each run's end, held such runs up to 30 s
    in CI (its stack showed `execute_posix_tail`), so a time limit measured Dagster, not the code."""
    yield from _test_instance(pg_server_url, compute_logs={
        "module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"})


@pytest.fixture(params=[0, 2], ids=["legacy-tag0", "versioned-tag2"])
def event_table(request, dynamodb, monkeypatch):
    """A new event table in the layout of the event tag (0: numeric ids, >= 1: "{tag}-{seq}")."""
    from migration_assets.chain.event_source import EventLayout
    from migration_assets.devstack.sample_events import create_event_table

    layout = EventLayout(request.param)
    name = f"events_{uuid.uuid4().hex[:10]}"
    create_event_table(dynamodb, name, layout)
    monkeypatch.setenv("CHAIN_EVENT_TABLE", name)
    monkeypatch.setenv("CHAIN_EVENT_TAG", str(layout.event_tag))
    return name, layout


@pytest.fixture
def fresh_instance(pg_server_url) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance of its own (fresh PostgreSQL storage), for tests that count runs or partitions."""
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    dagster_url = embedded.dagster_storage_url(embedded.database_url(pg_server_url, name))
    with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": dagster_url}}}) as test_instance:
        yield test_instance


@pytest.fixture
def dagster_home(tmp_path, instance, monkeypatch):
    """A DAGSTER_HOME with the project's dagster.yaml on the test instance's PostgreSQL storage: what
    the `migration-assets` command (in-process or as a subprocess) runs against."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(INSTANCE_CONFIG, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", instance.run_storage.postgres_url)
    return home
