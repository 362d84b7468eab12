"""Bounded concurrency for I/O-bound work: in input order (reads a consumer loads in order), or as done;
a budget of bytes that threads share out; slots shared by hosts, a share each."""

import multiprocessing
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


def ordered_map(
    fn: Callable[[In], Out], items: Iterable[In], concurrency: int, executor: Executor | None = None
) -> Iterator[Out]:
    """Like `map`, with up to 2 x `concurrency` calls in flight and results yielded in input order.

    Unlike `Executor.map`, items are submitted lazily, so memory stays bounded on long inputs and the
    consumer's work (loading what was read) overlaps the next reads. An error surfaces at its item.
    Runs in threads unless given an executor (e.g. a process pool, which the caller owns).
    """
    window = max(1, concurrency) * 2
    owned = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="read") if executor is None else None
    with owned or nullcontext(executor) as pool:
        pending: deque[Future[Out]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


NOT_YET = object()  # an item `completed_map`'s input gives while it has none until work in flight ends


def completed_map(fn: Callable[[In], Out], items: Iterable[In], concurrency: int) -> Iterator[Out]:
    """Like `ordered_map`, results yielded as they complete: one slow item (a repo a hundred times the
    others') holds up only its own thread, where in input order it would stall the whole window behind
    it. Items are still submitted lazily; an error surfaces when its item completes. An input with no
    item to give until some work in flight ends gives NOT_YET: results are yielded meanwhile."""
    window = max(1, concurrency) * 2
    finished: queue.SimpleQueue[Future[Out]] = queue.SimpleQueue()  # each future as it completes
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="work") as pool:
        pending: set[Future[Out]] = set()

        def next_result(future: Future[Out] | None = None) -> Out:
            future = future or finished.get()
            pending.discard(future)
            return future.result()

        try:
            for item in items:
                if item is NOT_YET:
                    try:
                        done = finished.get(timeout=0.5)
                    except queue.Empty:
                        continue  # asks its input again
                    yield next_result(done)
                    continue
                future = pool.submit(fn, item)
                pending.add(future)
                future.add_done_callback(finished.put)
                if len(pending) >= window:
                    yield next_result()
            while pending:
                yield next_result()
        finally:
            for future in pending:
                future.cancel()


class ByteBudget:
    """Bytes that threads share out without waiting: `take` answers at once whether `count` more fit
    within `limit`, so a caller that gets no share takes its slower path rather than queueing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        with self._lock:
            if self.taken + count > self.limit:
                return False
            self.taken += count
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.taken -= count


class HostBusy(Exception):
    """The host already holds its share of the slots: the caller puts its work aside for later."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} holds its share of the download slots")
        self.host = host


class HostSlots:
    """`total` slots shared by hosts, at most `per_host` of them held for any one host: a host that
    serves slowly (a heavy account's export, a host dripping bytes) keeps its share, and the others
    go on with the rest. Alone, a slow host would take every slot in turn, as the quick hosts' slots
    free up and are taken by the next of its repos."""

    def __init__(self, total: int, per_host: int) -> None:
        self.total = total
        self.per_host = max(1, min(per_host, total))
        self._changed = threading.Condition()
        self._held: Counter[str] = Counter()

    def has_room(self, host: str) -> bool:
        """Whether `host` holds fewer than its share now (a hint: another thread may take a slot next)."""
        return self._held[host] < self.per_host

    @contextmanager
    def hold(self, host: str, wait_for_host: bool = True) -> Iterator[None]:
        """A slot for `host` while the block runs. A slot held by another host is always waited for;
        a host at its share is waited for too, or raises HostBusy if not `wait_for_host`."""
        with self._changed:
            while self._held.total() >= self.total or not self.has_room(host):
                if not wait_for_host and not self.has_room(host):
                    raise HostBusy(host)
                self._changed.wait()
            self._held[host] += 1
        try:
            yield
        finally:
            with self._changed:
                self._held[host] -= 1
                if not self._held[host]:
                    del self._held[host]
                self._changed.notify_all()


def ordered_map_in_processes(fn: Callable[[In], Out], items: Iterable[In], processes: int) -> Iterator[Out]:
    """`ordered_map` over worker processes; `fn` and the items must pickle. For CPU-bound clients
    (botocore spends ~1 ms of CPU a request), where threads of one process contend for the GIL."""
    # spawn, not fork: the calling process has threads (pools, Dagster) whose locks a fork would copy.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=leave_with_parent, initargs=(os.getpid(),)) as pool:
        yield from ordered_map(fn, items, processes, executor=pool)


def leave_with_parent(parent: int) -> None:
    """Worker initializer (any spawned pool's). A worker whose run was killed (SIGKILL, OOM) would wait
    forever on its queues, holding its memory: it leaves within a second of its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="leave-with-parent", daemon=True).start()
