"""The file pipeline's tables: range expansion, claims with heartbeats, per-file results, retries.

Claims are committed state (PROCESSING, a claim token, a heartbeat), not long transactions: the
claiming statement locks the row with FOR UPDATE SKIP LOCKED just long enough to flip it, so two
workers never take the same range and no worker waits behind another's claim.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import psycopg

Status = Literal["SUCCESS", "FAIL"]


@dataclass(frozen=True)
class Claim:
    range_id: int
    min_id: int
    max_id: int
    token: uuid.UUID
    attempts: int


@dataclass(frozen=True)
class SourceFile:
    file_id: int
    file_uri: str
    file_name: str
    create_date: datetime | None
    size: int | None = None             # as listed in source_files, when known
    sha256: str | None = None
    status: str | None = None           # migration_files status, None when never attempted
    copied_sha256: str | None = None    # sha256 of the copy recorded as SUCCESS
    retry_count: int = 0


@dataclass(frozen=True)
class FileResult:
    file_id: int
    old_uri: str
    file_name: str
    create_date: datetime | None
    status: Status
    new_uri: str | None = None
    size: int | None = None
    sha256: str | None = None
    s3_checksum: str | None = None
    s3_etag: str | None = None
    error: str | None = None
    uploaded: bool = False              # False: already in S3 (verified) or unchanged, nothing sent
    unchanged: bool = False             # already SUCCESS with this content: nothing to record either


class ClaimRefused(Exception):
    """The range cannot be claimed now; the message says why and what to do."""


# --- ranges ----------------------------------------------------------------------------------------

def expand_ranges(conn: psycopg.Connection, size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Add ranges of `size` ids up to the highest source file id, after the highest existing range
    (so a changed FILES_RANGE_SIZE never overlaps old ranges); reopen COMPLETE ranges that gained
    files since they completed. Returns (added, reopened)."""
    with conn.transaction():
        low, high = conn.execute("SELECT min(file_id), max(file_id) FROM source_files").fetchone()
        if high is None:
            return [], []
        (covered,) = conn.execute("SELECT max(max_id) FROM migration_ranges").fetchone()
        start = covered if covered is not None else low - low % size
        wanted = [(s, s + size) for s in range(start, high + 1, size)]
        added = conn.execute(
            "INSERT INTO migration_ranges (min_id, max_id) SELECT * FROM unnest(%s::bigint[], %s::bigint[]) "
            "ON CONFLICT (min_id, max_id) DO NOTHING RETURNING min_id, max_id",
            ([s for s, _ in wanted], [e for _, e in wanted]),
        ).fetchall()
        reopened = conn.execute(
            "UPDATE migration_ranges r SET status = 'PENDING', last_updated = now() "
            "WHERE status = 'COMPLETE' AND EXISTS (SELECT 1 FROM source_files s "
            "  WHERE s.file_id > coalesce(r.covered_through, r.min_id - 1) AND s.file_id < r.max_id) "
            "RETURNING min_id, max_id"
        ).fetchall()
    return sorted(added), sorted(reopened)


def all_ranges(conn: psycopg.Connection) -> list[tuple[int, int, str]]:
    return conn.execute("SELECT min_id, max_id, status FROM migration_ranges ORDER BY min_id").fetchall()


_CLAIM = (
    "UPDATE migration_ranges SET status = 'PROCESSING', claim_token = %(token)s, claimed_by = %(worker)s, "
    "heartbeat = now(), attempts = attempts + 1, last_updated = now() "
    "WHERE range_id = (SELECT range_id FROM migration_ranges WHERE {where} "
    "  ORDER BY min_id LIMIT 1 FOR UPDATE SKIP LOCKED) "
    "RETURNING range_id, min_id, max_id, attempts"
)


def _claim(conn: psycopg.Connection, where: str, params: dict) -> Claim | None:
    token = uuid.uuid4()
    row = conn.execute(_CLAIM.format(where=where), {**params, "token": token}).fetchone()
    conn.commit()
    return Claim(row[0], row[1], row[2], token, row[3]) if row else None


def claim_next(conn: psycopg.Connection, worker: str) -> Claim | None:
    """The lowest PENDING range no other worker holds, or None when none is left."""
    for _ in range(5):  # LIMIT 1 + SKIP LOCKED can come back empty when racing a committed claim
        claim = _claim(conn, "status = 'PENDING'", {"worker": worker})
        if claim or not conn.execute("SELECT 1 FROM migration_ranges WHERE status = 'PENDING' LIMIT 1").fetchone():
            return claim
    return None


