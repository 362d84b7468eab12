"""Settings of the blob migration as a Dagster resource, defaulting to BlobSettings (the environment),
so the UI shows the effective values. No secrets here: the passwords are stored encrypted in
blob_migrations and the key is read from MIGRATION_SECRET_KEY only where it is used."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.blobs.settings import BlobSettings
from migration_assets.blobs.transfer import TransferSettings
from migration_assets.core.settings import data_dir, settings_of

_ENV = settings_of(BlobSettings)


class BlobMigrationResource(dg.ConfigurableResource):
    work_dir: str | None = Field(
        default=str(_ENV.work_dir) if _ENV.work_dir else None,
        description="staging folder for blobs in flight (BLOB_WORK_DIR; default: {MIGRATION_DATA_DIR}/tmp/atproto-blobs)",
    )
    blob_attempts: int = Field(default=_ENV.attempts, description="tries per blob before it goes to failed_blobs")
    backoff_base_seconds: float = Field(
        default=_ENV.backoff_base_seconds, description="longest first wait between a blob's tries; doubles")
    backoff_cap_seconds: float = Field(default=_ENV.backoff_cap_seconds, description="longest wait between a blob's tries")
    progress_every: int = Field(default=_ENV.progress_every, description="write progress_data every N blobs")
    max_blob_bytes: int = Field(default=_ENV.max_blob_bytes, description="a bigger download is cut off; that blob fails")
    request_timeout_seconds: float = Field(
        default=_ENV.request_timeout_seconds, description="per XRPC request (connect, each read)")
    min_bytes_per_second: float = Field(
        default=_ENV.min_bytes_per_second,
        description="a blob's transfer may take the request deadline plus 1 s per this many bytes; slower, the try is cut")
    lease_seconds: float = Field(
        default=_ENV.lease_seconds, description="a run's hold on its account lapses this long after its last heartbeat")
    rate_limit: bool = Field(default=True, description="share the per-host request budget (ATPROTO_RATE_LIMIT)")

    def transfer_settings(self) -> TransferSettings:
        work_dir = Path(self.work_dir) if self.work_dir else data_dir() / "tmp" / "atproto-blobs"
        return TransferSettings(
            work_dir=work_dir, attempts=self.blob_attempts, backoff_base_seconds=self.backoff_base_seconds,
            backoff_cap_seconds=self.backoff_cap_seconds, progress_every=self.progress_every,
            max_blob_bytes=self.max_blob_bytes, min_bytes_per_second=self.min_bytes_per_second,
        )

    def limiter(self, database_url: str) -> HostRateLimiter | None:
        return HostRateLimiter(database_url) if self.rate_limit else None
