import os

import psycopg

from migration_assets.files import store
from migration_assets.files.seed import seed_files


def seed(conn: psycopg.Connection, root, n: int, sizes=(1024, 3000, 20_000)) -> list[int]:
    ids = seed_files(conn, root, n, sizes=sizes)
    store.expand_ranges(conn, int(os.environ.get("FILES_RANGE_SIZE", "100")))
    conn.commit()
    return ids


def statuses(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT file_id, status FROM migration_files"))


def assert_bytes_equal(conn, s3, bucket: str, root) -> int:
    """Every SUCCESS row's object equals its source file byte for byte; returns how many were compared."""
    rows = conn.execute("SELECT m.new_uri, s.file_uri FROM migration_files m JOIN source_files s USING (file_id) "
                        "WHERE m.status = 'SUCCESS'").fetchall()
    for new_uri, file_uri in rows:
        key = new_uri.removeprefix(f"s3://{bucket}/")
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == (root / file_uri).read_bytes(), new_uri
    return len(rows)


def expire_claim(conn: psycopg.Connection, min_id: int, max_id: int) -> None:
    """Age the claim on [min_id, max_id) far past any stale limit, as if its worker died long ago:
    the claim's staleness is set in SQL instead of sleeping past a limit."""
    conn.execute("UPDATE migration_ranges SET lease_expires_at = now() - interval '1 day' "
                 "WHERE min_id = %s AND max_id = %s",
                 (min_id, max_id))
    conn.commit()
