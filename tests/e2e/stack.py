"""The README's demo command as a test fixture: embedded PostgreSQL, dynalite and `dagster dev`
(webserver and daemon as separate processes), driven through Dagster's GraphQL API like the UI."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx

from migration_assets.devstack.demo_atproto import DEMO_FILE
from migration_assets.devstack.servers import free_port, local_aws_environment

LOCATION = "migration_assets"
REPOSITORY = "__repository__"


@dataclass
class Stack:
    url: str
    dynamodb_url: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path

    def graphql(self, query: str, **variables) -> dict:
        reply = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
        assert "errors" not in reply, reply["errors"]
        return reply["data"]

    def dynamodb(self):
        env = local_aws_environment(self.dynamodb_url)
        return boto3.client(
            "dynamodb", endpoint_url=self.dynamodb_url, region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def atproto(self) -> dict:
        """What the demo seeded on its AT Protocol network (devstack/demo_atproto.py)."""
        return json.loads((self.data_dir / DEMO_FILE).read_text())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_stack(
    tmp_path: Path, heights: int, extra_env: dict[str, str] | None = None, args: list[str] | None = None
) -> Stack:
    port, dynamodb_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAGSTER_", "MIGRATION_", "CHAIN_"))}
    env.update({"MIGRATION_DATA_DIR": str(tmp_path / "data"), **(extra_env or {})})
    command = [sys.executable, "-m", "migration_assets.cli", "dev", "--port", str(port), "--heights", str(heights),
               "--dynamodb-port", str(dynamodb_port), *(args or [])]
    log_path = tmp_path / "demo.log"
    process = subprocess.Popen(command, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    stack = Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dynamodb_port}", process, log_path, tmp_path / "data")
    wait_until(lambda: asset_nodes(stack), 240, "the Dagster UI to serve the assets", stack)
    return stack


def stop_stack(stack: Stack) -> None:
    stack.process.send_signal(signal.SIGTERM)
    stack.process.wait(timeout=60)


def asset_nodes(stack: Stack) -> list:
    assert stack.process.poll() is None, f"the demo exited with {stack.process.returncode}:\n{stack.log_tail()}"
    try:
        return stack.graphql("{ assetNodes { assetKey { path } partitionKeys } }")["assetNodes"]
    except (httpx.HTTPError, ValueError):
        return []


def wait_until(condition, timeout: float, what: str, stack: Stack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}; demo log:\n{stack.log_tail()}")


def port_closed(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return False
    except httpx.TransportError:
        return True
