"""The bulk Scan path (chain/scan.py) against real dynalite and PostgreSQL: the same rows as the
per-height path, resume after SIGKILL, the read budget, throttling, and which path `auto` picks."""

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError

from migration_assets.chain.blocks import BlockRangeRequest, migrate_block_range
from migration_assets.chain.events import EventRangeRequest, migrate_event_range
from migration_assets.chain.scan import BLOCKS, EVENTS, ScanRequest, choose_method, run_scan
from migration_assets.chain.source import CANONICAL_RID
from migration_assets.core.postgres import shared_pool
from migration_assets.devstack.sample_chain import block_hash, sample_chain
from migration_assets.devstack.sample_events import chain_events
from migration_assets.files.bandwidth import SharedLimiter, Slot, Timetable
from tests.chain.helpers import TAG, orphan, seed
from tests.conftest import fresh_database

BIG_HEIGHT = 150


def scan_request(kind: str, table: str, tag: int, url: str, start: int = 0, end: int = 10**9, **options) -> ScanRequest:
    defaults = {"range_size": 100, "segments": 4, "chunk": 25}
    return ScanRequest(kind, table, tag, start, end, database_url=url, **(defaults | options))


def chain_with_hard_heights(heights: int) -> list[dict]:
    """A sample chain with reorgs and skips, where some heights lack their canonical item and one
    height's items fill more than one 1 MB Scan page."""
    items = []
    for item in sample_chain(TAG, 0, heights, reorg_rate=0.1, skip_rate=0.05):
        height = item["block_pid"]["S"].split("-")[1]
        if height in ("40", "41", "97") and item["block_rid"]["S"] == CANONICAL_RID:
            continue
        if height == str(BIG_HEIGHT) and item["block_rid"]["S"] == CANONICAL_RID:
            items += [orphan(BIG_HEIGHT, branch, padding={"S": "x" * 350_000}) for branch in big_branches()]
        items.append(item)
    return items


def big_branches() -> list[int]:
    """Four reorged blocks whose hashes sort after the winner's (its items are in key order), so the
    1 MB page ends between the winner's hash item and its canonical copy."""
    winner = block_hash(TAG, BIG_HEIGHT)
    return [b for b in range(50, 500) if block_hash(TAG, BIG_HEIGHT, b) > winner][:4]


def block_rows(conn) -> list[tuple]:
    return conn.execute(
        "SELECT height, tag, hash, parent_hash, parent_height, object_key_main, timestamp, skipped"
        " FROM block_metadata ORDER BY height, hash NULLS LAST"
    ).fetchall()


def canonical_rows(conn) -> list[tuple]:
    return conn.execute(
        "SELECT cb.height, cb.tag, bm.hash, bm.skipped,"
        " bm.id = (SELECT max(id) FROM block_metadata m WHERE m.tag = bm.tag AND m.height = bm.height)"
        " FROM canonical_blocks cb JOIN block_metadata bm ON bm.id = cb.block_metadata_id ORDER BY 1, 2"
    ).fetchall()


def event_rows(conn) -> list[tuple]:
    return conn.execute(
        "SELECT e.event_tag, e.event_sequence, e.event_type::text, e.height, bm.hash, bm.height, bm.skipped"
        " FROM block_events e JOIN block_metadata bm ON bm.id = e.block_metadata_id ORDER BY 1, 2"
    ).fetchall()


def pages_split_height(client, table: str, segments: int, height: int) -> bool:
    """Whether a Scan page of some segment ends inside the height's items."""
    for segment in range(segments):
        args = {"TableName": table, "Segment": segment, "TotalSegments": segments}
        while True:
            page = client.scan(**args)
            key = page.get("LastEvaluatedKey")
            if not key:
                break
            if key["block_pid"]["S"] == f"{TAG}-{height}":
                return True
            args["ExclusiveStartKey"] = key
    return False


