"""The failure report and the bandwidth limit as the assets use them: real PostgreSQL, a moto S3
server, the Dagster instance; the report's rows in the run's metadata and its CSV at its key, and a
run under a low FILES_BANDWIDTH that waited for the limiter (counted, not timed)."""

import argparse
import csv
import io

import dagster as dg
import pytest

from migration_assets.core.resources import PostgresResource
from migration_assets.files import assets
from migration_assets.files import cli as files_cli
from migration_assets.files.report import NO_RETRY_LEFT, column_names
from migration_assets.files.resources import FilesResource, FilesS3Resource
from tests.files.helpers import seed

RANGE = "000000000000-000000000100"


def resources() -> dict:
    return {"postgres": PostgresResource(), "files_s3": FilesS3Resource(), "files": FilesResource()}


def metadata(result: dg.ExecuteInProcessResult, node: str) -> dict:
    return result.asset_materializations_for_node(node)[0].metadata


def add_source(target, uri: str) -> int:
    file_id = target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, %s) RETURNING file_id",
                             (uri, uri.rsplit("/", 1)[-1])).fetchone()[0]
    target.commit()
    return file_id


def read_csv(s3, bucket: str, key: str) -> list[dict]:
    text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return list(csv.DictReader(io.StringIO(text, newline="")))


@pytest.fixture
def with_failures(files_env, target, source_root, tmp_path, instance) -> dict[int, str]:
    """Three good files and two that fail: one missing, one outside the root (ids 4 and 5)."""
    seed(target, source_root, 3)
    outside = tmp_path / "elsewhere, \"quoted\".txt"
    outside.write_bytes(b"not under the root")
    failing = {add_source(target, "gone/missing.txt"): "source file missing", add_source(target, str(outside)): "is not under the root"}
    dg.materialize([assets.migration_ranges], instance=instance, resources=resources())
    return failing


def test_failed_files_show_as_table_rows_and_go_to_a_csv_at_the_runs_key(with_failures, target, s3, bucket, instance):
    result = dg.materialize([assets.copied_files], partition_key=RANGE, instance=instance, resources=resources(),
                            raise_on_error=False)

    meta = metadata(result, "files__copied_files")
    table = meta["failure_report"].value
    assert [column.name for column in table.schema.columns] == column_names()
    rows = [record.data for record in table.records]
    assert [row["file_id"] for row in rows] == sorted(with_failures)
    for row in rows:
        assert with_failures[row["file_id"]] in row["reason"]
        assert (row["status"], row["attempts"]) == ("FAIL", 1) and row["next_retry"].endswith(" UTC")
    key = f"archive/_reports/{result.run_id}.csv"
    assert meta["failure_report_csv"].value == f"s3://{bucket}/{key}"
    written = read_csv(s3, bucket, key)
    assert [int(row["file_id"]) for row in written] == sorted(with_failures)
    assert [row["file_uri"] for row in written] == [row["file_uri"] for row in rows]  # any file_uri reads back


def test_a_retry_reports_its_batch_with_the_attempts_spent(with_failures, target, s3, bucket, instance, monkeypatch):
    monkeypatch.setenv("FILES_MAX_RETRIES", "1")
    monkeypatch.setenv("FILES_REPORT_PREFIX", "/reports/retries/")
    dg.materialize([assets.copied_files], partition_key=RANGE, instance=instance, resources=resources(),
                   raise_on_error=False)

    retry = dg.materialize([assets.file_retries], instance=instance, resources=resources(), raise_on_error=False)

    rows = [record.data for record in metadata(retry, "files__file_retries")["failure_report"].value.records]
    assert [(row["file_id"], row["attempts"], row["next_retry"]) for row in rows] == [
        (file_id, 2, NO_RETRY_LEFT) for file_id in sorted(with_failures)]
    key = f"archive/reports/retries/{retry.run_id}.csv"
    assert [int(row["file_id"]) for row in read_csv(s3, bucket, key)] == sorted(with_failures)


def test_a_run_without_failures_writes_no_report(files_env, target, s3, bucket, source_root, instance):
    seed(target, source_root, 3)
    dg.materialize([assets.migration_ranges], instance=instance, resources=resources())

    result = dg.materialize([assets.copied_files], partition_key=RANGE, instance=instance, resources=resources())

    meta = metadata(result, "files__copied_files")
    assert meta["failure_report"].value.records == [] and "failure_report_csv" not in meta
    assert s3.list_objects_v2(Bucket=bucket, Prefix="archive/_reports/")["KeyCount"] == 0


def test_files_migrate_prints_where_the_report_is(with_failures, dagster_home, s3, bucket, capsys):
    parser = argparse.ArgumentParser()
    files_cli.add_commands(parser.add_subparsers(dest="pipeline"))
    args = parser.parse_args(["files", "migrate"])

    assert args.handler(args) == 1
    out = capsys.readouterr().out
    uri = out.split("failure report: ")[1].split()[0]
    assert uri.startswith(f"s3://{bucket}/archive/_reports/") and uri.endswith(".csv")
    written = read_csv(s3, bucket, uri.removeprefix(f"s3://{bucket}/"))
    assert sorted(int(row["file_id"]) for row in written) == sorted(with_failures)


@pytest.mark.parametrize("limit, engaged", [("128k", True), (None, False)])
def test_a_low_bandwidth_makes_the_run_wait_for_the_limiter(limit, engaged, files_env, target, s3, bucket, source_root,
                                                           instance, monkeypatch, tmp_path):
    monkeypatch.setenv("MIGRATION_DATA_DIR", str(tmp_path / "data"))  # a bucket file of this test's own
    if limit:
        monkeypatch.setenv("FILES_BANDWIDTH", limit)
    seed(target, source_root, 4, sizes=(60_000,))  # 240 kB at 128 KiB/s, starting from an empty bucket
    dg.materialize([assets.migration_ranges], instance=instance, resources=resources())

    result = dg.materialize([assets.copied_files], partition_key=RANGE, instance=instance, resources=resources())

    meta = metadata(result, "files__copied_files")
    assert meta["files_copied"].value == 4
    if engaged:
        assert meta["bandwidth_limit"].value == "throttled to 128 KiB/s for the whole machine (FILES_BANDWIDTH)"
        assert meta["bandwidth_waits"].value > 0
        assert (tmp_path / "data" / assets.BANDWIDTH_BUCKET_FILE).stat().st_size == 16
    else:
        assert meta["bandwidth_limit"].value == "no limit (FILES_BANDWIDTH unset)"
        assert meta["bandwidth_waits"].value == 0
