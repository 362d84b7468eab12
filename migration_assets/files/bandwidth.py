"""Upload bandwidth: FILES_BANDWIDTH as a timetable in rclone's `--bwlimit` syntax, and one token
bucket shared by every upload thread and process of a worker on this machine.

Syntax (rclone's; units are bytes per second, binary multiples):
- a single value for all times: `10M`; `off` or `0` is no limit;
- a timetable of `[WEEKDAY-]HH:MM,BANDWIDTH` entries separated by spaces or `;`, e.g.
  `"08:00,512k 12:00,10M 13:00,512k 18:00,30M 23:00,off"` or `"Mon-00:00,512 Sat-10:00,1M Sun-20:00,off"`:
  an entry without a weekday applies on every day; WEEKDAY is `Mon` or `Monday` (any case);
- BANDWIDTH is a number with an optional suffix B (bytes), K, M, G, T, P (KiB ... PiB; no suffix
  means KiB), e.g. `0.625M`, or `off`; an `UP:DOWN` pair (`10M:100k`) limits uploads by UP (this
  pipeline only uploads).
A moment takes the limit of the latest entry at or before it in the week (Monday to Sunday); before
the week's first entry, the week's last one still applies (it wraps around), which is what rclone's
docs describe ("from 20:00 on Sunday it will be unlimited", until Monday's entry). Times are read in the zone the caller
gives (the run window's, FILES_RUN_WINDOW_TZ).
"""

import fcntl
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

ENV = "FILES_BANDWIDTH"
MINUTES_PER_WEEK = 7 * 24 * 60
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
FULL_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?:(?P<unit>[kmgtp])(?:i|ib)?|(?P<bytes>b))?", re.IGNORECASE)
_CLOCK = re.compile(r"(\d\d):(\d\d)")


class BandwidthError(ValueError):
    """A FILES_BANDWIDTH value that cannot be parsed; the message names the variable and the syntax."""


def _error(value: str, problem: str) -> BandwidthError:
    return BandwidthError(
        f"{ENV}={value!r}: {problem}. Use rclone's --bwlimit syntax: a rate like 10M (bytes per second; "
        "suffix B, K, M, G, T, P; off for no limit) or a timetable like \"08:00,512k 18:00,off\" "
        "(entries [Mon-]HH:MM,RATE separated by spaces)")


def parse_rate(text: str, value: str) -> int | None:
    """Bytes per second of one BANDWIDTH (`10M`, `512`, `10M:100k`: the upload part); None for no
    limit (`off` or 0, as in rclone)."""
    upload, colon, download = text.partition(":")
    if colon:
        _single_rate(download, value)  # checked like rclone does, then unused: nothing is downloaded
    return _single_rate(upload, value)


def _single_rate(text: str, value: str) -> int | None:
    text = text.strip()
    if text.lower() == "off":
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise _error(value, f"{text!r} is not a rate")
    unit = "b" if match["bytes"] else (match["unit"] or "k").lower()
    return int(float(match["number"]) * UNITS[unit]) or None


@dataclass(frozen=True)
class Slot:
    minute_of_week: int  # Monday 00:00 is 0
    rate: int | None     # bytes per second; None: no limit


@dataclass(frozen=True)
class Timetable:
    slots: tuple[Slot, ...]  # sorted by minute_of_week; at least one

    def limit_at(self, at: datetime, zone: tzinfo | None = None) -> int | None:
        """Bytes per second allowed at `at` (read in `zone` when given, else at's own wall clock);
        None: no limit."""
        local = at.astimezone(zone) if zone is not None else at
        minute = local.weekday() * 24 * 60 + local.hour * 60 + local.minute
        current = self.slots[-1]  # before the week's first entry: the week's last one wraps around
        for slot in self.slots:
            if slot.minute_of_week > minute:
                break
            current = slot
        return current.rate

    @property
    def unlimited(self) -> bool:
        return all(slot.rate is None for slot in self.slots)


def _weekday(name: str, value: str) -> int:
    lowered = name.lower()
    for names in (WEEKDAYS, FULL_WEEKDAYS):
        if lowered in names:
            return names.index(lowered)
    raise _error(value, f"{name!r} is not a weekday (Mon ... Sun, or Monday ... Sunday)")


