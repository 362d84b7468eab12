"""The file pipeline's configuration as a Dagster resource, and its S3 resource (dagster-aws's S3Resource)."""

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from migration_assets.files.settings import FilesSettings


class FilesResource(dg.ConfigurableResource):
    """Where files come from and go. Fields left unset take the FILES_* settings when the resource is
    built, so the UI shows the values in force; a run's launchpad config can set any of them (e.g. to
    move one run's window), validated like the environment."""

    source_root: str = Field(description="FILES_SOURCE_ROOT")
    bucket: str = Field(description="FILES_S3_BUCKET")
    prefix: str = Field(description="FILES_S3_PREFIX")
    concurrency: int = Field(description="uploads in flight per run (FILES_CONCURRENCY)")
    run_window_enabled: bool = Field(description="FILES_RUN_WINDOW_ENABLED")
    run_window_start: str = Field(description="HH:MM (FILES_RUN_WINDOW_START)")
    run_window_end: str = Field(description="HH:MM (FILES_RUN_WINDOW_END)")
    run_window_weekends: bool = Field(description="FILES_RUN_WINDOW_WEEKENDS")
    run_window_tz: str = Field(description="FILES_RUN_WINDOW_TZ")

    def __init__(self, **config: Any):
        env = FilesSettings.load().model_dump(include=set(_FROM_SETTINGS))
        defaults = {name: _as_config(value) for name, value in env.items()}
        super().__init__(**defaults | {name: value for name, value in config.items() if value is not None})

    def settings(self) -> FilesSettings:
        """The environment's settings with this resource's values in their place."""
        return FilesSettings.from_env(**{name: getattr(self, name) for name in _FROM_SETTINGS})


# Resource fields whose defaults are the FILES_* settings of the same name.
_FROM_SETTINGS = ("source_root", "bucket", "prefix", "concurrency", "run_window_enabled", "run_window_start",
                  "run_window_end", "run_window_weekends", "run_window_tz")


def _as_config(value: Any) -> Any:
    """A setting as run config holds it: paths as text, clock times as HH:MM."""
    if hasattr(value, "strftime"):
        return value.strftime("%H:%M")
    return str(value) if isinstance(value, Path) else value


class FilesS3Resource(S3Resource):
    """dagster-aws's S3Resource (same fields, same AWS_* defaults), for the file assets: they build
    their own tuned client from it (files/s3client.py). Dagster would otherwise build a plain client
    for every run's context that nothing uses (0.1-0.3 s a run: a boto3 session loading the S3 model)."""

    def get_object_to_set_on_execution_context(self) -> Any:
        return self
