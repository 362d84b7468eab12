"""Integrity checks of a migrated event range.

ERROR (the migration is wrong): counts against the source, contiguous ids, every event on its block.
WARN (the source is suspicious, or a block range is stale): the chain's event rules, and the last
event at each height adding the canonical block.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from migration_assets.core.checks import CheckOutcome, listing

if TYPE_CHECKING:
    from migration_assets.chain.events import EventRangeResult

CHECK_EVENT_COUNT = "event_rows_match_source"
CHECK_EVENT_CONTIGUOUS = "event_ids_contiguous"
CHECK_EVENT_BLOCKS = "events_resolve_to_blocks"
CHECK_EVENT_RULES = "event_sequence_rules"
CHECK_LAST_EVENT_CANONICAL = "last_event_adds_canonical"
EVENT_CHECK_NAMES = (CHECK_EVENT_COUNT, CHECK_EVENT_CONTIGUOUS, CHECK_EVENT_BLOCKS, CHECK_EVENT_RULES, CHECK_LAST_EVENT_CANONICAL)


def check_event_count(conn, event_tag: int, start: int, end: int, source_events: int) -> CheckOutcome:
    target = conn.execute(
        "SELECT count(*) FROM block_events WHERE event_tag = %s AND event_sequence >= %s AND event_sequence < %s",
        (event_tag, start, end),
    ).fetchone()[0]
    metadata = {"source_events": source_events, "target_events": target}
    if target == source_events:
        return CheckOutcome(CHECK_EVENT_COUNT, True, f"{target} events, as in the source", metadata=metadata)
    return CheckOutcome(
        CHECK_EVENT_COUNT, False,
        f"block_events holds {target} events in ids [{start}, {end}), the source {source_events}. Re-run the range.",
        metadata=metadata,
    )


def check_contiguous(conn, event_tag: int, start: int, end: int) -> CheckOutcome:
    low, high, count = conn.execute(
        "SELECT min(event_sequence), max(event_sequence), count(*) FROM block_events"
        " WHERE event_tag = %s AND event_sequence >= %s AND event_sequence < %s",
        (event_tag, start, end),
    ).fetchone()
    if count == 0 or high - low + 1 == count:
        return CheckOutcome(CHECK_EVENT_CONTIGUOUS, True, f"ids {low}-{high} contiguous" if count else "no events")
    gaps = [
        row[0]
        for row in conn.execute(
            "SELECT g FROM generate_series(%s::bigint, %s::bigint) g WHERE NOT EXISTS"
            " (SELECT 1 FROM block_events WHERE event_tag = %s AND event_sequence = g) LIMIT 100",
            (low, high, event_tag),
        )
    ]
    return CheckOutcome(
        CHECK_EVENT_CONTIGUOUS, False,
        f"ids {low}-{high} hold {count} events (max - min + 1 = {high - low + 1}); missing ids {listing(gaps)}",
        metadata={"missing_ids": high - low + 1 - count},
    )


def check_events_resolve(conn, event_tag: int, start: int, end: int) -> CheckOutcome:
    """Each event's block_metadata row is at the event's height, with its hash (or skipped)."""
    broken = conn.execute(
        "SELECT e.event_sequence, e.height FROM block_events e"
        " LEFT JOIN block_metadata bm ON bm.id = e.block_metadata_id"
        " WHERE e.event_tag = %s AND e.event_sequence >= %s AND e.event_sequence < %s AND ("
        "   bm.id IS NULL OR bm.height <> e.height"
        "   OR (NOT bm.skipped AND bm.hash IS DISTINCT FROM e.hash)) ORDER BY 1",
        (event_tag, start, end),
    ).fetchall()
    if not broken:
        return CheckOutcome(CHECK_EVENT_BLOCKS, True, "every event resolves to its block")
    return CheckOutcome(
        CHECK_EVENT_BLOCKS, False,
        f"{len(broken)} events point at another block: (id, height) {listing(broken)}",
        metadata={"broken_events": len(broken)},
    )


@dataclass(frozen=True)
class EventLink:
    sequence: int
    type: str
    height: int
    hash: str | None
    parent_hash: str
    skipped: bool


def rule_violations(events: Iterable[EventLink]) -> list[str]:
    """Where consecutive events break the chain's rules (reference/chain.md), as readable lines."""
    problems, previous = [], None
    for event in events:
        if previous is not None and previous.sequence + 1 == event.sequence:
            problem = _violation(previous, event)
            if problem:
                problems.append(f"event {event.sequence} at height {event.height}: {problem}")
        previous = event
    return problems


