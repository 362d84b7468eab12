"""Several chains in one deployment, as chainstorage runs them: one table set per blockchain and
network, each network's rows in its own PostgreSQL schema. Real dynalite and PostgreSQL."""

import uuid

import dagster as dg
import pytest

from migration_assets.chain.definitions import chain_definitions, network_assets
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.event_source import EventLayout
from migration_assets.chain.settings import ChainSettings, NetworkConfig
from migration_assets.cli import main
from migration_assets.definitions import shared_resources
from migration_assets.devstack.sample_chain import create_block_table, sample_chain
from migration_assets.devstack.sample_events import chain_events, chainstorage_index_name, create_event_table
from tests.chain.helpers import TAG, seed

NETWORKS = {"ethereum_mainnet": range(0, 30), "base_mainnet": range(500, 520)}  # heights apart: rows tell whose


def test_each_network_gets_its_own_prefixed_assets_partitions_checks_and_sensor():
    defs = dg.Definitions.merge(
        chain_definitions(ChainSettings.load(networks=["ethereum-mainnet", "base-mainnet"])),
        dg.Definitions(resources=shared_resources()),
    )
    graph = defs.resolve_asset_graph()

    keys = sorted(key.to_user_string() for key in graph.get_all_asset_keys())
    assert keys == [f"{network}/chain/{asset}" for network in sorted(NETWORKS)
                    for asset in ("block_events", "block_metadata", "block_scan", "event_scan")]
    ranged = [key for key in graph.get_all_asset_keys() if key.path[-1] not in ("block_scan", "event_scan")]
    assert {graph.get(key).partitions_def.name for key in ranged} == {
        f"{network}_chain_{ranges}_ranges" for network in NETWORKS for ranges in ("block", "event")
    }
    assert sorted(sensor.name for sensor in defs.sensors) == ["base_mainnet_chain_sync", "ethereum_mainnet_chain_sync"]
    checks = {check.asset_key.path[0] for key in graph.get_all_asset_keys() for check in graph.get(key).check_keys}
    assert checks == set(NETWORKS)


def test_networks_are_named_as_chainstorage_names_them():
    settings = ChainSettings.load(table_prefix="prod", event_tag=2)
    assert NetworkConfig.parse("base-mainnet").tables(settings) == (
        "prod_blocks_base_mainnet", "prod_versioned_block_events_base_mainnet",
    )
    assert NetworkConfig.parse("base-mainnet", block_table="mine").tables(settings)[0] == "mine"
    assert NetworkConfig().tables(settings) == (settings.block_table, settings.event_table)
    with pytest.raises(ValueError, match="CHAIN_NETWORKS.*Ethereum"):
        ChainSettings.load(networks=["Ethereum"])


