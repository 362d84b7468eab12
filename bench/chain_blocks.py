"""Block-metadata asset throughput (heights/s) against a serial boto3 Query loop, same run, same data.

dynalite serves a seeded sample chain (reorgs, skipped blocks); the baseline reads every height with one
Query each (following LastEvaluatedKey), one after the other; the asset materializes every partition
covering the same heights into an embedded PostgreSQL, with a Dagster instance on PostgreSQL storage.

    python bench/chain_blocks.py                  # 100,000 heights in 10,000-height partitions
    python bench/chain_blocks.py --heights 2000   # smoke run (one 2,000-height partition)
"""

import argparse
import os
import sys
import time
import uuid
from typing import Any

import boto3
import dagster as dg
import psycopg

try:
    from bench.common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result
except ImportError:  # run as a script: bench/ is on sys.path
    from common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result

from migration_assets.chain.assets import block_metadata
from migration_assets.chain.partitions import block_ranges
from migration_assets.chain.ranges import range_key
from migration_assets.chain.source import CANONICAL_RID
from migration_assets.definitions import shared_resources
from migration_assets.devstack.sample_chain import create_block_table, sample_chain, write_items
from migration_assets.devstack.servers import local_aws_environment, start_dynalite

NAME = "chain_blocks"
TAG = 1
REORG_RATE = 0.05
TARGET_RATIO = 1.0


