"""What a failure report reads from migration_files (read only): the files of some ranges, or some
file ids, whose last outcome is not SUCCESS."""

from collections.abc import Sequence

import psycopg

from migration_assets.files.report import FailedFile

_SELECT = (
    "SELECT m.file_id, m.old_uri, m.status, coalesce(m.error, 'no reason recorded'), m.retry_count + 1, "
    "  m.retry_count < %(max_retries)s "
    "FROM migration_files m WHERE m.status <> 'SUCCESS' AND {where} ORDER BY m.file_id"
)


def _failed(conn: psycopg.Connection, where: str, params: dict) -> list[FailedFile]:
    rows = conn.execute(_SELECT.format(where=where), params).fetchall()
    conn.commit()
    return [FailedFile(*row) for row in rows]


def failed_in_ranges(conn: psycopg.Connection, ranges: Sequence[tuple[int, int]], max_retries: int) -> list[FailedFile]:
    """Files of the ranges [min_id, max_id) (a run's partitions) not SUCCESS, each once."""
    return _failed(conn, "EXISTS (SELECT 1 FROM unnest(%(lo)s::bigint[], %(hi)s::bigint[]) AS r(lo, hi) "
                         "WHERE m.file_id >= r.lo AND m.file_id < r.hi)",
                   {"lo": [lo for lo, _ in ranges], "hi": [hi for _, hi in ranges], "max_retries": max_retries})


def failed_among(conn: psycopg.Connection, file_ids: Sequence[int], max_retries: int) -> list[FailedFile]:
    """Of these files (a retry run's batch), those not SUCCESS."""
    return _failed(conn, "m.file_id = ANY(%(ids)s::bigint[])", {"ids": list(file_ids), "max_retries": max_retries})