def seed_networks(dynamodb, monkeypatch, layout: EventLayout) -> dict:
    """Both networks' tables, named and indexed as chainstorage names them; {network: (blocks, events)}."""
    monkeypatch.setenv("CHAIN_TABLE_PREFIX", f"cs{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("CHAIN_NETWORKS", "ethereum-mainnet,base-mainnet")
    monkeypatch.setenv("CHAIN_EVENT_TAG", str(layout.event_tag))
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    sources = {}
    for name, heights in NETWORKS.items():
        blockchain, network = name.split("_")
        block_table, event_table = NetworkConfig(blockchain=blockchain, network=network).tables(ChainSettings.load())
        blocks = list(sample_chain(TAG, heights.start, heights.stop, reorg_rate=0.2))
        events = list(chain_events(blocks, layout))
        create_block_table(dynamodb, block_table)
        create_event_table(dynamodb, event_table, layout, [chainstorage_index_name(layout, blockchain, network)])
        seed(dynamodb, block_table, blocks)
        seed(dynamodb, event_table, events)
        sources[name] = (blocks, events)
    return sources


@pytest.mark.parametrize("event_tag", [0, 2], ids=["legacy-tag0", "versioned-tag2"])
def test_two_networks_migrate_side_by_side_without_mixing_rows(
    dagster_home, dynamodb, target, monkeypatch, capsys, event_tag
):
    sources = seed_networks(dynamodb, monkeypatch, EventLayout(event_tag))
    for name, heights in NETWORKS.items():
        blockchain, network = name.split("_")
        code = main(["chain", "migrate", "--blockchain", blockchain, "--network", network,
                     "--start-height", str(heights.start), "--end-height", str(heights.stop)])
        out = capsys.readouterr().out
        assert code == 0, out
    assert_each_network_in_its_schema(target, sources)


def assert_each_network_in_its_schema(target, sources: dict) -> None:
    for name, heights in NETWORKS.items():
        blocks, events = sources[name]
        schema = f"chain_{name}"
        stored = target.execute(f"SELECT min(height), max(height), count(*) FROM {schema}.block_metadata").fetchone()
        hash_items = [b for b in blocks if b["block_rid"]["S"] != "canonical"]
        assert stored == (heights.start, heights.stop - 1, len(hash_items)), name
        sequences = target.execute(f"SELECT event_sequence, height FROM {schema}.block_events ORDER BY 1").fetchall()
        assert [row[0] for row in sequences] == list(range(1, len(events))), name  # the last item is the watermark
        assert all(height in heights for _, height in sequences), name
    assert target.execute("SELECT count(*) FROM public.block_metadata").fetchone()[0] == 0


@pytest.mark.parametrize("event_tag", [0, 2], ids=["legacy-tag0", "versioned-tag2"])
def test_two_networks_scanned_side_by_side_without_mixing_rows(
    dagster_home, fresh_instance, dynamodb, target, monkeypatch, capsys, event_tag
):
    # An instance of its own: the partitions it shows materialized are this test's alone.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", fresh_instance.run_storage.postgres_url)
    monkeypatch.setenv("CHAIN_SCAN_SEGMENTS", "3")
    sources = seed_networks(dynamodb, monkeypatch, EventLayout(event_tag))
    for name in NETWORKS:
        blockchain, network = name.split("_")
        code = main(["chain", "migrate", "--blockchain", blockchain, "--network", network,
                     "--start-height", "0", "--method", "scan"])
        out = capsys.readouterr().out
        assert code == 0, out
        block_table, event_table = NetworkConfig(blockchain=blockchain, network=network).tables(ChainSettings.load())
        assert f"blocks: scanned {block_table}" in out and f"events: scanned {event_table}" in out, out
        assert "FAILED" not in out, out
    assert_each_network_in_its_schema(target, sources)

    for name, heights in NETWORKS.items():
        blockchain, network = name.split("_")
        chain = network_assets(NetworkConfig(blockchain=blockchain, network=network))
        block_keys = fresh_instance.get_materialized_partitions(chain.block_metadata.key)
        assert block_keys == {f"{s:012d}-{s + 10:012d}" for s in range(0, heights.stop, 10)}, name
        assert fresh_instance.get_materialized_partitions(chain.block_events.key) == {"000000000000-000000100000"}


def test_cli_wants_blockchain_and_network_together(capsys):
    code = main(["chain", "migrate", "--blockchain", "ethereum", "--start-height", "0", "--end-height", "1"])
    assert code == 2
    assert "--blockchain and --network together" in capsys.readouterr().out


def test_each_network_syncs_from_its_own_tables(fresh_instance, dynamodb, monkeypatch):
    sources = seed_networks(dynamodb, monkeypatch, EventLayout(0))
    for name, heights in NETWORKS.items():
        blockchain, network = name.split("_")
        chain = network_assets(NetworkConfig(blockchain=blockchain, network=network))
        context = dg.build_sensor_context(instance=fresh_instance, resources={"chain_source": ChainSourceResource()})

        result = chain.sync(context)

        assert {request.asset_selection[0] for request in result.run_requests} == {
            chain.block_metadata.key, chain.block_events.key,
        }
        block_keys = {r.partition_key for r in result.run_requests if r.asset_selection[0] == chain.block_metadata.key}
        assert block_keys == {f"{s:012d}-{s + 10:012d}" for s in range(0, heights.stop, 10)}, name
        added = {request.partitions_def_name for request in result.dynamic_partitions_requests}
        assert added == {f"{name}_chain_block_ranges", f"{name}_chain_event_ranges"}
        assert len(sources[name][1]) > 1


def test_without_chain_networks_the_one_chain_keeps_its_names():
    defs = dg.Definitions.merge(chain_definitions(ChainSettings.load()), dg.Definitions(resources=shared_resources()))
    graph = defs.resolve_asset_graph()

    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == {
        "chain/block_metadata", "chain/block_events", "chain/block_scan", "chain/event_scan"}
    assert [sensor.name for sensor in defs.sensors] == ["chain_sync"]
    assert NetworkConfig().schema is None