def _minute_of_day(clock: str, value: str) -> int:
    match = _CLOCK.fullmatch(clock)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise _error(value, f"{clock!r} is not a time HH:MM from 00:00 to 23:59")
    return int(match[1]) * 60 + int(match[2])


def _entry_slots(entry: str, value: str) -> list[Slot]:
    when, comma, rate_text = entry.partition(",")
    if not comma or "," in rate_text:
        raise _error(value, f"entry {entry!r} is not [WEEKDAY-]HH:MM,RATE")
    rate = parse_rate(rate_text, value)
    day, dash, clock = when.rpartition("-")
    minute = _minute_of_day(clock, value)
    days = [_weekday(day, value)] if dash else range(7)
    return [Slot(d * 24 * 60 + minute, rate) for d in days]


def parse_timetable(value: str) -> Timetable:
    """FILES_BANDWIDTH as a Timetable; BandwidthError naming FILES_BANDWIDTH when malformed."""
    text = value.strip()
    if not text:
        raise _error(value, "it is empty")
    if " " not in text and ";" not in text and "," not in text:  # one rate for all times
        return Timetable((Slot(0, parse_rate(text, value)),))
    by_minute: dict[int, Slot] = {}
    for entry in re.split(r"[ ;]+", text.strip(" ;")):
        for slot in _entry_slots(entry, value):
            by_minute[slot.minute_of_week] = slot  # the later entry for the same minute wins, as in rclone
    return Timetable(tuple(sorted(by_minute.values(), key=lambda s: s.minute_of_week)))


def parse_bandwidth(value: Any) -> Timetable | None:
    """Settings hook: unset/empty is None (no limit at any time), a Timetable stays as it is."""
    if value is None or isinstance(value, Timetable):
        return value
    return None if not str(value).strip() else parse_timetable(str(value))


def describe_rate(rate: int | None) -> str:
    """Bytes per second as an operator reads them: "512 KiB/s", "10 MiB/s", "no limit"."""
    if rate is None:
        return "no limit"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if rate >= size:
            return f"{rate / size:g} {unit}/s"
    return f"{rate} B/s"


# The settings field's type: `bandwidth: Bandwidth = Field(default=None, description=...)` in FilesSettings.
Bandwidth = Annotated[Timetable | None, NoDecode, BeforeValidator(parse_bandwidth)]


# --- the shared token bucket --------------------------------------------------------------------------

BURST_SECONDS = 1.0    # the bucket holds one second of the current rate
MAX_SLEEP = 1.0        # a waiting uploader looks again at least this often (the slot may have changed)
MIN_SLEEP = 0.001      # rounding can leave a wait too small to move an epoch clock: wait at least this
_STATE = struct.Struct("<dd")  # tokens (bytes, negative: debt), time of the last update (epoch seconds)


