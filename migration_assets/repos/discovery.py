"""Discovery: page through `com.atproto.sync.listRepos` of a PDS or relay into the ledger."""

import time
from dataclasses import dataclass

import psycopg

from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.repos import ledger
from migration_assets.repos.ledger import ListedRepo

PAGE_SIZE = 1000  # the endpoint's maximum


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
    items = [
        ListedRepo(r["did"], r.get("head"), r.get("rev"), r.get("active", True), r.get("status"))
        for r in reply.get("repos", [])
        if isinstance(r, dict) and isinstance(r.get("did"), str) and r["did"].startswith("did:")
    ]
    next_cursor = reply.get("cursor")
    # An empty page or a cursor that doesn't move ends the listing (some hosts repeat the last cursor).
    return items, (next_cursor if items and next_cursor and next_cursor != cursor else None)


def discover(
    conn: psycopg.Connection, client: XrpcClient, buckets: int, cursor: str | None = None,
    deadline: float | None = None, page_size: int = PAGE_SIZE,
) -> DiscoveryProgress:
    """List repos from `cursor` on, recording each page in the ledger as it arrives, to the end or until
    `deadline` (a time.monotonic() value) has passed after a page; `progress.cursor` is where to go on
    next time (None once finished). At least one page is listed, so every call makes progress."""
    progress = DiscoveryProgress(client.base_url, cursor=cursor)
    while True:
        items, next_cursor = list_page(client, progress.cursor, page_size)
        new, due = ledger.record_listing(conn, items, buckets)
        progress.pages += 1
        progress.listed += len(items)
        progress.new += new
        progress.due += due
        progress.cursor = next_cursor
        if next_cursor is None:
            progress.finished = True
            return progress
        if deadline is not None and time.monotonic() >= deadline:
            return progress
