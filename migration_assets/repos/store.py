"""Store a repo snapshot: diff it against the stored records and write only what changed, with the
ledger update, in one transaction (a crash leaves the repo either fully at the old rev or the new).

The snapshot's records are COPYed into a temp table (joined to their blocks here while the blocks are
in memory, else in PostgreSQL from two spooled tables) and the diff is one set-based statement, so
memory stays flat however big the repo; unchanged records are not written. A repo with no stored
records (its first sync, most of a backfill) has nothing to diff: its records are COPYed straight into
`records`, which costs PostgreSQL half as much as staging and diffing them. Records the
snapshot's collection filter left out are not among its keys, so a narrowed filter deletes them here
like any record gone from the MST; the filter is recorded with the repo (`collections_filter`)."""

from dataclasses import dataclass
from datetime import datetime

import psycopg

from migration_assets.atproto.mst import MstError
from migration_assets.core.postgres import copy_rows, copy_text
from migration_assets.repos import ledger
from migration_assets.repos.snapshot import RepoSnapshot

# Session-local staging, created once per connection and emptied by each store before it stages. A
# repo's records arrive in incoming_records, one row each with its JSON form (or why there is none:
# error, or both NULL for a block missing from the CAR). A repo whose blocks were spooled to disk comes
# as keys and blocks, joined here into incoming_records.
_STAGING_TABLES = {
    "incoming_records": "collection text, rkey text, cid text, record text, error text, record_cbor bytea",
    "incoming_blocks": "link bytea, record text, error text, record_cbor bytea",
    "incoming_keys": "collection text, rkey text, cid text, link bytea",
}
# Emptied with DELETE, which costs nothing at commit, unlike ON COMMIT DELETE ROWS (it truncated the three
# tables and their TOAST tables at every commit: two thirds of a small repo's commit time). Temp tables
# are never vacuumed, so a table that has grown past _STAGING_MAX_BYTES of dead rows is truncated instead.
_STAGING_MAX_BYTES = 1 << 20
_STAGING = (
    *(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns})" for name, columns in _STAGING_TABLES.items()),
    "DO $$ BEGIN "
    + " ".join(f"IF pg_relation_size('pg_temp.{name}') > {_STAGING_MAX_BYTES} THEN TRUNCATE {name}; "
               f"ELSE DELETE FROM {name}; END IF;" for name in _STAGING_TABLES)
    + " END $$",
)
_RECORD_COLUMNS = ("collection", "rkey", "cid", "record", "error", "record_cbor")

# A link's blocks are all the same bytes, so any of its rows will do; one with a record first.
_JOIN_SPOOLED = """
    INSERT INTO incoming_records
    SELECT k.collection, k.rkey, k.cid, b.record, b.error, b.record_cbor FROM incoming_keys k
    LEFT JOIN (SELECT DISTINCT ON (link) link, record, error, record_cbor FROM incoming_blocks
               ORDER BY link, record IS NULL) b ON b.link = k.link"""

# A changed record left unwritten (no JSON form: missing from the CAR, or not DAG-CBOR). Only run
# when the write found fewer records to write than changes.
_UNUSABLE = """
    SELECT i.collection, i.rkey, i.cid, i.error FROM incoming_records i
    LEFT JOIN records r ON r.did = %(did)s AND r.collection = i.collection AND r.rkey = i.rkey
    WHERE i.record IS NULL AND r.cid IS DISTINCT FROM i.cid LIMIT 1"""

# One statement: creates and updates (CID changed) and deletes (stored, no longer in the MST) touch
# disjoint rows. xmax = 0 tells an inserted row from an updated one. Unchanged records are not written.
_DIFF_AND_WRITE = """
    WITH changed AS (
        SELECT i.collection, i.rkey, i.cid, i.record, i.record_cbor FROM incoming_records i
        LEFT JOIN records r ON r.did = %(did)s AND r.collection = i.collection AND r.rkey = i.rkey
        WHERE r.cid IS DISTINCT FROM i.cid
    ), written AS (
        INSERT INTO records (did, collection, rkey, cid, record, record_cbor)
        SELECT %(did)s, c.collection, c.rkey, c.cid, c.record::jsonb, c.record_cbor FROM changed c
        WHERE c.record IS NOT NULL
        ON CONFLICT (did, collection, rkey)
        DO UPDATE SET cid = excluded.cid, record = excluded.record, record_cbor = excluded.record_cbor,
                      indexed_at = now()
        RETURNING xmax = 0 AS created
    ), gone AS (
        DELETE FROM records r WHERE r.did = %(did)s AND NOT EXISTS
            (SELECT 1 FROM incoming_records k WHERE k.collection = r.collection AND k.rkey = r.rkey)
        RETURNING 1
    )
    SELECT (SELECT count(*) FILTER (WHERE created) FROM written),
           (SELECT count(*) FILTER (WHERE NOT created) FROM written),
           (SELECT count(*) FROM gone), (SELECT count(*) FROM changed)"""


# A first sync of a repo spooled to disk: its keys joined to their blocks straight into records.
_INSERT_SPOOLED = """
    INSERT INTO records (did, collection, rkey, cid, record, record_cbor)
    SELECT %(did)s, k.collection, k.rkey, k.cid, b.record::jsonb, b.record_cbor FROM incoming_keys k
    JOIN (SELECT DISTINCT ON (link) link, record, record_cbor FROM incoming_blocks WHERE record IS NOT NULL
          ORDER BY link) b ON b.link = k.link"""
