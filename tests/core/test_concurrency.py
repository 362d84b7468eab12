"""Order, errors and worker lifetimes of the bounded maps."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migration_assets.core.concurrency import NOT_YET, HostBusy, HostSlots, completed_map, ordered_map

ROOT = Path(__file__).resolve().parents[2]


def test_results_come_in_input_order_and_an_error_surfaces_at_its_item():
    def slow_for_small(n: int) -> int:
        time.sleep(0.01 * (5 - n % 5))
        if n == 7:
            raise ValueError("seven")
        return n * n

    results = ordered_map(slow_for_small, range(10), concurrency=4)
    assert [next(results) for _ in range(7)] == [n * n for n in range(7)]
    with pytest.raises(ValueError, match="seven"):
        next(results)


def test_as_completed_a_slow_item_holds_up_only_its_own_thread():
    """Item 0 waits until the 40 others are done: in input order the window would stop behind it."""
    others_done = threading.Event()
    finished: list[int] = []

    def work(n: int) -> int:
        if n == 0:
            assert others_done.wait(30), "the other items were not handed out while item 0 waited"
        return n

    for n in completed_map(work, range(41), concurrency=4):
        finished.append(n)
        if len(finished) == 40:
            others_done.set()
    assert sorted(finished) == list(range(41)) and finished[-1] == 0


def test_as_completed_an_error_surfaces_and_the_items_not_started_are_dropped():
    started: list[int] = []

    def work(n: int) -> int:
        started.append(n)
        if n == 3:
            raise ValueError("three")
        return n

    with pytest.raises(ValueError, match="three"):
        list(completed_map(work, range(1000), concurrency=2))
    assert len(started) < 1000, "every item was started despite the error"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_as_completed_results_come_while_the_input_has_nothing_yet():
    """The input waits (NOT_YET) for the slow item, which waits for the quick one's result to be taken."""
    taken_quick = threading.Event()

    def items():
        yield "slow"
        yield "quick"
        while not taken_quick.is_set():
            yield NOT_YET

    def work(item: str) -> str:
        if item == "slow":
            assert taken_quick.wait(30), "the quick result was not yielded while the input waited"
        return item

    results = []
    for result in completed_map(work, items(), 2):
        results.append(result)
        if result == "quick":
            taken_quick.set()
    assert results == ["quick", "slow"]


def test_host_slots_keep_each_host_to_its_share_of_the_total():
    slots = HostSlots(total=3, per_host=2)
    with slots.hold("slow:443"), slots.hold("slow:443"):
        with pytest.raises(HostBusy) as busy:
            with slots.hold("slow:443", wait_for_host=False):
                pass
        assert busy.value.host == "slow:443"
        assert not slots.has_room("slow:443") and slots.has_room("quick:443")
        taken = threading.Event()
        with slots.hold("quick:443"):  # the third and last slot
            waiter = threading.Thread(target=lambda: slots.hold("other:443", wait_for_host=False).__enter__()
                                      or taken.set())
            waiter.start()  # another host at no share waits for a slot, not HostBusy
            assert not taken.wait(0.2), "a fourth slot was given out"
        waiter.join(10)
        assert taken.is_set(), "the slot given back was not taken by the waiting host"
    assert slots.has_room("slow:443")


def test_host_slots_share_never_exceeds_the_total():
    assert HostSlots(total=2, per_host=8).per_host == 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process parents from /proc")
def test_pool_workers_leave_when_their_run_is_killed():
    code = ("from migration_assets.core.concurrency import ordered_map_in_processes\n"
            "from tests.core.pool_work import pid_after\n"
            "for pid in ordered_map_in_processes(pid_after, [0.0, 0.0] + [600.0] * 4, 2):\n"
            "    print(pid, flush=True)\n")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first = int(run.stdout.readline())  # the workers are up and busy with 600 s items
        workers = {pid for pid in _children(run.pid) if _alive(pid)}  # and spawn's resource tracker
        assert first in workers
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "pool workers outlived their killed parent"