@pytest.mark.parametrize("page_items", [None, 3], ids=["1MB-pages", "3-item-pages"])
def test_scan_gives_the_rows_of_the_per_height_path(
    pg_server_url, target_url, dynamodb, block_table, event_table, page_items,
):
    events_table, layout = event_table
    heights = 300
    blocks = chain_with_hard_heights(heights)
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_table, events)
    assert pages_split_height(dynamodb, block_table, 4, BIG_HEIGHT), "the big height must span two pages"

    query_url = fresh_database(pg_server_url)
    pool = shared_pool(query_url)
    migrate_block_range(BlockRangeRequest(dynamodb, block_table, TAG, 0, heights), pool)
    migrate_event_range(EventRangeRequest(dynamodb, events_table, layout.event_tag, 1, len(events)), pool)

    block_scan = run_scan(scan_request(BLOCKS, block_table, TAG, target_url, page_items=page_items), dynamodb)
    event_scan = run_scan(
        scan_request(EVENTS, events_table, layout.event_tag, target_url, range_size=200, page_items=page_items),
        dynamodb,
    )

    with psycopg.connect(query_url) as by_query, psycopg.connect(target_url) as by_scan:
        assert block_rows(by_scan) == block_rows(by_query)
        assert canonical_rows(by_scan) == canonical_rows(by_query)
        assert event_rows(by_scan) == event_rows(by_query)
        assert all(row[4] for row in canonical_rows(by_scan)), "the canonical block has its height's highest id"
        assert {40, 41, 97}.isdisjoint(row[0] for row in canonical_rows(by_scan))
        assert len([r for r in block_rows(by_scan) if r[0] == BIG_HEIGHT]) >= 5
    assert block_scan.failed_ranges == [], block_scan.checks
    assert event_scan.failed_ranges == [], event_scan.checks
    assert sorted(block_scan.checks) == ["000000000000-000000000100", "000000000100-000000000200",
                                         "000000000200-000000000300"]
    assert sum(c.blocks for c in block_scan.counts.values()) == len(block_rows(psycopg.connect(target_url)))


def test_heights_outside_the_span_or_above_the_watermark_are_skipped(target_url, dynamodb, block_table):
    items = list(sample_chain(TAG, 0, 100, skip_rate=0.0, reorg_rate=0.0))
    watermark = items.pop()  # the "{tag}-latest" item, moved down to height 79
    items += [{**i, "block_pid": watermark["block_pid"]} for i in items if i["block_pid"]["S"] == f"{TAG}-79"
              and i["block_rid"]["S"] == CANONICAL_RID]
    seed(dynamodb, block_table, items)

    summary = run_scan(scan_request(BLOCKS, block_table, TAG, target_url, start=10, end=200), dynamodb)

    with psycopg.connect(target_url) as conn:
        heights = sorted({row[0] for row in block_rows(conn)})
    assert heights == list(range(10, 80))
    assert summary.failed_ranges == []


def test_events_whose_blocks_are_missing_fail_loudly(target_url, dynamodb, block_table, event_table):
    events_table, layout = event_table
    blocks = list(sample_chain(TAG, 0, 50))
    seed(dynamodb, events_table, chain_events(blocks, layout))

    with pytest.raises(Exception, match="not in block_metadata.*--skip-events"):
        run_scan(scan_request(EVENTS, events_table, layout.event_tag, target_url), dynamodb)
    with psycopg.connect(target_url) as conn:
        assert conn.execute("SELECT count(*) FROM block_events").fetchone()[0] == 0


# --- SIGKILL and resume ---------------------------------------------------------------------------

def run_scan_from_argv() -> None:
    """Entry point of the killed subprocess: argv[1] is the request as JSON."""
    fields = json.loads(sys.argv[1])
    run_scan(ScanRequest(**fields), boto3.client("dynamodb"))


