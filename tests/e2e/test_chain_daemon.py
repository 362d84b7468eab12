"""The chain pipeline the way users work it: a partition backfill launched through the UI's GraphQL
API and run by the daemon, its asset-check results read back per partition, and the sync sensor
discovering new ranges as the source grows."""

import psycopg

from migration_assets.chain.event_source import EventLayout
from migration_assets.core.embedded import TARGET_DATABASE
from migration_assets.devstack.sample_chain import sample_chain, write_items
from migration_assets.devstack.sample_events import chain_events
from tests.e2e.stack import LOCATION, REPOSITORY, wait_until

BLOCK_KEYS = ["000000000000-000000010000", "000000010000-000000020000", "000000020000-000000030000"]
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"""
CHECK_EXECUTIONS = """
query($asset: AssetKeyInput!, $check: String!, $partition: String) {
  assetCheckExecutions(assetKey: $asset, checkName: $check, partition: $partition, limit: 1) {
    status partition evaluation { success severity description }
  }
}"""
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on Sensor { sensorState { status } } }
}"""
RUNS = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { status tags { key value } } } }
}"""


def backfill(stack, asset_path, keys) -> None:
    params = {"partitionNames": keys, "assetSelection": [{"path": asset_path}], "fromFailure": False}
    launched = stack.graphql(LAUNCH_BACKFILL, params=params)["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched

    def finished():
        status = stack.graphql(BACKFILL_STATUS, id=launched["backfillId"])["partitionBackfillOrError"]["status"]
        return status if status != "REQUESTED" else None

    assert wait_until(finished, 420, f"the backfill of {asset_path}", stack) in ("COMPLETED", "COMPLETED_SUCCESS"), stack.log_tail()


def demo_target(stack) -> psycopg.Connection:
    """The demo's own target database, on its embedded PostgreSQL (socket and port from postmaster.pid)."""
    postmaster = (stack.data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    port, socket_dir = postmaster[3], postmaster[4]
    return psycopg.connect(host=socket_dir, port=port, user="postgres", dbname=TARGET_DATABASE, autocommit=True)


def scan(stack, table: str) -> list[dict]:
    client, request, items = stack.dynamodb(), {"TableName": table, "ConsistentRead": True}, []
    while True:
        page = client.scan(**request)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def source_chain(stack) -> tuple[dict, dict]:
    """From the demo's DynamoDB: height -> (hash or None when skipped) of each canonical block, and
    event id -> (type, height, block hash or None) of each event."""
    canonical = {
        int(i["height"]["N"]): None if i["skipped"]["BOOL"] else i["block_hash"]["S"]
        for i in scan(stack, "chain_blocks")
        if i["block_rid"]["S"] == "canonical" and not i["block_pid"]["S"].endswith("-latest")
    }
    types = {"0": "UNKNOWN", "1": "BLOCK_ADDED", "2": "BLOCK_REMOVED"}
    events = {
        int(i["sequence"]["N"]): (types[i["type"]["N"]], int(i["height"]["N"]), None if i["skipped"]["BOOL"] else i["hash"]["S"])
        for i in scan(stack, "chain_events") if int(i["event_id"]["N"]) > 0  # -1: the watermark
    }
    return canonical, events


def target_chain(conn) -> tuple[dict, dict]:
    """The same, from the demo's PostgreSQL: each row joined to the block it points at."""
    canonical = dict(conn.execute(
        "SELECT cb.height, bm.hash FROM canonical_blocks cb JOIN block_metadata bm ON bm.id = cb.block_metadata_id"
        " WHERE cb.tag = 1 AND bm.height = cb.height"
    ).fetchall())
    events = {
        seq: (kind, height, block_hash)
        for seq, kind, height, block_hash in conn.execute(
            "SELECT e.event_sequence, e.event_type::text, bm.height, bm.hash FROM block_events e"
            " JOIN block_metadata bm ON bm.id = e.block_metadata_id WHERE e.event_tag = 0 AND bm.height = e.height"
        )
    }
    return canonical, events


def assert_target_matches_source(conn, source: tuple[dict, dict]) -> None:
    (source_blocks, source_events), (blocks, events) = source, target_chain(conn)
    assert len(blocks) == len(source_blocks) and blocks.keys() == source_blocks.keys()
    assert blocks == source_blocks, [h for h in source_blocks if blocks.get(h) != source_blocks[h]][:10]
    assert len(events) == len(source_events) and events.keys() == source_events.keys()
    assert events == source_events, [i for i in source_events if events.get(i) != source_events[i]][:10]


def latest_check(stack, asset_path, check, partition) -> dict:
    [execution] = stack.graphql(CHECK_EXECUTIONS, asset={"path": asset_path}, check=check, partition=partition)["assetCheckExecutions"]
    return execution


def test_backfill_through_the_ui_api_then_read_the_check_results(stack):
    backfill(stack, ["chain", "block_metadata"], BLOCK_KEYS)
    for key in BLOCK_KEYS:
        for check in ("block_rows_match_source", "canonical_rows_match_source", "canonical_rows_resolve"):
            execution = latest_check(stack, ["chain", "block_metadata"], check, key)
            assert execution["status"] == "SUCCEEDED" and execution["evaluation"]["success"], (key, check, execution)
            assert execution["partition"] == key

    backfill(stack, ["chain", "block_events"], ["000000000000-000000100000"])
    execution = latest_check(stack, ["chain", "block_events"], "event_rows_match_source", "000000000000-000000100000")
    assert execution["evaluation"]["success"] and "events, as in the source" in execution["evaluation"]["description"]

    source = source_chain(stack)
    assert len(source[0]) == 25_000 and len(source[1]) >= 25_000
    with demo_target(stack) as conn:
        assert_target_matches_source(conn, source)


def sensor_runs(stack) -> set[tuple[str, str, str]]:
    runs = stack.graphql(RUNS, filter={"tags": [{"key": "dagster/sensor_name", "value": "chain_sync"}]})["runsOrError"]["results"]
    found = set()
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        found.add((tags.get("dagster/partition", ""), tags.get("migration-assets/sync", ""), run["status"]))
    return found


def test_the_sync_sensor_discovers_new_ranges_as_the_source_grows(stack):
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": "chain_sync"}
    started = stack.graphql(START_SENSOR, selector=selector)["startSensor"]
    assert started["sensorState"]["status"] == "RUNNING", started
    wait_until(lambda: ("000000020000-000000030000", "tip", "SUCCESS") in sensor_runs(stack), 300,
               "the sensor's first tip run", stack)

    # The chain grows by 10,000 heights: [20000, 30000) completes, [30000, 40000) opens.
    client = stack.dynamodb()
    chain = list(sample_chain(1, 0, 35_000))
    write_items(client, "chain_blocks", (i for i in chain if i["block_pid"]["S"].endswith("latest") or int(i["height"]["N"]) >= 25_000))
    events = list(chain_events(chain, EventLayout(0)))  # the same ids as the demo's for heights < 25,000
    watermark = EventLayout(0).watermark_key()  # at height 0, as chainstorage writes it: always rewritten
    write_items(client, "chain_events", (e for e in events
                                         if int(e["height"]["N"]) >= 25_000 or e["event_id"] == watermark["event_id"]))

    def grown():
        runs = sensor_runs(stack)
        return {("000000020000-000000030000", "complete", "SUCCESS"), ("000000030000-000000040000", "tip", "SUCCESS")} <= runs

    wait_until(grown, 420, "the sensor's runs for the new ranges", stack)
    source = source_chain(stack)
    assert len(source[0]) == 35_000
    with demo_target(stack) as conn:
        # The tip event range is re-run for the new watermark after the block runs: wait for it.
        wait_until(lambda: target_chain(conn) == source, 300, "PostgreSQL to hold the grown chain", stack)
        assert_target_matches_source(conn, source)
    partitions = {n["assetKey"]["path"][-1]: n["partitionKeys"] for n in stack.graphql("{ assetNodes { assetKey { path } partitionKeys } }")["assetNodes"]}
    assert "000000030000-000000040000" in partitions["block_metadata"]
    assert not any(status == "FAILURE" for _, _, status in sensor_runs(stack))
