"""Migrating one event range [start, end) of ids: BatchGetItem reads, COPY loads, verification.

Only ids up to the source's watermark are read (the range at the tip is still open). An id missing
below the watermark is a gap in the source and fails the range; so does an event whose block is not
in block_metadata (the blocks must be migrated first). Loads are idempotent: a killed run is re-run.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from migration_assets.chain.event_checks import run_event_checks
from migration_assets.chain.event_loader import load_events
from migration_assets.chain.event_source import EventItem, EventLayout, max_event_id, read_events
from migration_assets.chain.items import NothingToRead
from migration_assets.core.aws import DynamoClientSpec
from migration_assets.core.checks import CheckOutcome, listing


class EventGapError(Exception):
    pass


class MissingBlocksError(Exception):
    def __init__(self, message: str, heights: list[int]):
        super().__init__(message)
        self.heights = heights


@dataclass
class EventRangeResult:
    event_tag: int
    start: int
    end: int
    read_start: int = 0  # ids [read_start, read_end) were read: ids start at 1, and the
    read_end: int = 0  # watermark cuts the range at the tip short
    events: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    min_height: int | None = None
    max_height: int | None = None
    seconds: float = 0.0
    checks: list[CheckOutcome] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def count(self, batch: list[EventItem]) -> None:
        self.events += len(batch)
        for event in batch:
            self.by_type[event.type.value] = self.by_type.get(event.type.value, 0) + 1
            self.min_height = event.height if self.min_height is None else min(self.min_height, event.height)
            self.max_height = event.height if self.max_height is None else max(self.max_height, event.height)


@dataclass(frozen=True)
class EventRangeRequest:
    client: Any
    table: str
    event_tag: int
    start: int
    end: int
    read_concurrency: int = 16
    chunk_events: int = 20_000
    read_processes: int = 1  # > 1 needs client_spec, for the worker processes' own clients
    client_spec: DynamoClientSpec | None = None


def migrate_event_range(
    request: EventRangeRequest,
    pool: ConnectionPool,
    on_progress: Callable[[EventRangeResult], None] = lambda result: None,
) -> EventRangeResult:
    started = time.monotonic()
    layout = EventLayout(request.event_tag)
    result = EventRangeResult(request.event_tag, request.start, request.end)
    watermark = max_event_id(request.client, request.table, layout)
    first = result.read_start = max(request.start, 1)  # event ids start at 1
    result.read_end = max(first, min(request.end, (watermark or 0) + 1))
    if result.read_end <= first:  # before: materialized with no event, every check passing
        tip = "it has no event watermark item" if watermark is None else f"its watermark is event {watermark}"
        raise NothingToRead(f"{request.table}: events [{request.start}, {request.end}) are past the source's tip "
                            f"({tip}): nothing to read yet; run the range once the chain has reached it "
                            "(the sync sensor does)")

    gaps: list[int] = []
    missing_blocks: set[tuple[int, str | None]] = set()
    expected = first
    chunk: list[EventItem] = []
    with pool.connection() as conn:

        def flush() -> None:
            missing_blocks.update(load_events(conn, chunk))
            chunk.clear()
            on_progress(result)

        batches = read_events(
            request.client, request.table, layout, first, result.read_end, request.read_concurrency,
            request.read_processes, request.client_spec,
        )
        for batch in batches:
            for event in batch:
                gaps.extend(range(expected, event.sequence))
                expected = event.sequence + 1
            result.count(batch)
            chunk.extend(batch)
            if len(chunk) >= request.chunk_events:
                flush()
        gaps.extend(range(expected, result.read_end))
        if chunk:
            flush()
        result.seconds = time.monotonic() - started
        if gaps:
            raise EventGapError(
                f"event tag {request.event_tag}: the source has no events with ids {listing(gaps)} "
                f"(below its watermark {watermark}); ids must be contiguous. Inspect {request.table}."
            )
        if missing_blocks:
            pairs = sorted(missing_blocks, key=lambda pair: pair[0])
            heights = [h for h, _ in pairs]
            raise MissingBlocksError(
                f"{len(pairs)} blocks referenced by events are not in block_metadata: "
                f"(height, hash) {listing(pairs)}. Migrate those heights' blocks first "
                f"(heights {min(heights)}-{max(heights)}: `migration-assets chain migrate "
                f"--start-height {min(heights)} --end-height {max(heights) + 1} --skip-events`), "
                "then re-run this event range.",
                heights,
            )
        result.checks = run_event_checks(conn, request.event_tag, request.start, request.end, result)
        conn.commit()
    on_progress(result)
    return result
