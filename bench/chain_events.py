"""Block-events asset throughput (events/s) against a raw BatchGetItem read and a raw COPY, same run, same data.

dynalite serves an event table seeded from a sample chain (reorgs, skipped blocks), cut at exactly
--events events; the blocks those events refer to are put into PostgreSQL directly (not measured, and
not seeded in DynamoDB). Two raw figures on the same rows:

  raw COPY  one COPY of the same rows, block_metadata_id resolved beforehand, into an empty block_events
            (then emptied again);
  raw read  a plain boto3 BatchGetItem loop (100 ids per call, UnprocessedKeys retried) over every id,
            in a thread pool as wide as the asset's read_concurrency.

The asset materializes every event-range partition covering the ids into the embedded PostgreSQL, with
a Dagster instance on PostgreSQL storage. The raw read goes range by range, each range's ids read just
before the asset materializes that partition, so that other load on the machine skews both alike. The
ratio is the asset's events/s over the slower raw figure.

    python bench/chain_events.py                    # 1,000,000 events in 100,000-id partitions
    python bench/chain_events.py --events 20000     # smoke run
    python bench/chain_events.py --event-tag 2      # the versioned ("{tag}-{seq}") layout
"""

import argparse
import gc
import os
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby, islice
from typing import Any

import boto3
import dagster as dg
import psycopg
from botocore.config import Config

try:
    from bench.common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result
except ImportError:  # run as a script: bench/ is on sys.path
    from common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result

from migration_assets.chain.assets import block_events
from migration_assets.chain.event_source import EventLayout
from migration_assets.chain.loader import load_heights
from migration_assets.chain.partitions import event_ranges, register_ranges
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.source import order_height
from migration_assets.core.schema import apply_migrations
from migration_assets.definitions import shared_resources
from migration_assets.devstack.sample_chain import sample_chain, write_items
from migration_assets.devstack.sample_events import ADDED, chain_events, create_event_table, watermark_item
from migration_assets.devstack.servers import local_aws_environment, start_dynalite

NAME = "chain_events"
BLOCK_TAG = 1
REORG_RATE = 0.02
TARGET_RATIO = 0.5
BATCH = 100  # keys per BatchGetItem call, DynamoDB's limit
BLOCK_CHUNK = 10_000  # heights per load_heights transaction while seeding PostgreSQL
READ_CONCURRENCY = ChainSourceResource().read_concurrency  # the asset's default (16 threads)
COPY_COLUMNS = ("event_tag", "event_sequence", "event_type", "block_metadata_id", "height", "hash")
TYPE_NAMES = {ADDED: "BLOCK_ADDED", 2: "BLOCK_REMOVED", 0: "UNKNOWN"}

# The same figure whoever wrote the rows: a checksum of block_events, to prove the asset wrote what COPY did.
CHECKSUM_SQL = """
SELECT count(*), coalesce(sum(hashtextextended(
    event_tag || ':' || event_sequence || ':' || event_type || ':' || block_metadata_id || ':' || height
    || ':' || coalesce(hash, ''), 0)::numeric), 0)::text
FROM block_events
"""

# (sequence, type, height, hash or None, skipped): what the baselines need of each seeded event.
EventRow = tuple[int, int, int, str | None, bool]


