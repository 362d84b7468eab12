"""FILES_BANDWIDTH: rclone's --bwlimit timetable, and the token bucket every upload thread and process
of a worker shares. Time is a fake clock everywhere but in the one real upload, which asserts on
bytes and on the limiter having waited, never on elapsed time."""

import base64
import hashlib
import multiprocessing
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import EnvSettings, SettingsError
from migration_assets.files.bandwidth import (
    Bandwidth, BandwidthError, SharedLimiter, ThrottledReader, parse_bandwidth, parse_timetable, shared_limiter, throttled,
)

KIB, MIB = 1 << 10, 1 << 20
MONDAY = datetime(2026, 12, 7, tzinfo=timezone.utc)  # a Monday, 00:00 UTC
DAILY = "08:00,512k 12:00,10M 13:00,512k 18:00,30M 23:00,off"  # rclone's documented example


def at(day: int, hh: int, mm: int = 0, zone=timezone.utc) -> datetime:
    """Monday + `day` days, at hh:mm in `zone`."""
    return datetime.combine((MONDAY + timedelta(days=day)).date(), datetime.min.time().replace(hour=hh, minute=mm), zone)


# --- the timetable ----------------------------------------------------------------------------------

def test_single_values_as_rclone_reads_them():
    cases = {"10M": 10 * MIB, "512k": 512 * KIB, "512": 512 * KIB, "100B": 100, "1G": 1 << 30,
             "0.625M": int(0.625 * MIB), "10M:100k": 10 * MIB, "10M:off": 10 * MIB, "1Mi": MIB, "2MiB": 2 * MIB}
    for text, rate in cases.items():
        table = parse_timetable(text)
        assert [table.limit_at(at(day, 12)) for day in range(7)] == [rate] * 7, text
    for unlimited in ("off", "OFF", "0", "off:10M"):
        assert parse_timetable(unlimited).limit_at(at(2, 3)) is None, unlimited
        assert parse_timetable(unlimited).unlimited


def test_rclone_daily_timetable():
    table = parse_timetable(DAILY)
    expected = {(7, 59): None, (8, 0): 512 * KIB, (11, 59): 512 * KIB, (12, 0): 10 * MIB, (13, 0): 512 * KIB,
                (17, 59): 512 * KIB, (18, 0): 30 * MIB, (22, 59): 30 * MIB, (23, 0): None, (0, 0): None}
    for day in range(7):
        for (hh, mm), rate in expected.items():
            assert table.limit_at(at(day, hh, mm)) == rate, (day, hh, mm)


def test_rclone_weekday_timetable_wraps_around_the_week():
    table = parse_timetable("Mon-00:00,512 Fri-23:59,10M Sat-10:00,1M Sun-20:00,off")
    assert table.limit_at(at(0, 0)) == 512 * KIB          # Monday
    assert table.limit_at(at(4, 23, 58)) == 512 * KIB     # Friday just before 23:59
    assert table.limit_at(at(4, 23, 59)) == 10 * MIB
    assert table.limit_at(at(5, 9, 59)) == 10 * MIB       # Saturday morning
    assert table.limit_at(at(5, 10)) == MIB
    assert table.limit_at(at(6, 19, 59)) == MIB           # Sunday before 20:00: still Saturday's
    assert table.limit_at(at(6, 20)) is None              # "From 20:00 on Sunday it will be unlimited"
    # no entry before Monday 00:30 in this one: the week's last (Sunday 20:00, off) wraps around
    late = parse_timetable("Mon-01:00,1M Sun-20:00,off;Wednesday-09:00,2M")  # ';' separates too (rclone >= 1.68)
    assert late.limit_at(at(0, 0, 30)) is None
    assert late.limit_at(at(0, 1)) == MIB
    assert late.limit_at(at(2, 9)) == 2 * MIB


def test_entries_without_a_weekday_apply_every_day_and_later_entries_win():
    table = parse_timetable("Mon-00:00,512 12:00,1M Sun-20:00,off")
    for day in range(7):
        assert table.limit_at(at(day, 12, 30)) == MIB
    assert table.limit_at(at(0, 11)) == 512 * KIB
    assert table.limit_at(at(3, 11)) == MIB              # Wednesday morning: Tuesday's 12:00 still holds
    assert parse_timetable("10:00,1M 10:00,2M").limit_at(at(1, 10)) == 2 * MIB


def test_limit_read_in_the_given_zone():
    table = parse_timetable("08:00,1M 18:00,off")
    new_york = ZoneInfo("America/New_York")
    assert table.limit_at(at(1, 13), new_york) == MIB    # 13:00 UTC is 08:00 in New York (December)
    assert table.limit_at(at(1, 12, 59), new_york) is None
    assert table.limit_at(at(1, 8, 30, new_york)) == MIB  # without a zone: the datetime's own wall clock


