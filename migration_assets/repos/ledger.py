"""The `repos` ledger: which accounts to sync, who holds them, and what happened to each.

A bucket run leases its due repos a batch at a time (`in_progress`, see core/lease.py), renews the
lease while it works, and finishes each repo in its own transaction with the records it changed,
fenced by the lease: `finish_*` run inside `Lease.holding`, so a run whose lease was taken over
writes nothing. A run that dies stops renewing; its repos are due again once the lease expires.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg

from migration_assets.core.backoff import Backoff
from migration_assets.core.lease import FREE, Lease
from migration_assets.core.postgres import storable
from migration_assets.repos.buckets import bucket_of

GONE_STATUSES = ("deleted", "deactivated", "takendown", "suspended")
# After the n-th failure in a row: 60 s x 2^(n-1), capped at an hour, a random 50-100 % of it, so
# repos that failed together don't all come back together.
RETRY = Backoff(base=60, cap=3600, floor=0.5)

# Due: never synced, listed as changed, retry time passed (before `due_before`, so a run never takes
# back a repo it failed itself), or left in_progress by a run whose lease expired (Lease adds FREE).
_DUE = """(status IN ('pending', 'in_progress')
           OR (status = 'error' AND next_retry_at <= least(now(), %(due_before)s::timestamptz)))"""


@dataclass(frozen=True)
class ListedRepo:
    """One `com.atproto.sync.listRepos` item."""

    did: str
    head: str | None
    rev: str | None
    active: bool = True


@dataclass(frozen=True)
class ClaimedRepo:
    did: str
    bucket: int
    attempts: int
    head: str | None


def enqueue(conn: psycopg.Connection, dids: Iterable[str], buckets: int) -> int:
    """Add DIDs as pending; known DIDs are left as they are. Returns how many were new."""
    rows = [(did, bucket_of(did, buckets)) for did in dict.fromkeys(dids)]
    if not rows:
        return 0
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO repos (did, bucket) SELECT * FROM unnest(%s::text[], %s::int[]) "
            "ON CONFLICT (did) DO NOTHING",
            ([d for d, _ in rows], [b for _, b in rows]),
        )
        return cur.rowcount


def record_listing(conn: psycopg.Connection, items: list[ListedRepo], buckets: int) -> tuple[int, int]:
    """Upsert what listRepos reported; returns (new, due). New DIDs become pending. A known repo
    becomes due when the listing says it changed: a synced repo whose head or rev moved or that went
    inactive, an inactive or deleted one that is active again. A repo waiting for its retry keeps its
    backoff, and an inactive one is not fetched again at every pass."""
    if not items:
        return 0, 0
    columns = (
        [i.did for i in items], [bucket_of(i.did, buckets) for i in items],
        [i.head for i in items], [i.rev for i in items], [i.active for i in items],
    )
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE listed (did text, bucket int, head text, rev text, active bool) ON COMMIT DROP"
        )
        cur.execute("INSERT INTO listed SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::bool[])", columns)
        cur.execute(
            "INSERT INTO repos (did, bucket, listed_head, listed_rev) SELECT did, bucket, head, rev FROM listed "
            "ON CONFLICT (did) DO NOTHING"
        )
        new = cur.rowcount
        cur.execute(
            """UPDATE repos r SET status = 'pending', next_retry_at = NULL, updated_at = now()
               FROM listed l
               WHERE r.did = l.did AND (
                   (r.status = 'synced' AND (NOT l.active OR r.head IS DISTINCT FROM l.head
                                             OR r.rev IS DISTINCT FROM l.rev))
                   OR (r.status IN ('deactivated', 'takendown', 'suspended', 'deleted') AND l.active))"""
        )
        due = cur.rowcount
        cur.execute(
            "UPDATE repos r SET listed_head = l.head, listed_rev = l.rev FROM listed l "
            "WHERE r.did = l.did AND (r.listed_head IS DISTINCT FROM l.head OR r.listed_rev IS DISTINCT FROM l.rev)"
        )
    return new, due


def repo_lease(ttl_seconds: float) -> Lease:
    """A run's lease on the repos it syncs (one token per run)."""
    return Lease("repos", "did", ttl_seconds)


