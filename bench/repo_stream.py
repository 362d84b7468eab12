"""Following a host's event stream: events applied per second against a raw loop that only reads and
decodes the same stream, and the lag behind the stream under a steady write load.

A reference PDS (npm @atproto/dev-env) and a PLC directory (its own Node process) run on loopback.
`--accounts` accounts are created and backfilled; then `--commits` commits of `--ops` new records each
are written, round-robin over the accounts, and the stream from before them is read `--rounds` times
over in steps 1 and 2, taken in turn (each follow into a fresh copy of the backfilled database): the
figures are those of the round with the median ratio, and every round's ratio is reported, because this
machine's speed drifts within seconds and a single pair can flatter either side.

1. raw: subscribeRepos frames read and decoded (typed events, their CAR slices read): events/s.
2. follow: the project's follower applies the same events to PostgreSQL (signature and MST checks,
   records, ledger, cursor), `--batch-events` per transaction: events/s; target >= 0.5x raw. The commits
   are checked in `--check-processes` worker processes while the previous batch is written; they are
   started before the clock starts (their start-up, once per run, is reported apart). CPU seconds
   per process (PDS, PLC, PostgreSQL, this one, its workers) for steps 1 and 2 show where the time went.
3. lag: a writer adds `--rate` commits/s for `--load-seconds` while the follower follows live (into the
   last round's database); the lag (event time to commit) after each batch, median and max.
4. a burst of resyncs: every account made due in one batch (a gap's or a burst of desyncs' worth) and
   fetched again as the follower does after that batch, RESYNC_THREADS at a time against one at a time,
   `--rounds` times in turn: the seconds the stream waits for them.

    python bench/repo_stream.py                                   # 50 accounts, 5,000 commits
    python bench/repo_stream.py --accounts 5 --commits 300 --load-seconds 5    # smoke run
"""

import argparse
import cProfile
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    from bench.common import (CpuMeter, copied_database, embedded_postgres, embedded_postgres_pid, load_average, log,
                              machine_info, median_round, spread, write_result)
except ImportError:  # run as a script: bench/ is on sys.path
    from common import (CpuMeter, copied_database, embedded_postgres, embedded_postgres_pid, load_average, log,
                        machine_info, median_round, spread, write_result)

from migration_assets.atproto.car import read_blocks
from migration_assets.core.postgres import close_pools, shared_pool
from migration_assets.devstack.atproto import PdsSeeder, populate, start_atproto_network
from migration_assets.repos import ledger
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos.commit_check import CommitChecker
from migration_assets.repos.follow import BATCH_EVENTS, RESYNC_THREADS, Follower, FollowReport, save_cursor
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.stream import CommitEvent, Subscription

NAME = "repo_stream"
TARGET = 0.5
QUIET_SECONDS = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--ops", type=int, default=1, help="records created per commit")
    parser.add_argument("--batch-events", type=int, default=BATCH_EVENTS)
    parser.add_argument("--rate", type=float, default=50.0, help="commits/s of the steady load (step 3)")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="steps 1 and 2 taken this many times in turn; the median ratio is the figure")
    parser.add_argument("--profile", type=Path,
                        help="write a cProfile of the follow step (step 2) here, in the follower thread's CPU time")
    parser.add_argument("--check-processes", type=int, default=None,
                        help="worker processes checking commits (default REPO_FOLLOW_CHECK_PROCESSES)")
    return parser.parse_args(argv)


def write_commits(seeder: PdsSeeder, accounts: list, commits: int, ops: int) -> None:
    def one(n: int) -> None:
        account = accounts[n % len(accounts)]
        seeder.create_records(account, "com.example.record", [{"text": f"stream {n}.{i}", "n": n} for i in range(ops)])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(commits)))


def raw_read(host: str, cursor: int) -> tuple[int, int, float]:
    """(events, last seq, seconds up to the last event): read and decode until the stream goes quiet."""
    events, last, started, finished = 0, cursor, time.perf_counter(), None
    with Subscription(host, cursor) as subscription:
        while (event := subscription.next(timeout=QUIET_SECONDS)) is not None:
            if isinstance(event, CommitEvent):
                read_blocks(event.blocks, max_size=1 << 24)  # the fastest read of a CAR slice, as the check's
            events, last, finished = events + 1, getattr(event, "seq", last), time.perf_counter()
    return events, last, (finished or started) - started


def follower(target_url: str, host: str, batch_events: int, on_batch=None, check_processes: int | None = None,
             checker: CommitChecker | None = None) -> tuple[Follower, object]:
    source = RepoSourceResource()
    pool = shared_pool(target_url)
    clients = source.clients(target_url)
    return Follower(pool, host, source.syncer(pool, clients), buckets=source.settings.buckets,
                    batch_size=batch_events, on_batch=on_batch, check_processes=check_processes,
                    checker=checker), clients


