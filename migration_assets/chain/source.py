"""Reading chainstorage's DynamoDB block table (reference/chain.md).

Items: `block_pid` = "{tag}-{height}", `block_rid` = the block hash, "canonical" for the winner's full
copy, or "null" for a skipped block. Watermark: `block_pid` = "{tag}-latest", `block_rid` = "canonical".
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from migration_assets.chain.items import HASH_LENGTH, OBJECT_KEY_LENGTH, ItemReader, SourceDataError, pages

CANONICAL_RID = "canonical"
BLOCK_KEY = ("block_pid", "block_rid")


class MultipleCanonicalError(SourceDataError):
    pass


class BlockItem(BaseModel, frozen=True):
    """One block as stored in PostgreSQL; built from a DynamoDB item."""

    tag: int
    height: int
    hash: str | None
    parent_hash: str
    parent_height: int
    object_key_main: str
    timestamp: int
    skipped: bool

    @property
    def identity(self) -> tuple[str, str | int]:
        """What makes a block distinct in the target: its hash, or its height when skipped."""
        return ("skipped", self.height) if self.skipped else ("hash", self.hash or "")


@dataclass(frozen=True)
class HeightBlocks:
    """Every block at one height, in load order: non-canonical first, the canonical one last."""

    height: int
    blocks: list[BlockItem]
    canonical: BlockItem | None

    @property
    def non_canonical_count(self) -> int:
        return len(self.blocks) - (1 if self.canonical else 0)


def parse_block_item(item: dict[str, Any], table: str = "the block table") -> tuple[str, BlockItem]:
    """(block_rid, block) from a raw DynamoDB item; SourceDataError names a malformed one."""
    attrs = ItemReader(table, "block", item, BLOCK_KEY)
    skipped = attrs.flag("skipped", default=False)
    block = BlockItem(
        tag=attrs.integer("tag", bits=32),
        height=attrs.integer("height"),
        hash=None if skipped else (attrs.text("block_hash", default="", max_length=HASH_LENGTH) or None),
        parent_hash=attrs.text("parent_hash", default="", max_length=HASH_LENGTH),
        parent_height=attrs.integer("parent_height", default=0),
        object_key_main=attrs.text("object_key_main", default="", max_length=OBJECT_KEY_LENGTH),
        timestamp=attrs.integer("timestamp", default=0),
        skipped=skipped,
    )
    if not skipped and not block.hash:
        raise attrs.malformed("not skipped but has no block_hash")
    return attrs.text("block_rid"), block


def order_height(tag: int, height: int, items: list[dict[str, Any]], table: str = "the block table") -> HeightBlocks:
    """Classify one height's items: the canonical copy last, each other distinct block once before it."""
    canonical: list[BlockItem] = []
    others: dict[tuple[str, str | int], BlockItem] = {}
    for item in items:
        rid, block = parse_block_item(item, table)
        if block.height != height or block.tag != tag:
            raise SourceDataError(
                f"block item {tag}-{height}/{rid} in table {table} says tag {block.tag} height {block.height}"
            )
        if rid == CANONICAL_RID:
            canonical.append(block)
        else:
            others.setdefault(block.identity, block)
    if len(canonical) > 1:
        raise MultipleCanonicalError(f"multiple canonical blocks found for {tag}-{height} in table {table}")
    winner = canonical[0] if canonical else None
    if winner is not None:
        others.pop(winner.identity, None)  # the canonical copy stands for its own hash item
    ordered = sorted(others.values(), key=lambda b: (b.timestamp, b.hash or ""))
    return HeightBlocks(height, ordered + ([winner] if winner else []), winner)


def query_height_items(client: Any, table: str, tag: int, height: int) -> list[dict[str, Any]]:
    """Every item under "{tag}-{height}", following each 1 MB page."""
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {
        "TableName": table,
        "KeyConditionExpression": "block_pid = :pid",
        "ExpressionAttributeValues": {":pid": {"S": f"{tag}-{height}"}},
        "ConsistentRead": True,
    }
    for page in pages(client.query, request, table):
        items.extend(page.get("Items", []))
    return items


def read_height(client: Any, table: str, tag: int, height: int) -> HeightBlocks:
    return order_height(tag, height, query_height_items(client, table, tag, height), table)


class SourceTableMissing(SourceDataError):
    """The configured DynamoDB table does not exist at the endpoint."""


@contextmanager
def naming_missing_table(client: Any, table: str, variable: str) -> Iterator[None]:
    """DynamoDB's ResourceNotFoundException names no table: say which one, where, and what sets it."""
    try:
        yield
    except client.exceptions.ResourceNotFoundException:
        raise SourceTableMissing(
            f"DynamoDB table {table!r} not found at {client.meta.endpoint_url}; "
            f"check {variable} and AWS_ENDPOINT_URL_DYNAMODB"
        ) from None


def latest_block(client: Any, table: str, tag: int) -> tuple[int, str] | None:
    """(height, hash) of the "{tag}-latest" watermark, or None when the table has none yet."""
    with naming_missing_table(client, table, "CHAIN_BLOCK_TABLE"):
        reply = client.get_item(
            TableName=table,
            Key={"block_pid": {"S": f"{tag}-latest"}, "block_rid": {"S": CANONICAL_RID}},
            ConsistentRead=True,
        )
    item = reply.get("Item")
    if item is None:
        return None
    attrs = ItemReader(table, "watermark", item, BLOCK_KEY)
    return attrs.integer("height"), attrs.text("block_hash", default="")


def latest_height(client: Any, table: str, tag: int) -> int | None:
    latest = latest_block(client, table, tag)
    return None if latest is None else latest[0]
