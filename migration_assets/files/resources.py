"""The file pipeline's configuration as a Dagster resource, and its S3 resource (dagster-aws's S3Resource)."""

from datetime import time
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from migration_assets.files.settings import FilesSettings


class FilesResource(dg.ConfigurableResource):
    """Where files come from and go. A field left unset takes its FILES_* value when the resource is
    built (at definitions load, and again in each run), so the UI shows the values in force. The fields
    stay optional in the config schema: a run's launchpad config may set only some (e.g. to move one
    run's window), the others keep the environment's values."""

    source_root: str | None = Field(default=None, description="FILES_SOURCE_ROOT")
    bucket: str | None = Field(default=None, description="FILES_S3_BUCKET")
    prefix: str | None = Field(default=None, description="FILES_S3_PREFIX")
    concurrency: int | None = Field(default=None, description="uploads in flight per run (FILES_CONCURRENCY)")
    run_window_enabled: bool | None = Field(default=None, description="FILES_RUN_WINDOW_ENABLED")
    run_window_start: str | None = Field(default=None, description="HH:MM (FILES_RUN_WINDOW_START)")
    run_window_end: str | None = Field(default=None, description="HH:MM (FILES_RUN_WINDOW_END)")
    run_window_weekends: bool | None = Field(default=None, description="FILES_RUN_WINDOW_WEEKENDS")
    run_window_tz: str | None = Field(default=None, description="FILES_RUN_WINDOW_TZ")

    def __init__(self, **config: Any):
        # Dagster shows the built resource's values as its config defaults (the launchpad and the
        # Resources page); Field defaults from the environment would be frozen at import instead.
        env = FilesSettings.load().model_dump(include=set(_FROM_SETTINGS))
        given = {name: value for name, value in config.items() if value is not None}
        super().__init__(**{name: _as_config(value) for name, value in env.items()} | given)

    def settings(self) -> FilesSettings:
        """The environment's settings with this resource's values in their place (validated alike)."""
        return FilesSettings.from_env(**{name: getattr(self, name) for name in _FROM_SETTINGS})


# Resource fields whose values are the FILES_* settings of the same name unless set.
_FROM_SETTINGS = ("source_root", "bucket", "prefix", "concurrency", "run_window_enabled", "run_window_start",
                  "run_window_end", "run_window_weekends", "run_window_tz")


def _as_config(value: Any) -> Any:
    """A setting as run config holds it: paths as text, clock times as HH:MM."""
    if isinstance(value, time):
        return value.strftime("%H:%M")
    return str(value) if isinstance(value, Path) else value


class FilesS3Resource(S3Resource):
    """dagster-aws's S3Resource (same fields, same AWS_* defaults), for the file assets: they build
    their own tuned client from it (files/s3client.py). Dagster would otherwise build a plain client
    for every run's context that nothing uses (0.1-0.3 s a run: a boto3 session loading the S3 model)."""

    def get_object_to_set_on_execution_context(self) -> Any:
        return self
