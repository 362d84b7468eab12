"""Blob migration throughput (MB/s) against a raw in-memory download+upload loop, and the migrating
process's peak RSS as the data grows from 10 MB to 1 GB (blobs of 50 MB included).

Two reference PDSes (atproto_network.mjs, blob upload limit raised to 64 MB) on loopback. For each data
set, two accounts on the old PDS get the same blobs, each referenced by a record, and are migrated to the
new PDS the real way (service auth, createAccount with the DID, importRepo): account A by the project
(`migration-assets blobs migrate`, in a fresh process), account B by the raw loop (a fresh process: login,
listBlobs, then getBlob into memory and uploadBlob of those bytes, one blob after the other).

    python bench/blob_migration.py                 # 10 MB and 1 GB
    python bench/blob_migration.py --large-mb 100  # smoke run
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

try:
    from bench.common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result
except ImportError:  # run as a script: bench/ is on sys.path
    from common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result

from migration_assets.core.instance import INSTANCE_CONFIG
from migration_assets.core.settings import PROJECT_ROOT

NAME = "blob_migration"
MB = 1_000_000
TARGET_RATIO = 0.8
TARGET_RSS_GROWTH_MB = 20.0
UPLOAD_LIMIT = 64 * 1024 * 1024


class BenchError(RuntimeError):
    """The measured run did not produce what the seeded data says it must."""


def blob_sizes(total_mb: int) -> list[int]:
    """10 MB: six 1 MB and sixteen 250 kB blobs. Larger: 50 MB blobs for 60%, 5 MB for 30%, 1 MB for the rest."""
    if total_mb <= 10:
        return [MB] * 6 + [250_000] * 16
    fifty = (total_mb * 6 // 10) // 50
    five = (total_mb * 3 // 10) // 5
    ones = total_mb - fifty * 50 - five * 5
    return [50 * MB] * fifty + [5 * MB] * five + [MB] * ones


# --- the two children (each a fresh process, so each ru_maxrss is its own) --------------------------


def child_project(did: str, old: str, new: str) -> dict[str, Any]:
    from migration_assets.blobs import cli

    ready_rss = peak_rss_mb()
    started = time.perf_counter()
    code = cli.main(["blobs", "migrate", "--did", did, "--old-pds", old, "--new-pds", new])
    seconds = time.perf_counter() - started
    return {"exit_code": code, "seconds": seconds, "rss_after_imports_mb": ready_rss, "peak_rss_mb": peak_rss_mb()}


def child_raw(did: str, old: str, new: str) -> dict[str, Any]:
    ready_rss = peak_rss_mb()
    started = time.perf_counter()
    with httpx.Client(base_url=old, timeout=300) as old_http, httpx.Client(base_url=new, timeout=300) as new_http:
        old_auth = session(old_http, did, os.environ["ATPROTO_OLD_PASSWORD"])
        new_auth = session(new_http, did, os.environ["ATPROTO_NEW_PASSWORD"])
        cids, cursor = [], None
        while True:
            params = {"did": did, "limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = old_http.get("/xrpc/com.atproto.sync.listBlobs", params=params, headers=old_auth).raise_for_status().json()
            cids += page.get("cids", [])
            cursor = page.get("cursor")
            if not cursor or not page.get("cids"):
                break
        moved = 0
        for cid in cids:
            blob = old_http.get("/xrpc/com.atproto.sync.getBlob", params={"did": did, "cid": cid}, headers=old_auth)
            blob.raise_for_status()
            new_http.post(
                "/xrpc/com.atproto.repo.uploadBlob", content=blob.content,
                headers={**new_auth, "Content-Type": blob.headers.get("content-type", "application/octet-stream")},
            ).raise_for_status()
            moved += len(blob.content)
    seconds = time.perf_counter() - started
    return {"exit_code": 0, "seconds": seconds, "bytes": moved, "rss_after_imports_mb": ready_rss,
            "peak_rss_mb": peak_rss_mb()}


def session(http: httpx.Client, did: str, password: str) -> dict[str, str]:
    reply = http.post("/xrpc/com.atproto.server.createSession", json={"identifier": did, "password": password})
    return {"Authorization": f"Bearer {reply.raise_for_status().json()['accessJwt']}"}


# --- the parent ---------------------------------------------------------------------------------------


def run_child(mode: str, account, old_url: str, new_url: str, moved, env: dict[str, str]) -> dict[str, Any]:
    child_env = {**env, "ATPROTO_OLD_PASSWORD": account.password, "ATPROTO_NEW_PASSWORD": moved.password}
    command = [sys.executable, __file__, "--child", mode, "--did", account.did, "--old", old_url, "--new", new_url]
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=3600, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise BenchError(f"{mode} child failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["exit_code"] != 0:
        raise BenchError(f"{mode} child's migration failed:\n{done.stdout[-3000:]}")
    return result


def seed_pair(old_seeder, new_seeder, sizes: list[int], label: str):
    """Accounts A (project) and B (raw) holding the same blobs; both migrated without their blobs."""
    from migration_assets.devstack.atproto import migrate_account

    pair = [old_seeder.create_account(f"{label}{name}.test", password=f"old-{label}-{name}") for name in "ab"]
    for size in sizes:
        data = os.urandom(size)
        for account in pair:
            old_seeder.login(account)
            old_seeder.create_record_with_blob(account, data, "application/octet-stream")
        del data
    return [(account, migrate_account(old_seeder, new_seeder, old_seeder.login(account), f"new-{label}")) for account in pair]


def measure(size_mb: int, old_seeder, new_seeder, env: dict[str, str]) -> dict[str, Any]:
    sizes = blob_sizes(size_mb)
    log(f"{size_mb} MB: seeding {len(sizes)} blobs (largest {max(sizes) // MB} MB) twice ...")
    started = time.perf_counter()
    (a, a_new), (b, b_new) = seed_pair(old_seeder, new_seeder, sizes, f"d{size_mb}x")
    seeding = time.perf_counter() - started
    old_url, new_url = old_seeder.pds.url, new_seeder.pds.url
    log(f"  seeded in {seeding:.1f} s; project migration (fresh process) ...")
    project = run_child("project", a, old_url, new_url, a_new, env)
    log(f"  {project}; raw loop (fresh process) ...")
    raw = run_child("raw", b, old_url, new_url, b_new, env)
    log(f"  {raw}")
    for moved in (a_new, b_new):
        status = new_seeder.check_account_status(new_seeder.login(moved))
        if new_seeder.list_missing_blobs(moved) or status["importedBlobs"] < status["expectedBlobs"]:
            raise BenchError(f"{moved.did} is missing blobs on the new PDS after the migration: {status}")
    total = sum(sizes)
    if raw["bytes"] != total:
        raise BenchError(f"the raw loop moved {raw['bytes']} bytes, the data set holds {total}")
    project_rate, raw_rate = total / MB / project["seconds"], total / MB / raw["seconds"]
    return {
        "data_mb": round(total / MB, 1), "blobs": len(sizes), "largest_blob_mb": max(sizes) / MB,
        "seeding_seconds": round(seeding, 1),
        "project": {"seconds": round(project["seconds"], 2), "mb_per_s": round(project_rate, 2),
                    "rss_after_imports_mb": project["rss_after_imports_mb"], "peak_rss_mb": project["peak_rss_mb"]},
        "raw": {"seconds": round(raw["seconds"], 2), "mb_per_s": round(raw_rate, 2),
                "rss_after_imports_mb": raw["rss_after_imports_mb"], "peak_rss_mb": raw["peak_rss_mb"]},
        "ratio": round(project_rate / raw_rate, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from migration_assets.devstack.atproto import PdsSeeder, start_atproto_network

    run_started, load_at_start = time.perf_counter(), load_average()
    home = Path(tempfile.mkdtemp(prefix="bench-dagster-home-"))
    shutil.copyfile(INSTANCE_CONFIG, home / "dagster.yaml")
    network = start_atproto_network(2, blob_upload_limit=UPLOAD_LIMIT)
    try:
        with embedded_postgres() as (target_url, dagster_url):
            env = {**os.environ, **network.environment(), "MIGRATION_DATABASE_URL": target_url,
                   "DAGSTER_POSTGRES_URL": dagster_url, "DAGSTER_HOME": str(home),
                   "MIGRATION_SECRET_KEY": Fernet.generate_key().decode()}
            with PdsSeeder(network.pdses[0], timeout=600) as old, PdsSeeder(network.pdses[1], timeout=600) as new:
                small = measure(args.small_mb, old, new, env)
                large = measure(args.large_mb, old, new, env)
    finally:
        network.stop()
        shutil.rmtree(home, ignore_errors=True)
    growth = round(large["project"]["peak_rss_mb"] - small["project"]["peak_rss_mb"], 1)
    ratio = large["ratio"]
    return {
        "bench": NAME,
        "machine": machine_info(),
        "servers": "two @atproto/pds 0.5 reference PDSes + PLC on loopback (atproto_network.mjs), "
                   f"blob upload limit {UPLOAD_LIMIT // (1024 * 1024)} MiB; embedded PostgreSQL",
        "baseline": "raw httpx loop in a fresh process: listBlobs, then per blob getBlob into memory and "
                    "uploadBlob of those bytes (no hashing, no disk, no retries, no progress)",
        "project": "`migration-assets blobs migrate` (blobs.cli.main) in a fresh process: request row, Dagster run "
                   "in-process, logins, listBlobs + listMissingBlobs, streamed via disk with CID check, checks",
        "unit": "MB/s (10^6 bytes) over the whole command vs the whole raw loop",
        "small": small,
        "large": large,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "rss_growth_mb": growth,
        "target_rss_growth_mb": TARGET_RSS_GROWTH_MB,
        "meets_rss_target": growth <= TARGET_RSS_GROWTH_MB,
        "load_average": {"start": load_at_start, "end": load_average()},
        "run_seconds": round(time.perf_counter() - run_started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=1000, help="the large data set (default 1000 MB = 1 GB)")
    parser.add_argument("--child", choices=["project", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--did", help=argparse.SUPPRESS)
    parser.add_argument("--old", help=argparse.SUPPRESS)
    parser.add_argument("--new", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child = child_project if args.child == "project" else child_raw
        print(json.dumps(child(args.did, args.old, args.new)), flush=True)
        return 0
    write_result(NAME, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
