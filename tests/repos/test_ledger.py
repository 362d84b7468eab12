"""The ledger's rules on a real PostgreSQL: what a listing makes due, claims, backoff."""

import random
import threading
from datetime import datetime, timedelta, timezone

import psycopg

from migration_assets.atproto.cid import CID
from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.repos import ledger
from migration_assets.repos.discovery import discover
from migration_assets.repos.ledger import ListedRepo
from tests.atproto.loopback import LoopbackServer, json_reply
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
        ListedRepo("did:plc:quiet", "h1", "r1", active=False),
        ListedRepo("did:plc:back", "h1", "r1", active=True),
        ListedRepo("did:plc:waiting", "h2", "r2"),
        ListedRepo("did:plc:gone", "h1", "r1", active=False),
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
    """Runs claiming side by side (behind a barrier) take disjoint batches covering every due repo, and
    pass over a repo whose result is being written instead of waiting for it (lock_timeout turns a
    wait into an error). A claim whose run stopped renewing it is taken over; a live one is not."""
    dids = [f"did:plc:c{n:03d}" for n in range(400)]
    ledger.enqueue(target, dids, 1)
    runs, barrier = 4, threading.Barrier(4)
    claimed: list[list[str]] = [[] for _ in range(runs)]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        lease = ledger.repo_lease(60)
        try:
            with psycopg.connect(target_url, options="-c lock_timeout=10s") as conn:
                barrier.wait()
                while repos := ledger.claim_due(conn, lease, [0], limit=20):
                    claimed[n].extend(r.did for r in repos)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with psycopg.connect(target_url) as writer:  # a repo's result being written by another run
        writer.execute("SELECT 1 FROM repos WHERE did = 'did:plc:c007' FOR UPDATE")
        threads = [threading.Thread(target=run, args=(n,)) for n in range(runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    everything = [did for run_dids in claimed for did in run_dids]
    assert all(claimed), "every run got repos: the claims really ran side by side"
    assert len(everything) == len(set(everything)), "a repo was claimed by two runs"
    assert set(everything) == set(dids) - {"did:plc:c007"}

    late = ledger.repo_lease(60)
    assert [c.did for c in ledger.claim_due(target, late, [0], limit=500)] == ["did:plc:c007"]
    target.execute("UPDATE repos SET lease_expires_at = now() - interval '1 second' WHERE did = 'did:plc:c003'")
    assert [c.did for c in ledger.claim_due(target, late, [0], limit=500)] == ["did:plc:c003"]
    assert ledger.due_buckets(target) == {}, "every repo is leased by a live run"


def test_retry_backoff_doubles_from_a_minute_to_an_hour_with_jitter():
    rng = random.Random(7)
    for attempts, base in ((1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600), (20, 3600)):
        delays = [ledger.RETRY.delay(attempts, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays), (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > base / 10, "no jitter"


def test_a_listing_with_hostile_items_records_the_rest_of_its_page(target):
    """listRepos items are a host's word: one naming no valid DID is left out, a head that is not a CID, a
    rev that is not a TID or an `active` that is not a boolean is taken as unknown. Written as sent, any
    of them (U+0000 above all) failed the whole page, and the listing never got past it."""
    good, odd = "did:plc:" + "a" * 24, "did:plc:" + "b" * 24
    head, rev = str(CID.for_block(b"head")), "3l5aaaaaaaa22"
    page = [
        {"did": good, "head": head, "rev": rev, "active": True},
        {"did": odd, "head": "bafy\x00", "rev": "r\x00", "active": "yes"},
        {"did": "did:plc:\x00nul", "head": head, "rev": rev},
        {"did": "did:web:" + "x" * 3000, "head": head, "rev": rev},
        {"did": "alice.example.com", "head": head, "rev": rev},
        {"did": good.replace("a", "c"), "head": {"$link": head}, "rev": 5},
        "not an item",
    ]
    server = LoopbackServer()
    server.route("GET", "/xrpc/com.atproto.sync.listRepos", json_reply({"repos": page}))
    try:
        with XrpcClient(server.url, allow_private_hosts=True) as client:
            progress = discover(target, client, BUCKETS)
    finally:
        server.stop()
    assert progress.listed == 3
    listed = dict(target.execute("SELECT did, (listed_head, listed_rev) FROM repos").fetchall())
    assert listed == {good: (head, rev), odd: (None, None), good.replace("a", "c"): (None, None)}
