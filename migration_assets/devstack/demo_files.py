"""The demo's file side: a local S3-API server (SeaweedFS, its data under MIGRATION_DATA_DIR) with the
target bucket, and sample files on disk listed in `source_files`, expanded into ranges that show as
partitions of `files/copied_files`."""

import os

import boto3

from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import data_dir
from migration_assets.devstack.servers import LocalServer, start_seaweedfs
from migration_assets.files import store
from migration_assets.files.partitions import register_ranges
from migration_assets.files.seed import seed_files
from migration_assets.files.settings import FilesSettings

DEMO_RANGE_SIZE = "100"  # a few ranges to backfill from 300 files


def start_s3() -> LocalServer | None:
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        return None  # the user's own S3(-API) endpoint
    # On disk, so copies made in one demo session are still there, as recorded, in the next.
    server = start_seaweedfs(data_dir() / "seaweedfs", log_path=data_dir() / "seaweedfs.log")
    os.environ["AWS_ENDPOINT_URL_S3"] = server.url  # credentials: the dynalite ones (local_aws_environment)
    return server


def seed(files: int) -> str:
    """Files, bucket, ranges and partitions (idempotent). Returns a line for the console."""
    os.environ.setdefault("FILES_RANGE_SIZE", DEMO_RANGE_SIZE)
    window_variables = ("FILES_RUN_WINDOW_ENABLED", "FILES_RUN_WINDOW_START", "FILES_RUN_WINDOW_END",
                        "FILES_RUN_WINDOW_WEEKENDS", "FILES_RUN_WINDOW_TZ")
    if not any(name in os.environ for name in window_variables):
        # Daytime demos would sit outside the nightly window; the window's behaviour is shown by
        # setting FILES_RUN_WINDOW_* (or a run's `files` resource config) instead.
        os.environ["FILES_RUN_WINDOW_ENABLED"] = "false"
    settings = FilesSettings.from_env()
    s3 = boto3.client("s3")
    if settings.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=settings.bucket)
    with PostgresResource().connection() as conn:
        if conn.execute("SELECT count(*) FROM source_files").fetchone()[0] == 0:
            settings.source_root.mkdir(parents=True, exist_ok=True)
            seed_files(conn, settings.source_root, files, sizes=(4 * 1024, 64 * 1024, 1024 * 1024))
        store.expand_ranges(conn, settings.range_size)
        ranges = store.all_ranges(conn)
        conn.commit()
    register_ranges(project_instance(), [(lo, hi) for lo, hi, _ in ranges])
    window = "run window off (FILES_RUN_WINDOW_ENABLED)" if not settings.window.enabled else "run window on"
    return (f"{files} files under {settings.source_root} in {len(ranges)} ranges to copy to "
            f"s3://{settings.bucket}/ at {os.environ['AWS_ENDPOINT_URL_S3']} ({window})")