class BenchError(RuntimeError):
    """The measured run did not produce what the seeded data says it must."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events seeded and read (default 1000000)")
    parser.add_argument("--event-tag", type=int, default=0, help="event tag: 0 legacy layout, >= 1 versioned (default 0)")
    parser.add_argument("--range-size", type=int, default=100_000, help="event ids per partition (default 100000)")
    args = parser.parse_args(argv)
    if args.events <= 0 or args.range_size <= 0 or args.event_tag < 0:
        parser.error("--events and --range-size must be positive, --event-tag not negative")
    args.range_size = min(args.range_size, args.events)  # a smoke run is one full partition of its ids
    return args


def seed_events(client: Any, table: str, layout: EventLayout, events: int) -> tuple[list[EventRow], dict[str, Any]]:
    """Create the event table and fill it with the first `events` events of the sample chain plus a
    watermark at `events`; return the events (compactly) and what the table holds."""
    seeded: list[EventRow] = []

    def items() -> Iterator[dict[str, Any]]:
        # Every height yields at least one event, so events + 1 heights always hold enough of them.
        for item in islice(chain_events(sample_chain(BLOCK_TAG, 0, events + 1, reorg_rate=REORG_RATE), layout), events):
            if "sequence" not in item:
                raise BenchError("the sample chain ran out of events before the cut")
            skipped = item["skipped"]["BOOL"]
            seeded.append((
                int(item["sequence"]["N"]), int(item["type"]["N"]), int(item["height"]["N"]),
                None if skipped else item["hash"]["S"], skipped,
            ))
            yield item
        yield watermark_item(layout, events)

    started = time.perf_counter()
    create_event_table(client, table, layout)
    written = write_items(client, table, items())
    seconds = time.perf_counter() - started
    if len(seeded) != events or [row[0] for row in (seeded[0], seeded[-1])] != [1, events]:
        raise BenchError(f"seeded {len(seeded)} events, wanted ids 1-{events}")
    by_type: dict[str, int] = {}
    for row in seeded:
        by_type[TYPE_NAMES[row[1]]] = by_type.get(TYPE_NAMES[row[1]], 0) + 1
    return seeded, {
        "items": written,
        "last_height": seeded[-1][2],
        "by_type": by_type,
        "skipped_block_events": sum(1 for row in seeded if row[4]),
        "seconds": round(seconds, 2),
    }


def raw_read(client: Any, table: str, layout: EventLayout, first: int, end: int, concurrency: int) -> tuple[int, int, float]:
    """A plain BatchGetItem loop over ids [first, end), `concurrency` calls in flight; the items are
    counted. Returns (items, calls, retried calls, seconds)."""
    starts = range(first, end, BATCH)
    calls = [0] * len(starts)

    def fetch(index: int) -> int:
        ids = range(starts[index], min(starts[index] + BATCH, end))
        request = {table: {"Keys": [layout.key(i) for i in ids], "ConsistentRead": True}}
        got = 0
        while request:
            reply = client.batch_get_item(RequestItems=request)
            calls[index] += 1
            got += len(reply.get("Responses", {}).get(table, []))
            request = reply.get("UnprocessedKeys") or {}
            if request:
                time.sleep(0.05)
        return got

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="raw-read") as pool:
        items = sum(pool.map(fetch, range(len(starts))))
    seconds = time.perf_counter() - started
    return items, sum(calls), sum(calls) - len(starts), seconds


def seed_blocks(conn: psycopg.Connection, last_height: int) -> dict[str, Any]:
    """Put the blocks of heights 0..last_height into block_metadata/canonical_blocks with the project's
    loader (not measured): the same deterministic sample chain the events came from."""
    started = time.perf_counter()
    items = sample_chain(BLOCK_TAG, 0, last_height + 1, reorg_rate=REORG_RATE)
    heights = (
        order_height(BLOCK_TAG, int(pid.rpartition("-")[2]), list(group))
        for pid, group in groupby(items, key=lambda i: i["block_pid"]["S"])
        if not pid.endswith("-latest")
    )
    blocks = count = 0
    while chunk := list(islice(heights, BLOCK_CHUNK)):
        blocks += load_heights(conn, chunk)
        count += len(chunk)
    conn.execute("ANALYZE block_metadata")
    conn.execute("ANALYZE canonical_blocks")
    return {"heights": count, "blocks": blocks, "seconds": round(time.perf_counter() - started, 2)}


def event_rows(conn: psycopg.Connection, event_tag: int, seeded: list[EventRow]) -> list[tuple]:
    """block_events rows of the seeded events, their block ids resolved with one query (not measured)."""
    by_hash: dict[str, int] = {}
    by_height: dict[int, int] = {}
    for block_id, height, block_hash, skipped in conn.execute(
        "SELECT id, height, hash, skipped FROM block_metadata WHERE tag = %s", (BLOCK_TAG,)
    ):
        if skipped:
            by_height[height] = block_id
        else:
            by_hash[block_hash] = block_id
    try:
        return [
            (event_tag, seq, TYPE_NAMES[kind], by_height[height] if skipped else by_hash[block_hash], height, block_hash)
            for seq, kind, height, block_hash, skipped in seeded
        ]
    except KeyError as error:
        raise BenchError(f"an event's block is not in block_metadata: {error}") from error


def raw_copy(conn: psycopg.Connection, rows: list[tuple]) -> dict[str, Any]:
    """One COPY of every row into the (empty) block_events, with its keys, indexes and foreign key."""
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(f"COPY block_events ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "events_per_s": round(len(rows) / seconds, 1)}


def measure_ranges(
    instance: dg.DagsterInstance, client: Any, table: str, layout: EventLayout, events: int, keys: list[str]
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Per partition, one after the other: the raw read of its ids, then the asset materializing it
    in-process. Interleaved, so that other load on the machine falls on both figures alike."""
    resources = shared_resources()
    name = block_events.node_def.name
    read_seconds, read_items, read_calls, read_retried = 0.0, 0, 0, 0
    asset_seconds, inner_seconds, asset_events, warnings = 0.0, 0.0, 0, []
    per_partition: list[dict[str, Any]] = []
    for key in keys:
        start, end = parse_range_key(key)
        items, calls, retried, seconds = raw_read(client, table, layout, max(start, 1), min(end, events + 1), READ_CONCURRENCY)
        read_seconds, read_items = read_seconds + seconds, read_items + items
        read_calls, read_retried = read_calls + calls, read_retried + retried

        partition_started = time.perf_counter()
        result = dg.materialize([block_events], partition_key=key, instance=instance, resources=resources)
        partition_seconds = time.perf_counter() - partition_started
        if not result.success:
            raise BenchError(f"partition {key} failed")
        evaluations = result.get_asset_check_evaluations()
        failed = [e.check_name for e in evaluations if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR]
        if failed or len(evaluations) != 5:
            raise BenchError(f"partition {key}: ERROR checks failed: {failed} ({len(evaluations)} checks evaluated)")
        warnings += [f"{key}: {e.check_name}: {e.description}" for e in evaluations if not e.passed]
        [materialization] = result.asset_materializations_for_node(name)
        loaded = materialization.metadata["events"].value
        if loaded != items:
            raise BenchError(f"partition {key}: the asset loaded {loaded} events, the raw read got {items}")
        asset_seconds += partition_seconds
        inner_seconds += materialization.metadata["seconds"].value
        asset_events += loaded
        per_partition.append({"key": key, "events": loaded, "raw_read_seconds": round(seconds, 2),
                              "asset_seconds": round(partition_seconds, 2)})
        log(f"  {key}: {loaded} events, raw read {seconds:.2f} s, asset {partition_seconds:.2f} s")
    read = {
        "seconds": round(read_seconds, 3), "events_per_s": round(read_items / read_seconds, 1),
        "items": read_items, "calls": read_calls, "retried_calls": read_retried,
        "concurrency": READ_CONCURRENCY,
    }
    asset = {
        "seconds": round(asset_seconds, 3), "events": asset_events,
        # The asset's own "seconds" spans reading and loading; checks and Dagster's run overhead are the rest.
        "read_load_seconds": round(inner_seconds, 2),
        "checks_and_dagster_seconds": round(asset_seconds - inner_seconds, 2),
        "warn_checks_failed": warnings,
    }
    return read, asset, per_partition


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_started, load_at_start = time.perf_counter(), load_average()
    layout = EventLayout(args.event_tag)
    table = f"bench_events_{uuid.uuid4().hex[:8]}"
    dynalite = start_dynalite()
    try:
        os.environ.update(local_aws_environment(dynalite.url))
        os.environ.update(
            CHAIN_EVENT_TABLE=table, CHAIN_EVENT_TAG=str(args.event_tag),
            CHAIN_EVENT_RANGE_SIZE=str(args.range_size), CHAIN_BLOCK_TAG=str(BLOCK_TAG),
        )
        # The asset's client settings (pool, retries, no parameter validation), so both read alike.
        client = boto3.client("dynamodb", config=Config(
            retries={"max_attempts": 10, "mode": "standard"}, max_pool_connections=READ_CONCURRENCY + 4,
            parameter_validation=False,
        ))

        log(f"seeding {table} (event tag {args.event_tag}) with {args.events} events on {dynalite.url} ...")
        seeded, data = seed_events(client, table, layout, args.events)
        log(f"  {data['items']} items (heights 0-{data['last_height']}) in {data['seconds']} s")

        with embedded_postgres() as (target_url, dagster_url):
            os.environ["MIGRATION_DATABASE_URL"] = target_url
            with psycopg.connect(target_url, autocommit=True) as conn:
                apply_migrations(conn)
                log(f"putting heights 0-{data['last_height']} into block_metadata ...")
                blocks = seed_blocks(conn, data["last_height"])
                log(f"  {blocks['blocks']} blocks in {blocks['seconds']} s")
                rows = event_rows(conn, args.event_tag, seeded)
                del seeded

                log("raw COPY into an empty block_events ...")
                copy = raw_copy(conn, rows)
                del rows
                count, copy_checksum = conn.execute(CHECKSUM_SQL).fetchone()
                log(f"  {copy['events_per_s']} events/s ({copy['seconds']} s)")
                if count != args.events:
                    raise BenchError(f"raw COPY left {count} rows, wanted {args.events}")
                conn.execute("TRUNCATE block_events")
            gc.collect()

            overrides = {"storage": {"postgres": {"postgres_url": dagster_url}}}
            with dg.instance_for_test(overrides=overrides) as instance:
                keys = register_ranges(instance, event_ranges, 1, args.events + 1, args.range_size)
                log(f"raw read (BatchGetItem x{BATCH} ids, {READ_CONCURRENCY} threads), then the asset, "
                    f"for each of {len(keys)} partitions of {event_ranges.name} ...")
                read, asset, per_partition = measure_ranges(instance, client, table, layout, args.events, keys)
            with psycopg.connect(target_url) as conn:
                rows_after, asset_checksum = conn.execute(CHECKSUM_SQL).fetchone()
        asset["events_per_s"] = round(args.events / asset["seconds"], 1)
        asset["rows"] = rows_after
        log(f"  raw read {read['events_per_s']} events/s ({read['seconds']} s); "
            f"asset {asset['events_per_s']} events/s ({asset['seconds']} s), {rows_after} rows")
        if read["items"] != args.events:
            raise BenchError(f"raw read got {read['items']} items, the table holds {args.events} events")
        if rows_after != args.events or asset["events"] != args.events:
            raise BenchError(f"block_events holds {rows_after} rows ({asset['events']} reported), wanted {args.events}")
        if asset_checksum != copy_checksum:
            raise BenchError("the asset's block_events rows differ from the raw COPY's")
    finally:
        dynalite.stop()

    slower = min(("raw_read", read), ("raw_copy", copy), key=lambda pair: pair[1]["events_per_s"])
    ratio = asset["events_per_s"] / slower[1]["events_per_s"]
    return {
        "bench": NAME,
        "machine": machine_info(),
        "data": {
            "events": args.events,
            "event_tag": args.event_tag,
            "layout": "legacy (numeric event_id)" if layout.legacy else "versioned (\"{tag}-{seq}\")",
            "range_size": args.range_size,
            "partitions": len(keys),
            "block_tag": BLOCK_TAG,
            "reorg_rate": REORG_RATE,
            "heights": blocks["heights"],
            "blocks": blocks["blocks"],
            "event_items": data["items"],
            "by_type": data["by_type"],
            "skipped_block_events": data["skipped_block_events"],
        },
        "source": "dynalite (in-memory DynamoDB API) on loopback",
        "target": "embedded PostgreSQL; Dagster instance on PostgreSQL storage",
        "seeding_seconds": {"dynamodb_events": data["seconds"], "postgres_blocks": blocks["seconds"]},
        "raw_read": {
            "what": f"boto3 batch_get_item loop, {BATCH} ids a call, UnprocessedKeys retried, "
            f"{READ_CONCURRENCY} threads (the asset's read_concurrency and client config), "
            "each partition's ids read just before the asset materializes it",
            **read,
        },
        "raw_copy": {
            "what": "one psycopg COPY of the same rows (block ids resolved beforehand) into an empty "
            "block_events with its primary key, indexes and foreign key",
            **copy,
        },
        "baseline": {"what": "the slower raw figure", "name": slower[0], "events_per_s": slower[1]["events_per_s"]},
        "asset": {"what": "dg.materialize(block_events) per partition, in-process", **asset},
        "partitions": per_partition,
        "unit": "events/s",
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
