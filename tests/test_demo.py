"""README's demo command brings up the UI with the chain assets and their partitions, on embedded
PostgreSQL and its own local DynamoDB-API server; SIGTERM stops everything it started."""

from tests.e2e.stack import asset_nodes, port_closed, start_stack, stop_stack, wait_until


def test_demo_serves_the_chain_assets_ready_to_backfill(tmp_path):
    stack = start_stack(tmp_path, heights=25_000)
    try:
        partitions = {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in asset_nodes(stack)}
        assert partitions["chain/block_metadata"] == [
            "000000000000-000000010000", "000000010000-000000020000", "000000020000-000000030000"
        ]
        assert partitions["chain/block_events"] == ["000000000000-000000100000"]
    finally:
        stop_stack(stack)
    wait_until(lambda: port_closed(stack.dynamodb_url) and port_closed(stack.url), 30, "the demo to stop", stack)