def scanned_items(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT coalesce(sum(items), 0) FROM chain_scan_segments").fetchone()[0]


def test_a_scan_killed_mid_segment_resumes_and_ends_exact(target_url, dynamodb, block_table):
    items = list(sample_chain(TAG, 0, 3000, reorg_rate=0.1, skip_rate=0.05))
    seed(dynamodb, block_table, items)
    fields = {"kind": BLOCKS, "table": block_table, "tag": TAG, "start": 0, "end": 10**9, "range_size": 1000,
              "database_url": target_url, "segments": 2, "chunk": 10, "page_items": 5}
    code = "import tests.chain.test_scan as t; t.run_scan_from_argv()"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(fields)], env=env)
    deadline = time.monotonic() + 120
    while scanned_items(target_url) < 500 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = scanned_items(target_url)
    assert 0 < killed_at < len(items), "killed mid-scan"

    summary = run_scan(ScanRequest(**fields), dynamodb)

    assert scanned_items(target_url) == len(items), "every item read and committed exactly once"
    assert summary.items == len(items)
    assert 0 < summary.segments_run <= 2, "resumed"
    assert summary.failed_ranges == []
    source_blocks = {(i["block_pid"]["S"], i["block_hash"]["S"]) for i in items
                     if i["block_rid"]["S"] != CANONICAL_RID and not i["block_pid"]["S"].endswith("latest")}
    assert sum(c.blocks for c in summary.counts.values()) == len(source_blocks)
    with psycopg.connect(target_url) as conn:
        assert len(block_rows(conn)) == len(source_blocks)
        assert conn.execute("SELECT count(*) FROM canonical_blocks").fetchone()[0] == 3000


# --- read budget and throttling -------------------------------------------------------------------

class SimulatedClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class MeteredClient:
    """The real client, recording each Scan's consumed units at the simulated time it returned."""

    def __init__(self, client, clock: SimulatedClock) -> None:
        self.client, self.clock, self.pages = client, clock, []

    def scan(self, **args):
        page = self.client.scan(**args)
        self.pages.append((self.clock.now, page["ConsumedCapacity"]["CapacityUnits"]))
        return page

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_the_read_budget_holds_consumed_units_near_the_limit(target_url, dynamodb, block_table, tmp_path):
    pad = {"padding": {"S": "p" * 3000}}  # about one read unit an item
    items = [{**i, **pad} for i in sample_chain(TAG, 0, 600, reorg_rate=0.0, skip_rate=0.0)]
    seed(dynamodb, block_table, items)
    clock, limit = SimulatedClock(), 10
    limiter = SharedLimiter(Timetable((Slot(0, limit),)), None, tmp_path / "scan.bucket",
                            clock=clock.time, sleep=clock.sleep)
    metered = MeteredClient(dynamodb, clock)

    run_scan(scan_request(BLOCKS, block_table, TAG, target_url, page_items=10), metered, limiter)

    units = sum(u for _, u in metered.pages)
    seconds = clock.now - 1_000_000.0
    assert units > 20 * limit, "enough reads to measure a rate"
    assert 0.9 * limit <= units / seconds <= 1.1 * limit
    per_second: dict[int, float] = {}
    for at, used in metered.pages:
        per_second[int(at)] = per_second.get(int(at), 0) + used
    biggest_page = max(u for _, u in metered.pages)
    assert max(per_second.values()) <= limit + biggest_page


class ThrottlingClient:
    """The real client, whose every third Scan is refused as DynamoDB refuses an over-budget read."""

    def __init__(self, client) -> None:
        self.client, self.calls, self.refused = client, 0, 0

    def scan(self, **args):
        self.calls += 1
        if self.calls % 3 == 0:
            self.refused += 1
            error = {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "over budget"}}
            raise ClientError(error, "Scan")
        return self.client.scan(**args)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_throttled_reads_back_off_and_keep_the_segment_place(target_url, dynamodb, block_table):
    items = list(sample_chain(TAG, 0, 200, reorg_rate=0.1, skip_rate=0.05))
    seed(dynamodb, block_table, items)
    client = ThrottlingClient(dynamodb)

    summary = run_scan(scan_request(BLOCKS, block_table, TAG, target_url, page_items=20), client)

    assert client.refused > 5
    assert summary.items == len(items) and summary.failed_ranges == []


# --- which path ------------------------------------------------------------------------------------

