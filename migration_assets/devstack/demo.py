"""`migration-assets dev`: the project on embedded defaults with demo data.

Embedded PostgreSQL (target and Dagster storage); a dynalite DynamoDB-API server seeded with a
sample chain (reorgs, skipped blocks), its block ranges registered as partitions; a local S3-API server
(SeaweedFS) and sample files listed in `source_files`, their ranges registered; a PLC directory and
two reference PDSes with accounts to backfill and accounts whose blobs wait to move; then `dagster dev`
(webserver and daemon) on the project's workspace, with the AT Protocol sensors turned on.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import httpx

from migration_assets.chain.event_source import EventLayout, max_event_id
from migration_assets.chain.partitions import block_ranges, event_ranges, register_ranges
from migration_assets.chain.settings import ChainSettings
from migration_assets.chain.source import latest_height
from migration_assets.core import embedded
from migration_assets.core.instance import project_instance
from migration_assets.core.settings import PROJECT_ROOT, data_dir
from migration_assets.devstack import demo_atproto, demo_files
from migration_assets.devstack.sample_chain import create_block_table, sample_chain, write_items
from migration_assets.devstack.sample_events import chain_events, create_event_table
from migration_assets.devstack.servers import LocalServer, local_aws_environment, start_dynalite


def add_commands(commands: argparse._SubParsersAction) -> None:
    dev = commands.add_parser("dev", help="start the demo: embedded services, sample data, Dagster UI")
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    dev.add_argument("--heights", type=int, default=30_000, help="sample chain length (default 30000)")
    dev.add_argument("--dynamodb-port", type=int, default=8765, help="local DynamoDB-API port")
    dev.add_argument("--repo-accounts", type=int, default=20, help="accounts with records to backfill (default 20)")
    dev.add_argument("--blob-accounts", type=int, default=3, help="accounts whose blobs wait to move (default 3)")
    dev.add_argument("--files", type=int, default=300, help="sample files to copy to S3 (default 300)")
    dev.set_defaults(handler=dev_command)


def seed_chain(heights: int) -> tuple[int, int]:
    """Create and fill the block and event tables unless they hold a watermark; return their tips."""
    settings = ChainSettings.from_env()
    client = boto3.client("dynamodb")
    layout = EventLayout(settings.event_tag)
    tables = client.list_tables()["TableNames"]
    if settings.block_table not in tables:
        create_block_table(client, settings.block_table)
    if settings.event_table not in tables:
        create_event_table(client, settings.event_table, layout)
    if latest_height(client, settings.block_table, settings.block_tag) is None:
        print(f"seeding {settings.block_table} and {settings.event_table} with {heights} heights ...")
        blocks = list(sample_chain(settings.block_tag, 0, heights))
        write_items(client, settings.block_table, blocks)
        write_items(client, settings.event_table, chain_events(blocks, layout))
    block_tip = latest_height(client, settings.block_table, settings.block_tag)
    return block_tip, max_event_id(client, settings.event_table, layout)


def start_local_sources(args: argparse.Namespace) -> list[LocalServer]:
    servers = []
    if not os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"):
        dynamo = start_dynalite(args.dynamodb_port, log_path=data_dir() / "dynalite.log")
        servers.append(dynamo)
        os.environ.update(local_aws_environment(dynamo.url))
        print(f"local DynamoDB-API server (dynalite) at {dynamo.url}")
    return servers


SERVERS_FILE = "demo-servers.json"  # every server the demo started, for tests that check they stop
DEMO_SENSORS = ("repo_sync", "repo_follow", "atproto_blob_requests")
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}"""


def turn_on_sensors(url: str, names: tuple[str, ...], timeout: float = 300) -> None:
    """Once the webserver answers, turn the demo's sensors on through the API the UI uses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for name in names:
                selector = {"repositoryLocationName": "migration_assets", "repositoryName": "__repository__",
                            "sensorName": name}
                reply = httpx.post(f"{url}/graphql", json={"query": START_SENSOR, "variables": {"selector": selector}},
                                   timeout=30).json()
                if reply.get("errors") or reply["data"]["startSensor"]["__typename"] == "PythonError":
                    raise RuntimeError(reply)
            print(f"sensors on: {', '.join(names)}")
            return
        except (httpx.HTTPError, RuntimeError, KeyError, TypeError):
            time.sleep(2)
    print(f"warning: could not turn on {', '.join(names)}; turn them on in the UI (Automation page)")


def dev_command(args: argparse.Namespace) -> int:
    data_dir().mkdir(parents=True, exist_ok=True)
    instance = project_instance()
    servers = start_local_sources(args)
    try:
        s3 = demo_files.start_s3()
        if s3:
            servers.append(s3)
        print(demo_files.seed(args.files))
        network = demo_atproto.start_network()
        servers.append(network.server)
        print(f"PLC directory at {network.plc_url}, PDSes at {', '.join(p.url for p in network.pdses)}")
        atproto = demo_atproto.seed(network, args.repo_accounts, args.blob_accounts)
        print(atproto["forgotten"])
        print(f"{len(atproto['repo_dids'])} accounts to backfill (repo_sync sensor) and "
              "follow (repo_follow sensor: one atproto/repo_stream run at a time), "
              f"{len(atproto['blob_migration_dids'])} blob migrations queued (atproto_blob_requests sensor)")
        block_tip, event_tip = seed_chain(args.heights)
        settings = ChainSettings.from_env()
        blocks = register_ranges(instance, block_ranges, 0, block_tip + 1, settings.block_range_size)
        events = register_ranges(instance, event_ranges, 0, event_tip + 1, settings.event_range_size)
        print(f"heights 0-{block_tip} in {len(blocks)} block ranges, events 1-{event_tip} in {len(events)} "
              "event ranges: ready to backfill in the UI (blocks first), or turn on the chain_sync sensor")
        print(f"Dagster UI: http://127.0.0.1:{args.port} (Ctrl-C stops everything)")
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                   "-p", str(args.port)]
        dagster = subprocess.Popen(command, cwd=os.environ["DAGSTER_HOME"], start_new_session=True)
        servers.append(LocalServer("dagster dev", f"http://127.0.0.1:{args.port}", dagster, own_group=True))
        (data_dir() / SERVERS_FILE).write_text(json.dumps({server.name: server.url for server in servers}))
        threading.Thread(target=turn_on_sensors, args=(f"http://127.0.0.1:{args.port}", DEMO_SENSORS),
                         daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the children on SIGTERM too
        return dagster.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for server in reversed(servers):
            server.stop()
        if not os.environ.get("MIGRATION_DATABASE_URL"):
            embedded.stop_embedded_server()  # the demo's own PostgreSQL; its data stays for next time