def started_checker(processes: int) -> tuple[CommitChecker, float]:
    """Check workers already up, and how long they took to start (a run pays that once)."""
    started = time.perf_counter()
    checker = CommitChecker(processes, RepoSettings.load().scope.collections)
    checker.wait_started()
    return checker, time.perf_counter() - started


def follow_until(target_url: str, host: str, start: int, end: int, batch_events: int, checker: CommitChecker,
                 profile: Path | None = None) -> tuple[FollowReport, float, dict]:
    """Follow from `start` until the cursor reaches `end`, with check workers already started:
    (report, seconds in all, the steady part: after the first batch, whose DIDs are resolved first)."""
    with shared_pool(target_url).connection() as conn:
        save_cursor(conn, host, start)
    stop = threading.Event()
    batches: list[tuple[float, int]] = []  # (when, events so far) after each batch

    def on_batch(report: FollowReport) -> None:
        batches.append((time.perf_counter(), report.events))
        if report.cursor is not None and report.cursor >= end:
            stop.set()

    follow, clients = follower(target_url, host, batch_events, on_batch, checker=checker)
    try:
        started = time.perf_counter()
        if profile is None:
            report = follow.run(stop)
        else:
            profiler = cProfile.Profile(time.thread_time)  # the follower thread's CPU, not waits (nor other threads')
            report = profiler.runcall(follow.run, stop)
            profiler.dump_stats(profile)
    finally:
        clients.close()
    (first_at, first_events), (last_at, last_events) = batches[0], batches[-1]
    steady = {"events": last_events - first_events, "seconds": round(last_at - first_at, 3),
              "first_batch_after_seconds": round(first_at - started, 3)}
    steady["events_per_second"] = round(steady["events"] / (last_at - first_at), 1) if last_at > first_at else None
    return report, last_at - started, steady


def stream_round(n: int, cpu: CpuMeter, target_url: str, host: str, start: int, args,
                 checker: CommitChecker) -> dict:
    """Steps 1 and 2 once: the raw read, then the follow into `target_url` (a copy of the backfilled
    database). A cProfile (--profile) is taken of the first round only."""
    log(f"round {n + 1}: raw read ...")
    raw_events, end, raw_seconds = cpu.measure("raw_read", raw_read, host, start)
    cpu_raw = cpu.seconds["raw_read"]
    log(f"raw {raw_events} events in {raw_seconds:.2f} s; follow ...")
    report, follow_seconds, steady = cpu.measure("follow", follow_until, target_url, host, start, end,
                                                 args.batch_events, checker, args.profile if n == 0 else None)
    if report.applied != args.commits or report.desyncs:
        raise SystemExit(f"the follower did not apply every commit exactly: {report.summary()}")
    log(f"follow {report.events} events in {follow_seconds:.2f} s")
    raw_rate, follow_rate = raw_events / raw_seconds, report.events / follow_seconds
    return {"url": target_url, "raw_events": raw_events, "raw_seconds": raw_seconds, "raw_rate": raw_rate,
            "report": report, "follow_seconds": follow_seconds, "follow_rate": follow_rate, "steady": steady,
            "ratio": round(follow_rate / raw_rate, 3), "cpu_seconds": {"raw_read": cpu_raw, "follow": cpu.seconds["follow"]}}


def lag_under_load(target_url: str, seeder: PdsSeeder, accounts: list, args) -> dict:
    host = seeder.pds.url
    lags: list[float] = []
    follow, clients = follower(target_url, host, args.batch_events, lambda r: lags.append(r.lag_seconds),
                               args.check_processes)
    stop = threading.Event()
    thread = threading.Thread(target=follow.run, args=(stop,))
    thread.start()
    written = 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < args.load_seconds:
            due = int(elapsed * args.rate) + 1
            for n in range(written, due):
                account = accounts[n % len(accounts)]
                seeder.create_records(account, "com.example.record", [{"text": f"load {n}", "n": n}])
            written = due
            time.sleep(max(0.0, due / args.rate - (time.perf_counter() - started)))
        time.sleep(QUIET_SECONDS)
    finally:
        stop.set()
        thread.join()
        clients.close()
    achieved = written / args.load_seconds
    return {"commits": written, "commits_per_second": round(achieved, 1), "batches": len(lags),
            "lag_median_seconds": round(statistics.median(lags), 3) if lags else None,
            "lag_max_seconds": round(max(lags), 3) if lags else None,
            "desyncs": follow.report.desyncs}


