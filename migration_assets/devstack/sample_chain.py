"""A sample chain in chainstorage's DynamoDB block-table layout, with reorgs and skipped blocks."""

import hashlib
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any

from migration_assets.chain.source import CANONICAL_RID
from migration_assets.core.concurrency import ordered_map

Item = dict[str, dict[str, Any]]


def block_hash(tag: int, height: int, branch: int = 0) -> str:
    return "0x" + hashlib.sha256(f"{tag}:{height}:{branch}".encode()).hexdigest()


def block_item(
    tag: int, height: int, rid: str, *, hash: str = "", parent_hash: str = "", parent_height: int = 0,
    skipped: bool = False, timestamp: int = 1_700_000_000, **extra: Item,
) -> Item:
    """One DynamoDB item of the block table, in the low-level attribute-value format."""
    item: Item = {
        "block_pid": {"S": f"{tag}-{height}"},
        "block_rid": {"S": rid},
        "tag": {"N": str(tag)},
        "block_hash": {"S": hash},
        "parent_hash": {"S": parent_hash},
        "height": {"N": str(height)},
        "parent_height": {"N": str(parent_height)},
        "object_key_main": {"S": f"blocks/{tag}/{height}/{hash or 'skipped'}" if not skipped else ""},
        "skipped": {"BOOL": skipped},
        "timestamp": {"N": str(timestamp + height)},
    }
    item.update(extra)
    return item


def sample_chain(
    tag: int, start: int, end: int, *, seed: int = 7, reorg_rate: float = 0.02, skip_rate: float = 0.01,
) -> Iterator[Item]:
    """Items for heights [start, end): each height's blocks plus its canonical copy; some heights
    hold 1-3 reorged blocks, some are skipped. Ends with the "{tag}-latest" watermark."""
    rng = random.Random(seed)
    parent_hash, parent_height = block_hash(tag, start - 1), max(start - 1, 0)
    winner: Item | None = None
    for height in range(start, end):
        if height > start and rng.random() < skip_rate:
            yield block_item(tag, height, "null", skipped=True)
            yield block_item(tag, height, CANONICAL_RID, skipped=True)
            continue
        for branch in range(1, 1 + (rng.randint(1, 3) if rng.random() < reorg_rate else 0)):
            orphan = block_hash(tag, height, branch)
            yield block_item(tag, height, orphan, hash=orphan, parent_hash=parent_hash, parent_height=parent_height)
        current = block_hash(tag, height)
        winner = block_item(tag, height, current, hash=current, parent_hash=parent_hash, parent_height=parent_height)
        yield winner
        yield {**winner, "block_rid": {"S": CANONICAL_RID}}
        parent_hash, parent_height = current, height
    if winner is not None:
        yield {**winner, "block_pid": {"S": f"{tag}-latest"}, "block_rid": {"S": CANONICAL_RID}}


def create_block_table(client: Any, table: str) -> None:
    client.create_table(
        TableName=table,
        KeySchema=[
            {"AttributeName": "block_pid", "KeyType": "HASH"},
            {"AttributeName": "block_rid", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "block_pid", "AttributeType": "S"},
            {"AttributeName": "block_rid", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})


def write_items(client: Any, table: str, items: Iterable[Item], concurrency: int = 8) -> int:
    """BatchWriteItem in 25s, several in flight, retrying unprocessed items; return the count."""
    return sum(ordered_map(lambda batch: _write_batch(client, table, batch), _batches(items), concurrency))


def _batches(items: Iterable[Item], size: int = 25) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append({"PutRequest": {"Item": item}})
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_batch(client: Any, table: str, batch: list) -> int:
    requests, delay = {table: batch}, 0.05
    while requests:
        requests = client.batch_write_item(RequestItems=requests).get("UnprocessedItems") or {}
        if requests:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return len(batch)
