"""The Dagster shell on the real instance: materialize, checks, window refusal, schedule and sensor."""

from datetime import datetime

import pytest
from zoneinfo import ZoneInfo

import dagster as dg

from migration_assets.core.resources import PostgresResource
from migration_assets.files import assets
from migration_assets.files.cli import failure_text
from migration_assets.files.definitions import defs as files_defs
from migration_assets.files.resources import FilesResource, FilesS3Resource
from migration_assets.files.schedules import files_pending_ranges, files_retries
from migration_assets.files.worker import retry_failed
from tests.files.conftest import make_job
from tests.files.helpers import assert_bytes_equal, seed

NY = ZoneInfo("America/New_York")


def resources() -> dict:
    return {"postgres": PostgresResource(), "files_s3": FilesS3Resource(), "files": FilesResource()}


def test_materialize_ranges_then_a_partition_with_its_checks(files_env, target, s3, bucket, source_root, instance):
    seed(target, source_root, 130)
    ranges = dg.materialize([assets.migration_ranges], instance=instance, resources=resources())
    assert ranges.success
    assert {"000000000000-000000000100", "000000000100-000000000200"} <= set(instance.get_dynamic_partitions("files_ranges"))

    result = dg.materialize([assets.copied_files], partition_key="000000000100-000000000200",
                            instance=instance, resources=resources())

    assert result.success
    meta = result.asset_materializations_for_node("files__copied_files")[0].metadata
    assert meta["files_copied"].value == 31 and meta["bytes_copied"].value > 0
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"files_copied": True, "s3_checksums": True, "live_claims": True}
    assert assert_bytes_equal(target, s3, bucket, source_root) == 31  # ids 100-130


@pytest.mark.parametrize("mode", ["list", "head"])
def test_checksum_check_fails_when_an_object_no_longer_matches(mode, files_env, target, target_url, s3, bucket, source_root, instance,
                                                              monkeypatch):
    monkeypatch.setenv("FILES_CHECK_MODE", mode)
    seed(target, source_root, 5)
    dg.materialize([assets.migration_ranges], instance=instance, resources=resources())
    key = "000000000000-000000000100"
    assert dg.materialize([assets.copied_files], partition_key=key, instance=instance, resources=resources()).success
    uri, size = target.execute("SELECT new_uri, size FROM migration_files ORDER BY file_id LIMIT 1").fetchone()
    s3.put_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"), Body=b"t" * size)  # same size
    target.execute("UPDATE source_files SET sha256 = NULL")  # so the re-run reads the disk

    rerun = dg.materialize([assets.copied_files], partition_key=key, instance=instance, resources=resources(),
                           raise_on_error=False)

    assert not rerun.success  # a blocking ERROR check fails the run
    failed = [e for e in rerun.get_asset_check_evaluations() if not e.passed]
    assert [e.check_name for e in failed] == ["s3_checksums"]
    expected = f"{uri}: ETag" if mode == "list" else f"{uri}: sha256 metadata None"
    assert expected in failed[0].description and "marked FAIL: the retry schedule copies them again" in failed[0].description

    # As the check says: the file is FAIL now, and the retry copies it again (before, it stayed SUCCESS, and
    # re-runs skipped it: the object stayed wrong).
    assert target.execute("SELECT status FROM migration_files WHERE new_uri = %s", (uri,)).fetchone()[0] == "FAIL"
    assert retry_failed(make_job(files_env, target_url)).copied == 1
    checked = dg.materialize([assets.copied_files], partition_key=key, instance=instance, resources=resources())
    assert checked.success and all(e.passed for e in checked.get_asset_check_evaluations())
    assert assert_bytes_equal(target, s3, bucket, source_root) == 5


def test_a_run_outside_the_window_copies_nothing_and_says_when_it_opens(files_env, target, source_root, instance, monkeypatch):
    monkeypatch.setenv("FILES_RUN_WINDOW_ENABLED", "true")
    monkeypatch.setenv("FILES_RUN_WINDOW_START", "03:00")
    monkeypatch.setenv("FILES_RUN_WINDOW_END", "03:00")  # never open
    monkeypatch.setenv("FILES_RUN_WINDOW_WEEKENDS", "false")
    seed(target, source_root, 5)
    dg.materialize([assets.migration_ranges], instance=instance, resources=resources())

    result = dg.materialize([assets.copied_files], partition_key="000000000000-000000000100",
                            instance=instance, resources=resources(), raise_on_error=False)

    assert not result.success
    text = failure_text(result)
    assert "Nothing copied: outside the run window" in text and "it never opens" in text
    assert target.execute("SELECT status, attempts FROM migration_ranges WHERE min_id = 0").fetchone() == ("PENDING", 0)


def test_retry_schedule_runs_only_inside_the_window(files_env, monkeypatch, instance):
    monkeypatch.setenv("FILES_RUN_WINDOW_ENABLED", "true")
    def evaluate(moment):
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=moment, resources=resources())
        return files_retries(context)
    assert isinstance(evaluate(datetime(2026, 11, 24, 12, tzinfo=NY)), dg.SkipReason)
    assert isinstance(evaluate(datetime(2026, 11, 24, 23, tzinfo=NY)), dg.RunRequest)


def test_sensor_requests_pending_ranges_once_per_claim_and_backs_off_when_idle(files_env, target, source_root, instance):
    seed(target, source_root, 250)
    context = dg.build_sensor_context(instance=instance, resources=resources(), cursor=None)
    result = files_pending_ranges(context)
    keys = [r.partition_key for r in result.run_requests]
    assert keys == ["000000000000-000000000100", "000000000100-000000000200", "000000000200-000000000300"]
    assert len({r.run_key for r in result.run_requests}) == 3

    target.execute("UPDATE migration_ranges SET status = 'COMPLETE'")
    idle = dg.build_sensor_context(instance=instance, resources=resources(), cursor=None)
    assert "no PENDING ranges; polling again in 30 s" in files_pending_ranges(idle).skip_message
    again = dg.build_sensor_context(instance=instance, resources=resources(), cursor=idle.cursor)
    assert "idle backoff" in files_pending_ranges(again).skip_message


def test_definitions_load_with_their_resources():
    defs = dg.Definitions.merge(files_defs, dg.Definitions(resources=resources()))
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} == {
        "files/migration_ranges", "files/copied_files", "files/file_retries"}
