"""Event tables as a real chainstorage deployment creates them: height indexes named per deployment
(found by their key attribute), legacy items without `sequence`, watermarks at height 0, and the
"deleted" watermark chainstorage writes while it repopulates a table. Real dynalite and PostgreSQL."""

import uuid

import dagster as dg
import pytest

from migration_assets.chain.assets import block_metadata
from migration_assets.chain.cli import event_id_range
from migration_assets.chain.event_source import EventLayout, HeightIndexMissing, NoEventHistory, max_event_id
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.sensors import chain_sync
from migration_assets.cli import main
from migration_assets.devstack.sample_chain import sample_chain
from migration_assets.devstack.sample_events import (
    chain_events, chainstorage_index_name, create_event_table, watermark_item,
)
from tests.chain.helpers import TAG, seed

LAYOUTS = [pytest.param(EventLayout(0), id="legacy-tag0"), pytest.param(EventLayout(2), id="versioned-tag2")]


def as_chainstorage_writes(layout: EventLayout, item: dict) -> dict:
    """chainstorage's legacy event items have no `sequence` (the id is the key) and carry a zero
    `max_event_id`; versioned items are as the sample writes them."""
    if not layout.legacy or item["event_id"]["N"] == "-1":
        return item
    rest = {name: value for name, value in item.items() if name != "sequence"}
    return {**rest, "max_event_id": {"N": "0"}}


def event_table_named(dynamodb, monkeypatch, layout: EventLayout, indexes: list[str], items=()) -> str:
    name = f"events_{uuid.uuid4().hex[:10]}"
    create_event_table(dynamodb, name, layout, indexes)
    seed(dynamodb, name, [as_chainstorage_writes(layout, item) for item in items])
    monkeypatch.setenv("CHAIN_EVENT_TABLE", name)
    monkeypatch.setenv("CHAIN_EVENT_TAG", str(layout.event_tag))
    return name


def source_ids(events: list, heights: range) -> tuple[int, int]:
    ids = [int(e["sequence"]["N"]) for e in events[:-1] if int(e["height"]["N"]) in heights]
    return min(ids), max(ids) + 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_migrates_events_through_a_deployment_named_index(
    dagster_home, dynamodb, block_table, target, monkeypatch, capsys, layout
):
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_EVENT_RANGE_SIZE", "1000")
    blocks = list(sample_chain(TAG, 0, 20, reorg_rate=0.2))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    table = event_table_named(dynamodb, monkeypatch, layout, [chainstorage_index_name(layout, "polygon", "mainnet")], events)

    code = main(["chain", "migrate", "--start-height", "0", "--end-height", "20"])

    out = capsys.readouterr().out
    assert code == 0, out
    first, end = source_ids(events, range(0, 20))  # height 0 holds the legacy watermark too: not an event
    assert f"events: heights [0, 20) are event ids [{first}, {end})" in out, table
    stored = target.execute("SELECT event_sequence FROM block_events ORDER BY 1").fetchall()
    assert [row[0] for row in stored] == list(range(1, len(events)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_override_picks_one_of_several_indexes_on_the_height_key(dynamodb, monkeypatch, layout):
    events = list(chain_events(sample_chain(TAG, 0, 10, reorg_rate=0.3), layout))
    event_table_named(dynamodb, monkeypatch, layout, ["events_by_height_b", "events_by_height_a"], events)
    with pytest.raises(HeightIndexMissing, match=r"found several \(events_by_height_a, events_by_height_b\)"):
        event_id_range(ChainSourceResource(), 0, 10)

    monkeypatch.setenv("CHAIN_EVENT_HEIGHT_INDEX", "events_by_height_a")
    assert event_id_range(ChainSourceResource(), 3, 7) == source_ids(events, range(3, 7))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_table_without_a_height_index_is_named_with_what_was_looked_for(dynamodb, monkeypatch, layout):
    events = list(chain_events(sample_chain(TAG, 0, 5), layout))
    table = event_table_named(dynamodb, monkeypatch, layout, [], events)

    with pytest.raises(HeightIndexMissing) as raised:
        event_id_range(ChainSourceResource(), 0, 5)

    message = str(raised.value)
    assert table in message
    assert f"hash key {layout.index_attribute!r}" in message
    assert "CHAIN_EVENT_HEIGHT_INDEX" in message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_deleted_watermark_means_no_event_history_yet(
    dagster_home, dynamodb, block_table, monkeypatch, capsys, layout
):
    events = list(chain_events(sample_chain(TAG, 0, 5), layout))
    table = event_table_named(dynamodb, monkeypatch, layout, [chainstorage_index_name(layout)],
                              events[:-1] + [watermark_item(layout, 0)])

    with pytest.raises(NoEventHistory, match="no event history yet"):
        max_event_id(dynamodb, table, layout)
    code = main(["chain", "migrate", "--start-height", "0", "--end-height", "5", "--skip-blocks"])

    out = capsys.readouterr().out
    assert code == 1
    assert f"error: {table}: event tag {layout.event_tag} has no event history yet" in out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_sync_sensor_skips_events_while_their_history_is_deleted(
    fresh_instance, dynamodb, block_table, monkeypatch, capfd, layout
):
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    blocks = list(sample_chain(TAG, 0, 25))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    event_table_named(dynamodb, monkeypatch, layout, [chainstorage_index_name(layout)], events[:-1] + [watermark_item(layout, 0)])
    context = dg.build_sensor_context(instance=fresh_instance, resources={"chain_source": ChainSourceResource()})

    result = chain_sync(context)

    assert {request.asset_selection[0] for request in result.run_requests} == {block_metadata.key}
    assert "has no event history yet" in capfd.readouterr().err
