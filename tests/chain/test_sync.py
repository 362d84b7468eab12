"""Continuous sync: the pure planner, and the sensor driven tick by tick against a growing source."""

import dagster as dg
from dagster._core.utils import make_new_run_id

from migration_assets.chain.assets import SYNC_TAG, block_events, block_metadata
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.sensors import chain_sync
from migration_assets.chain.sync import StreamCursor, plan_stream
from migration_assets.definitions import shared_resources
from migration_assets.devstack.sample_chain import block_hash, block_item, sample_chain
from migration_assets.devstack.sample_events import ADDED, REMOVED, chain_events, event_item, watermark_item
from tests.chain.helpers import TAG, seed


def test_completed_ranges_are_planned_once_and_capped_per_tick():
    first = plan_stream("blocks", StreamCursor(), tip=54, size=10, max_new_ranges=3)
    assert [run.key[-4:] for run in first.runs] == ["0010", "0020", "0030"]
    assert all(run.complete for run in first.runs) and first.cursor.next_start == 30
    second = plan_stream("blocks", first.cursor, tip=54, size=10, max_new_ranges=3)
    assert [(run.key, run.complete) for run in second.runs] == [
        ("000000000030-000000000040", True), ("000000000040-000000000050", True), ("000000000050-000000000060", False),
    ]
    again = plan_stream("blocks", second.cursor, tip=54, size=10, max_new_ranges=3)
    assert again.runs == [] and again.cursor == second.cursor


def test_the_open_range_reruns_when_the_tip_moves_or_reorgs():
    caught_up = StreamCursor(next_start=50, synced_tip="54:a")
    assert plan_stream("b", caught_up, 54, 10, tip_marker="54:a").runs == []
    reorg = plan_stream("b", caught_up, 54, 10, tip_marker="54:b")
    assert [run.run_key for run in reorg.runs] == ["b:000000000050-000000000060@54:b"]
    near_boundary = plan_stream("b", StreamCursor(next_start=50), 51, 10, reorg_margin=5)
    assert [run.key for run in near_boundary.runs] == ["000000000050-000000000060", "000000000040-000000000050"]


def test_no_source_yet_plans_nothing():
    plan = plan_stream("events", StreamCursor(), None, 10, first_id=1)
    assert plan.runs == [] and plan.new_keys == []


