"""Discovery: page through `com.atproto.sync.listRepos` of a PDS or relay into the ledger.

With a signal collection (REPO_SIGNAL_COLLECTION), a host that serves
`com.atproto.sync.listReposByCollection` (a relay does; the reference PDS answers 401 AuthMissing) is listed in two
phases: the repos having that collection enter the ledger, then listRepos marks the known ones whose
head moved, without adding the others. A host that doesn't serve it is listed whole, and the backfill
decides (a repo without a signal record is stored with none). The phase is kept in the cursor.
"""

import time
from dataclasses import dataclass

import psycopg

from migration_assets.atproto.cid import CID, CidError
from migration_assets.atproto.syntax import is_did, is_tid
from migration_assets.atproto.xrpc import XrpcClient, XrpcError
from migration_assets.repos import ledger
from migration_assets.repos.collections import RecordScope
from migration_assets.repos.ledger import ListedRepo

PAGE_SIZE = 1000  # listRepos's maximum (listReposByCollection allows 2000)
BY_COLLECTION = "listReposByCollection:"  # cursor prefix of phase 1: repos having the signal collection
KNOWN_ONLY = "listRepos(known):"  # cursor prefix of phase 2: listRepos, updating only repos already known
_NOT_SERVED = {"MethodNotImplemented", "XRPCNotSupported", "MethodNotSupported"}
OUT_OF_SCOPE_BATCH = 10_000


@dataclass
class DiscoveryProgress:
    host: str
    pages: int = 0
    listed: int = 0
    new: int = 0
    due: int = 0
    cursor: str | None = None
    finished: bool = False


def list_page(client: XrpcClient, cursor: str | None, limit: int = PAGE_SIZE) -> tuple[list[ListedRepo], str | None]:
    params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
    reply = client.query("com.atproto.sync.listRepos", params)
    items = [item for item in map(_listed, reply.get("repos", [])) if item is not None]
    return items, _next(cursor, reply.get("cursor"), items)


def _listed(item: object) -> ListedRepo | None:
    """A listRepos item as the ledger records it; None without a valid DID (atproto/syntax.py). A head
    that is not a CID, a rev that is not a TID or an `active` that is not a boolean is taken as unknown
    (the repo is then due, and its getRepo decides), not written: the listing's page would fail with it."""
    if not isinstance(item, dict) or not is_did(did := item.get("did")):
        return None
    head, rev, active = item.get("head"), item.get("rev"), item.get("active", True)
    return ListedRepo(did, head if _is_cid(head) else None, rev if is_tid(rev) else None,
                      active if type(active) is bool else True)


def _is_cid(text: object) -> bool:
    if type(text) is not str or len(text) > 200:
        return False
    try:
        CID.decode(text)
    except CidError:
        return False
    return True


def list_by_collection_page(client: XrpcClient, collection: str, cursor: str | None,
                            limit: int = PAGE_SIZE) -> tuple[list[str], str | None]:
    """A page of the DIDs having `collection`; XrpcError if the host fails or doesn't serve it."""
    params = {"collection": collection, "limit": limit} | ({"cursor": cursor} if cursor else {})
    reply = client.query("com.atproto.sync.listReposByCollection", params)
    dids = [r["did"] for r in reply.get("repos", []) if isinstance(r, dict) and is_did(r.get("did"))]
    return dids, _next(cursor, reply.get("cursor"), dids)


def _next(cursor: str | None, next_cursor: object, items: list) -> str | None:
    # An empty page or a cursor that doesn't move ends the listing (some hosts repeat the last cursor).
    return next_cursor if items and isinstance(next_cursor, str) and next_cursor and next_cursor != cursor else None


def is_not_served(exc: XrpcError) -> bool:
    """The endpoint is public: a 401 means the host passed an unknown method on to its app view (the
    reference PDS answers AuthMissing), like a 501 or 404 from others."""
    return exc.status in (401, 404, 501) or exc.error in _NOT_SERVED


def discover(
    conn: psycopg.Connection, client: XrpcClient, buckets: int, cursor: str | None = None,
    deadline: float | None = None, page_size: int = PAGE_SIZE, signal: str | None = None,
) -> DiscoveryProgress:
    """List repos from `cursor` on, recording each page in the ledger as it arrives, to the end or until
    `deadline` (a time.monotonic() value) has passed after a page; `progress.cursor` is where to go on
    next time (None once finished). At least one page is listed, so every call makes progress.
    With `signal`, a host serving listReposByCollection adds only repos having that collection."""
    progress = DiscoveryProgress(client.base_url, cursor=cursor)
    while True:
        progress.cursor = _record_page(conn, client, buckets, progress, page_size, signal)
        progress.pages += 1
        if progress.cursor is None:
            progress.finished = True
            return progress
        if deadline is not None and time.monotonic() >= deadline:
            return progress


def _record_page(conn: psycopg.Connection, client: XrpcClient, buckets: int, progress: DiscoveryProgress,
                 page_size: int, signal: str | None) -> str | None:
    """List and record one page from `progress.cursor`; returns the cursor to go on from."""
    cursor = progress.cursor
    if signal and (cursor is None or cursor.startswith(BY_COLLECTION)):
        after = (cursor[len(BY_COLLECTION):] or None) if cursor else None
        try:
            dids, next_cursor = list_by_collection_page(client, signal, after, page_size)
        except XrpcError as exc:
            if cursor is not None or not is_not_served(exc):
                raise
            cursor = None  # not served: list every repo, the backfill decides
        else:
            progress.listed += len(dids)
            progress.new += ledger.enqueue(conn, dids, buckets)
            conn.commit()
            return BY_COLLECTION + next_cursor if next_cursor else KNOWN_ONLY
        signal = None
    known_only = cursor is not None and cursor.startswith(KNOWN_ONLY)
    after = (cursor[len(KNOWN_ONLY):] or None) if known_only else cursor
    items, next_cursor = list_page(client, after, page_size)
    progress.listed += len(items)
    if known_only:
        items = _known(conn, items)
    new, due = ledger.record_listing(conn, items, buckets)
    progress.new += new
    progress.due += due
    if next_cursor is None:
        return None
    return KNOWN_ONLY + next_cursor if known_only else next_cursor


def _known(conn: psycopg.Connection, items: list[ListedRepo]) -> list[ListedRepo]:
    rows = conn.execute("SELECT did FROM repos WHERE did = ANY(%s)", ([i.did for i in items],)).fetchall()
    known = {did for (did,) in rows}
    conn.commit()
    return [i for i in items if i.did in known]


def mark_out_of_scope(conn: psycopg.Connection, scope: RecordScope, limit: int = OUT_OF_SCOPE_BATCH) -> int:
    """Make due the synced repos whose records were stored under another collection filter or signal
    collection than `scope` (widened: the newly included collections get backfilled; narrowed: the
    excluded records get deleted). At most `limit` per call, so a changed filter over millions of repos
    spreads over sensor ticks; two range scans of an index find them without reading every repo."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """UPDATE repos SET status = 'pending', next_retry_at = NULL, updated_at = now()
               WHERE did IN (SELECT did FROM repos
                             WHERE status = 'synced' AND (collections_filter < %(key)s OR collections_filter > %(key)s)
                             LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
            {"key": scope.key, "limit": limit},
        )
        return cur.rowcount
