"""Reading chainstorage's DynamoDB event tables (reference/chain.md).

Two layouts: event tag 0 (legacy) keys events by a numeric `event_id`, with a watermark item
`event_id = -1` holding `max_event_id`; event tag >= 1 keys them by the string "{tag}-{sequence}",
with a watermark "{tag}-latest" whose `sequence` is the max event id. Ids start at 1, contiguous.
"""

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

from pydantic import BaseModel, ValidationError

from migration_assets.chain.source import SourceDataError, naming_missing_table, plain
from migration_assets.core.aws import DynamoClientSpec, cached_client
from migration_assets.core.concurrency import ordered_map, ordered_map_in_processes

BATCH_GET_LIMIT = 100  # keys per BatchGetItem call


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

    def watermark_value(self, item: dict[str, Any]) -> int:
        return int(plain(item["max_event_id" if self.legacy else "sequence"]))

    def height_index(self, height: int) -> tuple[str, str, dict[str, Any]]:
        """(index name, key attribute, key value) of the GSI that finds a height's events."""
        if self.legacy:
            return "height_index", "height", {"N": str(height)}
        return "block_id_index", "block_id", {"S": f"{self.event_tag}-{height}"}


def parse_event_item(layout: EventLayout, item: dict[str, Any]) -> EventItem:
    attrs = {name: plain(value) for name, value in item.items()}
    event_id = attrs.get("event_id")
    try:
        skipped = bool(attrs.get("skipped", False))
        event = EventItem(
            event_tag=attrs.get("event_tag", layout.event_tag),
            sequence=attrs["sequence"],
            type=_EVENT_TYPES[int(attrs["type"])],
            height=attrs["height"],
            hash=None if skipped else (attrs.get("hash") or None),
            parent_hash=attrs.get("parent_hash") or "",
            block_tag=attrs["tag"],
            skipped=skipped,
        )
    except KeyError as error:
        raise SourceDataError(f"malformed event item {event_id}: missing or unknown {error}") from error
    except ValidationError as error:
        raise SourceDataError(f"malformed event item {event_id}: {error}") from error
    if event.event_tag != layout.event_tag:
        raise SourceDataError(f"event item {event_id} has event_tag {event.event_tag}, expected {layout.event_tag}")
    if not event.skipped and not event.hash:
        raise SourceDataError(f"malformed event item {event_id}: block not skipped but has no hash")
    return event


def batch_get(client: Any, table: str, keys: list[dict[str, Any]], max_attempts: int = 12) -> list[dict[str, Any]]:
    """BatchGetItem of up to 100 keys, retrying `UnprocessedKeys` with jittered exponential backoff."""
    items: list[dict[str, Any]] = []
    request = {table: {"Keys": keys, "ConsistentRead": True}}
    for attempt in range(max_attempts):
        reply = client.batch_get_item(RequestItems=request)
        items.extend(reply.get("Responses", {}).get(table, []))
        request = reply.get("UnprocessedKeys") or {}
        if not request:
            return items
        time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
    left = len(request[table]["Keys"])
    raise RuntimeError(f"{table}: {left} keys still unprocessed after {max_attempts} BatchGetItem attempts; "
                       "the table is throttled: lower read_concurrency or raise its capacity, then re-run")


def _fetch_events(client: Any, table: str, layout: EventLayout, end: int, first: int) -> list[EventItem]:
    keys = [layout.key(seq) for seq in range(first, min(first + BATCH_GET_LIMIT, end))]
    events = [parse_event_item(layout, item) for item in batch_get(client, table, keys)]
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
    """The event watermark, or None when the table has none yet."""
    with naming_missing_table(client, table, "CHAIN_EVENT_TABLE"):
        item = client.get_item(TableName=table, Key=layout.watermark_key(), ConsistentRead=True).get("Item")
    return None if item is None else layout.watermark_value(item)


def event_ids_at_height(client: Any, table: str, layout: EventLayout, height: int) -> list[int]:
    """Ids of the events at one height, from the table's height index (eventually consistent)."""
    index, attribute, value = layout.height_index(height)
    request: dict[str, Any] = {
        "TableName": table, "IndexName": index,
        "KeyConditionExpression": f"{attribute} = :value",
        "ExpressionAttributeValues": {":value": value},
        "ProjectionExpression": "#seq", "ExpressionAttributeNames": {"#seq": "sequence"},
    }
    ids: list[int] = []
    while True:
        page = client.query(**request)
        ids += [int(plain(item["sequence"])) for item in page.get("Items", []) if "sequence" in item]
        if not page.get("LastEvaluatedKey"):
            return sorted(ids)
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
