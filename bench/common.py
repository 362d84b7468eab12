"""Shared helpers of the benchmarks: machine facts, results, an embedded PostgreSQL, peak memory.

Every bench measures this project and its baseline in the same run on the same data, prints one JSON
line on stdout and writes bench/results/NAME.json (see `write_result`).
"""

import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def total_memory_bytes() -> int | None:
    """MemTotal from /proc/meminfo, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "memory_total_bytes": total_memory_bytes(),
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: other work on the machine skews every figure."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def vm_hwm_mb(pid: int | str) -> float | None:
    """A live process's peak resident set (VmHWM), in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def private_mb(pid: int | str) -> float | None:
    """Memory only this process holds (Private_Clean + Private_Dirty of smaps_rollup), in MiB: a forked
    worker's own, without the pages it still shares with its parent; None once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    kib = sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:")))
    return round(kib / 1024, 1)


class ChildrenPeakRss:
    """The peak memory of this process's Python children (worker processes, not the servers it started),
    polled every 100 ms from start() to stop(): `peak_mb`, the largest VmHWM, and `peak_private_mb`, the
    largest private memory. A forked worker's VmHWM counts the pages it shares with its parent (here the
    parent's seeded data), and RUSAGE_CHILDREN's ru_maxrss survives exec: neither tells its own."""

    def __init__(self) -> None:
        self.peak_mb = self.peak_private_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _children(self) -> list[str]:
        me, found = str(os.getpid()), []
        for entry in Path("/proc").iterdir():
            try:
                command, _, rest = (entry / "stat").read_text().partition(" (")[2].rpartition(")")
            except OSError:
                continue
            if rest.split()[1:2] == [me] and command.startswith("python"):
                found.append(entry.name)
        return found

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for pid in self._children():
                self.peak_mb = max(self.peak_mb, vm_hwm_mb(pid) or 0.0)
                self.peak_private_mb = max(self.peak_private_mb, private_mb(pid) or 0.0)

    def start(self) -> "ChildrenPeakRss":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), in MiB.

    For this process, Linux's VmHWM: ru_maxrss survives exec, so a child started by a big parent would
    report the parent's peak."""
    if not children and (own := vm_hwm_mb("self")) is not None:
        return own
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # bytes on macOS
    return round(kib / 1024, 1)


def process_tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants, plus its reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        if pid in stats:
            utime, stime, cutime, cstime = map(int, stats[pid][11:15])
            total += utime + stime + (cutime + cstime if pid == root_pid else 0)
            todo += children.get(pid, [])
    return total / ticks


class CpuMeter:
    """CPU seconds each process (by pid, with its children) and this one spent in each measured phase:
    where the time went when several processes share the same cores. `children` (default `bench_workers`):
    the processes this one started and joined within the phase (a process pool's workers, runs)."""

    def __init__(self, children: str = "bench_workers", **pids: int) -> None:
        self.pids, self.children = pids, children
        self.seconds: dict[str, dict[str, float]] = {}

    def _now(self) -> dict[str, float]:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes this one started and joined
        return {name: process_tree_cpu_seconds(pid) for name, pid in self.pids.items()} | {
            "bench_process": time.process_time(), self.children: reaped.ru_utime + reaped.ru_stime}

    def measure(self, phase: str, fn, *args):
        before = self._now()
        result = fn(*args)
        after = self._now()
        self.seconds[phase] = {name: round(after[name] - before[name], 2) for name in after}
        return result


def median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose `key` (a ratio of this project to its baseline) is the median, the lower middle of
    an even count. This machine's speed drifts by a fifth within seconds (other tenants share its host),
    so one pair of timings can put a fast baseline beside a slow run or the reverse; pairs taken in turn
    and their median ratio are steadier."""
    return sorted(rounds, key=lambda r: r[key])[(len(rounds) - 1) // 2]


def spread(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """`key` over the rounds: each in the order taken, and the lowest and highest."""
    values = [r[key] for r in rounds]
    return {"each": values, "min": min(values), "max": max(values)}


def copied_database(url: str, name: str) -> str:
    """A new database `name` on the server of `url`, copied from the database of `url` (no session may be
    connected to it), and its URL: each round of a bench starts from the same state."""
    import psycopg

    from migration_assets.core import embedded

    with psycopg.connect(embedded.database_url(url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{urlsplit(url).path.lstrip("/")}"')
    return embedded.database_url(url, name)


def embedded_postgres_pid() -> int:
    """The postmaster of the embedded server under MIGRATION_DATA_DIR (see embedded_postgres)."""
    [pid_file] = Path(os.environ["MIGRATION_DATA_DIR"]).rglob("postmaster.pid")
    return int(pid_file.read_text().split()[0])


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/{name}.json (indent 2) and print the payload as one JSON line on stdout."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(json.dumps(payload, separators=(",", ":")), flush=True)
    return path


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the result line."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def embedded_postgres(target_db: str = "bench_target", dagster_db: str = "bench_dagster") -> Iterator[tuple[str, str]]:
    """An embedded PostgreSQL in a temporary MIGRATION_DATA_DIR: yields (target_url, dagster_storage_url)
    on fresh databases; on exit the server is stopped and its folder deleted."""
    from migration_assets.core import embedded
    from migration_assets.core.postgres import close_pools

    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    previous = os.environ.get("MIGRATION_DATA_DIR")
    os.environ["MIGRATION_DATA_DIR"] = str(data)
    try:
        server_url = embedded.embedded_server_url()
        target_url = embedded.database_url(server_url, target_db)
        dagster_url = embedded.dagster_storage_url(embedded.database_url(server_url, dagster_db))
        yield target_url, dagster_url
    finally:
        close_pools()
        embedded.stop_embedded_server()
        if previous is None:
            os.environ.pop("MIGRATION_DATA_DIR", None)
        else:
            os.environ["MIGRATION_DATA_DIR"] = previous
        shutil.rmtree(data, ignore_errors=True)

