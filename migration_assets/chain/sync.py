"""Planning continuous sync from the source's watermarks: pure logic, no Dagster.

Completed ranges are requested once each, oldest first, at most `max_new_ranges` per tick so a tick
stays short whatever the backlog. Once caught up, the open range at the tip is re-run whenever its
watermark moves (and the range below it too while the tip is within `reorg_margin` of the boundary,
so a reorg across the boundary reaches canonical_blocks).
"""

from dataclasses import dataclass

from pydantic import BaseModel

from migration_assets.chain.ranges import range_key


class StreamCursor(BaseModel):
    next_start: int = 0  # first range not yet requested as complete
    synced_tip: str | None = None  # the watermark (e.g. "height:hash") the last tip run was for


class SyncCursor(BaseModel):
    blocks: StreamCursor = StreamCursor()
    events: StreamCursor = StreamCursor()


@dataclass(frozen=True)
class RangeRun:
    key: str
    run_key: str
    complete: bool


@dataclass(frozen=True)
class StreamPlan:
    new_keys: list[str]  # partitions to register
    runs: list[RangeRun]
    cursor: StreamCursor


def plan_stream(
    name: str, cursor: StreamCursor, tip: int | None, size: int, max_new_ranges: int = 100, reorg_margin: int = 0,
    first_id: int = 0, tip_marker: str | None = None,
) -> StreamPlan:
    """`tip` is the last height (or id) in the source; `tip_marker` changes whenever the tip does,
    even at the same height (a reorg replaces the tip block), and defaults to the tip itself."""
    marker = str(tip) if tip_marker is None else tip_marker
    if tip is None or tip < first_id:
        return StreamPlan([], [], cursor)
    start = cursor.next_start
    runs: list[RangeRun] = []
    while start + size - 1 <= tip and len(runs) < max_new_ranges:
        key = range_key(start, start + size)
        runs.append(RangeRun(key, f"{name}:{key}", complete=True))
        start += size
    caught_up = start + size - 1 > tip
    next_cursor = StreamCursor(next_start=start, synced_tip=cursor.synced_tip)
    if caught_up and tip >= start and marker != cursor.synced_tip:
        open_key = range_key(start, start + size)
        runs.append(RangeRun(open_key, f"{name}:{open_key}@{marker}", complete=False))
        below = range_key(start - size, start) if start >= size else None
        if below and tip - start < reorg_margin and all(run.key != below for run in runs):
            runs.append(RangeRun(below, f"{name}:{below}@{marker}", complete=False))
        next_cursor = StreamCursor(next_start=start, synced_tip=marker)
    new_keys = sorted({run.key for run in runs})
    return StreamPlan(new_keys, runs, next_cursor)
