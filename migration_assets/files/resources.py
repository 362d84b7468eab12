"""The file pipeline's configuration as a Dagster resource; the S3 client is dagster-aws's S3Resource."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from migration_assets.files.settings import FilesSettings


class FilesResource(dg.ConfigurableResource):
    """Where files come from and go. Unset fields come from the environment (FILES_*, see README)."""

    source_root: str | None = Field(default=None, description="defaults to FILES_SOURCE_ROOT")
    bucket: str | None = Field(default=None, description="defaults to FILES_S3_BUCKET")
    prefix: str | None = Field(default=None, description="defaults to FILES_S3_PREFIX")
    concurrency: int | None = Field(default=None, description="uploads in flight per run (FILES_CONCURRENCY, 8)")

    def settings(self) -> FilesSettings:
        env = FilesSettings.from_env()
        overrides = {
            "source_root": Path(self.source_root).resolve() if self.source_root else None,
            "bucket": self.bucket, "prefix": self.prefix, "concurrency": self.concurrency,
        }
        return env.model_copy(update={k: v for k, v in overrides.items() if v is not None})
