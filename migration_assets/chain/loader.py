"""Loading blocks into PostgreSQL: COPY into a temp table, then set-based, idempotent inserts.

Re-loading the same heights changes nothing: blocks are unique by (tag, hash), or (tag, height) when
skipped, and `canonical_blocks` is only updated where the winner changed (a reorg at the tip).
"""

from collections.abc import Sequence

import psycopg

from migration_assets.chain.source import HeightBlocks
from migration_assets.core.postgres import copy_rows

_STAGING_COLUMNS = (
    "ordinal", "height", "tag", "hash", "parent_hash", "parent_height",
    "object_key_main", "timestamp", "skipped", "is_canonical",
)

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_blocks (
    ordinal BIGINT, height BIGINT, tag INT, hash VARCHAR(66), parent_hash VARCHAR(66),
    parent_height BIGINT, object_key_main VARCHAR(255), timestamp BIGINT, skipped BOOLEAN,
    is_canonical BOOLEAN
) ON COMMIT DELETE ROWS
"""

# ORDER BY ordinal keeps each height's canonical block last, so it gets the highest id at its height.
_INSERT_BLOCKS = """
INSERT INTO block_metadata
    (height, tag, hash, parent_hash, parent_height, object_key_main, timestamp, skipped)
SELECT height, tag, hash, parent_hash, parent_height, object_key_main, timestamp, skipped
FROM staging_blocks ORDER BY ordinal
ON CONFLICT DO NOTHING
"""

_UPSERT_CANONICAL = """
INSERT INTO canonical_blocks (height, block_metadata_id, tag)
SELECT s.height, bm.id, s.tag
FROM staging_blocks s
JOIN block_metadata bm ON bm.tag = s.tag AND bm.height = s.height AND {match}
WHERE s.is_canonical AND s.skipped = {skipped}
ON CONFLICT (height, tag) DO UPDATE SET block_metadata_id = EXCLUDED.block_metadata_id
WHERE canonical_blocks.block_metadata_id IS DISTINCT FROM EXCLUDED.block_metadata_id
"""
_UPSERT_CANONICAL_BY_HASH = _UPSERT_CANONICAL.format(
    match="bm.hash = s.hash AND NOT bm.skipped", skipped="false"
)
_UPSERT_CANONICAL_SKIPPED = _UPSERT_CANONICAL.format(match="bm.skipped", skipped="true")


def staging_rows(heights: Sequence[HeightBlocks]):
    ordinal = 0
    for height in heights:
        for block in height.blocks:
            yield (
                ordinal, block.height, block.tag, block.hash, block.parent_hash, block.parent_height,
                block.object_key_main, block.timestamp, block.skipped, block is height.canonical,
            )
            ordinal += 1


def load_heights(conn: psycopg.Connection, heights: Sequence[HeightBlocks]) -> int:
    """Load these heights in one transaction; return the number of blocks staged."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_CREATE_STAGING)
        staged = copy_rows(cur, "staging_blocks", _STAGING_COLUMNS, staging_rows(heights))
        cur.execute(_INSERT_BLOCKS)
        cur.execute(_UPSERT_CANONICAL_BY_HASH)
        cur.execute(_UPSERT_CANONICAL_SKIPPED)
    return staged
