"""Migrating one block range [start, end): read heights concurrently, load them in chunks, verify.

Each chunk of heights is one transaction, and every load is idempotent, so a run killed at any point
is repaired by running the range again.
"""

import time
from collections.abc import Callable, Iterator
from functools import partial
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from migration_assets.chain.checks import SourceSummary, run_block_checks
from migration_assets.chain.loader import load_heights
from migration_assets.chain.items import NothingToRead
from migration_assets.chain.source import HeightBlocks, latest_height, read_height
from migration_assets.core.aws import DynamoClientSpec, cached_client
from migration_assets.core.checks import CheckOutcome
from migration_assets.core.concurrency import ordered_map, ordered_map_in_processes


@dataclass
class BlockRangeResult:
    tag: int
    start: int
    end: int
    read_end: int = 0  # heights [start, read_end) were read: the watermark cuts the open range short
    heights: int = 0
    blocks: int = 0
    reorged_blocks: int = 0
    missing_canonical: list[int] = field(default_factory=list)
    empty_heights: int = 0
    seconds: float = 0.0
    source: SourceSummary = field(default_factory=SourceSummary)
    checks: list[CheckOutcome] = field(default_factory=list)

    @property
    def heights_per_second(self) -> float:
        return self.heights / self.seconds if self.seconds else 0.0

    def count(self, height: HeightBlocks) -> None:
        self.heights += 1
        self.blocks += len(height.blocks)
        self.reorged_blocks += height.non_canonical_count
        if not height.blocks:
            self.empty_heights += 1
        elif height.canonical is None:
            self.missing_canonical.append(height.height)
        self.source.add(height)


@dataclass(frozen=True)
class BlockRangeRequest:
    client: Any  # a boto3 DynamoDB client
    table: str
    tag: int
    start: int
    end: int
    read_concurrency: int = 16
    chunk_heights: int = 1000
    read_processes: int = 1  # > 1 needs client_spec, for the worker processes' own clients
    client_spec: DynamoClientSpec | None = None


_HEIGHTS_PER_TASK = 100
_MIN_HEIGHTS_FOR_PROCESSES = 1000  # below this, starting the workers costs more than they save


def _read_heights_in_worker(spec: DynamoClientSpec, table: str, tag: int, threads: int, heights: range) -> list[HeightBlocks]:
    client = cached_client(spec)
    return list(ordered_map(lambda h: read_height(client, table, tag, h), heights, threads))


def read_heights(request: BlockRangeRequest, end: int) -> Iterator[HeightBlocks]:
    """Heights [start, end) in order, read by threads, or by worker processes each running threads."""
    in_threads = end - request.start < _MIN_HEIGHTS_FOR_PROCESSES
    if in_threads or request.read_processes <= 1 or request.client_spec is None:
        yield from ordered_map(
            lambda h: read_height(request.client, request.table, request.tag, h),
            range(request.start, end), request.read_concurrency,
        )
        return
    threads = max(1, request.read_concurrency // request.read_processes)
    task = partial(_read_heights_in_worker, request.client_spec, request.table, request.tag, threads)
    tasks = (range(s, min(s + _HEIGHTS_PER_TASK, end)) for s in range(request.start, end, _HEIGHTS_PER_TASK))
    for batch in ordered_map_in_processes(task, tasks, request.read_processes):
        yield from batch


def migrate_block_range(
    request: BlockRangeRequest,
    pool: ConnectionPool,
    on_progress: Callable[[BlockRangeResult], None] = lambda result: None,
) -> BlockRangeResult:
    started = time.monotonic()
    result = BlockRangeResult(request.tag, request.start, request.end)
    tip = latest_height(request.client, request.table, request.tag)
    result.read_end = request.end if tip is None else max(request.start, min(request.end, tip + 1))
    if result.read_end <= request.start:  # before: materialized with no block, every check passing
        raise NothingToRead(f"{request.table}: heights [{request.start}, {request.end}) are past the chain's tip "
                            f"(height {tip}): nothing to read yet; run the range once the chain has reached it "
                            "(the sync sensor does)")

    chunk: list[HeightBlocks] = []
    with pool.connection() as conn:
        for height in read_heights(request, result.read_end):
            chunk.append(height)
            result.count(height)
            if len(chunk) >= request.chunk_heights:
                load_heights(conn, chunk)
                chunk = []
                on_progress(result)
        if chunk:
            load_heights(conn, chunk)
            on_progress(result)
        result.seconds = time.monotonic() - started
        result.checks = run_block_checks(conn, request.tag, request.start, result.read_end, result.source)
        conn.commit()
    return result
