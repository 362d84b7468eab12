"""Loading events: COPY into a temp table, resolve each event's block, then an idempotent insert.

Unlike the original tool's plain JOIN, an event whose block is not in block_metadata is never dropped:
it is reported, and the caller fails the partition naming the missing blocks.
"""

from collections.abc import Sequence

import psycopg

from migration_assets.chain.event_source import EventItem
from migration_assets.core.postgres import copy_rows

_COLUMNS = ("event_tag", "event_sequence", "event_type", "height", "hash", "block_tag", "skipped")

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_events (
    event_tag INT, event_sequence BIGINT, event_type event_type_enum, height BIGINT,
    hash VARCHAR(66), block_tag INT, skipped BOOLEAN
) ON COMMIT DELETE ROWS
"""

# An event's block: by (tag, hash), or by (tag, height) when the block was skipped.
_RESOLVED = """
SELECT s.event_tag, s.event_sequence, s.event_type, bm.id AS block_metadata_id, s.height, s.hash
FROM staging_events s JOIN block_metadata bm
  ON bm.tag = s.block_tag AND bm.hash = s.hash AND bm.height = s.height AND NOT bm.skipped
WHERE NOT s.skipped
UNION ALL
SELECT s.event_tag, s.event_sequence, s.event_type, bm.id, s.height, s.hash
FROM staging_events s JOIN block_metadata bm
  ON bm.tag = s.block_tag AND bm.height = s.height AND bm.skipped
WHERE s.skipped
"""

_CREATE_RESOLVED = """
CREATE TEMP TABLE IF NOT EXISTS resolved_events (LIKE block_events) ON COMMIT DELETE ROWS
"""

# The blocks are resolved once per chunk; what did not resolve is what is missing.
_MISSING_BLOCKS = """
SELECT DISTINCT s.height, s.hash FROM staging_events s
WHERE NOT EXISTS (SELECT 1 FROM resolved_events r WHERE r.event_sequence = s.event_sequence)
ORDER BY s.height
"""

_INSERT = """
INSERT INTO block_events SELECT * FROM resolved_events ON CONFLICT DO NOTHING
"""


def load_events(conn: psycopg.Connection, events: Sequence[EventItem]) -> list[tuple[int, str | None]]:
    """Load these events in one transaction. If any event's block is missing, nothing is inserted and
    the missing (height, hash) pairs are returned."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_CREATE_STAGING)
        cur.execute(_CREATE_RESOLVED)
        rows = ((e.event_tag, e.sequence, e.type.value, e.height, e.hash, e.block_tag, e.skipped) for e in events)
        copy_rows(cur, "staging_events", _COLUMNS, rows)
        cur.execute(f"INSERT INTO resolved_events {_RESOLVED}")
        missing = cur.execute(_MISSING_BLOCKS).fetchall()
        if not missing:
            cur.execute(_INSERT)
    return missing
