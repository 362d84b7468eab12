"""Reading chainstorage's DynamoDB event tables (reference/chain.md).

Two layouts: event tag 0 (legacy) keys events by a numeric `event_id`, with a watermark item
`event_id = -1` holding `max_event_id`; event tag >= 1 keys them by the string "{tag}-{sequence}",
with a watermark "{tag}-latest" whose `sequence` is the max event id. Ids start at 1, contiguous.
Legacy items carry no `sequence`: their id is the key. Each table has a GSI on `height` (legacy) or
`block_id` ("{tag}-{height}"), named per deployment, so it is found by its key attribute. A watermark
holding chainstorage's EventIdDeleted (0), written while a table is repopulated, means no event history.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

from pydantic import BaseModel

from migration_assets.chain.items import HASH_LENGTH, ItemReader, SourceDataError, pages
from migration_assets.chain.source import naming_missing_table
from migration_assets.core.aws import DynamoClientSpec, cached_client
from migration_assets.core.backoff import Backoff
from migration_assets.core.concurrency import ordered_map, ordered_map_in_processes

BATCH_GET_LIMIT = 100  # keys per BatchGetItem call
EVENT_KEY = ("event_id",)
EVENT_ID_DELETED = 0  # chainstorage's EventIdDeleted: the watermark while the table is repopulated
LEGACY_WATERMARK_ID = -1  # the legacy watermark's event_id; it sits at height 0 in the height index
UNPROCESSED_BACKOFF = Backoff(base=0.05, cap=5.0)  # waits before re-asking for UnprocessedKeys
# How long UnprocessedKeys are asked for again before the range fails: a throttled table catches up in
# seconds to minutes (13 s of attempts failed 100,000-event ranges on a burst).
UNPROCESSED_MAX_SECONDS = 300.0


class TableThrottled(RuntimeError):
    """BatchGetItem kept keys unprocessed past UNPROCESSED_MAX_SECONDS."""


class NoEventHistory(SourceDataError):
    """The event table has no event history yet (its watermark is chainstorage's deleted sentinel)."""


class HeightIndexMissing(SourceDataError):
    """The event table has no GSI to find a height's events by."""


class EventType(str, Enum):
    UNKNOWN = "UNKNOWN"
    BLOCK_ADDED = "BLOCK_ADDED"
    BLOCK_REMOVED = "BLOCK_REMOVED"


_EVENT_TYPES = {0: EventType.UNKNOWN, 1: EventType.BLOCK_ADDED, 2: EventType.BLOCK_REMOVED}


class EventItem(BaseModel, frozen=True):
    event_tag: int
    sequence: int
    type: EventType
    height: int
    hash: str | None
    parent_hash: str
    block_tag: int
    skipped: bool


@dataclass(frozen=True)
class EventLayout:
    """Keys and watermark of the event table for one event tag."""

    event_tag: int

    @property
    def legacy(self) -> bool:
        return self.event_tag == 0

    def key(self, sequence: int) -> dict[str, Any]:
        if self.legacy:
            return {"event_id": {"N": str(sequence)}}
        return {"event_id": {"S": f"{self.event_tag}-{sequence}"}}

    def watermark_key(self) -> dict[str, Any]:
        return {"event_id": {"N": "-1"}} if self.legacy else {"event_id": {"S": f"{self.event_tag}-latest"}}

    @property
    def watermark_attribute(self) -> str:
        return "max_event_id" if self.legacy else "sequence"

    @property
    def index_attribute(self) -> str:
        """The hash key of the GSI that finds a height's events."""
        return "height" if self.legacy else "block_id"

    def index_value(self, height: int) -> dict[str, Any]:
        return {"N": str(height)} if self.legacy else {"S": f"{self.event_tag}-{height}"}

    def sequence_of(self, table: str, item: dict[str, Any]) -> int | None:
        """The event id of a height-index item; None for the legacy watermark (at height 0)."""
        attrs = ItemReader(table, "event", item, EVENT_KEY)
        if not self.legacy:
            return attrs.integer("sequence")
        sequence = attrs.integer("event_id")
        return None if sequence == LEGACY_WATERMARK_ID else sequence


def parse_event_item(layout: EventLayout, item: dict[str, Any], table: str = "the event table") -> EventItem:
    """An event from a raw DynamoDB item; SourceDataError names a malformed one."""
    attrs = ItemReader(table, "event", item, EVENT_KEY)
    skipped = attrs.flag("skipped", default=False)
    type_code = attrs.integer("type")
    if type_code not in _EVENT_TYPES:
        raise attrs.malformed(f"attribute 'type' must be 0, 1 or 2, got {type_code}")
    event = EventItem(
        event_tag=attrs.integer("event_tag", default=layout.event_tag, bits=32),
        sequence=attrs.integer("event_id" if layout.legacy else "sequence"),
        type=_EVENT_TYPES[type_code],
        height=attrs.integer("height"),
        hash=None if skipped else (attrs.text("hash", default="", max_length=HASH_LENGTH) or None),
        parent_hash=attrs.text("parent_hash", default="", max_length=HASH_LENGTH),
        block_tag=attrs.integer("tag", bits=32),
        skipped=skipped,
    )
    if event.event_tag != layout.event_tag:
        raise attrs.malformed(f"attribute 'event_tag' is {event.event_tag}, expected {layout.event_tag}")
    if item.get("event_id") != layout.key(event.sequence)["event_id"]:
        raise attrs.malformed(f"attribute 'sequence' is {event.sequence}, which is not the item's key")
    if layout.legacy and attrs.integer("sequence", default=event.sequence) != event.sequence:
        raise attrs.malformed(f"attribute 'sequence' is {attrs.integer('sequence')}, which is not the item's key")
    if not event.skipped and not event.hash:
        raise attrs.malformed("block not skipped but has no hash")
    return event


def batch_get(client: Any, table: str, keys: list[dict[str, Any]], max_seconds: float = UNPROCESSED_MAX_SECONDS,
              sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """BatchGetItem of up to 100 keys, asking again for `UnprocessedKeys` with the project's backoff for
    up to `max_seconds`."""
    items: list[dict[str, Any]] = []
    request = {table: {"Keys": keys, "ConsistentRead": True}}
    waited, attempt = 0.0, 0
    while True:
        reply = client.batch_get_item(RequestItems=request)
        items.extend(reply.get("Responses", {}).get(table, []))
        request = reply.get("UnprocessedKeys") or {}
        if not request:
            return items
        attempt += 1
        if waited >= max_seconds:
            break
        delay = UNPROCESSED_BACKOFF.delay(attempt)
        sleep(delay)
        waited += delay
    left = len(request[table]["Keys"])
    raise TableThrottled(f"{table}: {left} keys still unprocessed after {attempt} BatchGetItem attempts in {waited:.0f} s; "
                       "the table is throttled: lower read_concurrency or raise its capacity, then re-run")


def _fetch_events(client: Any, table: str, layout: EventLayout, end: int, first: int) -> list[EventItem]:
    keys = [layout.key(seq) for seq in range(first, min(first + BATCH_GET_LIMIT, end))]
    events = [parse_event_item(layout, item, table) for item in batch_get(client, table, keys)]
    return sorted(events, key=lambda e: e.sequence)


def _read_events_in_worker(
    spec: DynamoClientSpec, table: str, layout: EventLayout, end: int, threads: int, ids: range
) -> list[EventItem]:
    fetch = partial(_fetch_events, cached_client(spec), table, layout, end)
    return [event for batch in ordered_map(fetch, ids, threads) for event in batch]


_IDS_PER_TASK = 2000  # 20 BatchGetItem calls a worker task
_MIN_IDS_FOR_PROCESSES = 10_000


def read_events(
    client: Any, table: str, layout: EventLayout, start: int, end: int, concurrency: int,
    processes: int = 1, client_spec: DynamoClientSpec | None = None,
) -> Iterator[list[EventItem]]:
    """Batches of events with ids in [start, end), in id order, read by threads, or by worker
    processes each running threads (botocore's parsing is CPU-bound). A missing id is not an error
    here: the caller decides (a gap below the watermark is)."""
    if processes <= 1 or client_spec is None or end - start < _MIN_IDS_FOR_PROCESSES:
        fetch = partial(_fetch_events, client, table, layout, end)
        yield from ordered_map(fetch, range(start, end, BATCH_GET_LIMIT), concurrency)
        return
    threads = max(1, concurrency // processes)
    task = partial(_read_events_in_worker, client_spec, table, layout, end, threads)
    tasks = (range(s, min(s + _IDS_PER_TASK, end), BATCH_GET_LIMIT) for s in range(start, end, _IDS_PER_TASK))
    yield from ordered_map_in_processes(task, tasks, processes)


def max_event_id(client: Any, table: str, layout: EventLayout) -> int | None:
    """The event watermark, or None when the table has none yet. NoEventHistory when chainstorage
    has set it to its deleted sentinel, as it does while it repopulates the table."""
    with naming_missing_table(client, table, "CHAIN_EVENT_TABLE"):
        item = client.get_item(TableName=table, Key=layout.watermark_key(), ConsistentRead=True).get("Item")
    if item is None:
        return None
    watermark = ItemReader(table, "watermark", item, EVENT_KEY).integer(layout.watermark_attribute)
    if watermark == EVENT_ID_DELETED:
        raise NoEventHistory(
            f"{table}: event tag {layout.event_tag} has no event history yet: its watermark holds "
            f"chainstorage's deleted sentinel ({EVENT_ID_DELETED}), written while the table is repopulated; "
            "migrate its events once chainstorage has written a watermark again"
        )
    return watermark


def _hash_key(index: dict[str, Any]) -> str:
    return next(key["AttributeName"] for key in index["KeySchema"] if key["KeyType"] == "HASH")


def find_height_index(client: Any, table: str, layout: EventLayout, override: str | None = None) -> str:
    """The name of the table's GSI keyed by the layout's height attribute (`height` or `block_id`):
    chainstorage names it per deployment. `override` (CHAIN_EVENT_HEIGHT_INDEX) skips the lookup."""
    if override:
        return override
    attribute = layout.index_attribute
    with naming_missing_table(client, table, "CHAIN_EVENT_TABLE"):
        description = client.describe_table(TableName=table)["Table"]
    indexes = description.get("GlobalSecondaryIndexes", [])
    found = sorted(index["IndexName"] for index in indexes if _hash_key(index) == attribute)
    if len(found) == 1:
        return found[0]
    names = ", ".join(index["IndexName"] for index in indexes) or "none"
    problem = f"several ({', '.join(found)})" if found else f"none (its indexes: {names})"
    raise HeightIndexMissing(
        f"{table}: looked for a global secondary index with hash key {attribute!r} (event tag "
        f"{layout.event_tag}) to find a height's events, found {problem}; set CHAIN_EVENT_HEIGHT_INDEX "
        "to the index chainstorage's event_table_height_index / versioned_event_table_block_index names"
    )


def event_ids_at_height(client: Any, table: str, layout: EventLayout, height: int, index: str) -> list[int]:
    """Ids of the events at one height, from the table's height index `index` (eventually consistent)."""
    request: dict[str, Any] = {
        "TableName": table, "IndexName": index,
        "KeyConditionExpression": f"{layout.index_attribute} = :value",
        "ExpressionAttributeValues": {":value": layout.index_value(height)},
        "ProjectionExpression": "event_id, #seq", "ExpressionAttributeNames": {"#seq": "sequence"},
    }
    ids: list[int] = []
    for page in pages(client.query, request, table):
        # The legacy watermark (event_id -1) sits at height 0: never an event.
        sequences = (layout.sequence_of(table, item) for item in page.get("Items", []))
        ids += [sequence for sequence in sequences if sequence is not None]
    return sorted(ids)
