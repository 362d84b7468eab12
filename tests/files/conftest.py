"""The file pipeline's test rig: a moto S3 server on loopback (session), a bucket and a source folder
per test, and the FILES_* environment pointing at them (run window disabled unless a test says)."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from dagster_aws.s3 import S3Resource

from migration_assets.core.postgres import shared_pool
from migration_assets.devstack.servers import local_aws_environment, start_moto_s3
from migration_assets.files.mover import S3Target
from migration_assets.files.s3client import copy_client
from migration_assets.files.settings import FilesSettings
from migration_assets.files.worker import RangeJob


def serve_s3(server) -> Iterator[str]:
    """Export a local S3-API server as the AWS environment while a fixture lasts, then stop it."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in local_aws_environment(s3_url=server.url).items():
            mp.setenv(name, value)
        mp.delenv("AWS_CA_BUNDLE", raising=False)
        yield server.url
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[str]:
    yield from serve_s3(start_moto_s3(log_path=tmp_path_factory.mktemp("logs") / "moto.log"))


def s3_client(endpoint: str | None = None):
    """One attempt per request, so injected failures reach the pipeline instead of boto's retries."""
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1, "mode": "standard"},
                                                                   max_pool_connections=16))


@pytest.fixture
def s3(moto_s3):
    return s3_client()


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    name = f"files-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    monkeypatch.setenv("FILES_S3_BUCKET", name)
    return name


@pytest.fixture
def source_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "source"
    root.mkdir()
    monkeypatch.setenv("FILES_SOURCE_ROOT", str(root))
    return root


@pytest.fixture
def files_env(target_url, bucket, source_root, monkeypatch) -> FilesSettings:
    """Everything a file test needs; small parts (5 MiB, S3's minimum) so multipart stays cheap."""
    monkeypatch.setenv("FILES_S3_PREFIX", "archive")
    monkeypatch.setenv("FILES_RUN_WINDOW_ENABLED", "false")
    monkeypatch.setenv("FILES_HEARTBEAT_SECONDS", "0.2")
    monkeypatch.setenv("FILES_MULTIPART_THRESHOLD_MB", "5")
    monkeypatch.setenv("FILES_PART_SIZE_MB", "5")
    monkeypatch.setenv("FILES_RANGE_SIZE", "100")
    monkeypatch.setenv("FILES_CONCURRENCY", "4")
    return FilesSettings.from_env()


def make_job(settings: FilesSettings, target_url: str, endpoint: str | None = None, window_stop=lambda: None) -> RangeJob:
    """The pipeline's own tuned client (one attempt per request, so injected failures reach the pipeline)."""
    client = copy_client(S3Resource(endpoint_url=endpoint, max_attempts=1), settings.concurrency)
    return RangeJob(shared_pool(target_url), S3Target(client, settings.bucket, settings.key_prefix),
                    settings, window_stop)
