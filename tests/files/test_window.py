"""The run window with a fixed clock: open, closed, and closing in the middle of a range."""

from datetime import datetime, time
from zoneinfo import ZoneInfo

import pytest

from migration_assets.files import store
from migration_assets.files.settings import WindowSettings
from migration_assets.files.window import RunWindow
from migration_assets.files.worker import migrate_claimed_range
from tests.files.conftest import make_job
from tests.files.helpers import seed

NY = ZoneInfo("America/New_York")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=NY)  # 2026-11-23 is a Monday


@pytest.mark.parametrize("moment, is_open", [
    (at(24, 23), True), (at(25, 5, 59), True), (at(25, 6, 0), False), (at(24, 12), False),
    (at(24, 21, 59), False), (at(24, 22, 0), True), (at(28, 12), True), (at(29, 23), True), (at(30, 6, 0), False),
])
def test_default_window_is_nights_and_weekends_in_new_york(moment, is_open):
    assert RunWindow(WindowSettings()).is_open(moment) is is_open


def test_window_in_another_zone_disabled_and_next_opening():
    tokyo = RunWindow(WindowSettings(tz="Asia/Tokyo", weekends=False))
    assert not tokyo.is_open(datetime(2026, 11, 24, 12, tzinfo=ZoneInfo("Asia/Tokyo")))
    assert RunWindow(WindowSettings(enabled=False)).is_open(at(24, 12))
    assert RunWindow(WindowSettings()).next_open(at(24, 12)) == at(24, 22)
    assert RunWindow(WindowSettings(start=time(1, 0), end=time(2, 0))).next_open(at(27, 3)) == at(28, 0)  # Saturday


def test_bad_zone_names_the_variable(monkeypatch):
    from migration_assets.core.settings import SettingsError
    from migration_assets.files.settings import FilesSettings

    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        WindowSettings(tz="Mars/Olympus")
    monkeypatch.setenv("FILES_RUN_WINDOW_TZ", "Mars/Olympus")
    with pytest.raises(SettingsError, match="FILES_RUN_WINDOW_TZ .* unknown time zone 'Mars/Olympus'"):
        FilesSettings.from_env()


def test_window_closing_mid_range_stops_after_current_files_and_releases_the_range(files_env, target, target_url, source_root):
    seed(target, source_root, 60)
    ticks = iter(range(10_000))
    # The clock reads 05:59 for the first 20 looks, then 06:00: the window closes mid-range.
    window = RunWindow(WindowSettings(), clock=lambda: at(25, 5, 59) if next(ticks) < 20 else at(25, 6, 0))
    stop = lambda: None if window.is_open() else "the run window closed"  # noqa: E731
    job = make_job(files_env, target_url, window_stop=stop)
    with job.pool.connection() as conn:
        first_claim = store.claim_range(conn, "w", 0, 100, 60)

    progress = migrate_claimed_range(job, first_claim)

    assert progress.stopped == "the run window closed"
    assert 0 < progress.copied < 60 and progress.copied == len(target.execute("SELECT 1 FROM migration_files").fetchall())
    assert target.execute("SELECT status, claim_token FROM migration_ranges").fetchone() == ("PENDING", None)

    open_job = make_job(files_env, target_url)
    with open_job.pool.connection() as conn:
        resumed = migrate_claimed_range(open_job, store.claim_range(conn, "w", 0, 100, 60))
    assert resumed.stopped is None and resumed.copied == 60 - progress.copied
    assert target.execute("SELECT count(*) FROM migration_files WHERE status = 'SUCCESS'").fetchone()[0] == 60
