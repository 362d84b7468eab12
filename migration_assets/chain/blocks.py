"""Migrating one block range [start, end): read heights concurrently, load them in chunks, verify.

Each chunk of heights is one transaction, and every load is idempotent, so a run killed at any point
is repaired by running the range again.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import ConnectionPool

from migration_assets.chain.checks import SourceSummary, run_block_checks
from migration_assets.chain.loader import load_heights
from migration_assets.chain.source import HeightBlocks, latest_height, read_height
from migration_assets.core.checks import CheckOutcome
from migration_assets.core.concurrency import ordered_map


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


def migrate_block_range(
    request: BlockRangeRequest,
    pool: ConnectionPool,
    on_progress: Callable[[BlockRangeResult], None] = lambda result: None,
) -> BlockRangeResult:
    started = time.monotonic()
    result = BlockRangeResult(request.tag, request.start, request.end)
    tip = latest_height(request.client, request.table, request.tag)
    result.read_end = request.end if tip is None else max(request.start, min(request.end, tip + 1))

    def read(height: int) -> HeightBlocks:
        return read_height(request.client, request.table, request.tag, height)

    chunk: list[HeightBlocks] = []
    with pool.connection() as conn:
        for height in ordered_map(read, range(request.start, result.read_end), request.read_concurrency):
            chunk.append(height)
            result.count(height)
            if len(chunk) >= request.chunk_heights:
                load_heights(conn, chunk)
                chunk = []
                on_progress(result)
        if chunk:
            load_heights(conn, chunk)
        result.seconds = time.monotonic() - started
        result.checks = run_block_checks(conn, request.tag, request.start, result.read_end, result.source)
        conn.commit()
    on_progress(result)
    return result
