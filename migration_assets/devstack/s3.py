"""A local S3-API server (moto) on loopback, for tests, benches and the demo."""

import sys
from pathlib import Path
import subprocess

from migration_assets.devstack.servers import LocalServer, free_port, wait_until_listening


def start_moto_s3(port: int | None = None, log_path: Path | None = None) -> LocalServer:
    """`python -m moto.server` (moto[server] is a dev dependency): every bucket lives in its memory."""
    port = port or free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = LocalServer("moto S3", f"http://127.0.0.1:{port}", process)
    wait_until_listening(server)
    return server


def local_s3_environment(s3_url: str) -> dict[str, str]:
    """Environment for boto3 to talk to the local server with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL_S3": s3_url,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