def claim_due(conn: psycopg.Connection, lease: Lease, buckets: list[int], limit: int,
              due_before: datetime | None = None) -> list[ClaimedRepo]:
    """Lease up to `limit` due repos of these buckets, in DID order (SKIP LOCKED: two runs never take
    the same repo). Retries count as due only if due before `due_before` (the run's start)."""
    return _claim(conn, lease, f"bucket = ANY(%(buckets)s) AND {_DUE}",
                  {"buckets": buckets, "due_before": due_before}, limit)


def claim_dids(conn: psycopg.Connection, lease: Lease, dids: list[str]) -> list[ClaimedRepo]:
    """Lease these pending DIDs for an immediate resync (the stream's desyncs), as a bucket run leases
    its repos: one that a run holds is skipped, and that run syncs it."""
    return _claim(conn, lease, "did = ANY(%(dids)s) AND status = 'pending'", {"dids": list(dids)}, len(dids))


def _claim(conn: psycopg.Connection, lease: Lease, where_sql: str, params: dict, limit: int) -> list[ClaimedRepo]:
    rows = lease.claim(
        conn, where_sql, params, limit, order_by="did",
        set_sql="status = 'in_progress', claimed_at = now(), updated_at = now()",
        returning=("bucket", "attempts", "head"),
    )
    return [ClaimedRepo(*row) for row in rows]


def due_buckets(conn: psycopg.Connection) -> dict[int, tuple[int, float]]:
    """Buckets with due repos: {bucket: (how many, latest change as a unix time)}. The pair changes
    whenever the bucket's due set does, so it can key a run request."""
    rows = conn.execute(
        f"""SELECT bucket, count(*), extract(epoch FROM max(updated_at))::float8 FROM repos
            WHERE {_DUE} AND {FREE} GROUP BY bucket ORDER BY bucket""",
        {"due_before": None},
    ).fetchall()
    return {bucket: (count, latest) for bucket, count, latest in rows}


def next_retry_at(attempts: int) -> datetime:
    return RETRY.retry_at(attempts)


def error_text(text: str) -> str:
    """An error as `last_error` holds it: at most 2,000 characters, and nothing PostgreSQL's text refuses
    (U+0000, a lone surrogate: see `storable`), as an error may quote what a host sent."""
    return storable(text[:2000])


# The finish_* writes end the repo's lease; call them inside the run's `Lease.holding(conn, did)`.
_END_LEASE = "claim_token = NULL, lease_expires_at = NULL, claimed_at = NULL, updated_at = now()"


def finish_synced(cur: psycopg.Cursor, did: str, pds: str, *, head: str, rev: str | None, records: int,
                  data_root: str, collections_filter: str, signal_missing: bool) -> None:
    """A full sync stored: its commit, the MST root the stream's next commit must follow (prevData), and
    the collection filter its records were kept under."""
    cur.execute(
        f"""UPDATE repos SET status = 'synced', pds = %s, head = %s, rev = %s, records_count = %s, data_cid = %s,
               collections_filter = %s, signal_missing = %s, attempts = 0, next_retry_at = NULL, last_error = NULL,
               synced_at = now(), fetched_at = now(), {_END_LEASE}
           WHERE did = %s""",
        (pds, head, rev, records, data_root, collections_filter, signal_missing, did),
    )


def finish_gone(cur: psycopg.Cursor, did: str, status: str, pds: str | None, reason: str) -> None:
    """Deactivated, taken down, suspended or deleted: nothing stays pending. Only a deleted repo loses
    its records (see `delete_records`); the others keep theirs until the account comes back."""
    assert status in GONE_STATUSES, status
    cur.execute(
        f"""UPDATE repos SET status = %s, pds = coalesce(%s, pds), attempts = 0, next_retry_at = NULL,
               last_error = %s, {_END_LEASE}
           WHERE did = %s""",
        (status, pds, error_text(reason), did),
    )