class SharedLimiter:
    """A token bucket for every upload of this machine's worker: its two numbers live in a 16-byte
    file (e.g. under MIGRATION_DATA_DIR), read and written under flock by each process and under a
    lock by each thread.

    Why a file with flock: every process of the worker (Dagster runs, the CLI) can open it by path
    without a coordinator, the lock dies with a process that crashes holding it (no stuck semaphore,
    nothing to clean up), and one acquire costs a few microseconds of syscalls (page cache, no fsync),
    against a database round trip per chunk. flock locks belong to an open file description, so the
    file is opened anew in each process (after a fork too) and threads are serialized by a lock.

    `acquire(n)` waits until n bytes may be sent at the rate in force; a chunk larger than the bucket
    is let through once the bucket is full and leaves a debt the next callers wait out, so the rate
    holds on average whatever the chunk size. `clock` (epoch seconds) and `sleep` are injectable."""

    def __init__(self, timetable: Timetable, zone: tzinfo | None, path: Path,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.timetable, self.zone, self.path = timetable, zone or timezone.utc, Path(path)
        self.clock, self.sleep = clock, sleep
        self.waits = 0            # sleeps this object made (the limiter engaged); approximate across threads
        self.waited_seconds = 0.0
        self._pid: int | None = None
        self._fd = -1
        self._lock = threading.Lock()
        self._opening = threading.Lock()

    def rate_at(self, epoch_seconds: float) -> int | None:
        """Bytes per second the timetable allows then; None: no limit."""
        return self.timetable.limit_at(datetime.fromtimestamp(epoch_seconds, timezone.utc), self.zone)

    def acquire(self, nbytes: int) -> None:
        while (wait := self.try_acquire(nbytes)) > 0:
            wait = min(max(wait, MIN_SLEEP), MAX_SLEEP)
            self.waits += 1
            self.waited_seconds += wait
            self.sleep(wait)

    def try_acquire(self, nbytes: int) -> float:
        """Take `nbytes` from the bucket: 0.0 when granted, else the seconds to wait before asking again."""
        now = self.clock()
        rate = self.rate_at(now)
        if rate is None or nbytes <= 0:
            return 0.0  # no limit in force: no lock, no file
        capacity = rate * BURST_SECONDS
        with self._locked_state() as state:
            tokens, stamp = state.read(now)
            tokens = min(capacity, tokens + max(0.0, now - stamp) * rate)
            if tokens >= min(nbytes, capacity):
                state.write(tokens - nbytes, now)
                return 0.0
            state.write(tokens, now)
            return (min(nbytes, capacity) - tokens) / rate

    def _locked_state(self) -> "_LockedState":
        if self._pid != os.getpid():  # first use in this process, or a forked child: own descriptor and lock
            with self._opening:
                if self._pid != os.getpid():
                    self._lock = threading.Lock()
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                    self._pid = os.getpid()
        return _LockedState(self._fd, self._lock)

    def close(self) -> None:
        if self._pid == os.getpid() and self._fd >= 0:
            os.close(self._fd)
        self._pid, self._fd = None, -1


class _LockedState:
    def __init__(self, fd: int, lock: threading.Lock) -> None:
        self._fd, self._lock = fd, lock

    def __enter__(self) -> "_LockedState":
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def read(self, now: float) -> tuple[float, float]:
        raw = os.pread(self._fd, _STATE.size, 0)
        return _STATE.unpack(raw) if len(raw) == _STATE.size else (0.0, now)  # new (or torn) file: empty bucket

    def write(self, tokens: float, stamp: float) -> None:
        os.pwrite(self._fd, _STATE.pack(tokens, stamp), 0)


_limiters: dict[Path, SharedLimiter] = {}
_limiters_lock = threading.Lock()


def shared_limiter(timetable: Timetable | None, zone: tzinfo | None, path: Path) -> SharedLimiter | None:
    """The process's one limiter for `path` (its threads share its lock); None when the timetable
    never limits (nothing to wrap). Pass data_dir() / "files-bandwidth.bucket" as `path`."""
    if timetable is None or timetable.unlimited:
        return None
    with _limiters_lock:
        limiter = _limiters.get(Path(path))
        if limiter is None or limiter.timetable != timetable or limiter.zone != (zone or timezone.utc):
            limiter = _limiters[Path(path)] = SharedLimiter(timetable, zone, Path(path))
        return limiter


def throttled(body: Any, limiter: SharedLimiter | None) -> Any:
    """A request body paid for at the limiter: bytes are paid for up front (boto3 sends them as they
    are), a file is wrapped in a ThrottledReader; unchanged without a limiter."""
    if limiter is None:
        return body
    if isinstance(body, (bytes, bytearray, memoryview)):
        limiter.acquire(len(body))
        return body
    return ThrottledReader(body, limiter)


class ThrottledReader:
    """A file-like body whose reads wait for the limiter. seek/tell pass through, so botocore can rewind
    it for a retry (the resent bytes count again). The pipeline's client (s3client.copy_client) does not
    hash the payload for the signature, so each byte is read, and paid for, once; a default client
    over plain http reads the body twice (once to sign it) and would get half the limit."""

    def __init__(self, fileobj: BinaryIO, limiter: SharedLimiter) -> None:
        self._fileobj, self._limiter = fileobj, limiter

    def read(self, amount: int | None = -1) -> bytes:
        chunk = self._fileobj.read(amount)
        self._limiter.acquire(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fileobj.seek(offset, whence)

    def tell(self) -> int:
        return self._fileobj.tell()

    @property
    def name(self) -> str:
        return getattr(self._fileobj, "name", repr(self._fileobj))

    # No fileno() and no attribute pass-through on purpose: an HTTP client that found a descriptor
    # could send the file without calling read(), past the limiter.
