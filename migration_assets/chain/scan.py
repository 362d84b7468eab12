"""The bulk path: a parallel DynamoDB Scan (Segment/TotalSegments) of a block or event table, loaded
with the per-height path's parsers and loaders.

Every item of one `block_pid` ("{tag}-{height}") falls in one segment, in key order, so a segment
finishes whole heights on its own; a height whose items run past a 1 MB page is held until the next
page. After each loaded chunk, the segment's place (the key of the last item loaded) and what it read
per range are written in the same transaction as the rows: a killed scan resumes where it stopped.
Heights (or event ids) outside the requested span or above the watermark the scan started with are
skipped; the per-height path and the sync sensor carry on at the tip.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from botocore.exceptions import ClientError

from migration_assets.chain.checks import (
    CHECK_BLOCK_COUNT, CHECK_CANONICAL, check_canonical_resolves, check_continuity,
)
from migration_assets.chain.event_checks import CHECK_EVENT_CONTIGUOUS, run_event_checks
from migration_assets.chain.event_loader import load_events
from migration_assets.chain.items import PageKeys
from migration_assets.chain.event_source import EVENT_KEY, EventItem, EventLayout, max_event_id, parse_event_item
from migration_assets.chain.events import EventRangeResult, MissingBlocksError
from migration_assets.chain.loader import load_heights
from migration_assets.chain.ranges import covering_ranges, range_key
from migration_assets.chain.settings import CHAIN_MIGRATIONS
from migration_assets.chain.source import BLOCK_KEY, HeightBlocks, latest_height, order_height
from migration_assets.core.aws import DynamoClientSpec, cached_client, read_items_from_wire
from migration_assets.core.backoff import Backoff
from migration_assets.core.checks import CheckOutcome, listing
from migration_assets.core.concurrency import ordered_map_in_processes
from migration_assets.core.schema import apply_migrations
from migration_assets.files.bandwidth import SharedLimiter, Slot, Timetable

BLOCKS, EVENTS = "blocks", "events"
THROTTLE_BACKOFF = Backoff(base=0.1, cap=20.0)
# Throttled without a page between for this long, the scan stops (it resumes where it stopped when run
# again) rather than retrying without end, unseen.
THROTTLED_MAX_SECONDS = 900.0
_THROTTLED = {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
Item = dict[str, Any]


@dataclass(frozen=True)
class ScanRequest:
    kind: str  # BLOCKS or EVENTS
    table: str
    tag: int  # the block tag, or the event tag
    start: int  # [start, end): heights for blocks, event ids for events
    end: int
    range_size: int  # the partitions' size: counts are kept per range for the checks
    database_url: str
    segments: int = 16
    processes: int = 1  # > 1 needs client_spec, for the worker processes' own clients
    chunk: int = 1000  # heights (blocks) or events per load transaction
    max_read_units: float | None = None  # per second, across all segments
    limiter_path: str | None = None  # the token bucket's file, shared by the processes
    client_spec: DynamoClientSpec | None = None
    page_items: int | None = None  # Scan `Limit` (tests); None: 1 MB pages
    watermark: int | None = None  # set by run_scan from the source, kept by the scan's row
    schema: str | None = None  # a network's PostgreSQL schema (NetworkConfig.schema); None: the default

    @property
    def scan_id(self) -> str:
        return f"{self.kind}:{self.table}:{self.tag}:{self.start}-{self.end}/{self.segments}"

    @property
    def key_attributes(self) -> tuple[str, ...]:
        return BLOCK_KEY if self.kind == BLOCKS else EVENT_KEY

    def wanted(self, number: int) -> bool:
        """A height (or event id) inside the span, at or below the watermark."""
        return self.start <= number < self.end and self.watermark is not None and number <= self.watermark

    def covered_ranges(self) -> list[tuple[int, int]]:
        if self.watermark is None:
            return []  # an empty table (no watermark yet): nothing to cover
        top = min(self.end, self.watermark + 1)
        first = max(self.start, 1 if self.kind == EVENTS else 0)  # event ids start at 1
        return covering_ranges(first, top, self.range_size) if first < top else []


class ScanThrottled(RuntimeError):
    """The table stayed throttled past THROTTLED_MAX_SECONDS; the message says what to do."""


class ScanMissingBlocksError(MissingBlocksError):
    """MissingBlocksError that crosses from a worker process (its extra argument pickles)."""

    def __reduce__(self):
        return type(self), (str(self), self.heights)


@dataclass
class RangeCounts:
    heights: int = 0
    blocks: int = 0
    canonical: int = 0
    events: int = 0


@dataclass
class ScanSummary:
    request: ScanRequest
    counts: dict[tuple[int, int], RangeCounts]  # per covered range
    items: int = 0
    seconds: float = 0.0
    segments_run: int = 0  # segments not done when this call began (fewer than all: it resumed)
    checks: dict[str, list[CheckOutcome]] = field(default_factory=dict)  # per range key

    @property
    def failed_ranges(self) -> list[str]:
        """Ranges with a failed ERROR check (a WARN marks a suspicious source, not a wrong migration)."""
        return [key for key, outcomes in self.checks.items()
                if any(not o.passed and o.severity == "ERROR" for o in outcomes)]


# --- reading -------------------------------------------------------------------------------------


def read_limiter(request: ScanRequest) -> SharedLimiter | None:
    if request.max_read_units is None:
        return None
    if request.limiter_path is None:
        raise ValueError("a read budget needs limiter_path, the token bucket shared by the processes")
    return SharedLimiter(Timetable((Slot(0, request.max_read_units),)), None, Path(request.limiter_path))


def scan_pages(
    client: Any, request: ScanRequest, segment: int, start_key: Item | None, limiter: SharedLimiter | None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[list[Item], bool]]:
    """(items, more pages follow) of one segment from `start_key`. Read units are paid at the limiter
    after each page (a debt the next page waits out); a throttled request is retried at the same key."""
    args: dict[str, Any] = {
        "TableName": request.table, "Segment": segment, "TotalSegments": request.segments,
        "ConsistentRead": True, "ReturnConsumedCapacity": "TOTAL",
    }
    if request.page_items:
        args["Limit"] = request.page_items
    if start_key:
        args["ExclusiveStartKey"] = start_key
    read_items_from_wire(client)
    failures, throttled_for, keys = 0, 0.0, PageKeys(request.table)
    while True:
        try:
            page = client.scan(**args)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in _THROTTLED:
                raise
            if throttled_for >= THROTTLED_MAX_SECONDS:
                raise ScanThrottled(f"{request.table} segment {segment}: throttled for {throttled_for:.0f} s "
                                    f"({failures} tries) without a page; raise its read capacity or lower the scan's "
                                    "read budget, then run it again: it resumes where it stopped") from None
            failures += 1
            delay = THROTTLE_BACKOFF.delay(failures)
            sleep(delay)
            throttled_for += delay
            continue
        failures, throttled_for = 0, 0.0
        if limiter is not None:
            limiter.acquire(page.get("ConsumedCapacity", {}).get("CapacityUnits", 0.0))
        next_key = keys.next(page)
        yield page.get("Items", []), bool(next_key)
        if not next_key:
            return
        args["ExclusiveStartKey"] = next_key


def runs_of(items: list[Item], attribute: str) -> list[list[Item]]:
    """Consecutive items with the same `attribute` value (one height's items, for `block_pid`)."""
    runs: list[list[Item]] = []
    for item in items:
        if runs and runs[-1][0].get(attribute) == item.get(attribute):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# --- one segment ---------------------------------------------------------------------------------


class _Chunk:
    """What a segment read since its last commit: rows to load, counts per range, its place."""

    def __init__(self, request: ScanRequest):
        self.request = request
        self.layout = EventLayout(request.tag)
        self.heights: list[HeightBlocks] = []
        self.events: list[EventItem] = []
        self.counts: dict[tuple[int, int], RangeCounts] = {}
        self.items = 0
        self.last_key: Item | None = None

    def __len__(self) -> int:
        return len(self.heights) + len(self.events)

    def add(self, run: list[Item]) -> None:
        self.items += len(run)
        self.last_key = {name: run[-1][name] for name in self.request.key_attributes}
        if self.request.kind == BLOCKS:
            self._add_height(run)
        else:
            for item in run:
                self._add_event(item)

    def _range(self, number: int) -> RangeCounts:
        size = self.request.range_size
        start = number - number % size
        return self.counts.setdefault((start, start + size), RangeCounts())

    def _add_height(self, run: list[Item]) -> None:
        tag, _, height = run[0]["block_pid"].get("S", "").partition("-")
        if tag != str(self.request.tag) or not height.isdigit() or not self.request.wanted(int(height)):
            return  # another tag, the "{tag}-latest" watermark, or outside the span
        blocks = order_height(self.request.tag, int(height), run, self.request.table)
        self.heights.append(blocks)
        counts = self._range(blocks.height)
        counts.heights += 1
        counts.blocks += len(blocks.blocks)
        counts.canonical += blocks.canonical is not None

    def _add_event(self, item: Item) -> None:
        key = item.get("event_id", {})
        if self.layout.legacy:
            number = key.get("N", "")
        else:
            tag, _, number = key.get("S", "").partition("-")
            if tag != str(self.request.tag):
                return  # another event tag
        if not number.isdigit() or not self.request.wanted(int(number)):
            return  # a watermark item (-1, "{tag}-latest"), or outside the span
        event = parse_event_item(self.layout, item, self.request.table)
        self.events.append(event)
        self._range(event.sequence).events += 1

    def load(self, conn: psycopg.Connection) -> None:
        if self.heights:
            load_heights(conn, self.heights)
        if self.events:
            missing = load_events(conn, self.events)
            if missing:
                heights = sorted({h for h, _ in missing})
                raise ScanMissingBlocksError(
                    f"{len(missing)} blocks referenced by events of {self.request.table} are not in "
                    f"block_metadata: (height, hash) {listing(missing)}. Migrate those heights' blocks first "
                    f"(`migration-assets chain migrate --start-height {heights[0]} --end-height "
                    f"{heights[-1] + 1} --skip-events`), then run the event scan again: it resumes.",
                    heights,
                )


def scan_segment(
    request: ScanRequest, segment: int, client: Any = None, limiter: SharedLimiter | None = None,
) -> int:
    """Run (or resume) one segment to its end; return the items it read in this call."""
    client = client if client is not None else cached_client(request.client_spec)
    limiter = limiter if limiter is not None else read_limiter(request)
    read = 0
    with connect(request) as conn:
        start_key, done = _segment_place(conn, request, segment)
        if done:
            return 0
        chunk, held = _Chunk(request), []
        group_by = request.key_attributes[0]
        for items, more in scan_pages(client, request, segment, start_key, limiter):
            runs = runs_of(held + items, group_by)
            held = runs.pop() if more and runs else []  # its height may go on in the next page
            for run in runs:
                chunk.add(run)
            if len(chunk) >= request.chunk:
                read += _commit(conn, request, segment, chunk, done=False)
                chunk = _Chunk(request)
        read += _commit(conn, request, segment, chunk, done=True)
    return read


def connect(request: ScanRequest) -> psycopg.Connection:
    """An autocommit connection to the scan's database, in its network's schema when it has one."""
    options = {} if request.schema is None else {"options": f"-c search_path={request.schema}"}
    return psycopg.connect(request.database_url, autocommit=True, **options)


def _segment_place(conn: psycopg.Connection, request: ScanRequest, segment: int) -> tuple[Item | None, bool]:
    row = conn.execute(
        "SELECT last_key, done FROM chain_scan_segments WHERE scan_id = %s AND segment = %s",
        (request.scan_id, segment),
    ).fetchone()
    if row is None:
        raise RuntimeError(f"scan {request.scan_id} has no segment {segment}: start it with run_scan")
    return row[0], row[1]


def _commit(conn: psycopg.Connection, request: ScanRequest, segment: int, chunk: _Chunk, done: bool) -> int:
    """Load the chunk and record the segment's new place and counts, in one transaction."""
    with conn.transaction():
        chunk.load(conn)
        conn.execute(
            "UPDATE chain_scan_segments SET last_key = COALESCE(%s, last_key), items = items + %s,"
            " done = %s, updated_at = now() WHERE scan_id = %s AND segment = %s",
            (None if chunk.last_key is None else json.dumps(chunk.last_key), chunk.items, done,
             request.scan_id, segment),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO chain_scan_counts AS c"
                " (scan_id, segment, range_start, range_end, heights, blocks, canonical, events)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (scan_id, segment, range_start) DO UPDATE"
                " SET heights = c.heights + EXCLUDED.heights, blocks = c.blocks + EXCLUDED.blocks,"
                " canonical = c.canonical + EXCLUDED.canonical, events = c.events + EXCLUDED.events",
                [(request.scan_id, segment, s, e, c.heights, c.blocks, c.canonical, c.events)
                 for (s, e), c in chunk.counts.items()],
            )
    return chunk.items


# --- the whole scan ------------------------------------------------------------------------------


def source_watermark(client: Any, request: ScanRequest) -> int | None:
    if request.kind == BLOCKS:
        return latest_height(client, request.table, request.tag)
    return max_event_id(client, request.table, EventLayout(request.tag))


def begin_scan(request: ScanRequest, client: Any) -> ScanRequest:
    """Bring the target's schema up to date, register the scan and its segments (idempotent); return
    the request with the scan's own watermark: the source's now, or the one it started with. A table
    without a watermark yet has nothing to scan: the request keeps watermark None, unregistered."""
    with psycopg.connect(request.database_url, autocommit=True) as conn:
        apply_migrations(conn, request.schema, prefix=CHAIN_MIGRATIONS if request.schema else "")
    watermark = source_watermark(client, request)
    if watermark is None:
        return request
    with connect(request) as conn:
        return _register_scan(conn, request, watermark)


def _register_scan(conn: psycopg.Connection, request: ScanRequest, watermark: int | None) -> ScanRequest:
    conn.execute(
        "INSERT INTO chain_scans (scan_id, total, watermark) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (request.scan_id, request.segments, watermark),
    )
    conn.execute(
        "INSERT INTO chain_scan_segments (scan_id, segment, total) SELECT %s, s, %s"
        " FROM generate_series(0, %s - 1) s ON CONFLICT DO NOTHING",
        (request.scan_id, request.segments, request.segments),
    )
    [kept] = conn.execute("SELECT watermark FROM chain_scans WHERE scan_id = %s", (request.scan_id,)).fetchone()
    return replace(request, watermark=kept)


def run_scan(request: ScanRequest, client: Any, limiter: SharedLimiter | None = None) -> ScanSummary:
    """Run (or resume) every segment, in worker processes when asked; then check each covered range
    against the counts the scan gathered."""
    started = time.monotonic()
    request = begin_scan(request, client)
    if request.watermark is None:
        return ScanSummary(request, {})
    with connect(request) as conn:
        pending = [s for (s,) in conn.execute(
            "SELECT segment FROM chain_scan_segments WHERE scan_id = %s AND NOT done ORDER BY segment",
            (request.scan_id,),
        )]
    if request.processes > 1 and request.client_spec is not None and len(pending) > 1:
        list(ordered_map_in_processes(partial(scan_segment, request), pending, request.processes))
    else:
        for segment in pending:
            scan_segment(request, segment, client, limiter)
    with connect(request) as conn:
        summary = scan_summary(conn, request)
        summary.checks = range_checks(conn, summary)
    summary.seconds, summary.segments_run = time.monotonic() - started, len(pending)
    return summary


def scan_summary(conn: psycopg.Connection, request: ScanRequest) -> ScanSummary:
    rows = conn.execute(
        "SELECT range_start, range_end, sum(heights), sum(blocks), sum(canonical), sum(events)"
        " FROM chain_scan_counts WHERE scan_id = %s GROUP BY range_start, range_end",
        (request.scan_id,),
    ).fetchall()
    counts = {(r[0], r[1]): RangeCounts(*(int(v) for v in r[2:])) for r in rows}
    [items] = conn.execute(
        "SELECT coalesce(sum(items), 0) FROM chain_scan_segments WHERE scan_id = %s", (request.scan_id,)
    ).fetchone()
    return ScanSummary(request, {r: counts.get(r, RangeCounts()) for r in request.covered_ranges()}, int(items))


# --- checks per range ----------------------------------------------------------------------------


def range_checks(conn: psycopg.Connection, summary: ScanSummary) -> dict[str, list[CheckOutcome]]:
    # A scan loads tables far faster than autovacuum re-analyzes them: on stale statistics the
    # planner took a nested loop for the last-event check (6+ minutes for one 100k-event range).
    conn.execute("ANALYZE block_metadata, canonical_blocks, block_events")
    check = _block_range_checks if summary.request.kind == BLOCKS else _event_range_checks
    return {range_key(s, e): check(conn, summary.request, s, e, c) for (s, e), c in summary.counts.items()}


def _count_outcome(name: str, what: str, source: int, target: int) -> CheckOutcome:
    metadata = {"source": source, "target": target}
    if source == target:
        return CheckOutcome(name, True, f"{target} {what}, as the scan read", metadata=metadata)
    return CheckOutcome(
        name, False, f"the scan read {source} {what}, PostgreSQL holds {target}; re-run the range "
        "with `chain migrate --method query` to repair and see the heights that differ", metadata=metadata,
    )


def _block_range_checks(conn, request: ScanRequest, start: int, end: int, counts: RangeCounts) -> list[CheckOutcome]:
    low, top = max(start, request.start), min(end, request.end, request.watermark + 1)
    [blocks, canonical] = conn.execute(
        "SELECT (SELECT count(*) FROM block_metadata WHERE tag = %(tag)s AND height >= %(low)s AND height < %(top)s),"
        " (SELECT count(*) FROM canonical_blocks WHERE tag = %(tag)s AND height >= %(low)s AND height < %(top)s)",
        {"tag": request.tag, "low": low, "top": top},
    ).fetchone()
    return [
        _count_outcome(CHECK_BLOCK_COUNT, "blocks", counts.blocks, blocks),
        _count_outcome(CHECK_CANONICAL, "canonical heights", counts.canonical, canonical),
        check_canonical_resolves(conn, request.tag, low, top),
        check_continuity(conn, request.tag, low, top),
    ]


def _event_range_checks(conn, request: ScanRequest, start: int, end: int, counts: RangeCounts) -> list[CheckOutcome]:
    low, top = max(start, request.start, 1), min(end, request.end, request.watermark + 1)
    scanned = EventRangeResult(request.tag, low, top, events=counts.events)
    outcomes = run_event_checks(conn, request.tag, low, top, scanned)
    if counts.events != top - low:  # ids missing in the source (the target's own check sees only inner gaps)
        gap = CheckOutcome(
            CHECK_EVENT_CONTIGUOUS, False,
            f"the scan read {counts.events} events of the {top - low} ids [{low}, {top}) below the watermark "
            f"{request.watermark}: the source lacks ids (they must be contiguous); inspect {request.table}",
            metadata={"source_events": counts.events, "expected": top - low},
        )
        outcomes = [gap if o.name == CHECK_EVENT_CONTIGUOUS else o for o in outcomes]
    return outcomes


# --- which path ----------------------------------------------------------------------------------

SCAN_MIN_RANGES = 50  # below this many block ranges, per-height reads cost less than a table scan


def choose_method(requested: str, start: int, end: int, range_size: int, whole_table: bool) -> tuple[str, str]:
    """("scan" or "query", why) for `chain migrate --method`."""
    if requested != "auto":
        return requested, f"--method {requested}"
    if whole_table:
        return "scan", "the whole table is asked for (--start-height 0, no --end-height)"
    ranges = len(covering_ranges(start, end, range_size))
    if ranges >= SCAN_MIN_RANGES:
        return "scan", f"{ranges} block ranges >= {SCAN_MIN_RANGES}: a parallel Scan reads them faster"
    return "query", f"{ranges} block ranges < {SCAN_MIN_RANGES}: per-height reads touch only those heights"
