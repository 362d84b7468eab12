"""CHAIN_* settings: a bad value fails naming its variable; the resource shows the effective values."""

import pytest

from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.settings import ChainSettings
from migration_assets.core.settings import SettingsError


@pytest.mark.parametrize("variable, value, accepts", [
    ("CHAIN_BLOCK_TAG", "one", "valid integer"),
    ("CHAIN_EVENT_TAG", "-1", "greater than or equal to 0"),
    ("CHAIN_BLOCK_RANGE_SIZE", "10k", "valid integer"),
    ("CHAIN_READ_PROCESSES", "0", "greater than 0"),
])
def test_a_bad_value_fails_naming_its_variable(monkeypatch, variable, value, accepts):
    monkeypatch.setenv(variable, value)
    for load in (ChainSettings.from_env, ChainSourceResource):
        with pytest.raises(SettingsError) as raised:
            load()
        message = str(raised.value)
        assert f"{variable} (got {value!r})" in message and accepts in message, message


def test_the_resource_takes_its_defaults_from_the_environment_and_shows_them(monkeypatch):
    monkeypatch.setenv("CHAIN_BLOCK_TABLE", "mainnet_blocks")
    monkeypatch.setenv("CHAIN_EVENT_TAG", "2")
    monkeypatch.setenv("CHAIN_READ_CONCURRENCY", "32")

    resource = ChainSourceResource(block_tag=3, event_table=None)  # None: not given (the CLI's way)

    assert (resource.block_table, resource.block_tag, resource.event_table, resource.event_tag) == (
        "mainnet_blocks", 3, "chain_events", 2)
    assert resource.settings.block_tag == 3 and resource.settings.read_concurrency == 32
    assert resource.client_spec().max_pool_connections == 36
    # What the UI lists as the resource's configured values: the effective ones.
    shown = resource.get_resource_definition().config_schema.default_value
    assert {k: shown[k] for k in ("block_table", "block_tag", "event_tag", "read_concurrency")} == {
        "block_table": "mainnet_blocks", "block_tag": 3, "event_tag": 2, "read_concurrency": 32}


def test_a_bad_resource_value_is_refused_like_a_bad_variable():
    with pytest.raises(SettingsError, match="CHAIN_BLOCK_TAG.*greater than or equal to 0"):
        ChainSourceResource(block_tag=-1).settings
