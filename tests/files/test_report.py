"""The failure report: rows read from a real PostgreSQL, a CSV that gives back any file_uri, and the
upload to its key in a real (moto) S3 server."""

import csv
import io
from datetime import datetime, timezone

import dagster as dg
import pytest

from migration_assets.files import report, report_store

HOSTILE_URI = 'dir, with "quotes"/line\nbreak\r\nand, more "\u00e9\u6587".txt'
MAX_RETRIES = 3


def add_file(conn, file_id: int, uri: str, status: str | None, retry_count: int = 0, error: str | None = None) -> None:
    conn.execute("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, %s, %s)", (file_id, uri, uri[-20:]))
    if status:
        conn.execute("INSERT INTO migration_files (file_id, old_uri, status, retry_count, error) VALUES (%s, %s, %s, %s, %s)",
                     (file_id, uri, status, retry_count, error))


@pytest.fixture
def failures_db(target):
    """Range [100, 200): two failures (one out of retries), a success, one never attempted; a
    failure in [200, 300) and one in [300, 400)."""
    add_file(target, 100, "ok.txt", "SUCCESS")
    add_file(target, 101, HOSTILE_URI, "FAIL", 0, "source file missing: /src/x; restore it")
    add_file(target, 150, "tired.txt", "FAIL", MAX_RETRIES, 'S3 upload failed (BadDigest: "a, b")')
    add_file(target, 160, "never.txt", None)
    add_file(target, 250, "other.txt", "FAIL", 1, None)
    add_file(target, 350, "far.txt", "FAIL", 2, "reading far.txt failed")
    return target


def test_rows_of_a_runs_ranges(failures_db):
    failed = report_store.failed_in_ranges(failures_db, [(100, 200), (200, 300), (150, 260)], MAX_RETRIES)
    assert failed == [
        report.FailedFile(101, HOSTILE_URI, "FAIL", "source file missing: /src/x; restore it", 1, True),
        report.FailedFile(150, "tired.txt", "FAIL", 'S3 upload failed (BadDigest: "a, b")', MAX_RETRIES + 1, False),
        report.FailedFile(250, "other.txt", "FAIL", "no reason recorded", 2, True),
    ]  # each once though [150, 260) overlaps; SUCCESS, never attempted and [300, 400) left out
    assert report_store.failed_in_ranges(failures_db, [], MAX_RETRIES) == []
    assert [f.file_id for f in report_store.failed_among(failures_db, [100, 150, 350, 999], MAX_RETRIES)] == [150, 350]

    next_retry = datetime(2026, 12, 8, 3, 30, tzinfo=timezone.utc)
    rows = report.report_rows(failed, next_retry)
    assert [list(row) for row in rows] == [report.column_names()] * 3
    assert [(r["file_id"], r["attempts"], r["next_retry"]) for r in rows] == [
        (101, 1, "2026-12-08 03:30 UTC"), (150, 4, report.NO_RETRY_LEFT), (250, 2, "2026-12-08 03:30 UTC")]
    assert report.report_rows(failed[:1], None)[0]["next_retry"] == "not scheduled"


def test_rows_fit_a_dagster_table(failures_db):
    rows = report.report_rows(report_store.failed_in_ranges(failures_db, [(100, 400)], MAX_RETRIES), None)
    table = dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in rows[: report.TABLE_ROWS]],
        schema=dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in report.COLUMNS]),
    )
    assert [r.data["file_uri"] for r in table.records] == [HOSTILE_URI, "tired.txt", "other.txt", "far.txt"]


def test_csv_round_trip(failures_db):
    rows = report.report_rows(report_store.failed_in_ranges(failures_db, [(100, 400)], MAX_RETRIES), None)
    text = report.report_csv(rows)
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == report.column_names()
    assert parsed[1:] == [[str(row[name]) for name in report.column_names()] for row in rows]
    assert parsed[1][1] == HOSTILE_URI
    assert report.report_csv([]) == "file_id,file_uri,status,reason,attempts,next_retry\r\n"


@pytest.mark.parametrize("key_prefix, report_prefix, expected", [
    ("archive/", "_reports/", "archive/_reports/run-1.csv"),
    ("", "_reports/", "_reports/run-1.csv"),
    ("archive/", "/ops/reports", "archive/ops/reports/run-1.csv"),
    ("archive/", "", "archive/run-1.csv"),
])
def test_report_key(key_prefix, report_prefix, expected):
    assert report.report_key(key_prefix, report_prefix, "run-1") == expected


@pytest.mark.parametrize("run_id", ["", "..", "a/b"])
def test_report_key_refuses_a_run_id_that_is_a_path(run_id):
    with pytest.raises(ValueError, match="run id"):
        report.report_key("archive/", "_reports/", run_id)


def test_upload_lands_at_its_key(failures_db, s3, bucket):
    run_id = "6f1c2d3e-0000-4a4a-9b9b-123456789abc"
    text = report.report_csv(report.report_rows(report_store.failed_in_ranges(failures_db, [(100, 200)], MAX_RETRIES), None))
    key = report.report_key("archive/", report.DEFAULT_REPORT_PREFIX, run_id)
    assert report.upload_report(s3, bucket, key, text) == f"s3://{bucket}/archive/_reports/{run_id}.csv"
    stored = s3.get_object(Bucket=bucket, Key=f"archive/_reports/{run_id}.csv")
    assert stored["Body"].read().decode("utf-8") == text
    assert stored["ContentType"].startswith("text/csv")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [key]


def test_next_retry_tick_waits_for_the_window():
    night = lambda at: at.hour >= 22 or at.hour < 6  # noqa: E731 (UTC, for the test)
    assert report.next_retry_tick(datetime(2026, 12, 8, 23, 10, tzinfo=timezone.utc), night) == \
        datetime(2026, 12, 8, 23, 30, tzinfo=timezone.utc)
    assert report.next_retry_tick(datetime(2026, 12, 8, 23, 30, tzinfo=timezone.utc), night) == \
        datetime(2026, 12, 9, 0, 0, tzinfo=timezone.utc)  # strictly after
    assert report.next_retry_tick(datetime(2026, 12, 8, 9, 0, tzinfo=timezone.utc), night) == \
        datetime(2026, 12, 8, 22, 0, tzinfo=timezone.utc)
    assert report.next_retry_tick(datetime(2026, 12, 8, 9, 0, tzinfo=timezone.utc), lambda at: False) is None
