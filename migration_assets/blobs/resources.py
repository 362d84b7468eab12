"""Settings of the blob migration as a Dagster resource (no secrets here: the passwords are stored
encrypted in blob_migrations, the key comes from MIGRATION_SECRET_KEY)."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.blobs.transfer import TransferSettings
from migration_assets.core.settings import data_dir


class BlobMigrationResource(dg.ConfigurableResource):
    work_dir: str | None = Field(
        default=None, description="staging folder for blobs in flight (default: {MIGRATION_DATA_DIR}/tmp/atproto-blobs)"
    )
    blob_attempts: int = Field(default=3, description="tries per blob before it goes to failed_blobs")
    backoff_base_seconds: float = Field(default=2.0, description="wait between a blob's tries: 2 s, 4 s, ...")
    progress_every: int = Field(default=10, description="write progress_data every N blobs")
    job_retries: int = Field(default=3, description="retries of a whole account before it is marked failed")
    job_retry_delay_seconds: float = Field(default=30.0, description="first wait before retrying an account; doubles")
    request_timeout_seconds: float = Field(default=120.0, description="per XRPC request (connect, each read)")
    rate_limit: bool = Field(default=True, description="share the per-host request budget (ATPROTO_RATE_LIMIT)")

    def transfer_settings(self) -> TransferSettings:
        work_dir = Path(self.work_dir) if self.work_dir else data_dir() / "tmp" / "atproto-blobs"
        return TransferSettings(
            work_dir=work_dir, attempts=self.blob_attempts, backoff_base_seconds=self.backoff_base_seconds,
            progress_every=self.progress_every,
        )

    def limiter(self, database_url: str) -> HostRateLimiter | None:
        return HostRateLimiter(database_url) if self.rate_limit else None

    def retry_delay(self, retry_number: int) -> float:
        return self.job_retry_delay_seconds * 2**retry_number