@pytest.mark.parametrize("value", [
    "", "  ", "bad", "bad,bad", "bad bad", "1000X", "-1M", "2401,666", "24:00,1M", "10:60,1M", "8:00,1M",
    "bad-10:20,666", "Mon-bad,666", "Mon-10:20,bad", "10M:bad", "08:00,1M,2M", "08:00 1M", "Mon-Tue-10:00,1M",
])
def test_malformed_values_name_the_variable(value):
    with pytest.raises(BandwidthError, match="FILES_BANDWIDTH") as raised:
        parse_timetable(value)
    assert "--bwlimit" in str(raised.value)


def test_settings_hook():
    assert parse_bandwidth(None) is None and parse_bandwidth("") is None
    table = parse_timetable(DAILY)
    assert parse_bandwidth(DAILY) == table and parse_bandwidth(table) is table
    with pytest.raises(ValueError, match="FILES_BANDWIDTH"):
        parse_bandwidth("fast")


class _Settings(EnvSettings):
    """The field as FilesSettings declares it."""

    model_config = SettingsConfigDict(env_prefix="FILES_", env_ignore_empty=True, extra="ignore")
    bandwidth: Bandwidth = Field(default=None, description="upload bandwidth timetable")


def test_the_settings_field(monkeypatch):
    monkeypatch.delenv("FILES_BANDWIDTH", raising=False)
    assert _Settings.load().bandwidth is None
    monkeypatch.setenv("FILES_BANDWIDTH", DAILY)
    assert _Settings.load().bandwidth == parse_timetable(DAILY)
    monkeypatch.setenv("FILES_BANDWIDTH", "Mon-25:00,1M")
    with pytest.raises(SettingsError, match="FILES_BANDWIDTH"):
        _Settings.load()


# --- the limiter, on a fake clock -------------------------------------------------------------------

class FakeTime:
    """Epoch seconds that move only when an uploader sleeps."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def granted_per_second(limiter: SharedLimiter, fake: FakeTime, chunk: int, until: datetime) -> Counter:
    """Acquire chunks back to back until `until`; bytes granted in each simulated second."""
    per_second: Counter = Counter()
    while fake.now < until.timestamp():
        limiter.acquire(chunk)
        per_second[int(fake.now)] += chunk
    return per_second


def test_bytes_per_simulated_second_follow_each_slot(tmp_path):
    chunk = 64 * KIB
    fake = FakeTime(at(0, 11, 59) - timedelta(seconds=0))
    limiter = SharedLimiter(parse_timetable(DAILY), timezone.utc, tmp_path / "bucket", fake.clock, fake.sleep)
    noon = at(0, 12).timestamp()
    per_second = granted_per_second(limiter, fake, chunk, at(0, 12, 1))
    before = [n for second, n in per_second.items() if noon - 58 <= second < noon - 1]
    after = [n for second, n in per_second.items() if noon + 2 <= second < noon + 58]
    assert len(before) == 57 and len(after) == 56
    # one chunk of slack: a grant that lands on a second's boundary counts in either second
    assert all(abs(n - 512 * KIB) <= chunk for n in before), before
    assert all(abs(n - 10 * MIB) <= chunk for n in after), after
    assert sum(before) == pytest.approx(57 * 512 * KIB, abs=chunk)
    assert limiter.waits > 0


def test_an_off_slot_never_waits_nor_touches_the_state(tmp_path):
    fake = FakeTime(at(2, 23, 30))
    limiter = SharedLimiter(parse_timetable(DAILY), timezone.utc, tmp_path / "bucket", fake.clock, fake.sleep)
    for _ in range(1000):
        limiter.acquire(8 * MIB)
    assert fake.sleeps == [] and limiter.waits == 0
    assert not (tmp_path / "bucket").exists()


def test_a_chunk_larger_than_the_bucket_passes_and_the_rate_holds(tmp_path):
    fake = FakeTime(at(1, 9))
    limiter = SharedLimiter(parse_timetable("100k"), timezone.utc, tmp_path / "bucket", fake.clock, fake.sleep)
    start = fake.now
    for _ in range(10):
        limiter.acquire(MIB)  # ten times the bucket
    # 10 MiB at 100 KiB/s: the last grant comes after 9 MiB were paid for (the first waits for a full bucket)
    assert fake.now - start == pytest.approx((9 * MIB + 100 * KIB) / (100 * KIB), rel=0.01)


def run_steps(take, steps: int, barrier, clock_step):
    """Each simulated second: every party takes what it can at a frozen clock, then the clock moves."""
    for _ in range(steps):
        barrier.wait()
        take()
        barrier.wait()
        clock_step()


def test_two_threads_share_one_bucket(tmp_path):
    rate, chunk, steps = 512 * KIB, KIB, 12
    fake = FakeTime(at(1, 9))
    limiter = SharedLimiter(parse_timetable("512k"), timezone.utc, tmp_path / "bucket", fake.clock, fake.sleep)
    granted = [Counter(), Counter()]
    step = [0]
    barrier = threading.Barrier(3)

    def worker(mine: Counter) -> None:
        def take():
            while limiter.try_acquire(chunk) == 0:
                mine[step[0]] += chunk
        run_steps(take, steps, barrier, lambda: None)

    threads = [threading.Thread(target=worker, args=(g,)) for g in granted]
    for thread in threads:
        thread.start()

    def advance():
        fake.now += 1.0
        step[0] += 1
    run_steps(lambda: None, steps, barrier, advance)
    for thread in threads:
        thread.join()
    totals = [granted[0][s] + granted[1][s] for s in range(steps)]
    assert totals == [0] + [rate] * (steps - 1)  # an empty bucket at first, then one second's worth


def _process_uploader(path, clock, barrier, steps: int, chunk: int, granted) -> None:
    """One worker process: its own limiter on the shared state file, the test's clock."""
    limiter = SharedLimiter(parse_timetable("512k"), timezone.utc, path, clock=lambda: clock.value)

    def take():
        step = int(clock.value - at(1, 9).timestamp())
        while limiter.try_acquire(chunk) == 0:
            with granted.get_lock():
                granted[step] += chunk
    run_steps(take, steps, barrier, lambda: None)