def claim_range(conn: psycopg.Connection, worker: str, min_id: int, max_id: int, stale_minutes: float) -> Claim:
    """Claim one given range (a partition run): PENDING or COMPLETE (a re-run re-verifies and copies
    what changed), or PROCESSING with a stale heartbeat (its worker died). Else ClaimRefused."""
    claim = _claim(
        conn,
        "min_id = %(min)s AND max_id = %(max)s AND (status <> 'PROCESSING' "
        "  OR heartbeat < now() - make_interval(secs => %(stale)s))",
        {"worker": worker, "min": min_id, "max": max_id, "stale": stale_minutes * 60},
    )
    if claim:
        return claim
    # FOR SHARE waits out a claim being committed right now (SKIP LOCKED passed over its row), so
    # the refusal names the worker that took it.
    row = conn.execute(
        "SELECT status, claimed_by, heartbeat FROM migration_ranges WHERE min_id = %s AND max_id = %s FOR SHARE",
        (min_id, max_id),
    ).fetchone()
    conn.commit()
    if row is None:
        raise ClaimRefused(f"no migration range [{min_id}, {max_id}): materialize files/migration_ranges "
                           "(or run `migration-assets files migrate`) to create the ranges first")
    beat = f"{row[2]:%Y-%m-%d %H:%M:%S %Z}" if row[2] else "none yet"
    raise ClaimRefused(f"range [{min_id}, {max_id}) is {row[0]}, held by {row[1]} (heartbeat {beat}): "
                       "that worker is copying it; nothing to do here")


def heartbeat(conn: psycopg.Connection, claim: Claim) -> bool:
    """Renew the claim; False when it was lost (released as stale and maybe claimed by another)."""
    cur = conn.execute(
        "UPDATE migration_ranges SET heartbeat = now() WHERE range_id = %s AND claim_token = %s",
        (claim.range_id, claim.token),
    )
    conn.commit()
    return cur.rowcount == 1


def release(conn: psycopg.Connection, claim: Claim) -> bool:
    """Back to PENDING for the next run (window closed, run stopped); False if no longer ours."""
    cur = conn.execute(
        "UPDATE migration_ranges SET status = 'PENDING', claim_token = NULL, heartbeat = NULL, last_updated = now() "
        "WHERE range_id = %s AND claim_token = %s",
        (claim.range_id, claim.token),
    )
    conn.commit()
    return cur.rowcount == 1


def complete(conn: psycopg.Connection, claim: Claim, covered_through: int | None) -> bool:
    cur = conn.execute(
        "UPDATE migration_ranges SET status = 'COMPLETE', claim_token = NULL, heartbeat = NULL, "
        "covered_through = %s, last_updated = now() WHERE range_id = %s AND claim_token = %s",
        (covered_through, claim.range_id, claim.token),
    )
    conn.commit()
    return cur.rowcount == 1


def release_stale(conn: psycopg.Connection, stale_minutes: float) -> list[tuple[int, int]]:
    """PROCESSING ranges whose heartbeat is older than `stale_minutes` go back to PENDING. A live
    worker renews its heartbeat every FILES_HEARTBEAT_SECONDS, so it is never released."""
    rows = conn.execute(
        "UPDATE migration_ranges SET status = 'PENDING', claim_token = NULL, heartbeat = NULL, last_updated = now() "
        "WHERE status = 'PROCESSING' AND (heartbeat IS NULL OR heartbeat < now() - make_interval(secs => %s)) "
        "RETURNING min_id, max_id",
        (stale_minutes * 60,),
    ).fetchall()
    conn.commit()
    return sorted(rows)


def stale_processing(conn: psycopg.Connection, max_age_seconds: float) -> list[tuple[int, int, datetime | None]]:
    rows = conn.execute(
        "SELECT min_id, max_id, heartbeat FROM migration_ranges WHERE status = 'PROCESSING' "
        "AND (heartbeat IS NULL OR heartbeat < now() - make_interval(secs => %s)) ORDER BY min_id",
        (max_age_seconds,),
    ).fetchall()
    conn.commit()
    return rows


# --- files -----------------------------------------------------------------------------------------

def range_files(conn: psycopg.Connection, min_id: int, max_id: int) -> list[SourceFile]:
    rows = conn.execute(
        "SELECT s.file_id, s.file_uri, s.file_name, s.create_date, s.size, s.sha256, m.status, "
        "  CASE WHEN m.status = 'SUCCESS' THEN m.sha256 END, coalesce(m.retry_count, 0) "
        "FROM source_files s LEFT JOIN migration_files m USING (file_id) "
        "WHERE s.file_id >= %s AND s.file_id < %s ORDER BY s.file_id",
        (min_id, max_id),
    ).fetchall()
    conn.commit()
    return [SourceFile(*row) for row in rows]


