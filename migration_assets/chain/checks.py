"""Integrity checks of a migrated block range, compared with what the source held.

Counts, canonical rows and their resolution are ERROR (the migration is wrong); a break in the
parent-hash chain is WARN, since the loader copies the source as it is (the source is suspicious).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from migration_assets.chain.source import HeightBlocks
from migration_assets.core.checks import CheckOutcome, listing

CHECK_BLOCK_COUNT = "block_rows_match_source"
CHECK_CANONICAL = "canonical_rows_match_source"
CHECK_CANONICAL_RESOLVES = "canonical_rows_resolve"
CHECK_CONTINUITY = "canonical_chain_continuity"
BLOCK_CHECK_NAMES = (CHECK_BLOCK_COUNT, CHECK_CANONICAL, CHECK_CANONICAL_RESOLVES, CHECK_CONTINUITY)


@dataclass
class SourceSummary:
    """Per height, what the source holds: how many distinct blocks and which is canonical."""

    blocks_at: dict[int, int] = field(default_factory=dict)
    canonical_at: dict[int, tuple[str, str | int]] = field(default_factory=dict)

    def add(self, height: HeightBlocks) -> None:
        if height.blocks:
            self.blocks_at[height.height] = len(height.blocks)
        if height.canonical is not None:
            self.canonical_at[height.height] = height.canonical.identity


def _target_blocks_at(conn: psycopg.Connection, tag: int, start: int, end: int) -> dict[int, int]:
    rows = conn.execute(
        "SELECT height, count(*) FROM block_metadata WHERE tag = %s AND height >= %s AND height < %s"
        " GROUP BY height",
        (tag, start, end),
    )
    return dict(rows.fetchall())


def check_block_count(conn, tag: int, start: int, end: int, source: SourceSummary) -> CheckOutcome:
    target = _target_blocks_at(conn, tag, start, end)
    wrong = sorted(h for h in set(target) | set(source.blocks_at) if target.get(h, 0) != source.blocks_at.get(h, 0))
    source_total, target_total = sum(source.blocks_at.values()), sum(target.values())
    metadata = {"source_blocks": source_total, "target_blocks": target_total, "heights_differing": len(wrong)}
    if not wrong:
        return CheckOutcome(CHECK_BLOCK_COUNT, True, f"{target_total} blocks, as in the source", metadata=metadata)
    detail = listing([f"{h} (source {source.blocks_at.get(h, 0)}, target {target.get(h, 0)})" for h in wrong])
    return CheckOutcome(
        CHECK_BLOCK_COUNT, False,
        f"block_metadata differs from the source at {len(wrong)} heights: {detail}. "
        "Re-run the partition; if it persists, look for conflicting rows at those heights.",
        metadata=metadata,
    )


def check_canonical(conn, tag: int, start: int, end: int, source: SourceSummary) -> CheckOutcome:
    """One canonical_blocks row per height with a canonical item, pointing at that same block."""
    rows = conn.execute(
        "SELECT cb.height, bm.skipped, bm.hash, bm.height FROM canonical_blocks cb"
        " JOIN block_metadata bm ON bm.id = cb.block_metadata_id"
        " WHERE cb.tag = %s AND cb.height >= %s AND cb.height < %s",
        (tag, start, end),
    ).fetchall()
    target = {h: (("skipped", bh) if skipped else ("hash", block_hash)) for h, skipped, block_hash, bh in rows}
    missing = sorted(set(source.canonical_at) - set(target))
    extra = sorted(set(target) - set(source.canonical_at))
    wrong = sorted(h for h in set(target) & set(source.canonical_at) if target[h] != source.canonical_at[h])
    metadata = {"source_canonical": len(source.canonical_at), "target_canonical": len(target)}
    if not (missing or extra or wrong):
        return CheckOutcome(CHECK_CANONICAL, True, f"{len(target)} canonical heights, as in the source", metadata=metadata)
    parts = [
        f"{label} at heights {listing(heights)}"
        for label, heights in (("missing", missing), ("not canonical in the source", extra), ("pointing at another block", wrong))
        if heights
    ]
    return CheckOutcome(CHECK_CANONICAL, False, "canonical_blocks " + "; ".join(parts), metadata=metadata)


def check_canonical_resolves(conn, tag: int, start: int, end: int) -> CheckOutcome:
    """Every canonical_blocks row has its block_metadata row, at the same tag and height."""
    broken = [
        row[0]
        for row in conn.execute(
            "SELECT cb.height FROM canonical_blocks cb"
            " LEFT JOIN block_metadata bm ON bm.id = cb.block_metadata_id"
            " WHERE cb.tag = %s AND cb.height >= %s AND cb.height < %s"
            " AND (bm.id IS NULL OR bm.height <> cb.height OR bm.tag <> cb.tag) ORDER BY cb.height",
            (tag, start, end),
        )
    ]
    if not broken:
        return CheckOutcome(CHECK_CANONICAL_RESOLVES, True, "every canonical row resolves to its block")
    return CheckOutcome(
        CHECK_CANONICAL_RESOLVES, False,
        f"canonical_blocks rows without their block_metadata row at heights {listing(broken)}",
        metadata={"broken_heights": len(broken)},
    )


@dataclass(frozen=True)
class ChainLink:
    height: int
    hash: str | None
    parent_hash: str
    parent_height: int
    skipped: bool


def continuity_breaks(chain: Iterable[ChainLink]) -> list[int]:
    """Heights whose block does not follow the previous non-skipped canonical block.

    Neighbours are compared only when nothing but skipped heights lies between them; a hole (a height
    with no canonical block) is reported by the canonical check, not here.
    """
    breaks, previous, expected_next = [], None, None
    for link in sorted(chain, key=lambda link: link.height):
        if previous is not None and link.height != expected_next:
            previous = None  # a hole: restart the chain
        expected_next = link.height + 1
        if link.skipped:
            continue
        if previous is not None:
            hash_breaks = link.parent_hash and link.parent_hash != previous.hash
            height_breaks = link.parent_height and link.parent_height != previous.height
            if hash_breaks or height_breaks:
                breaks.append(link.height)
        previous = link
    return breaks


def check_continuity(conn, tag: int, start: int, end: int) -> CheckOutcome:
    # One height before the range links the range to what precedes it, when that is migrated.
    rows = conn.execute(
        "SELECT bm.height, bm.hash, bm.parent_hash, bm.parent_height, bm.skipped"
        " FROM canonical_blocks cb JOIN block_metadata bm ON bm.id = cb.block_metadata_id"
        " WHERE cb.tag = %s AND cb.height >= %s AND cb.height < %s",
        (tag, max(start - 1, 0), end),
    ).fetchall()
    breaks = continuity_breaks(ChainLink(h, bh, ph or "", pht or 0, s) for h, bh, ph, pht, s in rows)
    if not breaks:
        return CheckOutcome(CHECK_CONTINUITY, True, f"{len(rows)} canonical blocks link up", severity="WARN")
    return CheckOutcome(
        CHECK_CONTINUITY, False,
        f"canonical chain breaks at heights {listing(breaks)}: the block's parent is not the canonical "
        "block below it. The loader copies the source as it is; inspect the source at those heights.",
        severity="WARN",
        metadata={"break_count": len(breaks)},
    )


def run_block_checks(conn, tag: int, start: int, end: int, source: SourceSummary) -> list[CheckOutcome]:
    return [
        check_block_count(conn, tag, start, end, source),
        check_canonical(conn, tag, start, end, source),
        check_canonical_resolves(conn, tag, start, end),
        check_continuity(conn, tag, start, end),
    ]

