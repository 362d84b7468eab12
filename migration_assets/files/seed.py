"""Demo data, as the seed's `seed_files(n)`: N real files on disk and their `source_files` rows."""

import hashlib
import os
import random
from pathlib import Path

import psycopg

from migration_assets.core.postgres import copy_rows


def seed_files(
    conn: psycopg.Connection, root: Path, n: int, sizes: tuple[int, ...] = (1024, 16 * 1024, 64 * 1024),
    record_checksums: bool = True, seed: int = 0,
) -> list[int]:
    """Write `n` files of the given sizes (cycled) under `root`/batch-*/ with random content and
    insert their rows (size and sha256 recorded unless told not to). Returns the new file ids."""
    rng = random.Random(seed)
    (first,) = conn.execute("SELECT coalesce(max(file_id), 0) + 1 FROM source_files").fetchone()
    rows = []
    for index in range(n):
        data = rng.randbytes(sizes[index % len(sizes)])
        uri = f"batch-{(first + index) // 1000:05d}/file-{first + index:09d}.bin"
        path = root / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest() if record_checksums else None
        rows.append((uri, os.path.basename(uri), len(data) if record_checksums else None, digest))
    with conn.transaction():
        with conn.cursor() as cur:
            copy_rows(cur, "source_files", ["file_uri", "file_name", "size", "sha256"], rows)
        ids = [row[0] for row in conn.execute(
            "SELECT file_id FROM source_files WHERE file_id >= %s ORDER BY file_id", (first,))]
    return ids