def finish_failed(cur: psycopg.Cursor, did: str, error: str, retry_at: datetime, count_attempt: bool) -> None:
    """Schedule a retry. A rate-limited repo retries when the host allows, without using an attempt."""
    cur.execute(
        f"""UPDATE repos SET status = 'error', attempts = attempts + %s, next_retry_at = %s,
               last_error = %s, {_END_LEASE}
           WHERE did = %s""",
        (1 if count_attempt else 0, retry_at, error_text(error), did),
    )


def request_sync(conn: psycopg.Connection, dids: Iterable[str], buckets: int) -> int:
    """Make these DIDs due now, known or not (an explicit resync). Returns how many were made due."""
    dids = list(dict.fromkeys(dids))
    enqueue(conn, dids, buckets)
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE repos SET status = 'pending', next_retry_at = NULL, updated_at = now() "
            "WHERE did = ANY(%s) AND status <> 'in_progress'",
            (dids,),
        )
        return cur.rowcount


# --- what the event stream (follow.py) changes in the ledger -------------------------------------------


@dataclass(frozen=True)
class RepoState:
    """What the stream needs of a repo's ledger row to tell whether a commit follows it."""

    status: str
    rev: str | None = None
    data: str | None = None  # the stored commit's MST root (data_cid)
    signal_missing: bool = False
    pds: str | None = None  # the host it was last fetched from


@dataclass(frozen=True)
class HeadAdvance:
    """A repo's new head after a batch of applied stream commits."""

    did: str
    head: str
    rev: str
    data: str
    record_change: int


def advance_heads(cur: psycopg.Cursor, heads: list[HeadAdvance]) -> None:
    """One statement for a batch's repos: head, rev, data root, and records_count moved by the change."""
    if heads:
        cur.execute(
            """UPDATE repos r SET head = h.head, rev = h.rev, data_cid = h.data,
                   records_count = r.records_count + h.change, synced_at = now(), updated_at = now()
               FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::int[]) AS h(did, head, rev, data, change)
               WHERE r.did = h.did""",
            ([h.did for h in heads], [h.head for h in heads], [h.rev for h in heads], [h.data for h in heads],
             [h.record_change for h in heads]),
        )


def known(conn: psycopg.Connection, dids: Iterable[str]) -> set[str]:
    """Which of these DIDs the ledger holds (no lock)."""
    rows = conn.execute("SELECT did FROM repos WHERE did = ANY(%s)", (list(dids),)).fetchall()
    return {did for (did,) in rows}


def lock_states(conn: psycopg.Connection, dids: list[str]) -> dict[str, RepoState]:
    """The states of these repos, locked for the transaction (in DID order: no deadlocks)."""
    rows = conn.execute(
        "SELECT did, status, rev, data_cid, signal_missing, pds FROM repos WHERE did = ANY(%s) ORDER BY did FOR UPDATE",
        (sorted(set(dids)),)).fetchall()
    return {did: RepoState(*state) for did, *state in rows}


def make_host_due(conn: psycopg.Connection, host: str, every_repo: bool = False,
                  fetched_before: datetime | None = None) -> int:
    """Events of this host's stream were missed (OutdatedCursor): every repo synced from it is due again,
    or, from a relay (`every_repo`: its stream carries every host's repos), every synced repo; only those
    fetched whole before `fetched_before` when given (a fetch since then holds what was missed)."""
    return conn.execute(
        "UPDATE repos SET status = 'pending', next_retry_at = NULL, updated_at = now() "
        "WHERE status = 'synced' AND (%s OR rtrim(pds, '/') = %s) "
        "AND (%s::timestamptz IS NULL OR fetched_at IS NULL OR fetched_at < %s)",
        (every_repo, host, fetched_before, fetched_before),
    ).rowcount
