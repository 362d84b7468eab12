"""Repo backfill throughput against a raw download loop, and parse+diff+store against a raw COPY, same run.

Two reference PDSes (npm @atproto/dev-env's packages) and a PLC directory run on loopback, seeded with
`--accounts` accounts of `--records` records each plus `--big` accounts of `--big-records` records.
The PLC runs in a Node process of its own, as plc.directory is its own service in production: sharing
the PDSes' single-threaded process, the backfill's fresh identity lookup per repo (~6 ms of Node CPU
each in the dev PLC) was taken from the PDSes serving the downloads being compared.

1. download: a raw loop that only GETs every repo's CAR into memory, `--concurrency` at a time.
2. backfill: the project's backfill of the same repos (resolve, stream + verify the CAR, verify the
   signature, walk the MST, diff, store in PostgreSQL), same concurrency: accounts/min, records/s,
   CPU seconds of each process (this one, the PDSes, the PLC, PostgreSQL) and the PLC lookups made
   (one per DID: a repeated one would be waste). Target: >= 0.7x the download loop. `backfill_cpu_bound`
   says what that CPU allows here: spread perfectly over the cores, the backfill's floor and best ratio. Then the same
   backfill again into a fresh database holding the DID documents the first one stored, as a rerun
   within ATPROTO_IDENTITY_TTL_SECONDS (or any deployment whose PLC is not on this machine) meets them:
   no PLC lookup, so what the PLC's share of these two cores costs the backfill shows.
3. store from memory: the CARs from step 1, parsed, diffed and stored one after the other (a
   transaction each), against a raw COPY of the same rows straight into `records` (a transaction per
   repo, rows made beforehand): PostgreSQL's floor for those rows. Target: >= 0.5x the raw COPY.
4. runs sharing buckets: 1, 2 and 4 processes backfill the same repos (all buckets, leased claims,
   fresh database each time) at once, each with `--concurrency` downloads: repos/min and records/s.
5. memory: peak RSS of a fresh process backfilling one repo of 1,000 and one of `--big-records` records.
6. a heavy account's two paths: the biggest export (`--big-records`) parsed and stored (a first sync,
   into a fresh database) read whole, and streamed with its rows spooled to disk, as an export past the
   memory for whole CARs (REPO_WHOLE_CAR_MEMORY_BYTES) goes: CPU seconds of this process for the parse
   and the store, and of PostgreSQL for the store, each the median of `--rounds`.

Steps 1 to 3 are taken `--rounds` times in turn (download then backfill, store then raw COPY, each into
a fresh database): the figures are those of the round with the median ratio, and every round's ratio is
reported. This machine's speed drifts within seconds, so a single pair can flatter either side.

    python bench/repo_backfill.py                                   # 200 x 300 + 2 x 10,000 records
    python bench/repo_backfill.py --accounts 10 --records 50 --big 1 --big-records 2000   # smoke run
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from psycopg.types.json import Jsonb

try:
    from bench.common import (CpuMeter, embedded_postgres, embedded_postgres_pid, load_average, log, machine_info,
                              median_round, peak_rss_mb, process_tree_cpu_seconds, spread, write_result)
except ImportError:  # run as a script: bench/ is on sys.path
    from common import (CpuMeter, embedded_postgres, embedded_postgres_pid, load_average, log, machine_info,
                        median_round, peak_rss_mb, process_tree_cpu_seconds, spread, write_result)

from migration_assets.atproto.identity import IdentityResolver
from migration_assets.core import embedded
from migration_assets.core.concurrency import ByteBudget
from migration_assets.core.postgres import close_pools, copy_rows, shared_pool
from migration_assets.devstack.atproto import PdsSeeder, populate, start_atproto_network
from migration_assets.repos import ledger
from migration_assets.repos import snapshot as snapshot_module
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.snapshot import read_snapshot
from migration_assets.repos.store import store_snapshot

NAME = "repo_backfill"
DOWNLOAD_TARGET = 0.7
STORE_TARGET = 0.5
RUN_COUNTS = (1, 2, 4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--big", type=int, default=2, help="accounts with --big-records records")
    parser.add_argument("--big-records", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=RepoSettings().concurrency)
    parser.add_argument("--rounds", type=int, default=3,
                        help="steps 1-3 taken this many times in turn; the median ratio is the figure")
    parser.add_argument("--runs", type=int, nargs="*", default=list(RUN_COUNTS),
                        help="step 4: how many runs share the buckets, one measurement each (none: skip)")
    parser.add_argument("--child-sync", metavar="DID", help=argparse.SUPPRESS)  # step 5's worker process
    parser.add_argument("--child-run", metavar="URL", help=argparse.SUPPRESS)  # step 4's worker process
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


class PlcLookups:
    """Counts the DID documents this process fetches (cache misses of every IdentityResolver)."""

    def __init__(self) -> None:
        self.count = 0
        self._real = IdentityResolver._resolve_uncached
        counter = self

        def counted(resolver, did):
            counter.count += 1
            return counter._real(resolver, did)

        IdentityResolver._resolve_uncached = counted


def backfill(target_url: str, dids: list[str], concurrency: int, pdses: list[str],
             documents: list[tuple] = ()) -> tuple[float, dict]:
    """The backfill of `dids` into a fresh database; `documents` (rows of did_documents) are stored first,
    outside the clock, as a rerun within ATPROTO_IDENTITY_TTL_SECONDS finds them."""
    source = RepoSourceResource(concurrency=concurrency)
    pool = shared_pool(target_url, max_size=source.settings.connections)
    buckets = source.settings.buckets
    with pool.connection() as conn:
        ledger.enqueue(conn, dids, buckets)
        conn.cursor().executemany("INSERT INTO did_documents (did, document, resolved_at) VALUES (%s, %s, %s)",
                                  [(did, Jsonb(document), at) for did, document, at in documents])
        conn.commit()
    clients = source.clients(target_url)
    try:
        # Set-up outside the clock, as the download loop's client: TLS contexts and pools per host.
        syncer = source.syncer(pool, clients)
        for pds in pdses:
            clients(pds)
        started = time.perf_counter()
        report = backfill_buckets(pool, syncer, list(range(buckets)))
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
                with conn.transaction():  # a transaction per repo, as a backfill's
                    store_snapshot(conn, snapshot, pds_of[did][0])
        return time.perf_counter() - started


def record_rows(cars: dict[str, bytes]) -> dict[str, list[tuple]]:
    """Each repo's rows for `records` (did, collection, rkey, cid, record JSON), made by the project's
    parse outside any clock: the raw COPY's input."""
    rows = {}
    for did, car in cars.items():
        with read_snapshot(did, [car], len(car)) as snapshot:
            text = {link: record for link, record, _, _ in snapshot.staged_blocks()}
            rows[did] = [(did, collection, rkey, cid, text[link]) for collection, rkey, cid, link in snapshot.keys]
    return rows


