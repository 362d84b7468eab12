"""The file pipeline's configuration as a Dagster resource, and its S3 resource (dagster-aws's S3Resource)."""

from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from migration_assets.files.settings import FilesSettings


class FilesResource(dg.ConfigurableResource):
    """Where files come from and go. Unset fields come from the environment (FILES_*, see README)."""

    source_root: str | None = Field(default=None, description="defaults to FILES_SOURCE_ROOT")
    bucket: str | None = Field(default=None, description="defaults to FILES_S3_BUCKET")
    prefix: str | None = Field(default=None, description="defaults to FILES_S3_PREFIX")
    concurrency: int | None = Field(default=None, description="uploads in flight per run (FILES_CONCURRENCY, 8)")
    run_window_enabled: bool | None = Field(default=None, description="defaults to FILES_RUN_WINDOW_ENABLED")
    run_window_start: str | None = Field(default=None, description="HH:MM, defaults to FILES_RUN_WINDOW_START")
    run_window_end: str | None = Field(default=None, description="HH:MM, defaults to FILES_RUN_WINDOW_END")
    run_window_weekends: bool | None = Field(default=None, description="defaults to FILES_RUN_WINDOW_WEEKENDS")
    run_window_tz: str | None = Field(default=None, description="defaults to FILES_RUN_WINDOW_TZ")

    def settings(self) -> FilesSettings:
        """The environment's settings, with any field set here (e.g. in a run's launchpad config, to
        move one run's window) taking its place."""
        overrides = {
            "source_root": self.source_root, "bucket": self.bucket, "prefix": self.prefix,
            "concurrency": self.concurrency, "run_window_enabled": self.run_window_enabled,
            "run_window_start": self.run_window_start, "run_window_end": self.run_window_end,
            "run_window_weekends": self.run_window_weekends, "run_window_tz": self.run_window_tz,
        }
        return FilesSettings.from_env(**{k: v for k, v in overrides.items() if v is not None})


class FilesS3Resource(S3Resource):
    """dagster-aws's S3Resource (same fields, same AWS_* defaults), for the file assets: they build
    their own tuned client from it (files/s3client.py). Dagster would otherwise build a plain client
    for every run's context that nothing uses (0.1-0.3 s a run: a boto3 session loading the S3 model)."""

    def get_object_to_set_on_execution_context(self) -> Any:
        return self