_RECORDS_COLUMNS = ("did", "collection", "rkey", "cid", "record", "record_cbor")


@dataclass(frozen=True)
class RecordChanges:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0


def store_snapshot(conn: psycopg.Connection, snapshot: RepoSnapshot, pds: str) -> RecordChanges:
    """Write the snapshot in the caller's transaction, with the repo's row locked as every writer of its
    records locks it first (Lease.holding does). Three round trips: the repo's ledger and counts (known
    from the snapshot, pipelined), one COPY of its records (two and a join for a repo spooled to disk),
    the diff. A repo with no stored records skips the staging tables and the diff."""
    did = {"did": snapshot.did}
    with conn.cursor() as cur:
        with conn.pipeline():
            _write_counts(cur, snapshot)
            ledger.finish_synced(cur, snapshot.did, pds, head=str(snapshot.head), rev=snapshot.commit.rev,
                                 records=snapshot.records, data_root=str(snapshot.commit.data),
                                 collections_filter=snapshot.scope.key, signal_missing=snapshot.signal_missing)
            cur.execute("SELECT NOT EXISTS (SELECT 1 FROM records WHERE did = %(did)s)", did)
        if cur.fetchone()[0]:
            return RecordChanges(created=_write_first(cur, snapshot))
        _stage(cur, snapshot)
        created, updated, deleted, changed = cur.execute(_DIFF_AND_WRITE, did).fetchone()
        if created + updated < changed:  # some changed record had no block to write: roll it all back
            _refuse_unusable(cur, snapshot)
    return RecordChanges(created, updated, deleted, snapshot.records - created - updated)


def _stage(cur: psycopg.Cursor, snapshot: RepoSnapshot) -> None:
    """The snapshot's records into incoming_records."""
    _copy_to_staging(cur, snapshot)
    if not snapshot.in_memory:
        cur.execute(_JOIN_SPOOLED)


def _copy_to_staging(cur: psycopg.Cursor, snapshot: RepoSnapshot) -> None:
    """Empty the staging tables, then COPY the records in: into incoming_records with their blocks
    joined here (most repos), or, for a repo spooled to disk, into incoming_blocks and incoming_keys."""
    with cur.connection.pipeline():
        for statement in _STAGING:
            cur.execute(statement)
    if snapshot.in_memory:
        lines = snapshot.copy_lines("", "\t\\N\t\\N\n")  # error and record_cbor NULL
        if lines is not None:
            copy_text(cur, "incoming_records", _RECORD_COLUMNS, lines)
        else:
            copy_rows(cur, "incoming_records", _RECORD_COLUMNS, snapshot.record_rows())
        return
    with cur.copy("COPY incoming_blocks (link, record, error, record_cbor) FROM STDIN") as copy:
        for batch in snapshot.staged_batches():
            if isinstance(batch, bytes):  # COPY lines made by compiled code
                copy.write(batch)
            else:
                for row in batch:
                    copy.write_row(row)
    copy_rows(cur, "incoming_keys", ("collection", "rkey", "cid", "link"), snapshot.keys)


def _write_first(cur: psycopg.Cursor, snapshot: RepoSnapshot) -> int:
    """Write the records of a repo that has none stored; as the diff, refuse (MstError) if any lacks its block."""
    lines = snapshot.copy_lines(f"{snapshot.did}\t", "\t\\N\n") if _copyable(snapshot.did) else None  # record_cbor NULL
    if lines is not None:
        copy_text(cur, "records", _RECORDS_COLUMNS, lines)
        written = snapshot.records
    elif snapshot.in_memory:
        rows = (row for row in snapshot.record_rows() if row[3] is not None)
        written = copy_rows(cur, "records", _RECORDS_COLUMNS, ((snapshot.did, *row[:4], row[5]) for row in rows))
    else:
        _copy_to_staging(cur, snapshot)
        written = cur.execute(_INSERT_SPOOLED, {"did": snapshot.did}).rowcount
    if written < snapshot.records:  # staged again to find which record, as the diff does
        _stage(cur, snapshot)
        _refuse_unusable(cur, snapshot)
    return written


def _copyable(text: str) -> bool:
    """Whether `text` goes into a COPY text line as it is (no backslash, tab or line break)."""
    return text.isprintable() and "\\" not in text


def _refuse_unusable(cur: psycopg.Cursor, snapshot: RepoSnapshot) -> None:
    collection, rkey, cid, error = cur.execute(_UNUSABLE, {"did": snapshot.did}).fetchone()
    if error:
        raise MstError(f"record {collection}/{rkey} ({cid}) of {snapshot.did} is not valid DAG-CBOR: {error}")
    raise MstError(f"record block {cid} ({collection}/{rkey}) is missing from the CAR; the export is incomplete")


def _write_counts(cur: psycopg.Cursor, snapshot: RepoSnapshot) -> None:
    cur.execute("DELETE FROM repo_collection_counts WHERE did = %s", (snapshot.did,))
    cur.executemany(  # a repo has a few collections; pipelined, this costs no round trip of its own
        "INSERT INTO repo_collection_counts (did, collection, records) VALUES (%s, %s, %s)",
        [(snapshot.did, collection, count) for collection, count in snapshot.collections.items()],
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
