"""The file pipeline's configuration as a Dagster resource, and its S3 resource (dagster-aws's S3Resource)."""

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from migration_assets.files.settings import FilesSettings, WindowSettings, parse_clock


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
        env = FilesSettings.from_env()
        overrides = {
            "source_root": Path(self.source_root).resolve() if self.source_root else None,
            "bucket": self.bucket, "prefix": self.prefix, "concurrency": self.concurrency,
        }
        settings = env.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        return settings.model_copy(update={"window": self.window(settings.window)})

    def window(self, base: WindowSettings) -> WindowSettings:
        """The window of this run: the environment's, with any field set here (e.g. in a run's
        launchpad config, to move one run's window) taking its place."""
        overrides = {
            "enabled": self.run_window_enabled,
            "start": parse_clock(self.run_window_start, "run_window_start") if self.run_window_start else None,
            "end": parse_clock(self.run_window_end, "run_window_end") if self.run_window_end else None,
            "weekends": self.run_window_weekends,
            "tz": self.run_window_tz,
        }
        return WindowSettings.model_validate(base.model_dump() | {k: v for k, v in overrides.items() if v is not None})


class FilesS3Resource(S3Resource):
    """dagster-aws's S3Resource (same fields, same AWS_* defaults), for the file assets: they build
    their own tuned client from it (files/s3client.py). Dagster would otherwise build a plain client
    for every run's context that nothing uses (0.1-0.3 s a run: a boto3 session loading the S3 model)."""

    def get_object_to_set_on_execution_context(self) -> Any:
        return self
