"""Repo backfill throughput against a raw download loop, and parse+diff+store against libipld, same run.

Two reference PDSes (npm @atproto/dev-env's packages) and a PLC directory run on loopback, seeded with
`--accounts` accounts of `--records` records each plus `--big` accounts of `--big-records` records.
The PLC runs in a Node process of its own, as plc.directory is its own service in production: sharing
the PDSes' single-threaded process, the backfill's fresh identity lookup per repo (~6 ms of Node CPU
each in the dev PLC) was taken from the PDSes serving the downloads being compared.

1. download: a raw loop that only GETs every repo's CAR into memory, `--concurrency` at a time.
2. backfill: the project's backfill of the same repos (resolve, stream + verify the CAR, verify the
   signature, walk the MST, diff, store in PostgreSQL), same concurrency: accounts/min, records/s.
3. store from memory: the CARs from step 1, parsed, diffed and stored one after the other, against
   `libipld.decode_car` of the same CARs (a Rust decoder): records/s each.
4. memory: peak RSS of a fresh process backfilling one repo of 1,000 and one of `--big-records` records.

    python bench/repo_backfill.py                                   # 200 x 300 + 2 x 10,000 records
    python bench/repo_backfill.py --accounts 10 --records 50 --big 1 --big-records 2000   # smoke run

Needs `libipld` (pip install libipld) for step 3.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

try:
    from bench.common import (embedded_postgres, embedded_postgres_pid, load_average, log, machine_info,
                              peak_rss_mb, process_tree_cpu_seconds, write_result)
except ImportError:  # run as a script: bench/ is on sys.path
    from common import (embedded_postgres, embedded_postgres_pid, load_average, log, machine_info, peak_rss_mb,
                        process_tree_cpu_seconds, write_result)

from migration_assets.core.postgres import close_pools, shared_pool
from migration_assets.devstack.atproto import PdsSeeder, populate, start_atproto_network
from migration_assets.repos import ledger
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.snapshot import read_snapshot
from migration_assets.repos.store import store_snapshot

NAME = "repo_backfill"
DOWNLOAD_TARGET = 0.8
STORE_TARGET = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--big", type=int, default=2, help="accounts with --big-records records")
    parser.add_argument("--big-records", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=RepoSettings().concurrency)
    parser.add_argument("--child-sync", metavar="DID", help=argparse.SUPPRESS)  # step 4's worker process
    return parser.parse_args(argv)


def seed(network, args) -> dict[str, tuple[str, int]]:
    """{did: (pds url, records)} over both PDSes."""
    repos: dict[str, tuple[str, int]] = {}
    seeders = [PdsSeeder(pds) for pds in network.pdses]
    for index, seeder in enumerate(seeders):
        share = args.accounts // len(seeders) + (index < args.accounts % len(seeders))
        for account in populate(seeder, share, args.records, handle_prefix=f"p{index}u"):
            repos[account.did] = (seeder.pds.url, args.records)
    for n in range(args.big):
        seeder = seeders[n % len(seeders)]
        for size, prefix in ((args.big_records, "big"), (1000, "mid")):
            account = seeder.create_account(f"{prefix}{n}.test")
            seeder.create_records(account, "com.example.record",
                                  [{"text": f"record {i}", "n": i} for i in range(size)])
            repos[account.did] = (seeder.pds.url, size)
    for seeder in seeders:
        seeder.close()
    return repos


def download_all(repos: dict[str, tuple[str, int]], concurrency: int) -> tuple[float, dict[str, bytes]]:
    with httpx.Client(timeout=120) as client:
        def get(did: str) -> tuple[str, bytes]:
            reply = client.get(f"{repos[did][0]}/xrpc/com.atproto.sync.getRepo", params={"did": did})
            reply.raise_for_status()
            return did, reply.content

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            cars = dict(pool.map(get, repos))
        return time.perf_counter() - started, cars


def backfill(target_url: str, dids: list[str], concurrency: int) -> tuple[float, dict]:
    source = RepoSourceResource(concurrency=concurrency)
    pool = shared_pool(target_url, max_size=source.settings.connections)
    buckets = source.settings.buckets
    with pool.connection() as conn:
        ledger.enqueue(conn, dids, buckets)
        conn.commit()
    clients = source.clients(target_url)
    try:
        started = time.perf_counter()
        report = backfill_buckets(pool, source.syncer(pool, clients), list(range(buckets)))
        seconds = time.perf_counter() - started
    finally:
        clients.close()
    return seconds, dict(report.by_status())


def store_from_memory(target_url: str, cars: dict[str, bytes], pds_of: dict) -> float:
    pool = shared_pool(target_url)
    with pool.connection() as conn:
        ledger.enqueue(conn, cars, RepoSettings().buckets)
        conn.commit()
        started = time.perf_counter()
        for did, car in cars.items():
            with read_snapshot(did, [car], len(car)) as snapshot:
                store_snapshot(conn, snapshot, pds_of[did][0])
        return time.perf_counter() - started


class CpuMeter:
    """CPU seconds each process spent in a phase: the download loop needs only the PDSes; the backfill
    also the PLC (one lookup per repo), PostgreSQL and this process, all on the same cores."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.seconds: dict[str, dict[str, float]] = {}

    def _now(self) -> dict[str, float]:
        return {name: process_tree_cpu_seconds(pid) for name, pid in self.pids.items()} | {
            "bench_process": time.process_time()}

    def measure(self, phase: str, fn, *args):
        before = self._now()
        result = fn(*args)
        after = self._now()
        self.seconds[phase] = {name: round(after[name] - before[name], 2) for name in after}
        return result


