"""A local AT Protocol network (PLC + one reference PDS from @atproto/dev-env) for the repo tests."""

import uuid
from collections.abc import Iterator

import pytest

from migration_assets.devstack.atproto import AtprotoNetwork, PdsSeeder, start_atproto_network


@pytest.fixture(scope="session")
def atproto_network(tmp_path_factory) -> Iterator[AtprotoNetwork]:
    network = start_atproto_network(pds_count=1, log_path=tmp_path_factory.mktemp("logs") / "atproto.log")
    yield network
    network.stop()


@pytest.fixture
def atproto_env(atproto_network, monkeypatch) -> AtprotoNetwork:
    for name, value in atproto_network.environment().items():
        monkeypatch.setenv(name, value)
    return atproto_network


@pytest.fixture
def pds(atproto_env) -> Iterator[PdsSeeder]:
    with PdsSeeder(atproto_env.pdses[0]) as seeder:
        yield seeder


def handle() -> str:
    return f"u{uuid.uuid4().hex[:10]}.test"