def _violation(prev: EventLink, cur: EventLink) -> str | None:
    added, removed = "BLOCK_ADDED", "BLOCK_REMOVED"
    if prev.type == added and cur.type == added:
        if cur.height != prev.height + 1:
            return f"added after an add at height {prev.height}, not one above it"
        linked = prev.skipped or cur.skipped or not cur.parent_hash or cur.parent_hash == prev.hash
        return None if linked else f"parent hash does not link to the block added at {prev.height}"
    if prev.type == removed and cur.type == removed:
        return None if cur.height == prev.height - 1 else f"removed after a removal at {prev.height}, not one below it"
    if {prev.type, cur.type} == {added, removed}:
        if cur.height != prev.height:
            return f"type changes from height {prev.height}: it must stay at one height"
        if prev.type == added and prev.hash != cur.hash:
            return "removes another block than the one just added"
    return None


def check_event_rules(conn, event_tag: int, start: int, end: int) -> CheckOutcome:
    rows = conn.execute(
        "SELECT e.event_sequence, e.event_type::text, e.height, e.hash, coalesce(bm.parent_hash, ''), bm.skipped"
        " FROM block_events e JOIN block_metadata bm ON bm.id = e.block_metadata_id"
        " WHERE e.event_tag = %s AND e.event_sequence >= %s AND e.event_sequence < %s ORDER BY 1",
        (event_tag, max(start - 1, 0), end),  # one event before links the range to the one below
    ).fetchall()
    problems = rule_violations(EventLink(*row) for row in rows)
    if not problems:
        return CheckOutcome(CHECK_EVENT_RULES, True, f"{len(rows)} events follow the chain's rules", severity="WARN")
    return CheckOutcome(
        CHECK_EVENT_RULES, False,
        f"{len(problems)} events break the chain's rules (the source is suspicious): {listing(problems, 10)}",
        severity="WARN", metadata={"violations": len(problems)},
    )


def check_last_event_canonical(conn, event_tag: int, start: int, end: int) -> CheckOutcome:
    """At each height of the range, the latest event migrated adds the canonical block."""
    wrong = conn.execute(
        """
        SELECT last.height, last.event_sequence, last.event_type::text FROM (
            SELECT DISTINCT ON (e.height) e.height, e.event_sequence, e.event_type, e.block_metadata_id
            FROM block_events e
            WHERE e.event_tag = %(tag)s AND e.height IN (
                SELECT DISTINCT height FROM block_events
                WHERE event_tag = %(tag)s AND event_sequence >= %(start)s AND event_sequence < %(end)s)
            ORDER BY e.height, e.event_sequence DESC) last
        JOIN block_metadata bm ON bm.id = last.block_metadata_id
        LEFT JOIN canonical_blocks cb ON cb.height = last.height AND cb.tag = bm.tag
        WHERE last.event_sequence >= %(start)s AND last.event_sequence < %(end)s
          AND (last.event_type <> 'BLOCK_ADDED' OR cb.block_metadata_id IS DISTINCT FROM last.block_metadata_id)
        ORDER BY 1
        """,
        {"tag": event_tag, "start": start, "end": end},
    ).fetchall()
    if not wrong:
        return CheckOutcome(CHECK_LAST_EVENT_CANONICAL, True, "the last event at each height adds its canonical block", severity="WARN")
    return CheckOutcome(
        CHECK_LAST_EVENT_CANONICAL, False,
        f"at {len(wrong)} heights the last event does not add the canonical block: (height, id, type) "
        f"{listing(wrong, 10)}. If those heights' block range was migrated before a reorg, re-run it; "
        "if later event ranges are not migrated yet, migrate them.",
        severity="WARN", metadata={"heights": len(wrong)},
    )


def run_event_checks(conn: psycopg.Connection, event_tag: int, start: int, end: int, result: "EventRangeResult") -> list[CheckOutcome]:
    return [
        check_event_count(conn, event_tag, start, end, result.events),
        check_contiguous(conn, event_tag, start, end),
        check_events_resolve(conn, event_tag, start, end),
        check_event_rules(conn, event_tag, start, end),
        check_last_event_canonical(conn, event_tag, start, end),
    ]