def raw_copy(target_url: str, rows: dict[str, list[tuple]]) -> float:
    """The same rows COPYed straight into `records`, a transaction per repo: no parse, no diff."""
    pool = shared_pool(target_url)
    with pool.connection() as conn:
        started = time.perf_counter()
        for repo_rows in rows.values():
            with conn.transaction(), conn.cursor() as cur:
                copy_rows(cur, "records", ("did", "collection", "rkey", "cid", "record"), repo_rows)
        return time.perf_counter() - started


def backfill_round(n: int, cpu: CpuMeter, lookups: PlcLookups, target_url: str, repos: dict, concurrency: int,
                   network) -> dict:
    """Steps 1 and 2 once: the raw download, then the backfill into `target_url` (a fresh database)."""
    log(f"round {n + 1}: raw download ...")
    pdses = [pds.url for pds in network.pdses]
    download_seconds, cars = cpu.measure("download", download_all, repos, concurrency)
    cpu_download, before = cpu.seconds["download"], lookups.count
    log(f"download {download_seconds:.2f} s; backfill ...")
    backfill_seconds, outcomes = cpu.measure("backfill", backfill, target_url, list(repos), concurrency, pdses)
    if outcomes != {"synced": len(repos)}:
        raise SystemExit(f"backfill did not sync every repo: {outcomes}")
    plc_lookups = lookups.count - before
    with shared_pool(target_url).connection() as conn:
        documents = conn.execute("SELECT did, document, resolved_at FROM did_documents").fetchall()
    cached_url = embedded.database_url(target_url, f"bench_repos_cached_{n}")
    cached_seconds, outcomes = cpu.measure("backfill_identities_stored", backfill, cached_url, list(repos),
                                           concurrency, pdses, documents)
    if outcomes != {"synced": len(repos)} or lookups.count != before + plc_lookups:
        raise SystemExit(f"the rerun with stored identities did not sync every repo without the PLC: {outcomes}")
    log(f"backfill {backfill_seconds:.2f} s ({plc_lookups} PLC lookups); with the identities stored {cached_seconds:.2f} s")
    return {"download_seconds": round(download_seconds, 2), "backfill_seconds": round(backfill_seconds, 2),
            "ratio": round(download_seconds / backfill_seconds, 3), "plc_lookups": plc_lookups,
            "identities_stored_seconds": round(cached_seconds, 2),
            "identities_stored_ratio": round(download_seconds / cached_seconds, 3),
            "cpu_seconds": {"download": cpu_download, "backfill": cpu.seconds["backfill"],
                            "backfill_identities_stored": cpu.seconds["backfill_identities_stored"]}, "cars": cars}


