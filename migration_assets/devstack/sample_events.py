"""Events for a sample chain, in both of chainstorage's event-table layouts.

For each height: every reorged block is added then removed, then the canonical block is added, so the
sequence obeys the chain's rules (reference/chain.md)."""

from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from typing import Any

from migration_assets.chain.event_source import EventLayout
from migration_assets.chain.source import CANONICAL_RID

Item = dict[str, dict[str, Any]]
ADDED, REMOVED = 1, 2


def event_item(layout: EventLayout, sequence: int, event_type: int, block: Item) -> Item:
    """One event item about `block` (a block-table item) in the layout's format."""
    height = block["height"]["N"]
    item: Item = {
        **layout.key(sequence),
        "sequence": {"N": str(sequence)},
        "event_tag": {"N": str(layout.event_tag)},
        "type": {"N": str(event_type)},
        "height": {"N": height},
        "hash": {"S": block["block_hash"]["S"]},
        "parent_hash": {"S": block["parent_hash"]["S"]},
        "tag": {"N": block["tag"]["N"]},
        "skipped": {"BOOL": block["skipped"]["BOOL"]},
        "block_timestamp": {"N": block["timestamp"]["N"]},
    }
    if not layout.legacy:
        item["block_id"] = {"S": f"{layout.event_tag}-{height}"}
    return item


def watermark_item(layout: EventLayout, max_id: int) -> Item:
    """The watermark as chainstorage writes it: at height 0, so the legacy one (event_id -1) is also
    in the height index; `max_id` 0 is chainstorage's "deleted" sentinel."""
    common: Item = {
        "height": {"N": "0"}, "hash": {"S": ""}, "type": {"N": "0"}, "tag": {"N": "0"},
        "parent_hash": {"S": ""}, "skipped": {"BOOL": False}, "event_tag": {"N": str(layout.event_tag)},
    }
    if layout.legacy:
        return {**layout.watermark_key(), **common, "max_event_id": {"N": str(max_id)}}
    latest = f"{layout.event_tag}-latest"
    return {**layout.watermark_key(), **common, "sequence": {"N": str(max_id)}, "block_id": {"S": latest}}


def chain_events(
    block_items: Iterable[Item], layout: EventLayout, first_id: int = 1, replays: int = 0,
) -> Iterator[Item]:
    """Events for the heights of `block_items` (grouped by height, as sample_chain yields them),
    followed by the watermark. `replays` > 0 removes and adds each canonical block again that many
    times (as a stream that rolls its tip back and forth does; the chain's rules allow it): more
    events per height, for benches that need many events over few heights."""
    sequence = first_id - 1
    heights = (list(group) for pid, group in groupby(block_items, key=lambda i: i["block_pid"]["S"]) if not pid.endswith("latest"))
    for items in heights:
        canonical = next((i for i in items if i["block_rid"]["S"] == CANONICAL_RID), None)
        winner_hash = canonical["block_hash"]["S"] if canonical else None
        for block in items:
            if block["block_rid"]["S"] in (CANONICAL_RID, "null") or block["block_hash"]["S"] == winner_hash:
                continue
            for event_type in (ADDED, REMOVED):
                sequence += 1
                yield event_item(layout, sequence, event_type, block)
        if canonical is not None:
            for event_type in (ADDED, *(REMOVED, ADDED) * replays):
                sequence += 1
                yield event_item(layout, sequence, event_type, canonical)
    yield watermark_item(layout, sequence)


def chainstorage_index_name(layout: EventLayout, blockchain: str = "ethereum", network: str = "mainnet") -> str:
    """The height index's name as chainstorage's config templates make it, per deployment."""
    if layout.legacy:
        return f"example_chainstorage_block_events_by_height_{blockchain}_{network}"
    return f"example_chainstorage_versioned_block_events_by_block_id_{blockchain}_{network}"


def create_event_table(client: Any, table: str, layout: EventLayout, indexes: Sequence[str] | None = None) -> None:
    """An event table as chainstorage creates it: a GSI on the layout's height attribute, projection
    ALL, named each of `indexes` (default: the chainstorage-style name; () makes none)."""
    indexes = [chainstorage_index_name(layout)] if indexes is None else indexes
    attribute = layout.index_attribute
    definitions = [{"AttributeName": "event_id", "AttributeType": "N" if layout.legacy else "S"}]
    if indexes:
        definitions.append({"AttributeName": attribute, "AttributeType": next(iter(layout.index_value(0)))})
    gsis = [
        {"IndexName": name, "KeySchema": [{"AttributeName": attribute, "KeyType": "HASH"}],
         "Projection": {"ProjectionType": "ALL"}}
        for name in indexes
    ]
    client.create_table(
        TableName=table, KeySchema=[{"AttributeName": "event_id", "KeyType": "HASH"}],
        AttributeDefinitions=definitions, BillingMode="PAY_PER_REQUEST",
        **({"GlobalSecondaryIndexes": gsis} if gsis else {}),
    )
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
