"""A per-host request budget shared by every process through PostgreSQL.

Each host has one row (`atproto_rate_limits`): a fixed window, the tokens granted in it, and a pause set
after a 429 or `RateLimit-Remaining: 0`. `acquire` takes tokens with one call of the SQL function
`atproto_rate_acquire` (one short transaction; the row lock lives for microseconds). Out of budget, it
sleeps exactly until the window resets or the pause ends, as the database computed: no polling loop.

Batching: a process reserves up to `batch` tokens per round trip and spends them locally. A token is only
spent in the window it was reserved in (leftovers are dropped when that window ends), so the global limit
is never exceeded; the cost is at most `batch - 1` unused tokens per process per window. The default batch
is limit/100 capped at 10 (1 for small limits): 3000/300 s -> 10, i.e. one round trip per 10 requests.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.settings import AtprotoSettings
from migration_assets.core.postgres import shared_pool

# A RateLimit-Reset below this is a delay in seconds (some servers follow the IETF draft), not a unix time.
_UNIX_TIME_FLOOR = 1_000_000_000


class LimiterWaitExceeded(AtprotoError):
    """The host has no budget until `retry_at` (unix time), later than the caller is willing to wait."""

    def __init__(self, host: str, retry_at: float) -> None:
        super().__init__(f"rate limit budget for {host} is exhausted until unix time {retry_at:.0f}")
        self.host = host
        self.retry_at = retry_at

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.host, self.retry_at))


# --- pauses asked for by a host's headers: untrusted, so always a finite time within max_pause_seconds ---


def bounded_wait(seconds: float, settings: AtprotoSettings) -> float:
    """A wait in [0, max_pause_seconds]; NaN (never a real wait) becomes the short default pause."""
    if math.isnan(seconds):
        return settings.default_pause_seconds
    return min(max(seconds, 0.0), settings.max_pause_seconds)


def _finite_non_negative(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def reset_time(value: str | None, now: float | None = None, settings: AtprotoSettings | None = None) -> float | None:
    """RateLimit-Reset as a unix time (a small number is a delay in seconds), at most max_pause_seconds
    ahead; a value that is not a finite non-negative number means the short default pause; None if absent."""
    if value is None:
        return None
    settings = settings or AtprotoSettings.load()
    now = time.time() if now is None else now
    number = _finite_non_negative(value)
    if number is None:
        return now + settings.default_pause_seconds
    wait = number if number < _UNIX_TIME_FLOOR else number - now
    return now + bounded_wait(wait, settings)


def retry_after_time(value: str | None, now: float, settings: AtprotoSettings) -> float | None:
    """Retry-After (seconds, or an HTTP date) as a unix time at most max_pause_seconds ahead; garbage
    means the short default pause; None if absent."""
    if value is None or not value.strip():
        return None
    seconds = _finite_non_negative(value)
    if seconds is None:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = settings.default_pause_seconds
    return now + bounded_wait(seconds, settings)


# The least a 429 pauses, whatever its headers say: a host answering 429 with `Retry-After: 0` (or a
# reset already past) would otherwise be asked again at once, without end.
MIN_429_PAUSE_SECONDS = 1.0


def pause_end(headers: Mapping[str, str], now: float, settings: AtprotoSettings) -> float:
    """When a 429 lifts: RateLimit-Reset, else Retry-After, else the short default pause; at least
    MIN_429_PAUSE_SECONDS ahead."""
    lowered = {key.lower(): value for key, value in headers.items()}
    for when in (reset_time(lowered.get("ratelimit-reset"), now, settings),
                 retry_after_time(lowered.get("retry-after"), now, settings)):
        if when is not None:
            return max(when, now + MIN_429_PAUSE_SECONDS)
    return now + settings.default_pause_seconds


@dataclass
class _Reservation:
    tokens: int
    expires: float  # time.monotonic() when the window the tokens came from ends
    window_start: float


class HostRateLimiter:
    """Requests per host and window, enforced across processes; see the module docstring."""

    def __init__(self, database_url: str, *, limit: int | None = None, window_seconds: float | None = None,
                 batch: int | None = None, settings: AtprotoSettings | None = None) -> None:
        self.settings = settings or AtprotoSettings.load()
        self.limit = int(limit if limit is not None else self.settings.rate_limit)
        self.window_seconds = float(window_seconds if window_seconds is not None else self.settings.rate_window_seconds)
        if self.limit < 1 or self.window_seconds <= 0:
            raise ValueError(f"rate limit must be >= 1 per positive window, got {self.limit}/{self.window_seconds}s")
        self.batch = max(1, batch if batch is not None else min(10, self.limit // 100))
        self._database_url = database_url
        self._local: dict[str, _Reservation] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the database URL may carry a password
        return f"HostRateLimiter(limit={self.limit}, window_seconds={self.window_seconds}, batch={self.batch})"

    def acquire(self, host: str, *, max_wait: float | None = None) -> float:
        """Block until `host` has budget and take one token; return the start (unix time, database clock)
        of the window it counts against. With `max_wait`, raise LimiterWaitExceeded instead of sleeping
        longer than that."""
        waited = 0.0
        while True:
            window_start = self._spend_local(host)
            if window_start is not None:
                return window_start
            wait = self._reserve(host)
            if wait <= 0:
                continue
            if max_wait is not None and waited + wait > max_wait:
                raise LimiterWaitExceeded(host, time.time() + wait)
            # A little jitter so the processes woken by the same reset don't all hit the row at once.
            pause = wait + random.uniform(0, 0.05)
            time.sleep(pause)
            waited += pause

    def observe(self, host: str, headers: Mapping[str, str]) -> None:
        """Honour the server's own accounting: `RateLimit-Remaining: 0` pauses the host until the reset."""
        lowered = {key.lower(): value for key, value in headers.items()}
        remaining = lowered.get("ratelimit-remaining")
        if remaining is None or remaining.strip() != "0":
            return
        reset = reset_time(lowered.get("ratelimit-reset"), settings=self.settings)
        if reset is not None:
            self.pause_until(host, reset)

    def pause_until(self, host: str, unix_time: float) -> None:
        """No grants for `host` before `unix_time` (every process), at most max_pause_seconds ahead; an
        earlier pause never shortens a later one, but a stored pause past the cap (an older version
        stored any value) is cut back to it."""
        now = time.time()
        until = now + bounded_wait(float(unix_time) - now, self.settings)
        with self._lock:
            self._local.pop(host, None)
        with shared_pool(self._database_url).connection() as conn:
            conn.execute(
                "INSERT INTO atproto_rate_limits (host, window_start, paused_until)"
                " VALUES (%(host)s, extract(epoch FROM clock_timestamp()), %(until)s)"
                " ON CONFLICT (host) DO UPDATE SET paused_until = GREATEST(EXCLUDED.paused_until,"
                "   LEAST(atproto_rate_limits.paused_until, extract(epoch FROM clock_timestamp()) + %(cap)s))",
                {"host": host, "until": until, "cap": self.settings.max_pause_seconds},
            )

    def paused_until(self, host: str) -> float:
        """The unix time before which `host` gets no grants (0 if never paused), read back within
        max_pause_seconds of now whatever is stored."""
        with shared_pool(self._database_url).connection() as conn:
            row = conn.execute("SELECT paused_until FROM atproto_rate_limits WHERE host = %s", (host,)).fetchone()
        if not row:
            return 0.0
        stored, now = float(row[0]), time.time()
        return stored if stored <= now else now + bounded_wait(stored - now, self.settings)  # NaN: bounded

    def _spend_local(self, host: str) -> float | None:
        with self._lock:
            reservation = self._local.get(host)
            if reservation is None:
                return None
            if reservation.tokens <= 0 or time.monotonic() >= reservation.expires:
                del self._local[host]  # leftovers of an ended window are not carried over
                return None
            reservation.tokens -= 1
            return reservation.window_start

    def _reserve(self, host: str) -> float:
        """Reserve up to `batch` tokens into the local pool; return seconds to wait if none were granted."""
        with shared_pool(self._database_url).connection() as conn:
            granted, wait, window_start, window_left = conn.execute(
                "SELECT * FROM atproto_rate_acquire(%s, %s, %s, %s)",
                (host, self.batch, self.limit, self.window_seconds),
            ).fetchone()
        if granted <= 0:  # the wait comes from a stored pause: bounded like a fresh one
            return max(bounded_wait(float(wait), self.settings), 0.001)
        with self._lock:
            self._local[host] = _Reservation(granted, time.monotonic() + float(window_left), float(window_start))
        return 0.0