def store_round(n: int, cpu: CpuMeter, server_url: str, cars: dict, repos: dict, rows: dict) -> dict:
    """Step 3 once, each side into a fresh database."""
    store_seconds = cpu.measure("store_from_memory", store_from_memory,
                                embedded.database_url(server_url, f"bench_repos_store_{n}"), cars, repos)
    copy_seconds = cpu.measure("raw_copy", raw_copy, embedded.database_url(server_url, f"bench_repos_copy_{n}"), rows)
    log(f"round {n + 1}: store {store_seconds:.2f} s, raw COPY {copy_seconds:.2f} s")
    return {"store_seconds": round(store_seconds, 2), "copy_seconds": round(copy_seconds, 2),
            "ratio": round(copy_seconds / store_seconds, 3),
            "cpu_seconds": {"store_from_memory": cpu.seconds["store_from_memory"], "raw_copy": cpu.seconds["raw_copy"]}}


def cpu_bound(round_: dict) -> dict:
    """What the CPU the backfill's processes used allows on this machine: spread perfectly over the usable
    cores, the backfill would take `floor_seconds`, so at best `max_ratio` of the raw download loop. The
    loop leaves cores idle (the PDSes' one Node thread is its bound); the backfill needs the PLC, PostgreSQL
    and this process on the same cores."""
    used = round_["cpu_seconds"]["backfill"]
    total = round(sum(used.values()), 2)
    floor = total / machine_info()["cpus_usable"]
    return {"cpu_seconds": total, "floor_seconds": round(floor, 2),
            "max_ratio": round(round_["download_seconds"] / floor, 3),
            "raw_download_cpu_seconds": round(sum(round_["cpu_seconds"]["download"].values()), 2)}


def child_run(url: str, concurrency: int) -> None:
    """Step 4's worker: one run over every bucket. Says `ready` once set up, starts on a line on stdin,
    prints its outcome counts as JSON."""
    source = RepoSourceResource(concurrency=concurrency)
    pool = shared_pool(url, max_size=source.settings.connections)
    clients = source.clients(url)
    syncer = source.syncer(pool, clients)
    print("ready", flush=True)
    sys.stdin.readline()
    report = backfill_buckets(pool, syncer, list(range(source.settings.buckets)))
    clients.close()
    print(json.dumps(dict(report.by_status())), flush=True)


