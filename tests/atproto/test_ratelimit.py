"""HostRateLimiter on the real PostgreSQL: a budget shared by processes, pauses from headers and 429s."""

import multiprocessing
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from migration_assets.atproto.ratelimit import HostRateLimiter, LimiterWaitExceeded, reset_time
from migration_assets.atproto.settings import AtprotoSettings
from tests.atproto.ratelimit_worker import take_tokens

HOST = "pds.example:443"


def db_now(url: str) -> float:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]


@pytest.mark.parametrize("batch", [1, 4])
def test_two_processes_never_exceed_the_shared_limit(target_url, target, batch):
    target.execute("CREATE TABLE grant_log (pid INT NOT NULL, window_start DOUBLE PRECISION NOT NULL)")
    limit, window, per_process = 20, 2.0, 25
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=take_tokens, args=(target_url, HOST, per_process, limit, window, batch))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    per_window = target.execute(
        "SELECT window_start, count(*), count(DISTINCT pid) FROM grant_log GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert sum(count for _, count, _ in per_window) == 2 * per_process
    assert all(count <= limit for _, count, _ in per_window), per_window
    assert len(per_window) >= 3  # 50 grants at 20 per window need at least three windows
    assert any(pids == 2 for _, _, pids in per_window)  # the processes really shared windows
    starts = [start for start, _, _ in per_window]
    assert all(b - a >= window for a, b in zip(starts, starts[1:]))  # windows never overlap


def test_exhausted_budget_waits_for_the_next_window(target_url):
    limiter = HostRateLimiter(target_url, limit=3, window_seconds=1.5)
    first = {limiter.acquire(HOST) for _ in range(3)}
    with pytest.raises(LimiterWaitExceeded) as raised:
        limiter.acquire(HOST, max_wait=0)
    (window_start,) = first
    assert raised.value.retry_at == pytest.approx(window_start + 1.5, abs=1.0)
    assert limiter.acquire(HOST) >= window_start + 1.5  # blocked until the next window, then granted


def test_hosts_have_separate_budgets(target_url):
    limiter = HostRateLimiter(target_url, limit=1, window_seconds=60)
    limiter.acquire("a.example:443")
    limiter.acquire("b.example:443", max_wait=0)
    with pytest.raises(LimiterWaitExceeded):
        limiter.acquire("a.example:443", max_wait=0)


def test_observe_remaining_zero_pauses_the_host_for_all_processes(target_url):
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    reset = db_now(target_url) + 1.5
    limiter.observe(HOST, {"RateLimit-Remaining": "5", "RateLimit-Reset": str(int(reset + 100))})
    assert limiter.paused_until(HOST) == 0
    limiter.observe(HOST, {"ratelimit-remaining": "0", "ratelimit-reset": str(reset)})
    other = HostRateLimiter(target_url, limit=100, window_seconds=60)  # as another process would see it
    with pytest.raises(LimiterWaitExceeded) as raised:
        other.acquire(HOST, max_wait=0)
    assert raised.value.retry_at == pytest.approx(reset, abs=1.0)
    other.acquire(HOST)
    assert db_now(target_url) >= reset  # granted only once the pause was over


def test_pause_until_is_honoured_and_never_shortened(target_url):
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60, batch=10)
    limiter.acquire(HOST)  # leaves 9 tokens reserved locally; a pause must drop them
    pause = db_now(target_url) + 1.0
    limiter.pause_until(HOST, pause)
    limiter.pause_until(HOST, pause - 30)
    assert limiter.paused_until(HOST) == pause
    with pytest.raises(LimiterWaitExceeded):
        limiter.acquire(HOST, max_wait=0)
    limiter.acquire(HOST)
    assert db_now(target_url) >= pause


def test_reset_header_forms():
    assert reset_time("1700000030", now=1700000000.0) == 1700000030
    assert reset_time("30", now=1000.0) == 1030.0  # a small value is a delay (IETF draft servers)
    assert reset_time(None) is None
    default, cap = AtprotoSettings().default_pause_seconds, AtprotoSettings().max_pause_seconds
    for unusable in ("soon", "inf", "nan", "-5", "-inf", ""):
        assert reset_time(unusable, now=1000.0) == 1000.0 + default, unusable
    assert reset_time("99999999999999", now=1700000000.0) == 1700000000.0 + cap


@pytest.mark.parametrize("reset", ["99999999999999999999", "1e300", "Infinity"])
def test_remaining_zero_with_an_absurd_reset_on_a_200_pauses_at_most_the_cap(target_url, reset):
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    limiter.observe(HOST, {"RateLimit-Remaining": "0", "RateLimit-Reset": reset})
    cap = AtprotoSettings().max_pause_seconds
    stored = psycopg.connect(target_url).execute(
        "SELECT paused_until FROM atproto_rate_limits WHERE host = %s", (HOST,)).fetchone()[0]
    assert 0 < stored - db_now(target_url) <= cap
    with pytest.raises(LimiterWaitExceeded) as raised:
        limiter.acquire(HOST, max_wait=0)
    assert datetime.fromtimestamp(raised.value.retry_at, timezone.utc) <= datetime.now(timezone.utc) + timedelta(
        seconds=cap + 5)


@pytest.mark.parametrize("stored", ["1e300", "Infinity", "NaN", "1000000000000"])
def test_an_absurd_pause_stored_by_an_older_version_is_read_back_bounded(target_url, target, stored):
    target.execute("INSERT INTO atproto_rate_limits (host, window_start, paused_until) VALUES (%s, 0, %s::float8)",
                   (HOST, stored))
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    cap = AtprotoSettings().max_pause_seconds
    latest = time.time() + cap + 5
    assert limiter.paused_until(HOST) <= latest
    with pytest.raises(LimiterWaitExceeded) as raised:
        limiter.acquire(HOST, max_wait=0)
    assert datetime.fromtimestamp(raised.value.retry_at, timezone.utc).timestamp() <= latest
    limiter.pause_until(HOST, time.time() + 5)  # a new pause also cuts the stored one back to the cap
    healed = target.execute("SELECT paused_until FROM atproto_rate_limits WHERE host = %s", (HOST,)).fetchone()[0]
    assert healed <= latest


def test_settings_from_environment(target_url, monkeypatch):
    monkeypatch.setenv("ATPROTO_RATE_LIMIT", "7")
    monkeypatch.setenv("ATPROTO_RATE_WINDOW_SECONDS", "30")
    limiter = HostRateLimiter(target_url)
    assert (limiter.limit, limiter.window_seconds, limiter.batch) == (7, 30.0, 1)
    assert "postgres" not in repr(limiter)
    monkeypatch.setenv("ATPROTO_RATE_LIMIT", "lots")
    with pytest.raises(ValueError, match="ATPROTO_RATE_LIMIT"):
        HostRateLimiter(target_url)
    monkeypatch.delenv("ATPROTO_RATE_LIMIT")
    monkeypatch.delenv("ATPROTO_RATE_WINDOW_SECONDS")
    default = HostRateLimiter(target_url)
    assert (default.limit, default.window_seconds, default.batch) == (3000, 300.0, 10)