def test_auto_picks_scan_for_large_spans_and_the_whole_table():
    assert choose_method("auto", 0, 20_000, 10_000, whole_table=False)[0] == "query"
    assert choose_method("auto", 0, 490_000, 10_000, whole_table=False)[0] == "query"
    assert choose_method("auto", 0, 500_000, 10_000, whole_table=False)[0] == "scan"
    assert choose_method("auto", 0, 30_000, 10_000, whole_table=True)[0] == "scan"
    assert choose_method("query", 0, 10**7, 10_000, whole_table=True)[0] == "query"
    assert choose_method("scan", 0, 10, 10_000, whole_table=False)[0] == "scan"


def test_cli_auto_takes_each_path_where_it_should(
    dagster_home, fresh_instance, dynamodb, block_table, event_table, target, monkeypatch, capsys,
):
    from migration_assets.cli import main

    # An instance of its own: the partitions it shows materialized are this test's alone.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", fresh_instance.run_storage.postgres_url)
    events_table, layout = event_table
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_SCAN_SEGMENTS", "3")
    blocks = list(sample_chain(TAG, 0, 600, reorg_rate=0.1, skip_rate=0.05))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_table, events)

    assert main(["chain", "migrate", "--start-height", "0", "--end-height", "30", "--skip-events"]) == 0
    assert "method: query (3 block ranges < 50" in capsys.readouterr().out
    assert main(["chain", "migrate", "--start-height", "0", "--end-height", "500", "--skip-events"]) == 0
    out = capsys.readouterr().out
    assert "method: scan (50 block ranges >= 50" in out and "blocks: scanned" in out, out
    assert main(["chain", "migrate", "--start-height", "0", "--end-height", "30", "--method", "scan", "--skip-events"]) == 0
    assert "method: scan (--method scan)" in capsys.readouterr().out

    assert main(["chain", "migrate", "--start-height", "0"]) == 0
    out = capsys.readouterr().out
    assert "method: scan (the whole table is asked for" in out and "events: scanned" in out, out
    assert "FAILED" not in out
    assert len(block_rows(target)) == len({(i["block_pid"]["S"], i["block_hash"]["S"]) for i in blocks
                                           if i["block_rid"]["S"] != CANONICAL_RID and "latest" not in i["block_pid"]["S"]})
    assert [row[1] for row in event_rows(target)] == list(range(1, len(events)))
    import dagster as dg

    from migration_assets.chain.assets import BLOCK_EVENTS, BLOCK_METADATA
    instance = dg.DagsterInstance.get()
    assert instance.get_materialized_partitions(BLOCK_EVENTS) == {"000000000000-000000100000"}
    assert len(instance.get_materialized_partitions(BLOCK_METADATA)) == 60


def test_block_scan_asset_reports_the_ranges_it_covered(fresh_instance, dynamodb, block_table, target, monkeypatch):
    import dagster as dg

    from migration_assets.chain.assets import BLOCK_METADATA
    from migration_assets.chain.assets_scan import BLOCK_SCAN, block_scan, scan_segments
    from migration_assets.chain.checks import BLOCK_CHECK_NAMES
    from migration_assets.definitions import shared_resources

    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "100")
    blocks = list(sample_chain(TAG, 0, 250, reorg_rate=0.1, skip_rate=0.05))
    seed(dynamodb, block_table, blocks)
    keys = scan_segments.get_partition_keys()

    for key in keys:
        result = dg.materialize([block_scan], partition_key=key, instance=fresh_instance,
                                resources=shared_resources(), raise_on_error=False)
        assert result.success
        [own] = [m for m in result.asset_materializations_for_node("chain__block_scan") if m.asset_key == BLOCK_SCAN]
        reported = own.metadata["ranges_reported"].value
        assert reported == (3 if key == keys[-1] else 0), "only the last segment to finish reports"

    again = dg.materialize([block_scan], partition_key=keys[0], instance=fresh_instance,
                           resources=shared_resources(), raise_on_error=False)
    assert again.success, "a finished scan's segment runs again and reports its ranges again"
    ranges = ["000000000000-000000000100", "000000000100-000000000200", "000000000200-000000000300"]
    assert set(ranges) <= set(fresh_instance.get_dynamic_partitions("chain_block_ranges"))
    materialized = fresh_instance.get_materialized_partitions(BLOCK_METADATA)
    assert materialized == set(ranges)
    for name in BLOCK_CHECK_NAMES:
        check_key = dg.AssetCheckKey(BLOCK_METADATA, name)
        records = fresh_instance.event_log_storage.get_asset_check_execution_history(check_key, limit=10)
        assert len(records) == 6, name
        assert all(r.evaluation is not None and r.evaluation.passed for r in records), name
        assert {r.evaluation.partition for r in records} == set(ranges), name
    assert len(block_rows(target)) == sum(1 for i in blocks if i["block_rid"]["S"] != CANONICAL_RID
                                          and "latest" not in i["block_pid"]["S"])


