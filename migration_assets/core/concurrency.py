"""Bounded concurrency for I/O-bound work: in input order (reads a consumer loads in order), or as done;
and a budget of bytes that threads share out."""

import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
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


def completed_map(fn: Callable[[In], Out], items: Iterable[In], concurrency: int) -> Iterator[Out]:
    """Like `ordered_map`, results yielded as they complete: one slow item (a repo a hundred times the
    others') holds up only its own thread, where in input order it would stall the whole window behind
    it. Items are still submitted lazily; an error surfaces when its item completes."""
    window = max(1, concurrency) * 2
    finished: queue.SimpleQueue[Future[Out]] = queue.SimpleQueue()  # each future as it completes
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="work") as pool:
        pending: set[Future[Out]] = set()

        def next_result() -> Out:
            future = finished.get()
            pending.discard(future)
            return future.result()

        try:
            for item in items:
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
