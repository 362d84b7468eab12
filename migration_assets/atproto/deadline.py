"""Whole-request deadlines for httpx, enforced where bytes move: in the connection's socket reads and writes.

httpx's timeouts are per read. A host that drips one byte inside each timeout, or sends `103 Early Hints`
without end before its real answer, never trips them, and holds the thread for as long as it likes. A
check between body chunks (what the callers did before) misses the headers, and a chunk never comes
from a host that stalls inside one.

Here a `Deadline` is set for the calling thread (a context variable) around a request, and the network
backend every HTTP client of the project uses (`DeadlineBackend`) gives each socket operation at most
the time left: connect, TLS, headers, body, uploads alike. Past it, the operation raises httpcore's
ReadTimeout/WriteTimeout/ConnectTimeout, which httpx turns into its own, worded with what was cut and
which setting raises the limit. With no deadline set, nothing changes.

A deadline may also grow with the bytes moved (`min_bytes_per_second`): a big blob at a fair rate gets
the time it needs, a drip does not.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import httpcore


class Deadline:
    """`seconds` for one request from (re)start, plus 1/`min_bytes_per_second` seconds per byte moved, up
    to `max_bytes` of them: bytes on the wire are counted (headers, 1xx answers, chunk framing, gzip
    alike), so without the cap a host could buy time without end with bytes that are never data.
    `what` names the request and its setting in the error ("getRepo of did:plc:x (REPO_FETCH_TIMEOUT_SECONDS)")."""

    def __init__(self, seconds: float, what: str = "the request", min_bytes_per_second: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.seconds = seconds
        self.what = what
        self.per_byte = 1.0 / min_bytes_per_second if min_bytes_per_second else 0.0
        if self.per_byte and max_bytes is None:
            raise ValueError("a deadline that grows with the bytes moved needs max_bytes: the most it grows by")
        self.max_bytes = max_bytes or 0
        self.restart()

    def restart(self) -> None:
        """A new attempt: the full time again, no bytes counted yet."""
        self.ends = time.monotonic() + self.seconds
        self.moved = 0  # bytes read and written in this attempt

    def left(self, timeout: float | None, error: type[Exception]) -> float:
        """The timeout for the next socket operation: `timeout` (httpx's per-operation one) or the time
        left, whichever is less; `error` once nothing is left."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise error(self.describe())
        return left if timeout is None else min(timeout, left)

    @contextmanager
    def operation(self, timeout: float | None, error: type[Exception]) -> Iterator[float]:
        """One socket operation under `left(...)`: a timeout it meets because the deadline passed is
        worded as the deadline's, not as httpcore's bare "timed out"."""
        try:
            yield self.left(timeout, error)
        except error:
            if self.passed():
                raise error(self.describe()) from None
            raise

    def passed(self) -> bool:
        """True once the time is up: a timeout raised now was this deadline's, not a slow host's read."""
        return self.ends <= time.monotonic()

    def count(self, size: int) -> None:
        grows_by = max(0, min(size, self.max_bytes - self.moved))
        self.moved += size
        self.ends += grows_by * self.per_byte

    def describe(self) -> str:
        rate = f" (and 1 s per {1 / self.per_byte:,.0f} bytes moved, up to {self.max_bytes:,})" if self.per_byte else ""
        return f"{self.what} took longer than its deadline of {self.seconds:g} s{rate}"


_CURRENT: ContextVar[Deadline | None] = ContextVar("http_deadline", default=None)


@contextmanager
def within(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Every socket operation of this thread's HTTP requests inside the block keeps to `deadline`."""
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


def current() -> Deadline | None:
    return _CURRENT.get()


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads and writes keep to the deadline current when they happen (a kept-alive
    connection serves requests with different deadlines)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        deadline = _CURRENT.get()
        if deadline is None:
            return self._inner.read(max_bytes, timeout)
        with deadline.operation(timeout, httpcore.ReadTimeout) as left:
            data = self._inner.read(max_bytes, left)
        deadline.count(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        deadline = _CURRENT.get()
        if deadline is None:
            return self._inner.write(buffer, timeout)
        with deadline.operation(timeout, httpcore.WriteTimeout) as left:
            self._inner.write(buffer, left)
        deadline.count(len(buffer))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        deadline = _CURRENT.get()
        if deadline is None:
            return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, timeout))
        with deadline.operation(timeout, httpcore.ConnectTimeout) as left:
            return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of `host` (the system resolver), in its order, without duplicates."""
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    return list(dict.fromkeys(addresses))


def resolve_within(resolve: Resolver, host: str, port: int, seconds: float | None) -> list[str]:
    """`resolve(host, port)` given at most `seconds`: getaddrinfo has no timeout of its own, so a name
    server that never answers held the request past its deadline, for as long as the system resolver's
    retries took. A lookup that overruns ends in its own thread, its answer unused (such threads last
    as long as the system resolver waits: a few per stuck name and try). A failed lookup is a
    ConnectError, retried like any connect failure."""
    if _is_address(host):
        return [host]
    if seconds is None:
        return _resolved(resolve, host, port)
    answer: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def look_up() -> None:
        try:
            answer.put((True, _resolved(resolve, host, port)))
        except BaseException as exc:  # noqa: BLE001 - raised in the waiting thread
            answer.put((False, exc))

    try:
        threading.Thread(target=look_up, name=f"resolve {host}", daemon=True).start()
    except RuntimeError as exc:  # no thread to be had
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
    try:
        resolved, value = answer.get(timeout=seconds)
    except queue.Empty:
        raise httpcore.ConnectTimeout(f"resolving {host} took longer than {seconds:g} s") from None
    if resolved:
        return value
    raise value


def _resolved(resolve: Resolver, host: str, port: int) -> list[str]:
    try:
        return resolve(host, port)
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class DeadlineBackend(httpcore.SyncBackend):
    """httpcore's own sockets, each kept to the current Deadline: the name's lookup (through `resolve`),
    then the connect to each address it gave, in turn, then every read and write."""

    def __init__(self, resolve: Resolver | None = None) -> None:
        self.resolve = resolve or resolve_host

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        deadline = _CURRENT.get()
        with deadline.operation(timeout, httpcore.ConnectTimeout) if deadline else nullcontext(timeout) as seconds:
            addresses = self.allowed(host, port, resolve_within(self.resolve, host, port, seconds))
        error: Exception | None = None
        for address in addresses:
            try:
                return self._connect(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                if deadline is not None and deadline.passed():
                    raise
                error = exc  # the next address, as socket.create_connection would (an IPv6 route that drops)
        raise error or httpcore.ConnectError(f"cannot connect to {host}:{port}: no address")

    def allowed(self, host: str, port: int, addresses: list[str]) -> list[str]:
        """The addresses of `host` that may be connected to: all of them here."""
        return addresses

    def _connect(self, address: str, port: int, timeout: float | None, local_address: str | None,
                 socket_options: Iterable[Any] | None) -> httpcore.NetworkStream:
        deadline = _CURRENT.get()
        if deadline is None:
            return _DeadlineStream(super().connect_tcp(address, port, timeout, local_address, socket_options))
        with deadline.operation(timeout, httpcore.ConnectTimeout) as left:
            return _DeadlineStream(super().connect_tcp(address, port, left, local_address, socket_options))
