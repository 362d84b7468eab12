"""Range expansion as set-based SQL on a real PostgreSQL: ranges only where source files are, so
sparse ids cost no empty ranges (bench/file_scale.py measures 1,000,000 rows); every file is
covered, late ones in a gap or below the first range too; older ranges are never overlapped."""

from migration_assets.files import store


def add_ids(conn, *ids: int) -> None:
    conn.cursor().executemany("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, %s, 'f')",
                              [(i, f"f-{i}") for i in ids])
    conn.commit()


def uncovered(conn) -> list[int]:
    return [row[0] for row in conn.execute(
        "SELECT file_id FROM source_files s WHERE NOT EXISTS (SELECT 1 FROM migration_ranges r "
        "WHERE s.file_id >= r.min_id AND s.file_id < r.max_id) ORDER BY file_id")]


def overlapping(conn) -> list[tuple]:
    return conn.execute(
        "SELECT a.min_id, a.max_id, b.min_id, b.max_id FROM migration_ranges a JOIN migration_ranges b "
        "ON a.range_id < b.range_id AND a.min_id < b.max_id AND b.min_id < a.max_id").fetchall()


def test_sparse_ids_get_ranges_only_where_files_are(target):
    add_ids(target, 1, 5, 1_000_003, 1_000_009, 1_000_010)

    added, _ = store.expand_ranges(target, 10)

    assert added == [(0, 10), (1_000_000, 1_000_010), (1_000_010, 1_000_020)]  # not 100,002 ranges
    assert store.expand_ranges(target, 10) == ([], [])


def test_late_files_in_a_gap_or_below_the_first_range_are_covered(target):
    add_ids(target, 500, 505, 2_000)
    store.expand_ranges(target, 100)
    assert [r[:2] for r in store.all_ranges(target)] == [(500, 600), (2_000, 2_100)]

    add_ids(target, 7, 1_234, 1_950, 2_150)
    added, _ = store.expand_ranges(target, 100)

    # buckets aligned on each gap's edge (500 below the first range, 600 after it, 2_100 above the last)
    assert added == [(0, 100), (1_200, 1_300), (1_900, 2_000), (2_100, 2_200)]
    assert uncovered(target) == [] and overlapping(target) == []


def test_a_changed_range_size_never_overlaps_older_ranges(target):
    add_ids(target, *range(1, 150))
    store.expand_ranges(target, 100)
    add_ids(target, 40_000, 40_001, *range(150, 260))

    added, _ = store.expand_ranges(target, 30)

    assert added[0] == (200, 230) and (39_980, 40_010) in added
    assert uncovered(target) == [] and overlapping(target) == []