def test_two_processes_share_one_bucket(tmp_path):
    rate, chunk, steps = 512 * KIB, 128, 8
    context = multiprocessing.get_context("spawn")
    clock = context.Value("d", at(1, 9).timestamp())
    granted = context.Array("q", steps)
    barrier = context.Barrier(3)
    processes = [context.Process(target=_process_uploader, args=(tmp_path / "bucket", clock, barrier, steps, chunk, granted))
                 for _ in range(2)]
    for process in processes:
        process.start()

    def advance():
        clock.value += 1.0
    try:
        run_steps(lambda: None, steps, barrier, advance)
    finally:
        for process in processes:
            process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    # one bucket for both: not twice the rate
    assert list(granted) == [0] + [rate] * (steps - 1)


def test_one_limiter_per_path_in_a_process(tmp_path):
    table = parse_timetable(DAILY)
    first = shared_limiter(table, timezone.utc, tmp_path / "bucket")
    assert shared_limiter(table, timezone.utc, tmp_path / "bucket") is first
    assert shared_limiter(parse_timetable("off"), timezone.utc, tmp_path / "bucket") is None
    assert shared_limiter(None, timezone.utc, tmp_path / "bucket") is None


def test_throttled_bodies(tmp_path):
    fake = FakeTime(at(1, 9))
    limiter = SharedLimiter(parse_timetable("64k"), timezone.utc, tmp_path / "bucket", fake.clock, fake.sleep)
    data = b"x" * (256 * KIB)
    assert throttled(data, None) is data
    assert throttled(data, limiter) is data  # bytes: paid for up front
    assert fake.sleeps and fake.now - at(1, 9).timestamp() == pytest.approx(1.0)  # a full bucket, then the debt
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        body = throttled(handle, limiter)
        assert isinstance(body, ThrottledReader) and body.name == str(path)
        before = fake.now
        assert body.read() == data
    # the file waits out the bytes' debt (192 KiB) and a full bucket (64 KiB) at 64 KiB/s, then leaves its own
    assert fake.now - before == pytest.approx((192 + 64) / 64)


# --- one real upload, throttled ---------------------------------------------------------------------

class CountingReader:
    def __init__(self, handle) -> None:
        self.handle, self.bytes_read = handle, 0

    def read(self, amount=-1):
        data = self.handle.read(amount)
        self.bytes_read += len(data)
        return data

    def seek(self, offset, whence=0):
        return self.handle.seek(offset, whence)

    def tell(self):
        return self.handle.tell()


def test_a_real_upload_through_the_limiter(s3, bucket, tmp_path):
    """The pipeline's client reads the body through ThrottledReader: the limiter waits (its sleeps
    counted), the object holds exactly the file's bytes, and each byte was read and paid for once."""
    from dagster_aws.s3 import S3Resource  # imported here: the processes spawned above import this module

    from migration_assets.files.s3client import copy_client

    client = copy_client(S3Resource(max_attempts=1), 4)
    data = hashlib.sha256(b"seed").digest() * (160 * KIB // 32)  # 160 KiB
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    limiter = SharedLimiter(parse_timetable("128k"), timezone.utc, tmp_path / "bucket")
    taken = []
    acquire = limiter.acquire
    limiter.acquire = lambda n: (taken.append(n), acquire(n))[1]
    with open(path, "rb") as handle:
        counted = CountingReader(handle)
        client.put_object(Bucket=bucket, Key="throttled/big.bin", Body=ThrottledReader(counted, limiter),
                          ContentLength=len(data), ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())
    assert s3.get_object(Bucket=bucket, Key="throttled/big.bin")["Body"].read() == data
    assert limiter.waits > 0 and limiter.waited_seconds > 0
    assert sum(taken) == counted.bytes_read == len(data)