def resync_burst(target_url: str, host: str, dids: list[str], rounds: int) -> dict:
    """Seconds for the follower's resyncs of `dids` after one batch, RESYNC_THREADS at a time and one at a
    time, taken in turn; the medians."""
    follow, clients = follower(target_url, host, BATCH_EVENTS)
    seconds: dict[int, list[float]] = {RESYNC_THREADS: [], 1: []}
    try:
        for _ in range(rounds):
            for at_once in seconds:
                with follow.pool.connection() as conn:
                    ledger.request_sync(conn, dids, follow.buckets)
                before = follow.report.resyncs
                follow.resync_threads = at_once
                started = time.perf_counter()
                follow._resync(dids)
                seconds[at_once].append(time.perf_counter() - started)
                if follow.report.resyncs - before != len(dids) or follow.report.resync_failures:
                    raise SystemExit(f"resync burst: {follow.report}")
    finally:
        clients.close()
    at_once, alone = statistics.median(seconds[RESYNC_THREADS]), statistics.median(seconds[1])
    return {"repos": len(dids), "threads": RESYNC_THREADS, "seconds": round(at_once, 2),
            "seconds_one_at_a_time": round(alone, 2), "speedup": round(alone / at_once, 2)}


def report_check_processes(args) -> int:
    return args.check_processes if args.check_processes is not None else RepoSettings.load().follow_check_processes


def main(argv=None) -> None:
    import migration_assets.definitions  # noqa: F401  (a run's process loads the code location first)

    args = parse_args(argv)
    with embedded_postgres("bench_stream") as (target_url, _), start_atproto_network(
        0, log_path=Path("/tmp/bench-stream-plc.log")
    ) as plc, start_atproto_network(1, plc_url=plc.plc_url, log_path=Path("/tmp/bench-stream.log")) as network:
        os.environ.update(network.environment())
        seeder = PdsSeeder(network.pdses[0])
        host = seeder.pds.url
        log(f"{args.accounts} accounts, backfilled ...")
        accounts = populate(seeder, args.accounts, 1, handle_prefix="stream")
        source = RepoSourceResource()
        pool = shared_pool(target_url, max_size=source.settings.connections)
        with pool.connection() as conn:
            ledger.enqueue(conn, [a.did for a in accounts], source.settings.buckets)
            conn.commit()
        clients = source.clients(target_url)
        outcomes = backfill_buckets(pool, source.syncer(pool, clients), list(range(source.settings.buckets))).by_status()
        clients.close()
        if outcomes != {"synced": len(accounts)}:
            raise SystemExit(f"backfill did not sync every repo: {dict(outcomes)}")
        _, start, _ = raw_read(host, 0)
        log(f"writing {args.commits} commits of {args.ops} records ...")
        write_commits(seeder, accounts, args.commits, args.ops)
        cpu = CpuMeter(pds=network.server.process.pid, plc=plc.server.process.pid, postgres=embedded_postgres_pid())
        checker, checker_start_seconds = started_checker(report_check_processes(args))
        cpu.pids |= {f"check_worker_{n}": pid for n, pid in enumerate(checker.worker_pids)}
        close_pools()  # each round follows into a copy of the backfilled database: nothing may hold it
        with checker:
            rounds = [stream_round(n, cpu, copied_database(target_url, f"bench_stream_{n}"), host, start,
                                   args, checker) for n in range(args.rounds)]
        median = median_round(rounds, "ratio")
        log("steady load ...")
        load = lag_under_load(rounds[-1]["url"], seeder, accounts, args)
        log("a burst of resyncs ...")
        burst = resync_burst(rounds[-1]["url"], host, [a.did for a in accounts], args.rounds)
        seeder.close()
    report, steady = median["report"], median["steady"]
    payload = {
        "bench": NAME,
        "machine": machine_info(),
        "load_average": load_average(),
        "data": {"accounts": args.accounts, "commits": args.commits, "records_per_commit": args.ops,
                 "batch_events": args.batch_events, "pdses": 1, "plc": "own Node process",
                 "check_processes": report_check_processes(args)},
        "rounds": args.rounds,
        "raw_read": {"events": median["raw_events"], "seconds": round(median["raw_seconds"], 2),
                     "events_per_second": round(median["raw_rate"], 1)},
        "follow": {"events": report.events, "commits_applied": report.applied,
                   "seconds": round(median["follow_seconds"], 2), "events_per_second": round(median["follow_rate"], 1),
                   "after_first_batch": steady, "check_workers_start_seconds": round(checker_start_seconds, 2),
                   "seconds_reading": round(report.reading_seconds, 2),
                   "seconds_waiting_for_checks": round(report.check_wait_seconds, 2),
                   "seconds_writing": round(report.writing_seconds, 2)},
        "follow_vs_raw": median["ratio"],
        "follow_vs_raw_rounds": spread(rounds, "ratio"),
        "follow_after_first_batch_vs_raw": round(steady["events_per_second"] / median["raw_rate"], 3)
        if steady["events_per_second"] else None,
        "cpu_seconds": median["cpu_seconds"],
        "target": TARGET,
        "steady_load": load,
        "resync_burst": burst,
    }
    write_result(NAME, payload)


if __name__ == "__main__":
    main()
