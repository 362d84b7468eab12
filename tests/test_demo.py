"""README's demo command brings up the UI with every pipeline's assets, on embedded PostgreSQL, its own
local DynamoDB-API server and AT Protocol network; SIGTERM stops everything it started."""

import json

from migration_assets.devstack.demo import SERVERS_FILE
from tests.e2e.stack import asset_nodes, port_closed, start_stack, stop_stack, wait_until


def test_demo_serves_every_pipeline_and_stops_cleanly(tmp_path):
    stack = start_stack(tmp_path, heights=25_000, args=["--repo-accounts", "2", "--blob-accounts", "1"])
    try:
        partitions = {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in asset_nodes(stack)}
        assert partitions["chain/block_metadata"] == [
            "000000000000-000000010000", "000000010000-000000020000", "000000020000-000000030000"
        ]
        assert partitions["chain/block_events"] == ["000000000000-000000100000"]
        assert len(partitions["atproto/repos"]) == 256
        assert {"atproto/repo_ledger", "atproto/blobs", "status/migration_status"} <= set(partitions)
        atproto = stack.atproto()
        assert len(atproto["repo_dids"]) == 2 and len(atproto["blob_migration_dids"]) == 1
        assert len(partitions["files/copied_files"]) == 4  # ids 1-300 in ranges of 100 aligned at 0
        servers = json.loads((stack.data_dir / SERVERS_FILE).read_text())
        assert {"dynalite", "moto S3", "atproto-network", "dagster dev"} <= set(servers), servers
    finally:
        stop_stack(stack)
    servers = [*servers.values(), atproto["plc"], *atproto["pdses"]]
    wait_until(lambda: all(port_closed(url) for url in servers), 30, "the demo to stop", stack)
