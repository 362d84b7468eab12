"""FILES_* settings: every bad value fails at load naming its variable; sizes stay in MB in the env."""

from datetime import time

import dagster as dg
import pytest

from migration_assets.core.settings import SettingsError
from migration_assets.files.resources import FilesResource
from migration_assets.files.settings import MIB, FilesSettings
from migration_assets.files.mover import MAX_PARTS, part_size_for


@pytest.mark.parametrize("variable, value, accepts", [
    ("FILES_RUN_WINDOW_ENABLED", "ture", "must be one of true, false, 1, 0, yes, no"),
    ("FILES_RUN_WINDOW_WEEKENDS", "sometimes", "must be one of true, false, 1, 0, yes, no"),
    ("FILES_CONCURRENCY", "eight", "valid integer"),
    ("FILES_CONCURRENCY", "65", "less than or equal to 64"),
    ("FILES_RANGE_SIZE", "0", "greater than 0"),
    ("FILES_MULTIPART_THRESHOLD_MB", "lots", "valid number"),
    ("FILES_PART_SIZE_MB", "4", "greater than or equal to 5"),
    ("FILES_RUN_WINDOW_START", "25:00", "must be HH:MM"),
    ("FILES_RUN_WINDOW_END", "6am", "must be HH:MM"),
    ("FILES_RUN_WINDOW_TZ", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("FILES_CHECK_MODE", "guess", "'list' or 'head'"),
])
def test_a_bad_value_fails_naming_its_variable(monkeypatch, variable, value, accepts):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        FilesSettings.from_env()
    message = str(raised.value)
    assert f"{variable} (got {value!r})" in message and accepts in message, message


def test_values_are_read_with_their_units(monkeypatch, tmp_path):
    monkeypatch.setenv("FILES_SOURCE_ROOT", str(tmp_path / "a" / ".." / "src"))
    monkeypatch.setenv("FILES_S3_BUCKET", "archive-bucket")
    monkeypatch.setenv("FILES_S3_PREFIX", "/old/")
    monkeypatch.setenv("FILES_MULTIPART_THRESHOLD_MB", "64")
    monkeypatch.setenv("FILES_PART_SIZE_MB", "5.5")
    monkeypatch.setenv("FILES_RUN_WINDOW_ENABLED", "no")
    monkeypatch.setenv("FILES_RUN_WINDOW_START", "01:30")
    monkeypatch.setenv("FILES_CONCURRENCY", "")  # empty: the default

    settings = FilesSettings.from_env()

    assert settings.source_root == tmp_path / "src"
    assert (settings.bucket, settings.key_prefix, settings.concurrency) == ("archive-bucket", "old/", 8)
    assert settings.multipart_threshold == 64 * MIB and settings.part_size == int(5.5 * MIB)
    assert not settings.window.enabled and settings.window.start == time(1, 30) and settings.window.end == time(6, 0)


def test_the_resource_overrides_the_environment_and_is_validated_alike(monkeypatch):
    monkeypatch.setenv("FILES_RUN_WINDOW_START", "22:00")
    monkeypatch.setenv("FILES_CONCURRENCY", "3")

    settings = FilesResource(run_window_start="02:15", bucket="other").settings()

    assert settings.window.start == time(2, 15) and settings.bucket == "other" and settings.concurrency == 3
    with pytest.raises(SettingsError, match="FILES_RUN_WINDOW_END.*must be HH:MM"):
        FilesResource(run_window_end="noon").settings()


def test_the_resource_shows_the_values_in_force_and_a_run_may_set_only_some(monkeypatch):
    monkeypatch.setenv("FILES_S3_BUCKET", "archive-bucket")
    monkeypatch.setenv("FILES_RUN_WINDOW_START", "21:30")
    used = []

    @dg.asset
    def probe(files: FilesResource) -> None:
        used.append(files.settings())

    job = dg.Definitions(assets=[probe], resources={"files": FilesResource()}).resolve_implicit_global_asset_job_def()
    resources = job.run_config_schema.config_type.fields["resources"].config_type
    shown = resources.fields["files"].config_type.fields["config"].default_value  # what the launchpad offers
    assert (shown["bucket"], shown["run_window_start"], shown["concurrency"]) == ("archive-bucket", "21:30", 8)

    # As from the launchpad: only the window is set; Dagster's config validation accepts it.
    window = {"run_window_start": "01:00", "run_window_weekends": False}
    assert job.execute_in_process(run_config={"resources": {"files": {"config": window}}}).success
    [settings] = used
    assert settings.window.start == time(1, 0) and not settings.window.weekends
    assert settings.bucket == "archive-bucket" and settings.window.end == time(6, 0)


def test_a_file_too_big_for_10000_parts_of_the_set_size_gets_bigger_parts():
    """S3 takes at most 10,000 parts: at 8 MiB a 100 GiB file sent ~78 GiB per try, then was refused."""
    assert part_size_for(100 * MIB, 8 * MIB) == 8 * MIB
    assert part_size_for(10_000 * 8 * MIB, 8 * MIB) == 8 * MIB
    size = 100 * 1024 * MIB
    part = part_size_for(size, 8 * MIB)
    assert part > 8 * MIB and -(-size // part) <= MAX_PARTS and -(-size // (part - 1)) > MAX_PARTS