def libipld_decode(cars: dict[str, bytes]) -> float:
    import libipld

    started = time.perf_counter()
    for car in cars.values():
        libipld.decode_car(car)
    return time.perf_counter() - started


def child_sync(did: str) -> None:
    """Step 4, in a fresh process: backfill one repo, print peak RSS before and after (MiB)."""
    url = os.environ["MIGRATION_DATABASE_URL"]
    pool = shared_pool(url)
    source = RepoSourceResource(concurrency=1)
    with pool.connection() as conn:
        ledger.request_sync(conn, [did], source.settings.buckets)
        conn.commit()
        bucket = conn.execute("SELECT bucket FROM repos WHERE did = %s", (did,)).fetchone()[0]
    before = peak_rss_mb()
    clients = source.clients(url)
    report = backfill_buckets(pool, source.syncer(pool, clients), [bucket])
    assert [o.status for o in report.outcomes if o.did == did] == ["synced"], report.outcomes
    print(f"{before} {peak_rss_mb()}")


def peak_rss_of_sync(did: str, target_url: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child-sync", did], check=True, capture_output=True, text=True,
        env={**os.environ, **env, "MIGRATION_DATABASE_URL": target_url},
    ).stdout.split()
    before, after = float(out[-2]), float(out[-1])
    return {"rss_before_mb": before, "peak_rss_mb": after, "growth_mb": round(after - before, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_sync:
        child_sync(args.child_sync)
        return
    with embedded_postgres("bench_repos") as (target_url, _), start_atproto_network(
        0, log_path=Path("/tmp/bench-atproto-plc.log")
    ) as plc, start_atproto_network(2, plc_url=plc.plc_url, log_path=Path("/tmp/bench-atproto.log")) as network:
        os.environ.update(network.environment())
        log(f"seeding {args.accounts} x {args.records} + {args.big} x {args.big_records} records ...")
        repos = seed(network, args)
        records = sum(n for _, n in repos.values())
        dids = list(repos)
        cpu = CpuMeter(pds=network.server.process.pid, plc=plc.server.process.pid, postgres=embedded_postgres_pid())
        log(f"{len(repos)} repos, {records} records; raw download ...")
        download_seconds, cars = cpu.measure("download", download_all, repos, args.concurrency)
        log(f"download {download_seconds:.2f} s; backfill ...")
        backfill_seconds, outcomes = cpu.measure("backfill", backfill, target_url, dids, args.concurrency)
        if outcomes != {"synced": len(dids)}:
            raise SystemExit(f"backfill did not sync every repo: {outcomes}")
        close_pools()
        log(f"backfill {backfill_seconds:.2f} s; store from memory ...")
        from migration_assets.core import embedded
        store_url = embedded.database_url(target_url, "bench_repos_store")
        store_seconds = store_from_memory(store_url, cars, repos)
        libipld_seconds = libipld_decode(cars)
        close_pools()
        sizes = {n: did for did, (_, n) in repos.items()}
        log("peak RSS of one repo's backfill ...")
        memory = {}
        for size in sorted({1000, args.big_records} & set(sizes)):
            memory[f"{size}_records"] = peak_rss_of_sync(sizes[size], target_url, network.environment())
    payload = {
        "bench": NAME,
        "machine": machine_info(),
        "load_average": load_average(),
        "data": {"repos": len(repos), "records": records, "car_megabytes": round(sum(map(len, cars.values())) / 1e6, 1),
                 "accounts": args.accounts, "records_per_account": args.records, "big_accounts": args.big,
                 "big_records": args.big_records, "concurrency": args.concurrency, "pdses": 2, "plc": "own Node process"},
        "backfill": {"seconds": round(backfill_seconds, 2),
                     "accounts_per_minute": round(60 * len(repos) / backfill_seconds, 1),
                     "records_per_second": round(records / backfill_seconds, 1)},
        "raw_download": {"seconds": round(download_seconds, 2),
                         "accounts_per_minute": round(60 * len(repos) / download_seconds, 1),
                         "records_per_second": round(records / download_seconds, 1)},
        "backfill_vs_download": round(download_seconds / backfill_seconds, 3),
        "cpu_seconds": cpu.seconds,
        "backfill_target": DOWNLOAD_TARGET,
        "store_from_memory": {"seconds": round(store_seconds, 2), "records_per_second": round(records / store_seconds, 1)},
        "libipld_decode": {"seconds": round(libipld_seconds, 3), "records_per_second": round(records / libipld_seconds, 1)},
        "store_vs_libipld": round(libipld_seconds / store_seconds, 3),
        "store_target": STORE_TARGET,
        "memory": memory,
    }
    write_result(NAME, payload)


if __name__ == "__main__":
    main()