class BenchError(RuntimeError):
    """The measured run did not produce what the seeded data says it must."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heights", type=int, default=100_000, help="heights seeded and read (default 100000)")
    parser.add_argument("--range-size", type=int, default=10_000, help="heights per partition (default 10000)")
    args = parser.parse_args(argv)
    if args.heights <= 0 or args.range_size <= 0:
        parser.error("--heights and --range-size must be positive")
    args.range_size = min(args.range_size, args.heights)  # a smoke run is one partition of its heights
    if args.heights % args.range_size:
        parser.error(f"--heights ({args.heights}) must be a multiple of --range-size ({args.range_size}), "
                     "so that the asset reads exactly the heights the baseline reads")
    return args


def seed(client: Any, table: str, heights: int) -> dict[str, Any]:
    """Create and fill the table; return what it holds (the expected figures) and the seeding time."""
    items = list(sample_chain(TAG, 0, heights, reorg_rate=REORG_RATE))
    latest = f"{TAG}-latest"
    height_items = [i for i in items if i["block_pid"]["S"] != latest]
    # One distinct block per hash item and per skipped ("null") item; canonical copies duplicate them.
    distinct = {(i["block_pid"]["S"], i["block_rid"]["S"]) for i in height_items if i["block_rid"]["S"] != CANONICAL_RID}
    skipped = sum(1 for i in height_items if i["block_rid"]["S"] == "null")
    canonical = sum(1 for i in height_items if i["block_rid"]["S"] == CANONICAL_RID)
    started = time.perf_counter()
    create_block_table(client, table)
    written = write_items(client, table, items)
    seconds = time.perf_counter() - started
    return {
        "items": written,
        "height_items": len(height_items),
        "distinct_blocks": len(distinct),
        "reorged_blocks": len(distinct) - canonical,
        "skipped_heights": skipped,
        "canonical_heights": canonical,
        "seeding_seconds": round(seconds, 2),
    }


def baseline(client: Any, table: str, heights: int) -> dict[str, Any]:
    """A plain serial loop: one Query per height, following LastEvaluatedKey pages."""
    queries = items = 0
    started = time.perf_counter()
    for height in range(heights):
        request: dict[str, Any] = {
            "TableName": table,
            "KeyConditionExpression": "block_pid = :pid",
            "ExpressionAttributeValues": {":pid": {"S": f"{TAG}-{height}"}},
            "ConsistentRead": True,
        }
        while True:
            page = client.query(**request)
            queries += 1
            items += len(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "heights_per_s": round(heights / seconds, 1), "queries": queries, "items": items}


def materialize_all(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, Any]:
    """Materialize each partition in-process, one after the other; the wall time spans them all."""
    resources = shared_resources()
    inner_seconds, per_partition = 0.0, []
    started = time.perf_counter()
    for key in keys:
        partition_started = time.perf_counter()
        result = dg.materialize([block_metadata], partition_key=key, instance=instance, resources=resources)
        if not result.success:
            raise BenchError(f"partition {key} failed")
        failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
        if failed:
            raise BenchError(f"partition {key}: checks failed: {failed}")
        [materialization] = result.asset_materializations_for_node(block_metadata.node_def.name)
        inner_seconds += materialization.metadata["seconds"].value
        per_partition.append(round(time.perf_counter() - partition_started, 2))
        log(f"  {key}: {per_partition[-1]} s")
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "partition_seconds": per_partition, "read_load_seconds": round(inner_seconds, 2)}


def target_counts(target_url: str) -> tuple[int, int]:
    with psycopg.connect(target_url) as conn:
        blocks = conn.execute("SELECT count(*) FROM block_metadata WHERE tag = %s", (TAG,)).fetchone()[0]
        canonical = conn.execute("SELECT count(*) FROM canonical_blocks WHERE tag = %s", (TAG,)).fetchone()[0]
    return blocks, canonical


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_started, load_at_start = time.perf_counter(), load_average()
    table = f"bench_blocks_{uuid.uuid4().hex[:8]}"
    dynalite = start_dynalite()
    try:
        os.environ.update(local_aws_environment(dynalite.url))
        os.environ.update(
            CHAIN_BLOCK_TABLE=table, CHAIN_BLOCK_TAG=str(TAG), CHAIN_BLOCK_RANGE_SIZE=str(args.range_size)
        )
        client = boto3.client("dynamodb")

        log(f"seeding {table} with {args.heights} heights (reorg rate {REORG_RATE}) on {dynalite.url} ...")
        data = seed(client, table, args.heights)
        log(f"  {data['items']} items, {data['distinct_blocks']} distinct blocks in {data['seeding_seconds']} s")

        log("baseline: serial boto3 Query loop ...")
        base = baseline(client, table, args.heights)
        log(f"  {base['heights_per_s']} heights/s ({base['seconds']} s)")
        if base["items"] != data["height_items"]:
            raise BenchError(f"baseline read {base['items']} items, the table holds {data['height_items']}")

        with embedded_postgres() as (target_url, dagster_url):
            os.environ["MIGRATION_DATABASE_URL"] = target_url
            overrides = {"storage": {"postgres": {"postgres_url": dagster_url}}}
            with dg.instance_for_test(overrides=overrides) as instance:
                keys = [range_key(s, s + args.range_size) for s in range(0, args.heights, args.range_size)]
                instance.add_dynamic_partitions(block_ranges.name, keys)
                log(f"asset: materializing {len(keys)} partitions of {block_ranges.name} ...")
                asset = materialize_all(instance, keys)
            rows, canonical_rows = target_counts(target_url)
        asset_heights = len(keys) * args.range_size
        asset["heights_per_s"] = round(asset_heights / asset["seconds"], 1)
        asset["rows"] = rows
        log(f"  {asset['heights_per_s']} heights/s ({asset['seconds']} s), {rows} rows")
        if rows != data["distinct_blocks"]:
            raise BenchError(f"block_metadata holds {rows} rows, the source {data['distinct_blocks']} distinct blocks")
        if canonical_rows != data["canonical_heights"]:
            raise BenchError(f"canonical_blocks holds {canonical_rows} rows, the source {data['canonical_heights']}")
    finally:
        dynalite.stop()

    ratio = asset["heights_per_s"] / base["heights_per_s"]
    return {
        "bench": NAME,
        "machine": machine_info(),
        "data": {
            "heights": args.heights,
            "range_size": args.range_size,
            "partitions": len(keys),
            "tag": TAG,
            "reorg_rate": REORG_RATE,
            **{k: v for k, v in data.items() if k != "seeding_seconds"},
        },
        "source": "dynalite (in-memory DynamoDB API) on loopback",
        "target": "embedded PostgreSQL; Dagster instance on PostgreSQL storage",
        "seeding_seconds": data["seeding_seconds"],
        "baseline": {"what": "serial boto3 client.query loop, one Query per height (+ pages)", **base},
        "asset": {"what": "dg.materialize(block_metadata) per partition, in-process", **asset},
        "unit": "heights/s",
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "peak_rss_mb": peak_rss_mb(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "run_seconds": round(time.perf_counter() - run_started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write_result(NAME, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