_UPSERT = (
    "INSERT INTO migration_files (file_id, old_uri, new_uri, file_name, create_date, status, size, sha256, "
    "  s3_checksum, s3_etag, last_attempt_date, migration_date, error) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now(), CASE WHEN %s = 'SUCCESS' THEN now() END, %s) "
    "ON CONFLICT (file_id) DO UPDATE SET old_uri = EXCLUDED.old_uri, new_uri = EXCLUDED.new_uri, "
    "  file_name = EXCLUDED.file_name, create_date = EXCLUDED.create_date, status = EXCLUDED.status, "
    "  size = EXCLUDED.size, sha256 = EXCLUDED.sha256, s3_checksum = EXCLUDED.s3_checksum, s3_etag = EXCLUDED.s3_etag, "
    "  last_attempt_date = EXCLUDED.last_attempt_date, "
    "  migration_date = coalesce(EXCLUDED.migration_date, migration_files.migration_date), error = EXCLUDED.error"
)


def record_results(conn: psycopg.Connection, results: Sequence[FileResult], commit: bool = True) -> None:
    """Upsert each file's outcome (a re-run's outcome replaces the last one; retry_count is the retry
    job's to keep)."""
    results = [r for r in results if not r.unchanged]
    if not results:
        return
    with conn.cursor() as cur:
        cur.executemany(_UPSERT, [
            (r.file_id, r.old_uri, r.new_uri, r.file_name, r.create_date, r.status, r.size, r.sha256,
             r.s3_checksum, r.s3_etag, r.status, r.error)
            for r in results
        ])
    if commit:
        conn.commit()


def claim_retries(conn: psycopg.Connection, max_retries: int, batch: int) -> list[SourceFile]:
    """Inside the caller's open transaction: lock up to `batch` FAIL files with retries left (SKIP
    LOCKED: retry workers split the backlog) and mark them RETRYING. The caller writes each outcome
    in the same transaction, so a crash rolls them back to FAIL: no row is ever left RETRYING."""
    rows = conn.execute(
        "WITH picked AS (SELECT file_id FROM migration_files WHERE status = 'FAIL' AND retry_count < %s "
        "  ORDER BY file_id LIMIT %s FOR UPDATE SKIP LOCKED), "
        "marked AS (UPDATE migration_files m SET status = 'RETRYING', retry_count = retry_count + 1, "
        "  last_attempt_date = now() FROM picked WHERE m.file_id = picked.file_id RETURNING m.file_id, m.retry_count) "
        "SELECT s.file_id, s.file_uri, s.file_name, s.create_date, s.size, s.sha256, 'RETRYING', NULL, marked.retry_count "
        "FROM marked JOIN source_files s USING (file_id) ORDER BY s.file_id",
        (max_retries, batch),
    ).fetchall()
    return [SourceFile(*row) for row in rows]


def unclaim_retries(conn: psycopg.Connection, file_ids: Sequence[int]) -> None:
    """Files claimed for retry but not attempted (the window closed): FAIL again, the retry not spent."""
    conn.execute(
        "UPDATE migration_files SET status = 'FAIL', retry_count = retry_count - 1 "
        "WHERE file_id = ANY(%s) AND status = 'RETRYING'", (list(file_ids),),
    )


# --- what the checks read ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RangeCounts:
    source: int
    success: int
    failed_retrying: int     # FAIL with retries left: the retry schedule will try again
    failed_final: int        # FAIL with no retries left
    missing: int             # never attempted
    failure_samples: list[tuple[int, str]]


def range_counts(conn: psycopg.Connection, min_id: int, max_id: int, max_retries: int) -> RangeCounts:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE m.status = 'SUCCESS'), "
        "  count(*) FILTER (WHERE m.status IN ('FAIL', 'RETRYING') AND m.retry_count < %(r)s), "
        "  count(*) FILTER (WHERE m.status = 'FAIL' AND m.retry_count >= %(r)s), "
        "  count(*) FILTER (WHERE m.file_id IS NULL) "
        "FROM source_files s LEFT JOIN migration_files m USING (file_id) "
        "WHERE s.file_id >= %(lo)s AND s.file_id < %(hi)s",
        {"r": max_retries, "lo": min_id, "hi": max_id},
    ).fetchone()
    samples = conn.execute(
        "SELECT file_id, error FROM migration_files WHERE file_id >= %s AND file_id < %s AND status <> 'SUCCESS' "
        "ORDER BY file_id LIMIT 10", (min_id, max_id),
    ).fetchall()
    conn.commit()
    return RangeCounts(*row, failure_samples=samples)


@dataclass(frozen=True)
class CopiedFile:
    file_id: int
    new_uri: str
    size: int
    sha256: str
    s3_checksum: str | None
    s3_etag: str | None


def copied_files(conn: psycopg.Connection, min_id: int, max_id: int) -> list[CopiedFile]:
    rows = conn.execute(
        "SELECT file_id, new_uri, size, sha256, s3_checksum, s3_etag FROM migration_files "
        "WHERE file_id >= %s AND file_id < %s AND status = 'SUCCESS' ORDER BY file_id",
        (min_id, max_id),
    ).fetchall()
    conn.commit()
    return [CopiedFile(*row) for row in rows]