def tick(instance, cursor):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"chain_source": ChainSourceResource()}
    )
    result = chain_sync(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def execute(instance, result):
    """Run what the sensor requested, blocks before events, as the daemon would (with retries)."""
    assets = {block_metadata.key: block_metadata, block_events.key: block_events}
    requests = sorted(result.run_requests, key=lambda r: r.asset_selection[0] != block_metadata.key)
    for request in requests:
        outcome = dg.materialize(
            [assets[request.asset_selection[0]]], partition_key=request.partition_key, instance=instance,
            resources=shared_resources(), tags=request.tags, raise_on_error=False,
        )
        assert outcome.success, request


def planned(result):
    return sorted((r.asset_selection[0].path[-1], r.partition_key, r.tags[SYNC_TAG]) for r in result.run_requests)


def test_sensor_follows_a_growing_chain(instance, dynamodb, block_table, event_table, target, monkeypatch):
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_EVENT_RANGE_SIZE", "20")
    events_table, layout = event_table
    chain = list(sample_chain(TAG, 0, 35, reorg_rate=0.0, skip_rate=0.0))
    events = list(chain_events(chain, layout))  # 35 events, one ADDED per height
    early = [i for i in chain if "latest" not in i["block_pid"]["S"] and int(i["height"]["N"]) < 25]
    seed(dynamodb, block_table, early + [{**early[-1], "block_pid": {"S": f"{TAG}-latest"}}])
    seed(dynamodb, events_table, events[:25] + [watermark_item(layout, 25)])

    first = tick(instance, None)
    assert planned(first) == [
        ("block_events", "000000000000-000000000020", "complete"),
        ("block_events", "000000000020-000000000040", "tip"),
        ("block_metadata", "000000000000-000000000010", "complete"),
        ("block_metadata", "000000000010-000000000020", "complete"),
        ("block_metadata", "000000000020-000000000030", "tip"),
    ]
    assert "000000000020-000000000030" in instance.get_dynamic_partitions("chain_block_ranges")
    execute(instance, first)
    assert target.execute("SELECT count(*), max(height) FROM canonical_blocks").fetchone() == (25, 24)
    assert target.execute("SELECT max(event_sequence) FROM block_events").fetchone()[0] == 25

    # A restarted daemon resumes from the stored cursor: nothing is requested twice.
    assert tick(instance, first.cursor).run_requests == []

    seed(dynamodb, block_table, chain)  # grows to height 34, with the watermark
    seed(dynamodb, events_table, events)
    grown = tick(instance, first.cursor)
    assert planned(grown) == [
        ("block_events", "000000000020-000000000040", "tip"),
        ("block_metadata", "000000000020-000000000030", "complete"),
        ("block_metadata", "000000000030-000000000040", "tip"),
    ]
    execute(instance, grown)
    assert target.execute("SELECT count(*), max(height) FROM canonical_blocks").fetchone() == (35, 34)
    assert target.execute("SELECT max(event_sequence) FROM block_events").fetchone()[0] == 35

    # A reorg at the tip: heights 33-34 get new winners; the watermark keeps its height.
    new33 = block_item(TAG, 33, block_hash(TAG, 33, 1), hash=block_hash(TAG, 33, 1), parent_hash=block_hash(TAG, 32), parent_height=32)
    new34 = block_item(TAG, 34, block_hash(TAG, 34, 1), hash=block_hash(TAG, 34, 1), parent_hash=block_hash(TAG, 33, 1), parent_height=33)
    old = {int(i["height"]["N"]): i for i in chain if i["block_rid"]["S"] == "canonical" and "latest" not in i["block_pid"]["S"]}
    seed(dynamodb, block_table, [new33, {**new33, "block_rid": {"S": "canonical"}}, new34, {**new34, "block_rid": {"S": "canonical"}},
                                 {**new34, "block_pid": {"S": f"{TAG}-latest"}, "block_rid": {"S": "canonical"}}])
    story = [(REMOVED, old[34]), (REMOVED, old[33]), (ADDED, new33), (ADDED, new34)]
    seed(dynamodb, events_table, [event_item(layout, 36 + i, kind, block) for i, (kind, block) in enumerate(story)] + [watermark_item(layout, 39)])
    reorged = tick(instance, grown.cursor)
    assert planned(reorged) == [
        ("block_events", "000000000020-000000000040", "complete"),  # ids 36-39 complete it
        ("block_metadata", "000000000020-000000000030", "tip"),  # the tip is near its boundary
        ("block_metadata", "000000000030-000000000040", "tip"),
    ]
    execute(instance, reorged)
    winners = dict(target.execute(
        "SELECT cb.height, bm.hash FROM canonical_blocks cb JOIN block_metadata bm ON bm.id = cb.block_metadata_id WHERE cb.height >= 33"
    ).fetchall())
    assert winners == {33: block_hash(TAG, 33, 1), 34: block_hash(TAG, 34, 1)}
    assert target.execute("SELECT max(event_sequence) FROM block_events").fetchone()[0] == 39


def test_sensor_syncs_blocks_when_the_event_table_is_missing(instance, dynamodb, block_table, target, monkeypatch):
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_EVENT_TABLE", "no_such_events_table")
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 12)))
    result = tick(instance, None)
    assert planned(result) == [
        ("block_metadata", "000000000000-000000000010", "complete"),
        ("block_metadata", "000000000010-000000000020", "tip"),
    ]


def test_a_tip_run_still_running_is_not_asked_for_again_until_it_ends(instance, dynamodb, block_table, target, monkeypatch):
    """Each move of the tip asked for another run of the open range, however many were still queued:
    a backlog piled them up (132 in an hour), each reading the whole range again."""
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_EVENT_TABLE", "no_such_events_table")
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 12)))
    first = tick(instance, None)
    (tip,) = [r for r in first.run_requests if r.tags[SYNC_TAG] == "tip"]
    running = dg.DagsterRun(job_name="__ASSET_JOB", run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED,
                            tags={**tip.tags, "dagster/partition": tip.partition_key})
    instance.add_run(running)

    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 14)))  # the tip moves while that run goes on
    second = tick(instance, first.cursor)
    open_range = ("block_metadata", "000000000010-000000000020", "tip")
    assert planned(second) == [("block_metadata", "000000000000-000000000010", "tip")], (
        "the open range asked for again while its last tip run is still running (the range below is near the tip)")

    instance.report_run_failed(running)
    third = tick(instance, second.cursor)
    (asked,) = [r for r in third.run_requests if r.partition_key == open_range[1]]
    assert asked.tags[SYNC_TAG] == "tip" and asked.run_key.endswith("@13:" + block_hash(TAG, 13))


def test_a_malformed_block_watermark_stops_only_the_block_stream(instance, dynamodb, block_table, event_table, target,
                                                                 monkeypatch):
    """Before, the SourceDataError failed every tick of the sensor, and the event stream stopped with it."""
    monkeypatch.setenv("CHAIN_EVENT_RANGE_SIZE", "20")
    events_table, layout = event_table
    chain = [i for i in sample_chain(TAG, 0, 25, reorg_rate=0.0, skip_rate=0.0) if "latest" not in i["block_pid"]["S"]]
    seed(dynamodb, block_table, chain + [{**chain[-1], "block_pid": {"S": f"{TAG}-latest"}, "height": {"S": "24"}}])
    seed(dynamodb, events_table, list(chain_events(chain, layout))[:25] + [watermark_item(layout, 25)])
    result = tick(instance, None)
    assert planned(result) == [("block_events", "000000000000-000000000020", "complete"),
                               ("block_events", "000000000020-000000000040", "tip")]
