"""Store a repo snapshot: diff it against the stored records and write only what changed, with the
ledger update, in one transaction (a crash leaves the repo either fully at the old rev or the new)."""

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import psycopg

from migration_assets.core.postgres import copy_rows
from migration_assets.repos import ledger
from migration_assets.repos.snapshot import RecordKey, RepoSnapshot

_INCOMING = "incoming_records"


@dataclass(frozen=True)
class RecordChanges:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0


def store_snapshot(conn: psycopg.Connection, snapshot: RepoSnapshot, pds: str) -> RecordChanges:
    did = snapshot.did
    # Pipelined: the lock and the read go out together, as do the writes after the COPY, so a repo
    # costs four round trips (read, COPY, writes, commit) whatever it holds.
    with conn.transaction(), conn.cursor() as cur:
        with conn.pipeline():
            cur.execute("SELECT 1 FROM repos WHERE did = %s FOR UPDATE", (did,))
            cur.execute("SELECT collection, rkey, cid FROM records WHERE did = %s", (did,))
            stored: dict[RecordKey, str] = {(c, r): cid for c, r, cid in cur.fetchall()}
        changed = [(key, cid) for key, cid in snapshot.records.items() if stored.get(key) != str(cid)]
        gone = [key for key in stored if key not in snapshot.records]
        created = sum(1 for key, _ in changed if key not in stored)
        _write_changed(cur, snapshot, changed, upsert=bool(stored))
        with conn.pipeline():
            _delete(cur, did, gone)
            _write_counts(cur, did, snapshot)
            ledger.finish_synced(cur, did, pds, str(snapshot.head), snapshot.commit.rev, len(snapshot.records))
    return RecordChanges(created, len(changed) - created, len(gone), len(snapshot.records) - len(changed))


def _write_changed(cur: psycopg.Cursor, snapshot: RepoSnapshot, changed: list, upsert: bool) -> None:
    if not changed:
        return
    rows = ((snapshot.did, c, r, str(cid), snapshot.record_json(cid)) for (c, r), cid in changed)
    columns = ("did", "collection", "rkey", "cid", "record")
    if not upsert:  # nothing stored for this repo yet (and its ledger row is locked): COPY straight in
        copy_rows(cur, "records", columns, rows)
        return
    cur.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {_INCOMING} (did text, collection text, rkey text, cid text, record jsonb) "
        "ON COMMIT DELETE ROWS"
    )
    copy_rows(cur, _INCOMING, columns, rows)
    cur.execute(
        f"""INSERT INTO records (did, collection, rkey, cid, record) SELECT * FROM {_INCOMING}
            ON CONFLICT (did, collection, rkey)
            DO UPDATE SET cid = excluded.cid, record = excluded.record, indexed_at = now()"""
    )


def _delete(cur: psycopg.Cursor, did: str, keys: list[RecordKey]) -> None:
    if keys:
        cur.execute(
            "DELETE FROM records WHERE did = %s AND (collection, rkey) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            (did, [c for c, _ in keys], [r for _, r in keys]),
        )


def _write_counts(cur: psycopg.Cursor, did: str, snapshot: RepoSnapshot) -> None:
    counts = Counter(collection for collection, _ in snapshot.records)
    cur.execute("DELETE FROM repo_collection_counts WHERE did = %s", (did,))
    cur.executemany(  # a repo has a few collections; pipelined, this costs no round trip of its own
        "INSERT INTO repo_collection_counts (did, collection, records) VALUES (%s, %s, %s)",
        [(did, collection, count) for collection, count in counts.items()],
    )


def delete_repo(conn: psycopg.Connection, did: str, pds: str | None, reason: str) -> int:
    """The repo no longer exists: remove its records and counts, mark it deleted. Returns records removed."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT 1 FROM repos WHERE did = %s FOR UPDATE", (did,))
        cur.execute("DELETE FROM records WHERE did = %s", (did,))
        removed = cur.rowcount
        cur.execute("DELETE FROM repo_collection_counts WHERE did = %s", (did,))
        cur.execute("UPDATE repos SET head = NULL, rev = NULL, records_count = 0 WHERE did = %s", (did,))
        ledger.finish_gone(cur, did, "deleted", pds, reason)
    return removed


def mark_gone(conn: psycopg.Connection, did: str, status: str, pds: str | None, reason: str) -> None:
    with conn.transaction(), conn.cursor() as cur:
        ledger.finish_gone(cur, did, status, pds, reason)


def mark_failed(conn: psycopg.Connection, did: str, error: str, retry_at: datetime, count_attempt: bool) -> None:
    with conn.transaction(), conn.cursor() as cur:
        ledger.finish_failed(cur, did, error, retry_at, count_attempt)
