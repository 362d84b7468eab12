"""store.record_results: a batch's outcomes upserted in one statement, every column as given."""

from datetime import datetime, timezone

from migration_assets.files import store
from migration_assets.files.store import FileResult

HOSTILE = 'dir, with "quotes"/line\nbreak\r\n{braces}, NULL, \\back\\ "\u00e9\u6587".txt'
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def rows(conn):
    return conn.execute(
        "SELECT file_id, old_uri, new_uri, file_name, create_date, status, size, sha256, s3_checksum, s3_etag, error, "
        "retry_count, last_attempt_date IS NOT NULL, migration_date FROM migration_files ORDER BY file_id").fetchall()


def test_a_batch_is_recorded_column_for_column_and_re_recorded_over(target):
    for file_id in (1, 2, 3, 4):
        target.execute("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, 'u', 'n')", (file_id,))
    store.record_results(target, [
        FileResult(1, HOSTILE, "NULL", WHEN, "SUCCESS", "s3://b/" + HOSTILE, 8192, "a" * 64, "ck==", '"etag"', uploaded=True),
        FileResult(2, "two", "two", None, "FAIL", error="NULL"),
        FileResult(3, "three", "three", None, "SUCCESS", unchanged=True),  # nothing to record
        FileResult(4, "four", "four", None, "FAIL", error="first"),
        FileResult(4, "four", "four", None, "FAIL", error="second"),  # twice in a batch: the last outcome
    ])
    (one, two, four) = rows(target)
    assert one[:13] == (1, HOSTILE, "s3://b/" + HOSTILE, "NULL", WHEN, "SUCCESS", 8192, "a" * 64, "ck==", '"etag"',
                        None, 0, True)
    succeeded = one[13]
    assert succeeded is not None
    assert two[:13] == (2, "two", None, "two", None, "FAIL", None, None, None, None, "NULL", 0, True) and two[13] is None
    assert four[10] == "second"

    target.execute("UPDATE migration_files SET retry_count = 2")
    store.record_results(target, [FileResult(1, "again", "x", None, "FAIL", error="gone"),
                                  FileResult(2, "two", "two", None, "SUCCESS", "s3://b/two", 1, "b" * 64, "c", "e")])
    (one, two, _) = rows(target)
    # a later failure keeps the date of the copy that succeeded; retry_count is the retry job's
    assert one[1] == "again" and one[5] == "FAIL" and one[10] == "gone" and one[11] == 2 and one[13] == succeeded
    assert two[5] == "SUCCESS" and two[2] == "s3://b/two" and two[10] is None and two[13] is not None
    store.record_results(target, [])
    store.record_results(target, [FileResult(3, "three", "three", None, "SUCCESS", unchanged=True)])
    assert len(rows(target)) == 3


def test_an_outcome_of_a_file_deleted_from_source_files_meanwhile_is_left_out(target):
    """A source row deleted while its range was copied: before, its outcome broke the foreign key and the
    whole batch's outcomes were lost (the range failed). Now the others are recorded."""
    for file_id in (1, 2):
        target.execute("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, 'u', 'n')", (file_id,))
    store.record_results(target, [FileResult(1, "one", "one", None, "FAIL", error="x"),
                                  FileResult(9, "gone", "gone", None, "SUCCESS", "s3://b/gone", 1, "c" * 64, "c", "e"),
                                  FileResult(2, "two", "two", None, "SUCCESS", "s3://b/two", 1, "b" * 64, "c", "e")])
    assert [(row[0], row[5]) for row in rows(target)] == [(1, "FAIL"), (2, "SUCCESS")]