def test_a_scan_into_a_new_database_brings_its_schema(pg_server_url, dynamodb, block_table):
    import uuid

    from migration_assets.core import embedded

    name = f"empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = embedded.database_url(pg_server_url, name)
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 20)))

    summary = run_scan(scan_request(BLOCKS, block_table, TAG, url), dynamodb)

    assert summary.failed_ranges == [] and summary.items == 41


def test_a_table_without_a_watermark_has_nothing_to_scan_yet(target_url, dynamodb, block_table):
    items = [i for i in sample_chain(TAG, 0, 20) if "latest" not in i["block_pid"]["S"]]
    seed(dynamodb, block_table, items)
    request = scan_request(BLOCKS, block_table, TAG, target_url)

    assert run_scan(request, dynamodb).counts == {}
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 20)))  # the watermark arrives
    summary = run_scan(request, dynamodb)

    assert len(summary.counts) == 1 and summary.failed_ranges == []
    with psycopg.connect(target_url) as conn:
        assert len({row[0] for row in block_rows(conn)}) == 20


def test_event_scan_asset_reports_the_event_ranges_it_covered(
    fresh_instance, dynamodb, block_table, event_table, target, monkeypatch,
):
    import dagster as dg

    from migration_assets.chain.assets import BLOCK_EVENTS
    from migration_assets.chain.assets_scan import EVENT_SCAN, block_scan, event_scan, scan_segments
    from migration_assets.chain.event_checks import EVENT_CHECK_NAMES
    from migration_assets.chain.ranges import covering_ranges, range_key
    from migration_assets.definitions import shared_resources

    events_table, layout = event_table
    monkeypatch.setenv("CHAIN_EVENT_RANGE_SIZE", "100")
    blocks = list(sample_chain(TAG, 0, 200, reorg_rate=0.1, skip_rate=0.05))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_table, events)
    keys = scan_segments.get_partition_keys()

    def run(asset, key):
        return dg.materialize([asset], partition_key=key, instance=fresh_instance,
                              resources=shared_resources(), raise_on_error=False)

    early = run(event_scan, keys[0])
    assert not early.success, "events before their blocks fail, naming them"
    [failure] = [e for e in early.all_events if e.is_step_failure]
    assert "not in block_metadata" in failure.step_failure_data.error.message
    assert event_rows(target) == []

    for key in keys:
        assert run(block_scan, key).success
    ranges = {range_key(s, e) for s, e in covering_ranges(1, len(events), 100)}
    assert len(ranges) >= 2
    for key in keys:
        result = run(event_scan, key)
        assert result.success
        [own] = [m for m in result.asset_materializations_for_node("chain__event_scan") if m.asset_key == EVENT_SCAN]
        assert own.metadata["ranges_reported"].value == (len(ranges) if key == keys[-1] else 0)

    assert fresh_instance.get_materialized_partitions(BLOCK_EVENTS) == ranges
    for name in EVENT_CHECK_NAMES:
        records = fresh_instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(BLOCK_EVENTS, name), limit=10)
        assert {r.evaluation.partition for r in records} == ranges, name
        assert all(r.evaluation.passed for r in records), (name, [r.evaluation.description for r in records])
    assert [row[1] for row in event_rows(target)] == list(range(1, len(events)))  # the last item: the watermark