def shared_runs(server_url: str, repos: dict[str, tuple[str, int]], runs: int, concurrency: int, env: dict) -> dict:
    """`runs` processes backfill the same repos at once into a fresh database: wall time from the go
    signal to the last run's end."""
    url = embedded.database_url(server_url, f"bench_repos_runs_{runs}")
    pool = shared_pool(url)
    with pool.connection() as conn:
        ledger.enqueue(conn, list(repos), RepoSettings().buckets)
        conn.commit()
    children = [subprocess.Popen([sys.executable, __file__, "--child-run", url, "--concurrency", str(concurrency)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
                for _ in range(runs)]
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("a run failed to start")
    started = time.perf_counter()
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    outcomes = Counter()
    for child in children:
        outcomes.update(json.loads(child.stdout.readline()))
        child.wait()
    seconds = time.perf_counter() - started
    with pool.connection() as conn:
        synced = conn.execute("SELECT count(*) FROM repos WHERE status = 'synced'").fetchone()[0]
        stored = conn.execute("SELECT count(*) FROM records").fetchone()[0]
    records = sum(n for _, n in repos.values())
    if synced != len(repos) or stored != records:
        raise SystemExit(f"{runs} runs synced {synced} of {len(repos)} repos, stored {stored} of {records} records")
    return {"runs": runs, "seconds": round(seconds, 2), "repos_per_minute": round(60 * len(repos) / seconds, 1),
            "records_per_second": round(records / seconds, 1), "outcomes": dict(outcomes)}


def heavy_paths(server_url: str, did: str, car: bytes, pds: str, records: int, rounds: int) -> dict:
    """Step 6: the export's parse and store, read whole and streamed (rows spooled to disk): CPU seconds."""

    def one(path: str, n: int) -> dict:
        url = embedded.database_url(server_url, f"bench_repos_heavy_{path}_{n}")
        with shared_pool(url).connection() as conn:
            ledger.enqueue(conn, [did], RepoSettings().buckets)
            conn.commit()
            chunks = (car[i:i + 65536] for i in range(0, len(car), 65536))  # as a download hands them over
            budget = ByteBudget(4 * len(car) if path == "whole" else 0)
            started = time.process_time()
            with read_snapshot(did, chunks, len(car), whole_cars=budget) as snapshot:
                parsed = time.process_time()
                if snapshot.in_memory != (path == "whole"):
                    raise SystemExit(f"the {path} path did not hold the rows where it should")
                postgres = process_tree_cpu_seconds(embedded_postgres_pid())
                with conn.transaction():
                    store_snapshot(conn, snapshot, pds)
                postgres = process_tree_cpu_seconds(embedded_postgres_pid()) - postgres
                stored = time.process_time()
        close_pools()
        return {"parse_cpu_seconds": round(parsed - started, 3), "store_cpu_seconds": round(stored - parsed, 3),
                "store_postgres_cpu_seconds": round(postgres, 3)}

    result = {"records": records, "car_megabytes": round(len(car) / 1e6, 1)}
    spool_memory = snapshot_module.SPOOL_MEMORY_BYTES
    for path in ("whole", "streamed"):
        snapshot_module.SPOOL_MEMORY_BYTES = 0 if path == "streamed" else spool_memory  # a heavy account's rows
        try:
            taken = [one(path, n) for n in range(rounds)]
        finally:
            snapshot_module.SPOOL_MEMORY_BYTES = spool_memory
        result[path] = {key: sorted(t[key] for t in taken)[(rounds - 1) // 2] for key in taken[0]}
    return result


def child_sync(did: str) -> None:
    """Step 5, in a fresh process: backfill one repo, print peak RSS before and after (MiB)."""
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
    import migration_assets.definitions  # noqa: F401  (a run's process loads the code location first)

    args = parse_args(argv)
    if args.child_sync:
        child_sync(args.child_sync)
        return
    if args.child_run:
        child_run(args.child_run, args.concurrency)
        return
    load_at_start = load_average()
    with embedded_postgres("bench_repos") as (target_url, _), start_atproto_network(
        0, log_path=Path("/tmp/bench-atproto-plc.log")
    ) as plc, start_atproto_network(2, plc_url=plc.plc_url, log_path=Path("/tmp/bench-atproto.log")) as network:
        os.environ.update(network.environment())
        log(f"seeding {args.accounts} x {args.records} + {args.big} x {args.big_records} records ...")
        repos = seed(network, args)
        records = sum(n for _, n in repos.values())
        log(f"{len(repos)} repos, {records} records")
        cpu = CpuMeter("run_processes", pds=network.server.process.pid, plc=plc.server.process.pid, postgres=embedded_postgres_pid())
        lookups = PlcLookups()
        backfills, stores = [], []
        for n in range(args.rounds):
            # Round 1 backfills into the main database: step 5 resyncs one of its repos.
            url = target_url if n == 0 else embedded.database_url(target_url, f"bench_repos_{n}")
            backfills.append(backfill_round(n, cpu, lookups, url, repos, args.concurrency, network))
            cars = backfills[-1].pop("cars")
            close_pools()
        rows = record_rows(cars)
        for n in range(args.rounds):
            stores.append(store_round(n, cpu, target_url, cars, repos, rows))
            close_pools()
        del rows
        backfill_median, store_median = median_round(backfills, "ratio"), median_round(stores, "ratio")
        shared = []
        for runs in args.runs:
            log(f"{runs} runs sharing the buckets ...")
            shared.append(cpu.measure(f"runs_{runs}", shared_runs, target_url, repos, runs, args.concurrency,
                                      network.environment()))
            close_pools()
        sizes = {n: did for did, (_, n) in repos.items()}
        log("peak RSS of one repo's backfill ...")
        memory = {}
        for size in sorted({1000, args.big_records} & set(sizes)):
            memory[f"{size}_records"] = peak_rss_of_sync(sizes[size], target_url, network.environment())
        heavy = {}
        if args.big:
            log("a heavy account's export, read whole and streamed ...")
            did = sizes[args.big_records]
            heavy = heavy_paths(target_url, did, cars[did], *repos[did], args.rounds)
    payload = {
        "bench": NAME,
        "machine": machine_info(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "data": {"repos": len(repos), "records": records, "car_megabytes": round(sum(map(len, cars.values())) / 1e6, 1),
                 "accounts": args.accounts, "records_per_account": args.records, "big_accounts": args.big,
                 "big_records": args.big_records, "concurrency": args.concurrency,
                 "host_concurrency": RepoSourceResource().host_concurrency, "pdses": 2, "plc": "own Node process"},
        "rounds": args.rounds,
        "backfill": {"seconds": backfill_median["backfill_seconds"],
                     "accounts_per_minute": round(60 * len(repos) / backfill_median["backfill_seconds"], 1),
                     "records_per_second": round(records / backfill_median["backfill_seconds"], 1),
                     "plc_lookups": backfill_median["plc_lookups"]},
        "raw_download": {"seconds": backfill_median["download_seconds"],
                         "accounts_per_minute": round(60 * len(repos) / backfill_median["download_seconds"], 1),
                         "records_per_second": round(records / backfill_median["download_seconds"], 1)},
        "backfill_vs_download": backfill_median["ratio"],
        "backfill_vs_download_rounds": spread(backfills, "ratio"),
        "backfill_identities_stored": {
            "seconds": backfill_median["identities_stored_seconds"],
            "accounts_per_minute": round(60 * len(repos) / backfill_median["identities_stored_seconds"], 1),
            "vs_download": backfill_median["identities_stored_ratio"],
            "vs_download_rounds": spread(backfills, "identities_stored_ratio")},
        "backfill_target": DOWNLOAD_TARGET,
        "backfill_cpu_bound": cpu_bound(backfill_median),
        "store_from_memory": {"seconds": store_median["store_seconds"],
                              "records_per_second": round(records / store_median["store_seconds"], 1)},
        "raw_copy": {"seconds": store_median["copy_seconds"],
                     "records_per_second": round(records / store_median["copy_seconds"], 1)},
        "store_vs_raw_copy": store_median["ratio"],
        "store_vs_raw_copy_rounds": spread(stores, "ratio"),
        "store_target": STORE_TARGET,
        "cpu_seconds": {**backfill_median["cpu_seconds"], **store_median["cpu_seconds"],
                        **{name: seconds for name, seconds in cpu.seconds.items() if name.startswith("runs_")}},
        "runs_sharing_buckets": shared,
        "memory": memory,
        "heavy_export_paths": heavy,
    }
    write_result(NAME, payload)


if __name__ == "__main__":
    main()
