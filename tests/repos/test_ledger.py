"""The ledger's rules on a real PostgreSQL: what a listing makes due, claims, backoff."""

import random
from datetime import datetime, timedelta, timezone

import psycopg

from migration_assets.repos import ledger
from migration_assets.repos.ledger import ListedRepo
from tests.repos.helpers import ledger_row

BUCKETS = 256


def set_status(conn: psycopg.Connection, did: str, status: str, head: str | None = None, **columns) -> None:
    assignments = ", ".join(f"{name} = %({name})s" for name in columns)
    conn.execute(
        f"UPDATE repos SET status = %(status)s, head = %(head)s{', ' + assignments if columns else ''} WHERE did = %(did)s",
        {"did": did, "status": status, "head": head, **columns},
    )


def statuses(conn: psycopg.Connection, dids: list[str]) -> dict[str, str]:
    return {d.removeprefix("did:plc:"): ledger_row(conn, d)["status"] for d in dids}


def test_listing_makes_due_only_what_changed(target):
    dids = [f"did:plc:{name}" for name in ("synced", "moved", "quiet", "back", "waiting", "gone")]
    assert ledger.record_listing(target, [ListedRepo(d, "h1", "r1") for d in dids], BUCKETS) == (6, 0)
    set_status(target, "did:plc:synced", "synced", "h1", rev="r1")
    set_status(target, "did:plc:moved", "synced", "h1", rev="r1")
    set_status(target, "did:plc:quiet", "deactivated")
    set_status(target, "did:plc:back", "deactivated")
    retry_at = datetime.now(timezone.utc) + timedelta(minutes=30)
    set_status(target, "did:plc:waiting", "error", next_retry_at=retry_at, attempts=2)
    set_status(target, "did:plc:gone", "synced", "h1", rev="r1")

    listing = [
        ListedRepo("did:plc:synced", "h1", "r1"),
        ListedRepo("did:plc:moved", "h2", "r2"),
        ListedRepo("did:plc:quiet", "h1", "r1", active=False, status="deactivated"),
        ListedRepo("did:plc:back", "h1", "r1", active=True),
        ListedRepo("did:plc:waiting", "h2", "r2"),
        ListedRepo("did:plc:gone", "h1", "r1", active=False, status="takendown"),
    ]
    ledger.record_listing(target, listing, BUCKETS)
    assert statuses(target, dids) == {"synced": "synced", "moved": "pending", "quiet": "deactivated",
                                      "back": "pending", "waiting": "error", "gone": "pending"}
    # The due repos run; the same listing again makes nothing due.
    set_status(target, "did:plc:moved", "synced", "h2", rev="r2")
    set_status(target, "did:plc:back", "synced", "h1", rev="r1")
    set_status(target, "did:plc:gone", "takendown")
    assert ledger.record_listing(target, listing, BUCKETS) == (0, 0)
    assert statuses(target, dids) == {"synced": "synced", "moved": "synced", "quiet": "deactivated",
                                      "back": "synced", "waiting": "error", "gone": "takendown"}
    waiting = ledger_row(target, "did:plc:waiting")
    assert (waiting["attempts"], waiting["next_retry_at"]) == (2, retry_at), "a listing must not reset a backoff"
    assert waiting["listed_head"] == "h2"


def test_claims_never_overlap_and_stale_claims_are_taken_over(target, target_url):
    ledger.enqueue(target, [f"did:plc:c{n}" for n in range(20)], 1)
    with psycopg.connect(target_url) as other:
        first = ledger.claim_due(target, [0], stale_minutes=30)
        second = ledger.claim_due(other, [0], stale_minutes=30)
    assert len(first) == 20 and second == []
    target.execute("UPDATE repos SET claimed_at = now() - interval '31 minutes' WHERE did = 'did:plc:c3'")
    assert [c.did for c in ledger.claim_due(target, [0], stale_minutes=30)] == ["did:plc:c3"]


def test_retry_backoff_doubles_from_a_minute_to_an_hour_with_jitter():
    rng = random.Random(7)
    for attempts, base in ((1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (20, 3600)):
        delays = [ledger.retry_delay_seconds(attempts, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays), (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > base / 10, "no jitter"
